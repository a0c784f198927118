"""``fsl-bench data``: prepare (decode to the uint8 cache), verify (report), make-split; and ``fsl-bench perf data``
(archive vs cache loading time; ``fsl-bench data bench`` is its deprecated former name)."""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any, Dict

import click

from ..bounds import COUNT, SEED
from ..options import data_option, dataset_kwargs, dataset_options, deprecated_alias, with_data_option


def _source_options(f):
    f = click.option("--check-md5", is_flag=True, help="Check a local archive against the official md5.")(f)
    return dataset_options(argument=True)(f)


def _open(dataset: str, archive, data_root, download, check_md5, split_file, train_per_class, folder_image_size,
          cache_dir=None):
    from . import get_dataset

    kw: Dict[str, Any] = dataset_kwargs(dataset, split_file, train_per_class, folder_image_size)
    if check_md5:
        kw["check_checksum"] = True
    return get_dataset(dataset, root=data_root, archive=archive, download=download, cache_dir=cache_dir, **kw)


@click.group("data")
def data() -> None:
    """Prepare and verify the few-shot datasets (their loading time: `fsl-bench perf data`).

    \b
    Example:
      fsl-bench data verify tiny_imagenet --data tiny_imagenet=tiny-imagenet-200.zip
      fsl-bench data prepare cifar_fs --data cifar_fs=~/datasets
    """


@data.command("prepare")
@_source_options
def prepare_cmd(dataset, archive, data_root, split_file, train_per_class, folder_image_size, download,
                check_md5) -> None:
    """Decode DATASET once into the uint8 cache ($FSL_BENCH_CACHE or ~/.cache/fsl-bench).

    \b
    Example:
      fsl-bench data prepare cifar_fs --data cifar_fs=cifar-100-python.tar.gz
      fsl-bench data prepare tiny_imagenet --data tiny_imagenet=~/datasets --download
      fsl-bench data prepare image_folder --data image_folder=my_images --split-file split.json --folder-image-size 64
    """
    ds = _open(dataset, archive, data_root, download, check_md5, split_file, train_per_class, folder_image_size)
    click.echo(f"{dataset}: source {ds.source}")
    ds.check_classes_present([c for names in ds.class_split().values() for c in names])
    for split in ("train", "val", "test"):
        cached = ds.is_cached(split)
        t = time.perf_counter()
        s = ds.load_split(split, mmap=True)
        dt = time.perf_counter() - t
        npy, _ = ds.cache_paths(split)
        how = "already cached" if cached else f"decoded in {dt:.1f}s"
        click.echo(f"  {split:<5} {s.num_classes:4d} classes {len(s):7,d} images {s.images.shape[1]}x"
                   f"{s.images.shape[2]}  {how}  -> {npy}")
    _print_leaks(dataset, ds)


def _print_leaks(dataset: str, ds) -> None:
    """Images one split shares with another (identical pixels), from the hashes the cache stores."""
    from .duplicates import LEAK_PAIRS, shared_images

    split = ds.class_split()
    pairs = [(a, b) for a, b in LEAK_PAIRS if split[a] and split[b]]
    if not pairs:
        return
    counts = {(a, b): shared_images(ds.split_hashes(a), ds.split_hashes(b)) for a, b in pairs}
    click.echo("images that also occur in another split (identical pixels): "
               + ", ".join(f"{a} in {b} {n}" for (a, b), n in counts.items()))
    for (a, b), n in counts.items():
        if n:
            click.echo(f"WARNING: {_also_occur(n, a)} among the {b} images: scores on them measure memorisation; "
                       f"`fsl-bench data verify {dataset}` lists them")


def _also_occur(n: int, split: str) -> str:
    return f"{n} {split} image{'s' if n != 1 else ''} also occur{'s' if n == 1 else ''}"


def _print_report(r: Dict[str, Any]) -> None:
    click.echo(f"dataset: {r['dataset']}  source: {r['source']}")
    click.echo(f"classes in source: {r['num_classes']}")
    for part, d in r["parts"].items():
        each = f"{d['min']} each" if d["min"] == d["max"] else f"{d['min']}-{d['max']} per class"
        click.echo(f"images per class, {part}: {each} ({d['total']:,} in all)")
    sc = r["split_classes"]
    click.echo(f"split classes (train/val/test): {sc['train']}/{sc['val']}/{sc['test']}")
    for s, miss in r["missing_classes"].items():
        click.echo(f"missing from the source ({s}): {', '.join(miss)}")
    few = r["too_few"]
    if few:
        n = sum(len(v) for v in few.values())
        click.echo(f"warning: {n} classes have fewer than {r['min_images']} images (e.g. 5 shot + 15 query):")
        for s, items in few.items():
            click.echo(f"  {s} ({len(items)}): " + ", ".join(f"{c} ({k})" for c, k in items))
    else:
        click.echo(f"classes with fewer than {r['min_images']} images: none")
    for s, names in r.get("empty_classes", {}).items():
        click.echo(f"split classes without any image ({s}, {len(names)}): {', '.join(names)}")
    if r.get("decoded"):
        bad = r["undecodable"]
        click.echo(f"images decoded: {r['images_checked']:,} of the split classes, {len(bad)} failed")
        for c, f, why in bad:
            click.echo(f"  failed: {f or c}: {why}")
        _print_duplicates(r["duplicates"])
    else:
        click.echo("images not decoded (--no-decode): duplicates not checked")


def _print_duplicates(rep, shown: int = 10) -> None:
    """The duplicate images of a :class:`~fsl_lsskd.data.duplicates.DuplicateReport`: counts by kind, leaks
    between splits (WARNING lines), the first ``shown`` groups."""
    def groups(n: int) -> str:
        return f"{n} group{'s' if n != 1 else ''}"

    if not rep.groups:
        click.echo(f"duplicate images (identical decoded pixels): none among the {rep.images:,} images")
        return
    click.echo(f"duplicate images (identical decoded pixels): {groups(len(rep.groups))}, {rep.extra_copies} extra "
               f"copies among the {rep.images:,} images")
    click.echo(f"  {groups(rep.count('across_splits'))} across splits, {rep.count('across_classes')} across classes "
               f"of one split, {rep.count('within_class')} within one class")
    click.echo("  images that also occur in another split: "
               + ", ".join(f"{a} in {b} {n}" for (a, b), n in rep.leaks.items()))
    ordered = rep.ordered_groups()
    for g in ordered[:shown]:
        click.echo(f"  {_KIND[rep.kind(g)]}: " + " = ".join(str(r) for r in g))
    if len(ordered) > shown:
        click.echo(f"  ... ({len(ordered) - shown} more groups)")
    for (a, b), n in rep.leaks.items():
        if n:
            click.echo(f"WARNING: {_also_occur(n, a)} among the {b} images (identical pixels): scores on them "
                       f"measure memorisation, not few-shot learning")


_KIND = {"across_splits": "across splits", "across_classes": "across classes", "within_class": "within one class"}


@data.command("verify")
@_source_options
@click.option("--min-images", type=COUNT, default=20, show_default=True,
              help="Report classes with fewer images than this (shot + query).")
@click.option("--strict", is_flag=True, help="Exit 2 (instead of a warning) when classes have too few images or "
              "when images of one split also occur in another.")
@click.option("--no-decode", is_flag=True, help="Skip decoding the images (counts and split only; faster).")
def verify_cmd(dataset, archive, data_root, download, split_file, train_per_class, folder_image_size, check_md5,
               min_images, strict, no_decode) -> None:
    """Report DATASET: classes, images per class per source part, split class counts, classes with too few
    images, every image of a split class that fails to read or decode (all are decoded, nothing is cached), and
    images that occur more than once (identical decoded pixels): within a class, across classes of a split, or
    across splits (a val or test image that is also a training image: leakage, with a WARNING). Exit 0 (with
    warnings) when some classes are small or images repeat; 2 when the data or split is broken: a split class
    missing or without images, or an undecodable image (--strict: also small classes and images shared by splits).

    \b
    Example:
      fsl-bench data verify tiny_imagenet --data tiny_imagenet=tiny-imagenet-200.zip
      fsl-bench data verify cifar_fs --data cifar_fs=~/datasets --min-images 20
      fsl-bench data verify image_folder --data image_folder=my_images --split-file split.json
    """
    from ..errors import DataError

    ds = _open(dataset, archive, data_root, download, check_md5, split_file, train_per_class, folder_image_size)
    r = ds.verify(min_images=min_images, decode=not no_decode)
    _print_report(r)
    problems = []
    if r["missing_classes"]:
        miss = sorted(c for v in r["missing_classes"].values() for c in v)
        problems.append(f"the split names {len(miss)} classes the data lacks ({', '.join(miss[:10])}); fix the "
                        f"split file or point --data {dataset}=PATH at the complete data")
    if r["empty_classes"]:
        empty = [c for v in r["empty_classes"].values() for c in v]
        problems.append(f"{len(empty)} split classes have no images ({', '.join(empty[:10])}); add images to them "
                        "or remove them from the split file")
    if r["undecodable"]:
        files = [f or c for c, f, _ in r["undecodable"]]
        more = f" ... ({len(files)} in all, listed above)" if len(files) > 5 else ""
        problems.append(f"{len(files)} images fail to read or decode ({', '.join(files[:5])}{more}); replace or "
                        "delete them (for an official archive: download it again, --check-md5 compares it with "
                        "the official checksum)")
    if problems:
        raise DataError("; ".join(problems))
    strict_problems = []
    if strict and r["too_few"]:
        bad = [f"{c} ({k})" for v in r["too_few"].values() for c, k in v]
        strict_problems.append(f"{len(bad)} classes have fewer than {min_images} images: {', '.join(bad)}; lower "
                               "shot/query (--min-images) or add images to these classes")
    leaks = {k: n for k, n in r["duplicates"].leaks.items() if n} if r["duplicates"] is not None else {}
    if strict and leaks:
        shared = ", ".join(f"{n} {a} in {b}" for (a, b), n in leaks.items())
        strict_problems.append(f"images occur in two splits ({shared}, listed above); remove the copies from one of "
                               "the splits (or drop --strict)")
    if strict_problems:
        raise DataError("; ".join(strict_problems))


@data.command("make-split")
@click.argument("dataset", type=click.Choice(["tiny_imagenet", "image_folder"]))
@data_option("Where the data is: tiny_imagenet=FILE (tiny-imagenet-200.zip), tiny_imagenet=DIR (its extracted "
             "folder or a directory holding it); image_folder=DIR (the folder of class folders).")
@click.option("--archive", type=click.Path(path_type=Path), default=None, help="Deprecated: use --data NAME=FILE.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Deprecated: use --data NAME=DIR.")
@click.option("--download", is_flag=True, help="tiny_imagenet: download the official archive into the --data "
              "directory (default <cache>/downloads) when it is not found there; checks the official md5.")
@click.option("--seed", type=SEED, default=None, help="Permutation seed (default: 0; for tiny_imagenet the "
              "published split's).")
@click.option("--ratios", default=None, help="image_folder: class shares train,val,test (default 0.6,0.2,0.2).")
@click.option("--min-images", type=COUNT, default=None,
              help="image_folder: fewest images a class may have (default 20: 5 shot + 15 query).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="tiny_imagenet: output directory (default: splits/tiny_imagenet, which also updates "
                   "MANIFEST.json); image_folder: the JSON split file to write (required).")
@with_data_option
def make_split_cmd(dataset, archive, data_root, download, seed, ratios, min_images, out) -> None:
    """Write a seeded class split: for tiny_imagenet regenerate our (non-standard) 120/40/40 split from
    wnids.txt; for image_folder split the class folders of --data image_folder=DIR by class shares (0.6/0.2/0.2 by
    default) into a JSON file {"train": [...], "val": [...], "test": [...]} for --split-file.

    \b
    Example:
      fsl-bench data make-split tiny_imagenet --data tiny_imagenet=tiny-imagenet-200.zip
      fsl-bench data make-split tiny_imagenet --data tiny_imagenet=tiny-imagenet-200.zip --seed 1 --out my_split
      fsl-bench data make-split image_folder --data image_folder=my_images --out split.json
      fsl-bench data make-split image_folder --data image_folder=my_images --ratios 0.5,0.25,0.25 --seed 1 --out s.json
    """
    from ..errors import ConfigError

    if dataset == "image_folder":
        if download:
            raise ConfigError("image_folder has nothing to download; drop --download and pass --data image_folder=DIR")
        _make_folder_split(archive, data_root, 0 if seed is None else seed, ratios, min_images, out)
        return

    for flag, value in (("--ratios", ratios), ("--min-images", min_images)):
        if value is not None:
            raise ConfigError(f"{flag} applies to image_folder; tiny_imagenet's split is 120/40/40 classes")
    from . import splits as sp
    from .tiny_imagenet import _Source, _is_folder, ARCHIVE_NAME, FOLDER_NAME, MD5, URL
    from .sources import resolve_source

    src = resolve_source("Tiny ImageNet", data_root, archive, download, ARCHIVE_NAME, "tiny-imagenet-200*.zip",
                         FOLDER_NAME, _is_folder, URL, MD5)
    wnids = _Source(src).read("wnids.txt").decode().split()
    split = sp.make_tiny_imagenet_split(wnids, sp.TINY_SPLIT_SEED if seed is None else seed)
    target = out or sp.splits_dir() / "tiny_imagenet"
    paths = sp.write_split(split, target)
    click.echo(f"wrote {', '.join(str(p) for p in paths)} "
               f"({'/'.join(str(len(split[s])) for s in ('train', 'val', 'test'))} classes)")
    try:
        rels = [p.resolve().relative_to(sp.splits_dir().resolve()).as_posix() for p in paths]
    except ValueError:
        return
    sp.update_manifest(rels)
    click.echo(f"updated {sp.splits_dir() / sp.MANIFEST_NAME}")


def _make_folder_split(archive, data_root, seed: int, ratios, min_images, out) -> None:
    from ..errors import ConfigError, DataError
    from ..utils import check_writable_dir
    from . import splits as sp
    from .base import DEFAULT_MIN_IMAGES
    from .image_folder import list_class_files

    if archive is not None:
        raise ConfigError(f"image_folder reads a folder: pass --data image_folder=DIR (DIR/<class>/<images>), not "
                          f"a file ({archive})")
    if data_root is None:
        raise ConfigError("image_folder needs --data image_folder=DIR: a folder with one sub-folder of images per "
                          "class")
    if out is None:
        raise ConfigError("image_folder needs --out FILE: the JSON split file to write (e.g. --out split.json), "
                          "then pass it to train/evaluate as --split-file")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give the JSON file to write, e.g. --out {out / 'split.json'}")
    shares = sp.parse_ratios(ratios if ratios is not None else sp.DEFAULT_RATIOS)
    least = DEFAULT_MIN_IMAGES if min_images is None else int(min_images)
    if least < 1:
        raise ConfigError(f"--min-images must be >= 1, got {least}")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a directory; pass --data image_folder=DIR with "
                        "DIR/<class>/<images>")
    files = list_class_files(root)
    small = [(c, len(v)) for c, v in files.items() if len(v) < least]
    if small:
        listing = ", ".join(f"{c!r} ({k})" for c, k in small[:30])
        more = f" ... ({len(small)} in all)" if len(small) > 30 else ""
        raise DataError(f"{len(small)} class folders of {root} have fewer than {least} images: {listing}{more}; "
                        f"add images to them, move them out of {root}, or lower --min-images (a val/test class "
                        f"needs n_shot + n_query images: {DEFAULT_MIN_IMAGES} for 5-shot with 15 queries)")
    split = sp.make_class_split(list(files), shares, seed)
    check_writable_dir(out.parent if str(out.parent) else Path("."), "--out")
    sp.write_split_json(split, out)
    counts = "/".join(str(len(split[s])) for s in ("train", "val", "test"))
    images = {s: sum(len(files[c]) for c in split[s]) for s in ("train", "val", "test")}
    click.echo(f"wrote {out}: {counts} classes (train/val/test), "
               f"{'/'.join(f'{images[s]:,}' for s in ('train', 'val', 'test'))} images, seed {seed}, "
               f"shares {','.join(f'{r:g}' for r in shares)}")
    fewest = min(len(files[c]) for c in split["val"]) if split["val"] else 0
    # training-time validation runs 5-way 5-shot episodes with 15 queries: a smaller val class needs fewer
    val = "" if fewest >= DEFAULT_MIN_IMAGES else (
        f" --val-n-shot 1 --val-n-query {max(1, fewest - 1)}  # val classes have {fewest}+ images, not "
        f"{DEFAULT_MIN_IMAGES}: validation episodes must fit (evaluate: --n-query likewise)")
    click.echo(f"next: fsl-bench train --data image_folder={shlex.quote(str(root))} --split-file "
               f"{shlex.quote(str(out))} --out RUN_DIR{val}")


@click.command("data")
@_source_options
@click.option("--split", "split_name", default="train", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--repeats", type=COUNT, default=3, show_default=True)
def data_perf(dataset, archive, data_root, split_file, train_per_class, folder_image_size, download, check_md5,
              split_name, repeats) -> None:
    """Time loading a split by decoding the archive vs from the uint8 cache (a temporary cache dir).

    \b
    Example:
      fsl-bench perf data tiny_imagenet --data tiny_imagenet=tiny-imagenet-200.zip --split train
    """
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsl-bench-cache-") as tmp:
        def fresh():
            return _open(dataset, archive, data_root, download, check_md5, split_file, train_per_class,
                         folder_image_size, cache_dir=tmp)

        dec = []
        for _ in range(repeats):
            t = time.perf_counter()
            s = fresh().decode_split(split_name)
            dec.append(time.perf_counter() - t)
        t = time.perf_counter()
        fresh().load_split(split_name)
        write = time.perf_counter() - t
        load, mm = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            c = fresh().load_split(split_name)
            load.append(time.perf_counter() - t)
            t = time.perf_counter()
            m = fresh().load_split(split_name, mmap=True)
            mm.append(time.perf_counter() - t)
        assert (c.images == s.images).all() and (m.labels == s.labels).all()
    d, lo, mmm = statistics.median(dec), statistics.median(load), statistics.median(mm)
    click.echo(f"{dataset} {split_name}: {len(s):,} images {s.images.shape[1]}x{s.images.shape[2]}, "
               f"{s.num_classes} classes ({s.images.nbytes / 2**20:.0f} MiB uint8)")
    click.echo(f"decode from source : {d:8.3f} s  (median of {repeats})")
    click.echo(f"decode + write cache: {write:8.3f} s  (first load_split)")
    click.echo(f"load from cache     : {lo:8.3f} s  (np.load into memory, median of {repeats})")
    click.echo(f"load from cache mmap: {mmm:8.3f} s  (np.load mmap_mode='r')")
    click.echo(f"speed-up            : {d / lo:8.1f}x  (in memory), {d / mmm:.0f}x (mmap)")


data.add_command(deprecated_alias(data_perf, "fsl-bench data bench", "fsl-bench perf data"))

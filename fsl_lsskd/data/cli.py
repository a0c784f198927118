"""``fsl-bench data``: prepare (decode to the uint8 cache), verify (report), make-split, bench."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

import click

from ..options import dataset_kwargs, dataset_options

def _source_options(f):
    f = click.option("--check-md5", is_flag=True, help="Check a local archive against the official md5.")(f)
    f = click.option("--download", is_flag=True, help="Download the official archive into --data-root "
                     "(default <cache>/downloads) when not found; checks the official md5.")(f)
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
    """Prepare, verify and benchmark the few-shot datasets.

    \b
    Example:
      fsl-bench data verify tiny_imagenet --archive tiny-imagenet-200.zip
      fsl-bench data prepare cifar_fs --data-root ~/datasets
    """


@data.command("prepare")
@_source_options
def prepare_cmd(dataset, archive, data_root, split_file, train_per_class, folder_image_size, download,
                check_md5) -> None:
    """Decode DATASET once into the uint8 cache ($FSL_BENCH_CACHE or ~/.cache/fsl-bench).

    \b
    Example:
      fsl-bench data prepare cifar_fs --archive cifar-100-python.tar.gz
      fsl-bench data prepare tiny_imagenet --data-root ~/datasets --download
      fsl-bench data prepare image_folder --data-root my_images --split-file split.json --folder-image-size 64
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


@data.command("verify")
@_source_options
@click.option("--min-images", type=int, default=20, show_default=True,
              help="Report classes with fewer images than this (shot + query).")
@click.option("--strict", is_flag=True, help="Exit 2 (instead of a warning) when classes have too few images.")
def verify_cmd(dataset, archive, data_root, split_file, train_per_class, folder_image_size, download, check_md5,
               min_images, strict) -> None:
    """Report DATASET: classes, images per class per source part, split class counts, classes with too few
    images. Exit 0 (with a warning listing) when some classes are small; 2 when data or split is broken.

    \b
    Example:
      fsl-bench data verify tiny_imagenet --archive tiny-imagenet-200.zip
      fsl-bench data verify cifar_fs --data-root ~/datasets --min-images 20
    """
    from ..errors import DataError

    ds = _open(dataset, archive, data_root, download, check_md5, split_file, train_per_class, folder_image_size)
    r = ds.verify(min_images=min_images)
    _print_report(r)
    if r["missing_classes"]:
        miss = sorted(c for v in r["missing_classes"].values() for c in v)
        raise DataError(f"the split names {len(miss)} classes the data lacks ({', '.join(miss[:10])}); fix the "
                        "split file or point --archive/--data-root at the complete data")
    if strict and r["too_few"]:
        bad = [f"{c} ({k})" for v in r["too_few"].values() for c, k in v]
        raise DataError(f"{len(bad)} classes have fewer than {min_images} images: {', '.join(bad)}; lower "
                        "shot/query (--min-images) or add images to these classes")


@data.command("make-split")
@click.argument("dataset", type=click.Choice(["tiny_imagenet"]))
@click.option("--archive", type=click.Path(path_type=Path), default=None, help="tiny-imagenet-200.zip or folder.")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="Directory holding it.")
@click.option("--seed", type=int, default=None, help="Permutation seed (default: the published one, 0).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output directory (default: splits/tiny_imagenet, which also updates MANIFEST.json).")
def make_split_cmd(dataset, archive, data_root, seed, out) -> None:
    """Regenerate the seeded (non-standard) Tiny ImageNet 120/40/40 class split from wnids.txt.

    \b
    Example:
      fsl-bench data make-split tiny_imagenet --archive tiny-imagenet-200.zip
      fsl-bench data make-split tiny_imagenet --archive tiny-imagenet-200.zip --seed 1 --out my_split
    """
    from . import splits as sp
    from .tiny_imagenet import _Source, _is_folder, ARCHIVE_NAME, FOLDER_NAME, MD5, URL
    from .sources import resolve_source

    src = resolve_source("Tiny ImageNet", data_root, archive, False, ARCHIVE_NAME, "tiny-imagenet-200*.zip",
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


@data.command("bench")
@_source_options
@click.option("--split", "split_name", default="train", show_default=True, type=click.Choice(["train", "val", "test"]))
@click.option("--repeats", type=int, default=3, show_default=True)
def bench_cmd(dataset, archive, data_root, split_file, train_per_class, folder_image_size, download, check_md5,
              split_name, repeats) -> None:
    """Time loading a split by decoding the archive vs from the uint8 cache (a temporary cache dir).

    \b
    Example:
      fsl-bench data bench tiny_imagenet --archive ../shared/data/tiny-imagenet-200-sub100.zip --split train
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

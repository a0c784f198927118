"""Images that occur more than once (identical decoded pixels): `fsl-bench data verify` lists them for every
dataset, `data prepare`, `run` and `evaluate` warn when a scored split shares images with the training split.
Duplicates are planted byte for byte in data generated in the official formats."""
from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data import get_dataset
from fsl_lsskd.data import splits as sp
from fsl_lsskd.data.duplicates import ImageRef, check_leakage, find_duplicates, pixel_hashes
from fsl_lsskd.data.fake import write_fake_cifar100, write_fake_tiny_imagenet
from fsl_lsskd.data.fake_omniglot import write_fake_omniglot_runs

TINY = sp.standard_split("tiny_imagenet")
CIFAR = sp.standard_split("cifar_fs")


def tiny_file(wnid: str, i: int) -> str:
    return f"train/{wnid}/images/{wnid}_{i}.JPEG"


#: byte-identical copies planted in the fake Tiny ImageNet (member -> the member whose bytes it takes)
TINY_COPIES = {
    tiny_file(TINY["test"][0], 0): tiny_file(TINY["train"][0], 1),   # a test image that is a training image
    tiny_file(TINY["val"][0], 1): tiny_file(TINY["train"][4], 0),    # a val image that is a training image
    tiny_file(TINY["train"][3], 0): tiny_file(TINY["train"][2], 0),  # two training classes share an image
    tiny_file(TINY["train"][1], 1): tiny_file(TINY["train"][1], 0),  # twice in one class: not a leak
}


@pytest.fixture(scope="module")
def planted_tiny(tmp_path_factory) -> Path:
    return write_fake_tiny_imagenet(tmp_path_factory.mktemp("tiny"), per_class_train=2, per_class_val=1, seed=4,
                                    copies=TINY_COPIES)


def data(*args):
    return CliRunner().invoke(main, ["data", *map(str, args)])


def test_find_duplicates_counts_groups_and_leaks():
    h = [bytes([k]) * 16 for k in range(4)]
    refs = [ImageRef("train", "a", "a0"), ImageRef("train", "a", "a1"), ImageRef("train", "b", "b0"),
            ImageRef("test", "t", "t0"), ImageRef("test", "t", "t1"), ImageRef("val", "v", "v0"),
            ImageRef("test", "u", "u0"), ImageRef("train", "b", "b1")]
    hashes = [h[0], h[0], h[1], h[1], h[1], h[2], None, h[3]]  # u0 failed to decode: left out
    rep = find_duplicates(refs, hashes)
    assert rep.images == 7 and len(rep.groups) == 2 and rep.extra_copies == 3
    assert [rep.kind(g) for g in rep.groups] == ["within_class", "across_splits"]
    assert rep.leaks == {("val", "train"): 0, ("test", "train"): 2, ("test", "val"): 0}
    assert rep.ordered_groups()[0] == (refs[2], refs[3], refs[4])
    d = rep.to_dict(max_groups=1)
    assert d["leaks"]["test in train"] == 2 and d["within_class"] == 1 and len(d["examples"]) == 1


def test_verify_lists_planted_tiny_imagenet_duplicates(planted_tiny):
    res = data("verify", "tiny_imagenet", "--archive", planted_tiny, "--min-images", "3")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "duplicate images (identical decoded pixels): 4 groups, 4 extra copies among the 600 images" in out, out
    assert "2 groups across splits, 1 across classes of one split, 1 within one class" in out
    assert "images that also occur in another split: val in train 1, test in train 1, test in val 0" in out
    tr, te, va = TINY["train"], TINY["test"], TINY["val"]
    assert (f"across splits: [train {tr[0]}] {tiny_file(tr[0], 1)} = [test {te[0]}] {tiny_file(te[0], 0)}"
            in out), out
    assert f"across splits: [train {tr[4]}] {tiny_file(tr[4], 0)} = [val {va[0]}] {tiny_file(va[0], 1)}" in out
    assert f"across classes: [train {tr[2]}] {tiny_file(tr[2], 0)} = [train {tr[3]}] {tiny_file(tr[3], 0)}" in out
    assert f"within one class: [train {tr[1]}] {tiny_file(tr[1], 0)} = [train {tr[1]}] {tiny_file(tr[1], 1)}" in out
    assert "WARNING: 1 test image also occurs among the train images" in out
    assert "WARNING: 1 val image also occurs among the train images" in out
    res = data("verify", "tiny_imagenet", "--archive", planted_tiny, "--min-images", "3", "--strict")
    assert res.exit_code == 2 and "images occur in two splits (1 val in train, 1 test in train" in res.output


def test_verify_says_none_and_no_decode_says_unchecked(tmp_path):
    clean = write_fake_tiny_imagenet(tmp_path, per_class_train=2, per_class_val=1, seed=4)
    res = data("verify", "tiny_imagenet", "--archive", clean, "--min-images", "3", "--strict")
    assert res.exit_code == 0, res.output
    assert "duplicate images (identical decoded pixels): none among the 600 images" in res.output
    res = data("verify", "tiny_imagenet", "--archive", clean, "--no-decode")
    assert res.exit_code == 0 and "duplicates not checked" in res.output


def test_prepare_stores_hashes_and_warns(planted_tiny):
    res = data("prepare", "tiny_imagenet", "--archive", planted_tiny)
    assert res.exit_code == 0, res.output
    assert "images that also occur in another split (identical pixels): val in train 1, test in train 1, test in " \
           "val 0" in res.output
    assert "WARNING: 1 test image also occurs among the train images" in res.output
    ds = get_dataset("tiny_imagenet", archive=planted_tiny)
    for split in ("train", "val", "test"):
        _, meta_path = ds.cache_paths(split)
        assert "pixel_hashes" in json.loads(meta_path.read_text())
        np.testing.assert_array_equal(ds.split_hashes(split), pixel_hashes(ds.load_split(split).images))


def test_cache_entry_without_hashes_gets_them(planted_tiny):
    ds = get_dataset("tiny_imagenet", archive=planted_tiny)
    want = pixel_hashes(ds.load_split("test").images)
    _, meta_path = ds.cache_paths("test")
    meta = json.loads(meta_path.read_text())
    del meta["pixel_hashes"]  # an entry an older fsl-bench wrote
    meta_path.write_text(json.dumps(meta))
    fresh = get_dataset("tiny_imagenet", archive=planted_tiny)
    np.testing.assert_array_equal(fresh.split_hashes("test"), want)
    assert "pixel_hashes" in json.loads(meta_path.read_text())
    assert fresh.is_cached("test")


def test_check_leakage_warns_with_the_count(planted_tiny, caplog):
    ds = get_dataset("tiny_imagenet", archive=planted_tiny)
    with caplog.at_level(logging.INFO, logger="fsl_lsskd.data.duplicates"):
        assert check_leakage(ds, "test", decode=False) is None  # nothing cached: nothing decoded for the check
        assert not ds.is_cached("train") and not ds.is_cached("test")
        assert check_leakage(ds, "test") == 1
        assert check_leakage(ds, "val") == 1
        assert check_leakage(ds, "test", "val") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "tiny_imagenet: 1 of the 120 test images also occur among the train images" in \
        warnings[0], warnings


def test_cifar_fs_rows_named(tmp_path):
    tr, te = CIFAR["train"], CIFAR["test"]
    archive = write_fake_cifar100(tmp_path, per_class_train=3, per_class_test=1, seed=3,
                                  copies={("test", te[0], 0): ("train", tr[0], 2),   # test class image = train image
                                          ("train", tr[1], 1): ("train", tr[1], 0)})  # twice in one class
    res = data("verify", "cifar_fs", "--archive", archive, "--min-images", "4")
    assert res.exit_code == 0, res.output
    assert "2 groups, 2 extra copies among the 400 images" in res.output, res.output
    assert "val in train 0, test in train 1, test in val 0" in res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("  across splits:"))
    # official rows: `train[<row>] <file name>` of the pickle the row is in
    assert f"[train {tr[0]}] train[" in line and f"[test {te[0]}] test[" in line and "_s_" in line, line
    ds = get_dataset("cifar_fs", archive=archive)
    names = ds.image_names([te[0]])[0]
    assert len(names) == 4 and names[0].startswith("train[") and names[-1].startswith("test[")


def test_image_folder_files_named(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c", "d", "e", "f", "g"):
        (root / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{j}.png")
    (root / "g" / "2.png").write_bytes((root / "a" / "0.png").read_bytes())  # test image = train image
    (root / "b" / "1.png").write_bytes((root / "b" / "0.png").read_bytes())  # twice in one class
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f", "g"]}))
    res = data("verify", "image_folder", "--data-root", root, "--split-file", split, "--folder-image-size", "16",
               "--min-images", "3")
    assert res.exit_code == 0, res.output
    assert "2 groups, 2 extra copies among the 21 images" in res.output, res.output
    assert "across splits: [train a] a/0.png = [test g] g/2.png" in res.output
    assert "within one class: [train b] b/0.png = [train b] b/1.png" in res.output
    assert "WARNING: 1 test image also occurs among the train images" in res.output


def test_omniglot_runs_checked_within_the_test_split(tmp_path):
    """The fake runs jitter each test item by up to 2 pixels, so some items draw exactly their training image:
    the report must find exactly those (counted here by comparing the decoded PNGs of every pair)."""
    import io
    import zipfile

    from PIL import Image

    archive = write_fake_omniglot_runs(tmp_path)
    ds = get_dataset("omniglot_runs", archive=archive)
    with zipfile.ZipFile(archive) as z:
        def px(rel):
            return np.asarray(Image.open(io.BytesIO(z.read(rel))).convert("RGB"))

        same = sorted(c for c, (a, b) in ds.pairs().items() if np.array_equal(px(a), px(b)))
    assert 0 < len(same) < 400
    res = data("verify", "omniglot_runs", "--archive", archive, "--min-images", "2")
    assert res.exit_code == 0, res.output
    assert (f"duplicate images (identical decoded pixels): {len(same)} group{'s' if len(same) > 1 else ''}, "
            f"{len(same)} extra copies among the 800 images") in res.output, res.output
    assert f"0 groups across splits, 0 across classes of one split, {len(same)} within one class" in res.output
    a, b = ds.pairs()[same[0]]
    assert f"within one class: [test {same[0]}] {a} = [test {same[0]}] {b}" in res.output
    assert ds.image_names(["run01/class01"]) == [[ds.pairs()["run01/class01"][0], ds.pairs()["run01/class01"][1]]]
    assert check_leakage(ds, "test") is None  # no train split


def test_run_and_evaluate_warn_when_test_images_are_training_images(tmp_path, monkeypatch, caplog):
    tr, te = CIFAR["train"], CIFAR["test"]
    archive = write_fake_cifar100(tmp_path, per_class_train=6, per_class_test=2, seed=11,
                                  copies={("test", te[3], 1): ("train", tr[5], 0),
                                          ("train", te[4], 0): ("test", tr[6], 1)})
    bench = tmp_path / "grid.yaml"
    bench.write_text(textwrap.dedent(f"""
        name: grid
        datasets: [cifar_fs]
        data: {{cifar_fs: {{archive: {archive}}}}}
        backbones: [conv4]
        methods: [ce]
        seeds: [0]
        image_size: 32
        train: {{epochs: 1, batch_size: 32, validation: null, heldout: 0.0}}
        eval: {{split: test, n_shot: [1], n_query: 5, n_episodes: 40, readouts: [protonet]}}
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    message = "cifar_fs: 2 of the 160 test images also occur among the train images"
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(main, ["run", str(bench), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert any(message in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]

    from fsl_lsskd.backbones import create_backbone
    from fsl_lsskd.checkpoint import export_backbone

    export_backbone(create_backbone("conv4", num_classes=0, image_size=32), "conv4", 32, tmp_path / "export",
                    extra={"dataset": "cifar_fs", "method": "ce"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(main, ["evaluate", "--checkpoint", str(tmp_path / "export"), "--dataset", "cifar_fs",
                                        "--archive", str(archive), "--n-shot", "1", "--n-query", "5",
                                        "--n-episodes", "10", "--readouts", "protonet"])
    assert res.exit_code == 0, res.output
    assert any(message in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]

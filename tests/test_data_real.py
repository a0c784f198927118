"""Real files in ../shared/data (skipped when absent): the Tiny ImageNet subset and the partial CIFAR-100."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data import check_min_images, get_dataset
from fsl_lsskd.errors import DataError

TINY = "tiny-imagenet-200-sub100.zip"
CIFAR = "cifar-100-python-partial-train1117-test916.tar.gz"


def test_verify_real_tiny(shared_data):
    res = CliRunner().invoke(main, ["data", "verify", "tiny_imagenet", "--archive", str(shared_data / TINY),
                                    "--no-decode"])
    assert res.exit_code == 0, res.output
    for s in ("classes in source: 200", "train: 100 each (20,000 in all)", "val: 50 each (10,000 in all)",
              "120/40/40", "fewer than 20 images: none", "images not decoded"):
        assert s in res.output, res.output


@pytest.mark.slow
def test_verify_real_tiny_decodes_every_image(shared_data):
    res = CliRunner().invoke(main, ["data", "verify", "tiny_imagenet", "--archive", str(shared_data / TINY)])
    assert res.exit_code == 0, res.output
    assert "images decoded: 30,000 of the split classes, 0 failed" in res.output, res.output
    # two byte-identical pairs in the subset: a val-split image that is also a training image, and one image filed
    # under two training classes; no test image occurs among the training images
    assert "2 groups, 2 extra copies among the 30,000 images" in res.output
    assert "val in train 1, test in train 0, test in val 0" in res.output
    assert ("across splits: [train n01855672] train/n01855672/images/n01855672_44.JPEG = [val n02002724] "
            "val/images/val_2157.JPEG") in res.output
    assert ("across classes: [train n07747607] train/n07747607/images/n07747607_20.JPEG = [train n07753592] "
            "train/n07753592/images/n07753592_63.JPEG") in res.output


def test_verify_real_partial_cifar_reports_small_classes(shared_data):
    res = CliRunner().invoke(main, ["data", "verify", "cifar_fs", "--archive", str(shared_data / CIFAR)])
    assert res.exit_code == 0, res.output
    assert "train: 5-22 per class (1,117 in all)" in res.output and "test: 4-15 per class (916 in all)" in res.output
    assert "warning: 45 classes have fewer than 20 images" in res.output and "fox (11)" in res.output
    assert "images decoded: 2,033 of the split classes, 0 failed" in res.output, res.output
    assert "duplicate images (identical decoded pixels): none among the 2,033 images" in res.output
    res = CliRunner().invoke(main, ["data", "verify", "cifar_fs", "--archive", str(shared_data / CIFAR),
                                    "--min-images", "11"])
    assert res.exit_code == 0 and "fewer than 11 images: none" in res.output


def test_load_real_partial_cifar(shared_data):
    ds = get_dataset("cifar_fs", archive=shared_data / CIFAR)
    sizes = {s: len(ds.load_split(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1292, "val": 346, "test": 395}  # README of shared/data
    test = ds.load_split("test")
    with pytest.raises(DataError, match=r"fox \(11\)"):
        check_min_images(test, 16)
    check_min_images(test, 11)


def test_decode_real_tiny_few_classes(shared_data):
    from PIL import Image

    ds = get_dataset("tiny_imagenet", archive=shared_data / TINY)
    names = ds.class_split()["test"][:3]
    arrays = ds.decode_classes(names)
    assert [a.shape for a in arrays] == [(150, 64, 64, 3)] * 3
    w = names[1]
    with zipfile.ZipFile(shared_data / TINY) as z:
        ref = np.asarray(Image.open(io.BytesIO(z.read(f"tiny-imagenet-200/train/{w}/images/{w}_7.JPEG"))).convert("RGB"))
    np.testing.assert_array_equal(arrays[1][7], ref)


@pytest.mark.slow
def test_real_tiny_prepare_and_cache(shared_data):
    import time

    ds = get_dataset("tiny_imagenet", archive=shared_data / TINY)
    t = time.perf_counter()
    sizes = ds.prepare()
    decode = time.perf_counter() - t
    assert sizes == {"train": 18000, "val": 6000, "test": 6000}
    t = time.perf_counter()
    s = get_dataset("tiny_imagenet", archive=shared_data / TINY).load_split("train")
    assert time.perf_counter() - t < decode / 20 and len(s) == 18000
    grey = (s.images[..., 0] == s.images[..., 2]).all(axis=(1, 2))
    assert 0 < grey.sum() < 1000  # some of the 548 greyscale JPEGs, converted to RGB

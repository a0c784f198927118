"""``omniglot_runs``: Omniglot's 20 official one-shot runs (Lake et al. 2015) read from all_runs.zip as published."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fsl_lsskd.data import get_dataset
from fsl_lsskd.data.fake_omniglot import write_fake_omniglot_runs
from fsl_lsskd.errors import DataError
from fsl_lsskd.eval.episodes import load_episodes
from fsl_lsskd.protocol import EpisodeProtocol

PROTOCOL = EpisodeProtocol(20, 1, 1, 20, 0)


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory) -> Path:
    return write_fake_omniglot_runs(tmp_path_factory.mktemp("omniglot"))


def _labels_txt(archive: Path, run: int) -> list:
    with zipfile.ZipFile(archive) as z:
        return [ln.split() for ln in z.read(f"run{run:02d}/class_labels.txt").decode().splitlines() if ln.strip()]


def _check_runs(archive: Path) -> None:
    ds = get_dataset("omniglot_runs", archive=archive)
    split = ds.load_split("test")
    assert split.images.shape == (800, 105, 105, 3) and split.num_classes == 400
    assert ds.class_split()["train"] == [] and ds.class_split()["val"] == []
    counts = np.bincount(split.labels)
    ep = load_episodes("omniglot_runs", "test", counts, PROTOCOL, split.class_names)
    rows = ep.rows(np.concatenate([[0], np.cumsum(counts)[:-1]]))
    assert rows.shape == (20, 20, 2)
    pairs = ds.pairs()
    with zipfile.ZipFile(archive) as z:
        for r in (1, 7, 20):
            # the support of way w is runNN/training/class{w+1}.png and its query the item class_labels.txt pairs
            # with it: compare decoded pixels with the archive's own files
            item_of = {cls: item for item, cls in _labels_txt(archive, r)}
            for w in (0, 5, 19):
                cls = f"run{r:02d}/training/class{w + 1:02d}.png"
                assert pairs[f"run{r:02d}/class{w + 1:02d}"] == [cls, item_of[cls]]
                for pos, rel in ((0, cls), (1, item_of[cls])):
                    from PIL import Image
                    import io

                    want = np.asarray(Image.open(io.BytesIO(z.read(rel))).convert("RGB"))
                    np.testing.assert_array_equal(split.images[rows[r - 1, w, pos]], want)


def test_fake_archive_reads_as_published(fake_runs):
    _check_runs(fake_runs)


def test_real_runs(shared_data):
    archive = shared_data / "omniglot" / "all_runs.zip"
    assert hashlib.md5(archive.read_bytes()).hexdigest() == "e8996daecdf12afeeb4a53a179f06b19"
    _check_runs(archive)


def test_only_the_official_protocol(fake_runs):
    ds = get_dataset("omniglot_runs", archive=fake_runs)
    counts = ds.split_counts("test")
    for bad in (EpisodeProtocol(5, 1, 1, 20, 0), EpisodeProtocol(20, 1, 1, 21, 0)):
        with pytest.raises(DataError, match="one fixed protocol"):
            load_episodes("omniglot_runs", "test", counts, bad, ())
    few = load_episodes("omniglot_runs", "test", counts, PROTOCOL.replace(n_episodes=3), ())
    assert len(few.classes) == 3


def test_bad_archives_are_refused(tmp_path):
    small = write_fake_omniglot_runs(tmp_path / "a", n_runs=19) if (tmp_path / "a").mkdir() is None else None
    with pytest.raises(DataError, match="run20/class_labels.txt|corrupt or incomplete"):
        get_dataset("omniglot_runs", archive=small).load_split("test")
    (tmp_path / "b").mkdir()
    bad = tmp_path / "b" / "all_runs.zip"
    with zipfile.ZipFile(write_fake_omniglot_runs(tmp_path / "a", name="x.zip")) as src, \
            zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "run03/class_labels.txt":
                data = b"\n".join(data.splitlines()[:-1])  # one test item unpaired
            dst.writestr(info, data)
    with pytest.raises(DataError, match="run03/class_labels.txt does not pair"):
        get_dataset("omniglot_runs", archive=bad).load_split("test")
    other = tmp_path / "b" / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "not omniglot")
    with pytest.raises(DataError, match="not Omniglot's all_runs.zip"):
        get_dataset("omniglot_runs", archive=other).load_split("test")


def test_shape_matcher_solves_the_fake_runs(fake_runs):
    """Pixels are a fine matcher for the fake runs (same strokes, shifted by 2 px): the episodes pair each
    support with its own query. Untrained conv features do far better than chance (5%)."""
    from fsl_lsskd.eval import evaluate

    split = get_dataset("omniglot_runs", archive=fake_runs).load_split("test")
    net = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())
    res = evaluate(net, split, protocols=[PROTOCOL], readouts=["protonet"], image_size=32, cache=False)[0]
    assert res.n_episodes == 20 and res.mean > 80, res.accuracy
    assert res.episodes_source.startswith("omniglot_runs")

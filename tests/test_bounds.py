"""Bounds on every number and name a user types (``fsl_lsskd.bounds``), and readers that name another dataset's
archive: each bad input exits 2 with a message naming the limit or what was found, before any data is decoded,
generated or allocated."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsl_lsskd import bounds
from fsl_lsskd.bounds import SEED_RULE, check_name, format_bytes
from fsl_lsskd.cli import main
from fsl_lsskd.errors import ConfigError, ProtocolError

GiB = 1 << 30


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def memory(monkeypatch):
    """This machine has 16 GiB available, whatever it really has (the messages quote it)."""
    monkeypatch.setattr(bounds, "available_memory", lambda: 16 * GiB)


def _nothing_decoded():
    from fsl_lsskd.utils import cache_dir

    root = cache_dir()
    return not root.exists() or not any(p.is_file() for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------- command line
EVAL = ("evaluate", "--untrained", "--backbone", "conv4", "--dataset", "tiny_imagenet", "--archive",
        "never-read.zip", "--n-shot", "1")


@pytest.mark.parametrize("option, value, rule", [
    ("--batch-size", "0", "must be an integer >= 1"),
    ("--batch-size", "-1", "must be an integer >= 1"),
    ("--image-size", "0", "must be an image size >= 1 pixel"),
    ("--seed", "-1", SEED_RULE),
    ("--seed", str(2 ** 32), SEED_RULE),
    ("--n-query", "0", "must be an integer >= 1"),
    ("--n-episodes", "0", "must be an integer >= 1"),
    ("--folder-image-size", "0", "must be an image size >= 1 pixel"),
    ("--train-per-class", "0", "must be an integer >= 1"),
])
def test_evaluate_refuses_out_of_range_numbers(option, value, rule):
    res = cli(*EVAL, option, value)
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}': {value}: {rule}" in res.output, res.output
    assert _nothing_decoded()


@pytest.mark.parametrize("args, option, rule", [
    (("train", "--out", "x", "--image-size", "0"), "--image-size", "must be an image size >= 1 pixel"),
    (("train", "--out", "x", "--seed", "-1"), "--seed", SEED_RULE),
    (("train", "--out", "x", "--batch-size", "0"), "--batch-size", "must be an integer >= 1"),
    (("train", "--out", "x", "--epochs", "0"), "--epochs", "must be an integer >= 1"),
    (("train", "--out", "x", "--val-n-episodes", "-1"), "--val-n-episodes", "must be an integer >= 0"),
    (("data", "make-split", "image_folder", "--data-root", ".", "--out", "s.json", "--seed", "-1"), "--seed",
     SEED_RULE),
    (("perf", "eval", "--n-episodes", "0"), "--n-episodes", "must be an integer >= 1"),
    (("perf", "train", "--steps", "0"), "--steps", "must be an integer >= 1"),
    (("export", "ckpt", "--out", "x", "--runs", "0"), "--runs", "must be an integer >= 1"),
])
def test_other_commands_refuse_out_of_range_numbers(tmp_path, monkeypatch, args, option, rule):
    monkeypatch.chdir(tmp_path)
    res = cli(*args)
    assert res.exit_code == 2 and f"Invalid value for '{option}'" in res.output and rule in res.output, res.output
    assert not (tmp_path / "x").exists()


def test_episodes_beyond_memory_are_refused_with_the_estimate_before_any_data(memory):
    res = cli(*EVAL, "--n-episodes", "99999999999")
    assert res.exit_code == 2, res.output
    # 5-way 1-shot 15 queries: int16 classes [E,5] + uint16 images [E,5,16] + int64 rows [E,5,16] + float64
    # accuracy [E] + float32 and float64 query probabilities [E,75,5]
    per_episode = 5 * 2 + 5 * 16 * 2 + 5 * 16 * 8 + 8 + 75 * 5 * (4 + 8)
    need = format_bytes(99_999_999_999 * per_episode)
    assert need == "484 TiB"
    assert (f"--n-episodes 99999999999: 99,999,999,999 episodes of 5-way 1-shot with 15 queries per class "
            f"(image positions, split rows and query probabilities) need {need}, more than the 16 GiB of memory "
            f"available here; lower --n-episodes") in res.output, res.output
    assert "never-read.zip" not in res.output and _nothing_decoded()  # refused before the data was looked at
    # the library refuses too, before allocating: the episode generator
    from fsl_lsskd.eval.episodes import generate_episodes
    from fsl_lsskd.protocol import EpisodeProtocol

    with pytest.raises(ConfigError, match=r"n_episodes 10000000000: 10,000,000,000 episodes .* need 7\.44 TiB"):
        generate_episodes(EpisodeProtocol(5, 1, 15, 10_000_000_000), [20] * 5)


def test_validation_episodes_beyond_memory_are_refused(tmp_path, memory):
    from fsl_lsskd.data.fake import write_fake_cifar100

    archive = write_fake_cifar100(tmp_path, per_class_train=2, per_class_test=1)
    res = cli("train", "--dataset", "cifar_fs", "--archive", archive, "--out", tmp_path / "run",
              "--val-n-episodes", "4000000000")
    need = format_bytes(4_000_000_000 * (5 * 2 + 5 * 20 * 2 + 5 * 20 * 8 + 8))  # no probabilities: ProtoNet accuracy
    assert res.exit_code == 2 and "--val-n-episodes 4000000000: 4,000,000,000 episodes of 5-way 5-shot" in res.output \
        and f"need {need}, more than the 16 GiB" in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_seeds_and_counts_in_the_python_api():
    from fsl_lsskd.protocol import EpisodeProtocol
    from fsl_lsskd.train.config import TrainConfig

    with pytest.raises(ProtocolError, match=r"seed 4294967296: seeds are non-negative integers below 2\*\*32"):
        EpisodeProtocol(seed=2 ** 32)
    with pytest.raises(ConfigError, match=r"seed -1: seeds are non-negative"):
        TrainConfig(seed=-1)
    with pytest.raises(ConfigError, match=r"image_size must be >= 1 pixel, got 0"):
        TrainConfig(image_size=0)
    assert TrainConfig(seed=2 ** 32 - 1).seed == 2 ** 32 - 1


def test_format_bytes_and_available_memory():
    assert format_bytes(999_999_999_990) == "931 GiB"
    assert format_bytes(3.28e12) == "2.98 TiB"
    assert format_bytes(512 * 2 ** 20) == "512 MiB"
    assert format_bytes(10) == "10 B"
    assert 0 < bounds.available_memory()


# ---------------------------------------------------------------------------------------------- benchmark files
BENCH = """
name: b
datasets: [tiny_imagenet]
data: {tiny_imagenet: {generate: [6, 2]}}
backbones: [conv4]
methods: [ce]
seeds: [0]
image_size: 32
train: {epochs: 1, validation: null}
eval: {n_shot: [1], n_query: 1, n_episodes: 10}
"""


def _bench(tmp_path, **changes) -> Path:
    text = BENCH
    for key, value in changes.items():
        old = next(line for line in BENCH.splitlines() if line.startswith(f"{key}:"))
        text = text.replace(old, f"{key}: {value}")
    path = tmp_path / "b.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("key, value, message", [
    ("data", "{tiny_imagenet: {generate: [-20, 5]}}", "b.yaml: data.tiny_imagenet.generate[0] must be >= 1, got -20"),
    ("data", "{tiny_imagenet: {generate: [6, 0]}}", "b.yaml: data.tiny_imagenet.generate[1] must be >= 1, got 0"),
    ("data", "{tiny_imagenet: {generate: [6]}}", "generate must be [train images per class, test images per class]"),
    ("data", "{image_folder: {image_size: 0}}", "data.image_folder.image_size must be >= 1 pixel, got 0"),
    ("seeds", "[0, -1]", f"b.yaml: seeds[1] -1: {SEED_RULE}"),
    ("seeds", "[4294967296]", f"b.yaml: seeds[0] 4294967296: {SEED_RULE}"),
    ("image_size", "0", "b.yaml: image_size must be >= 1 pixel, got 0"),
    ("eval", "{n_shot: [0], n_episodes: 10}", "b.yaml: eval.n_shot[0] must be >= 1, got 0"),
    ("eval", "{n_shot: [1], n_episodes: 0}", "b.yaml: eval.n_episodes must be >= 1, got 0"),
    ("train", "{epochs: 0}", "b.yaml: train.epochs must be >= 1, got 0"),
    ("name", "../../../somewhere/else", "b.yaml: name '../../../somewhere/else' names files and folders, so it must "
                                       "be one file-name component: it has a path separator (/ or \\) and a leading "
                                       "dot"),
    ("name", ".hidden", "it has a leading dot (a hidden file)"),
    ("name", '"a\\tb"', "it has a control character"),
    ("methods", "[ce, a/b]\nvariants: {a/b: {method: ce}}", "b.yaml: variants: the name 'a/b' names files"),
])
def test_benchmark_numbers_and_names_are_refused_before_anything_is_generated(tmp_path, monkeypatch, key, value,
                                                                              message):
    monkeypatch.chdir(tmp_path)
    for command in (("run", "--dry-run"), ("table",)):
        res = cli(command[0], _bench(tmp_path, **{key: value}), *command[1:])
        assert res.exit_code == 2 and message in res.output, res.output
    assert _nothing_decoded() and not (tmp_path / "results").exists()
    assert not any(p.name.startswith(("mlflow", "mlruns")) for p in tmp_path.iterdir())


def test_slurm_and_local_resources_are_bounded(tmp_path):
    from fsl_lsskd.bench.config import load_benchmark

    with pytest.raises(ConfigError, match=r"b\.yaml: launcher\.slurm\.mem_gb must be >= 1, got 0"):
        load_benchmark(_bench(tmp_path, train="{epochs: 1, validation: null}\nlauncher: {slurm: {mem_gb: 0}}"))
    with pytest.raises(ConfigError, match=r"launcher\.local\.parallel must be >= 1, got 0"):
        load_benchmark(_bench(tmp_path, train="{epochs: 1, validation: null}\nlauncher: {local: {parallel: 0}}"))


def test_generated_data_beyond_memory_is_refused_with_the_estimate(tmp_path, monkeypatch, memory):
    monkeypatch.chdir(tmp_path)
    res = cli("run", _bench(tmp_path, data="{tiny_imagenet: {generate: [100000000, 5]}}"), "--dry-run")
    assert res.exit_code == 2, res.output
    # 200 classes x 100,000,005 uint8 64x64x3 images + one class's float64 working array of 100,000,000 images
    need = format_bytes(200 * 100_000_005 * 64 * 64 * 3 + 100_000_000 * 64 * 64 * 3 * 8)
    assert (f"b.yaml: data.tiny_imagenet.generate [100000000, 5]: 200 classes of 100,000,005 generated 64x64 images "
            f"each need {need}, more than the 16 GiB of memory available here; lower data.tiny_imagenet.generate"
            in res.output), res.output
    assert _nothing_decoded()
    res = cli("run", _bench(tmp_path, eval="{n_shot: [1], n_query: 1, n_episodes: 99999999999}"), "--dry-run")
    assert res.exit_code == 2 and "b.yaml: eval.n_episodes 99999999999: 99,999,999,999 episodes of 5-way 1-shot" \
        in res.output and "more than the 16 GiB" in res.output, res.output


@pytest.mark.parametrize("name, ok", [("cpu_tiny_imagenet", True), ("a.b-c_d", True), ("Ünïcode", True),
                                      ("", False), (".", False), ("..", False), ("a/b", False), ("a\\b", False),
                                      ("a\nb", False), ("x" * 256, False)])
def test_check_name(name, ok):
    if ok:
        assert check_name(name, "name") == name
    else:
        with pytest.raises(ConfigError):
            check_name(name, "name")


# ------------------------------------------------------------------------------------------ another dataset
def _cifar10_tar(folder: Path) -> Path:
    path = folder / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in ("cifar-10-batches-py/", "cifar-10-batches-py/batches.meta", "cifar-10-batches-py/data_batch_1",
                     "cifar-10-batches-py/test_batch"):
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = 4
                tar.addfile(info, io.BytesIO(b"junk"))
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    from fsl_lsskd.data.fake import write_fake_cifar100, write_fake_tiny_imagenet
    from fsl_lsskd.data.fake_omniglot import write_fake_omniglot_runs

    d = tmp_path_factory.mktemp("archives")
    return {"cifar": write_fake_cifar100(d, per_class_train=1, per_class_test=1),
            "tiny": write_fake_tiny_imagenet(d, per_class_train=1, per_class_val=1),
            "omniglot": write_fake_omniglot_runs(d),
            "cifar10": _cifar10_tar(d)}


@pytest.mark.parametrize("dataset, archive, found, fix", [
    ("tiny_imagenet", "cifar", "holds CIFAR-100, not Tiny ImageNet: found cifar-100-python/", "--dataset cifar_fs"),
    ("tiny_imagenet", "omniglot", "holds Omniglot's one-shot runs, not Tiny ImageNet: found run01/class_labels.txt",
     "--dataset omniglot_runs"),
    ("cifar_fs", "tiny", "holds Tiny ImageNet, not CIFAR-100: found tiny-imagenet-200/", "--dataset tiny_imagenet"),
    ("cifar_fs", "cifar10", "holds CIFAR-10, not CIFAR-100: found cifar-10-batches-py/",
     "It is not a dataset fsl-bench reads"),
    ("omniglot_runs", "tiny", "holds Tiny ImageNet, not Omniglot's one-shot runs", "--dataset tiny_imagenet"),
    ("omniglot_runs", "cifar", "holds CIFAR-100, not Omniglot's one-shot runs", "--dataset cifar_fs"),
])
def test_a_readable_archive_of_another_dataset_is_named(archives, dataset, archive, found, fix):
    from fsl_lsskd.data.identify import LAYOUTS

    res = cli("data", "verify", dataset, "--archive", archives[archive], "--no-decode")
    assert res.exit_code == 2, res.output
    assert found in res.output and fix in res.output and "expected " in res.output, res.output
    expected = next(lay for lay in LAYOUTS if lay.dataset == dataset)
    assert expected.official in res.output and expected.expected in res.output, res.output
    assert "corrupt" not in res.output and "download it again" not in res.output, res.output


def test_the_issue_example_cifar_as_tiny_imagenet_in_evaluate(archives):
    res = cli("evaluate", "--untrained", "--backbone", "conv4", "--dataset", "tiny_imagenet", "--archive",
              archives["cifar"], "--n-episodes", "10")
    assert res.exit_code == 2, res.output
    assert f"{archives['cifar']} holds CIFAR-100, not Tiny ImageNet: found cifar-100-python/" in res.output
    assert ("; expected tiny-imagenet-200.zip or its extracted folder, holding tiny-imagenet-200/wnids.txt, "
            "train/<wnid>/images/<wnid>_<i>.JPEG and val/val_annotations.txt. Read it with --dataset cifar_fs"
            in res.output), res.output


def test_image_folder_names_another_datasets_archive_or_folder(archives, tmp_path):
    import zipfile

    split = tmp_path / "split.json"
    split.write_text('{"train": ["a"], "val": ["b"], "test": ["c"]}')
    res = cli("data", "verify", "image_folder", "--data-root", archives["cifar"], "--split-file", split)
    assert res.exit_code == 2 and "holds CIFAR-100, not an image folder" in res.output, res.output
    with zipfile.ZipFile(archives["tiny"]) as z:
        z.extractall(tmp_path / "x")
    res = cli("data", "verify", "image_folder", "--data-root", tmp_path / "x" / "tiny-imagenet-200", "--split-file",
              split, "--no-decode")
    assert res.exit_code == 2 and "holds Tiny ImageNet, not an image folder: found" in res.output \
        and "--dataset tiny_imagenet" in res.output, res.output


def test_own_archives_still_load_and_truncated_ones_are_called_corrupt(archives, tmp_path):
    res = cli("data", "verify", "cifar_fs", "--archive", archives["cifar"], "--no-decode")
    assert res.exit_code == 0, res.output
    cut = tmp_path / "tiny-imagenet-200.zip"
    cut.write_bytes(archives["tiny"].read_bytes()[:5000])
    res = cli("data", "verify", "tiny_imagenet", "--archive", cut, "--no-decode")
    assert res.exit_code == 2 and "corrupt or truncated" in res.output, res.output


"""One word, one thing, on the command line: ``--data NAME=PATH`` says where data is in every command (the old
``--archive``/``--data-root`` still work, with a deprecation note), the output directories are named for what
they hold (``run --runs-dir``, ``table``/``edge --results-dir``, ``publish --published-dir``; ``--out`` still
works, with a note), and ``evaluate`` takes a dataset's fixed protocol (omniglot_runs) when none is given."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.data.fake import write_fake_cifar100
from fsl_lsskd.data.fake_omniglot import write_fake_omniglot_runs
from fsl_lsskd.options import data_location, parse_data_items
from fsl_lsskd.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "benchmarks" / "smoke.yaml"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def deprecation_lines(res) -> list:
    return [ln for ln in res.stderr.splitlines() if "deprecated" in ln]


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    return write_fake_cifar100(tmp_path_factory.mktemp("cifar"), per_class_train=3, per_class_test=1, seed=3)


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory) -> Path:
    return write_fake_omniglot_runs(tmp_path_factory.mktemp("omniglot"))


# ------------------------------------------------------------------------------------------ the shared parser
def test_parser_reads_name_path_and_refuses_the_rest(tmp_path):
    assert parse_data_items(["a=x.zip", " b = dir/ "], ["a", "b"], "a dataset") == {"a": "x.zip", "b": "dir/"}
    for bad, msg in (("a", "expected NAME=PATH"), ("a=", "expected NAME=PATH"), ("=x", "expected NAME=PATH"),
                     ("c=x", "'c' is not a dataset (a, b)")):
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            parse_data_items([bad], ["a", "b"], "a dataset")
    with pytest.raises(ConfigError, match="given twice"):
        parse_data_items(["a=x", "a=y"], ["a"], "a dataset")
    # a file is the archive, a directory the root, a missing path an error (the directory to fetch into with
    # download)
    f = tmp_path / "x.zip"
    f.write_bytes(b"")
    assert data_location("a", str(f)) == {"archive": f.resolve()}
    assert data_location("a", str(tmp_path)) == {"root": tmp_path.resolve()}
    with pytest.raises(ConfigError, match="does not exist"):
        data_location("a", str(tmp_path / "nope"))
    assert data_location("a", str(tmp_path / "nope"), download=True) == {"root": (tmp_path / "nope").resolve()}


# ------------------------------------------------------------------------------------- --data everywhere
def test_data_prepare_with_data_file_dir_and_the_old_spellings(fake_cifar):
    res = cli("data", "prepare", "cifar_fs", "--data", f"cifar_fs={fake_cifar}")
    assert res.exit_code == 0, res.output
    assert f"source {fake_cifar}" in res.output and not deprecation_lines(res)
    res = cli("data", "verify", "cifar_fs", "--data", f"cifar_fs={fake_cifar.parent}", "--no-decode")
    assert res.exit_code == 0, res.output
    assert "classes in source: 100" in res.output and not deprecation_lines(res)
    for flag, path, word in (("--archive", fake_cifar, "FILE"), ("--data-root", fake_cifar.parent, "DIR")):
        res = cli("data", "verify", "cifar_fs", flag, path, "--no-decode")
        assert res.exit_code == 0, res.output
        assert "classes in source: 100" in res.output
        assert deprecation_lines(res) == [f"note: {flag} is deprecated and will be removed in a later release; use "
                                          f"--data cifar_fs={word}"], res.stderr


def test_evaluate_reads_the_dataset_named_by_data(fake_cifar):
    # no --dataset: NAME of --data is the dataset
    res = cli("evaluate", "--untrained", "--backbone", "conv4", "--data", f"cifar_fs={fake_cifar}",
              "--n-shot", "1", "--n-query", "1", "--n-episodes", "2", "--readouts", "protonet", "--image-size", "32",
              "--no-cache")
    assert res.exit_code == 0, res.output
    assert "on cifar_fs test" in res.output and "5-way 1-shot" in res.output and "(2 episodes" in res.output


COMMANDS = {  # each command's way of naming the dataset tiny_imagenet, before --data
    "train": ["train", "--method", "ce", "--backbone", "conv4", "--dataset", "tiny_imagenet"],
    "evaluate": ["evaluate", "--untrained", "--backbone", "conv4", "--dataset", "tiny_imagenet"],
    "data": ["data", "verify", "tiny_imagenet"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_data_errors_exit_2_with_the_fix(command, tmp_path):
    start = COMMANDS[command] + (["--out", tmp_path / "run"] if command == "train" else [])
    (tmp_path / "f.zip").write_bytes(b"")
    cases = [
        (["--data", "nope=x.zip"], "'nope' is not a registered dataset (cifar_fs, image_folder, omniglot_runs, "
                                   "tiny_imagenet)"),
        (["--data", "tiny_imagenet"], "expected NAME=PATH"),
        (["--data", "tiny_imagenet="], "expected NAME=PATH"),
        (["--data", f"tiny_imagenet={tmp_path / 'nope'}"], "does not exist"),
        (["--data", f"tiny_imagenet={tmp_path}", "--archive", tmp_path / "f.zip"],
         "--data and --archive both say where the data is; give --data NAME=PATH only"),
        (["--data", f"tiny_imagenet={tmp_path}", "--data-root", tmp_path],
         "--data and --data-root both say where the data is"),
        (["--data", f"cifar_fs={tmp_path}"], "this command reads dataset 'tiny_imagenet'; pass --data "
                                             "tiny_imagenet=PATH"),
        (["--data", f"tiny_imagenet={tmp_path}", "--data", f"cifar_fs={tmp_path}"], "this command reads one dataset"),
    ]
    for extra, message in cases:
        res = cli(*start, *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert message in res.output, (extra, res.output)
        assert "Traceback" not in res.output


def test_train_data_names_the_dataset_and_reaches_it(tmp_path):
    """--data cifar_fs=DIR without --dataset trains cifar_fs (default tiny_imagenet), reading DIR: its data is
    looked for there (an empty directory: the message names where, and the fix in the new spelling)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    res = cli("train", "--method", "ce", "--backbone", "conv4", "--data", f"cifar_fs={empty}",
              "--out", tmp_path / "run")
    assert res.exit_code == 2, res.output
    assert "CIFAR" in res.output and str(empty) in res.output and "--data cifar_fs=PATH" in res.output, res.output
    assert "--archive" not in res.output and "--data-root" not in res.output
    res = cli("train", "--method", "ce", "--backbone", "conv4", "--archive", empty / "x.tar.gz",
              "--out", tmp_path / "run")
    assert res.exit_code == 2 and len(deprecation_lines(res)) == 1
    assert "use --data tiny_imagenet=FILE" in deprecation_lines(res)[0]


def test_make_split_takes_data(tmp_path):
    root = tmp_path / "imgs"
    from PIL import Image

    for c in (f"c{i:02d}" for i in range(23)):
        (root / c).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (8, 8), (40 * j, 0, 0)).save(root / c / f"{j}.png")
    res = cli("data", "make-split", "image_folder", "--data", f"image_folder={root}", "--min-images", 3,
              "--out", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.json").is_file() and "next: fsl-bench train --data image_folder=" in res.output
    res = cli("data", "make-split", "image_folder", "--data", f"tiny_imagenet={root}", "--out", tmp_path / "t.json")
    assert res.exit_code == 2 and "this command reads dataset 'image_folder'" in res.output


def test_run_data_errors(tmp_path):
    res = cli("run", SMOKE, "--dry-run", "--data", "nope=x")
    assert res.exit_code == 2 and "'nope' is not a dataset of" in res.output, res.output
    res = cli("run", SMOKE, "--dry-run", "--data", "tiny_imagenet=a", "--data", "tiny_imagenet=b")
    assert res.exit_code == 2 and "given twice" in res.output, res.output


# ----------------------------------------------------------------------------- output directories by name
def _blocked(tmp_path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("x")
    return f / "sub"  # cannot be created: its parent is a file


@pytest.mark.parametrize("command,new", [("run", "--runs-dir"), ("table", "--results-dir"),
                                         ("publish", "--published-dir")])
def test_output_options_have_their_own_names_and_out_still_works(command, new, tmp_path):
    target = _blocked(tmp_path)
    # the new name reaches the command: its error names the new option and the path
    res = cli(command, SMOKE, new, target)
    assert res.exit_code == 2 and f"{new} {target}" in res.output and "is a file" in res.output, res.output
    assert not deprecation_lines(res)
    # --out still sets the same directory, after one deprecation note
    res = cli(command, SMOKE, "--out", target)
    assert res.exit_code == 2 and f"{new} {target}" in res.output, res.output
    assert deprecation_lines(res) == [f"note: --out is deprecated and will be removed in a later release; use {new}"]
    # both: a usage error
    res = cli(command, SMOKE, "--out", tmp_path / "x", new, tmp_path / "y")
    assert res.exit_code == 2 and f"--out and {new} are the same option" in res.output, res.output
    assert new in cli(command, "--help").output


def test_edge_results_dir(tmp_path):
    target = _blocked(tmp_path)
    for flag in ("--results-dir", "--out"):
        res = cli("edge", SMOKE, flag, target)
        assert res.exit_code == 2 and f"--results-dir {target}" in res.output, res.output


# ------------------------------------------------------------------------------- a dataset's own protocol
def _evaluate_runs(archive: Path, *extra):
    return cli("evaluate", "--untrained", "--backbone", "conv4", "--data", f"omniglot_runs={archive}",
               "--readouts", "protonet", "--image-size", "28", "--no-cache", *extra)


def test_evaluate_omniglot_runs_takes_its_fixed_protocol(fake_runs):
    res = _evaluate_runs(fake_runs)
    assert res.exit_code == 0, res.output
    assert "20-way 1-shot" in res.output and "(20 episodes, 1 queries/class" in res.output, res.output
    assert "omniglot_runs (fixed episodes of the dataset)" in res.output
    # an option given is kept: fewer episodes of the same runs; another protocol is refused, naming the one
    res = _evaluate_runs(fake_runs, "--n-episodes", "3")
    assert res.exit_code == 0 and "(3 episodes, 1 queries/class" in res.output, res.output
    res = _evaluate_runs(fake_runs, "--n-way", "5")
    assert res.exit_code == 2 and "one fixed protocol" in res.output, res.output
    # a split the dataset does not have is a message naming the one it has, not a traceback (newcomer finding)
    res = _evaluate_runs(fake_runs, "--split", "val")
    assert res.exit_code == 2 and "no classes in its val split; pass --split test" in res.output, res.output


def test_evaluate_real_omniglot_runs(shared_data):
    archive = shared_data / "omniglot" / "all_runs.zip"
    if not archive.is_file():
        pytest.skip(f"{archive} not present")
    res = _evaluate_runs(archive)
    assert res.exit_code == 0, res.output
    assert "400 classes, 800 images" in res.output and "(20 episodes, 1 queries/class" in res.output, res.output


def test_scoring_a_split_without_classes_names_the_split_that_has_them(fake_runs):
    """The one check evaluate and export both run before their capacity checks (export's `--split val` on
    omniglot_runs read min() of an empty array, as evaluate's did)."""
    from fsl_lsskd.data import get_dataset
    from fsl_lsskd.data.base import scored_split_counts
    from fsl_lsskd.errors import ConfigError

    ds = get_dataset("omniglot_runs", archive=fake_runs)
    assert len(scored_split_counts(ds, "omniglot_runs", "test")) > 0
    with pytest.raises(ConfigError, match=r"omniglot_runs has no classes in its val split; pass --split test$"):
        scored_split_counts(ds, "omniglot_runs", "val")

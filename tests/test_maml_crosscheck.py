"""tools/maml_l2l_crosscheck.py (learn2learn's MAML recipe on fsl-bench's training rows) runs end to end on a
generated Tiny ImageNet archive in the official layout: a validation point before training and after every
--val-every meta-iterations, written as JSON lines; a wrong --data is exit 2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "maml_l2l_crosscheck.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("maml_l2l_crosscheck", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crosscheck_runs_learn2learn_maml_on_our_training_rows(tool, tmp_path, monkeypatch):
    from fsl_lsskd.data.fake import write_fake_tiny_imagenet

    monkeypatch.setenv("FSL_BENCH_CACHE", str(tmp_path / "cache"))
    archive = write_fake_tiny_imagenet(tmp_path, per_class_train=5, per_class_val=3, size=32, seed=1)
    out = tmp_path / "xcheck.jsonl"
    rc = tool.main(["--data", f"tiny_imagenet={archive}", "--train-per-class", "5", "--shots", "1", "--queries", "2",
                    "--tasks", "4", "--meta-batch-size", "2", "--val-every", "1", "--val-tasks", "3", "--hidden", "4",
                    "--classifier-init", "normal", "--out", str(out)])
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 2] and [line["tasks"] for line in lines] == [0, 2, 4]
    assert all(0.0 <= line["val_acc"] <= 100.0 for line in lines)


def test_crosscheck_refuses_other_data(tool, capsys):
    assert tool.main(["--data", "cifar_fs=x.tar.gz"]) == 2
    assert "tiny_imagenet=PATH" in capsys.readouterr().err

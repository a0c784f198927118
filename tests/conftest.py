"""Shared fixtures. Every test runs in its own working directory with its own cache dir and MLflow store, all
temporary, and fails if it wrote anywhere else that a user keeps files: the repository (its default
``./mlflow.db``, ``./mlruns``, ``runs/``, ``results/``...), the directory pytest was started from, and the default
cache ``~/.cache/fsl-bench``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

pytest_plugins = ("pytester",)  # tests/test_isolation.py runs the guard below in a pytest of its own

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


# The test models are tiny: one thread is several times faster than two competing for 2 cores (and
# subprocesses inherit it). Set before torch is imported anywhere.
os.environ.setdefault("OMP_NUM_THREADS", "1")


#: where a user keeps files that no test may touch (the default cache is read before any test changes HOME)
WATCHED = tuple(dict.fromkeys([REPO, Path.cwd().resolve(), Path.home() / ".cache" / "fsl-bench"]))
#: not walked (their own tools write there, or they are too big to stat per test); still listed in their parent
_NOT_WALKED = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "mlruns", "runs"}


def _snapshot(root: Path) -> Dict[str, Tuple]:
    """Every directory's entries and every file's (size, mtime) under ``root`` (but :data:`_NOT_WALKED`)."""
    out: Dict[str, Tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        names = [n for n in dirnames + filenames if n != "__pycache__" and not n.startswith(".coverage")]
        out[rel + os.sep] = tuple(sorted(names))
        dirnames[:] = [d for d in dirnames if d not in _NOT_WALKED]
        for f in filenames:
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            out[os.path.join(rel, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """A temporary working directory, cache (``FSL_BENCH_CACHE``) and MLflow store (``MLFLOW_TRACKING_URI``) for
    every test (a test or fixture may set its own); the test fails when it wrote under :data:`WATCHED`."""
    before = {root: _snapshot(root) for root in WATCHED}
    monkeypatch.setenv("FSL_BENCH_CACHE", str(tmp_path_factory.mktemp("fslcache")))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    changed = []
    for root, old in before.items():
        new = _snapshot(root)
        changed += [str(root / k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        pytest.fail("the test wrote outside its temporary directories: " + ", ".join(changed[:10])
                    + (f" ... ({len(changed)} in all)" if len(changed) > 10 else ""), pytrace=False)


@pytest.fixture
def shared_data() -> Path:
    """The real data in ../shared/data, or skip when this checkout has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA

"""The suite's own isolation (tests/conftest.py): every test gets a temporary working directory, cache and MLflow
store, and a test that writes into the repository (e.g. a default ./mlflow.db) fails."""
from __future__ import annotations

from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

INNER = '''
import os
from pathlib import Path

from conftest import REPO


def test_gets_temporary_places(tmp_path):
    for place in (Path.cwd(), Path(os.environ["FSL_BENCH_CACHE"]),
                  Path(os.environ["MLFLOW_TRACKING_URI"][len("sqlite:///"):])):
        assert not str(place.resolve()).startswith(str(REPO)), place
    (tmp_path / "ok.txt").write_text("fine")
    Path("relative.txt").write_text("fine: the working directory is temporary")


def test_writes_a_store_into_the_repository():
    (REPO / "mlflow.db").write_text("not here")


def test_edits_a_repository_file():
    path = REPO / "tests" / "conftest.py"
    path.write_text(path.read_text() + "\\n")
'''


def test_a_test_writing_outside_its_temporary_directories_fails(pytester, tmp_path_factory):
    pytester.mkdir("tests")
    (pytester.path / "tests" / "conftest.py").write_text(CONFTEST.read_text())
    (pytester.path / "tests" / "test_inner.py").write_text(INNER)
    basetemp = tmp_path_factory.mktemp("inner-basetemp")  # outside the inner repository
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--basetemp", str(basetemp), "tests")
    res.assert_outcomes(passed=3, errors=2)
    text = res.stdout.str()
    assert "the test wrote outside its temporary directories" in text
    assert f"{pytester.path / 'mlflow.db'}" in text and f"{pytester.path / 'tests' / 'conftest.py'}" in text

"""results/README.md says no more than the published numbers: every number with two decimals it quotes is in
a published CSV (within the rounding of its last digit), and every generated section equals the headline and
verdicts that `fsl-bench table` wrote beside it (no stale or hand-edited verdict)."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from fsl_lsskd.report.files import generated_markers

RESULTS = Path(__file__).resolve().parent.parent / "results"
NUMBER = re.compile(r"(?<![\w.])[+\-−]?\d+\.\d\d(?![\d.]*\d)")


def _prose(text: str) -> str:
    """The README without fenced code blocks and inline code (commands, file names, versions)."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", " ", text)


def _published_values() -> list:
    values = []
    for path in sorted(p for p in RESULTS.glob("*.csv") if p.name.split("_headline")[0].split("_edge")[0].split(".")[0]
                       in PUBLISHED):
        with path.open(encoding="utf-8") as fh:
            for row in csv.reader(fh):
                for field in row:
                    for part in re.split(r"[;:]", field):
                        try:
                            values.append(float(part))
                        except ValueError:
                            pass
    return values


def quoted_numbers(text: str) -> list:
    return [float(m.group(0).replace("−", "-")) for m in NUMBER.finditer(_prose(text))]


def unpublished(numbers, values) -> list:
    """The numbers that no published value rounds to (half a unit of the last digit, either sign convention)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    return [x for x in numbers if not np.any(np.abs(v - x) <= 0.005 + 1e-9)]


def test_every_number_in_the_results_readme_is_published():
    text = (RESULTS / "README.md").read_text(encoding="utf-8")
    numbers = quoted_numbers(text)
    assert numbers, "no number found: the pattern is broken"
    missing = unpublished(numbers, _published_values())
    assert not missing, f"results/README.md quotes numbers that no results/*.csv holds: {missing[:20]}"


def test_the_check_catches_a_number_that_is_not_published():
    values = _published_values()
    assert not unpublished(quoted_numbers("CE reads 46.17 here"), [46.1666])
    assert unpublished(quoted_numbers("a typo: 46.71 [−0.40, +0.26]"), [46.1666, -0.4, 0.26]) == [46.71]
    assert quoted_numbers("`torch 2.14.1` and version 0.29.1, 15 epochs, 2,000 episodes") == []
    assert values


PUBLISHED = sorted(p.parent.name for p in (RESULTS / "weights").glob("*/MANIFEST.json"))


@pytest.mark.parametrize("name", PUBLISHED)
def test_generated_sections_equal_the_tables_beside_them(name):
    """Each published benchmark's generated section in results/README.md is exactly the headline and verdicts of
    results/<name>.md: rebuilt by `fsl-bench table`, never typed. (Tables of unpublished benchmarks a user makes
    into results/, such as the smoke run's, are not part of it.)"""
    md = f"{name}.md"
    begin, end = generated_markers(name)
    readme = (RESULTS / "README.md").read_text(encoding="utf-8")
    assert begin in readme and end in readme, f"results/README.md has no generated section for {name}"
    section = readme.split(begin, 1)[1].split(end, 1)[0].strip()
    table = (RESULTS / md).read_text(encoding="utf-8")
    body = table.split(f"# {name}: headline\n\n", 1)[1].split("\nEvery column, paired differences", 1)[0].strip()
    assert section == body

"""Writer of a small ``all_runs.zip`` in the official layout of Omniglot's one-shot runs (Lake et al. 2015;
brendenlake/omniglot ``python/one-shot-classification/all_runs.zip``), for tests.

Layout as published: ``runNN/`` (NN = 01..20) with ``training/classMM.png`` and ``test/itemMM.png`` (MM =
01..20, 105x105 1-bit PNGs, black strokes on white) and ``class_labels.txt``, one line per test item:
``runNN/test/itemMM.png runNN/training/classKK.png``, items in a shuffled class order. Every character is a
random set of strokes; its test item is the same strokes, jittered, so a matcher that looks at shape can solve
the runs."""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from ..utils import atomic_path

SIZE = 105


def _character(rng: np.random.Generator, n_strokes: int = 4) -> np.ndarray:
    """Stroke end points ``[n_strokes, 2, 2]`` in pixels."""
    return rng.uniform(15, SIZE - 15, size=(n_strokes, 2, 2))


def _draw(strokes: np.ndarray, shift: np.ndarray) -> bytes:
    from PIL import Image, ImageDraw

    im = Image.new("1", (SIZE, SIZE), 1)
    draw = ImageDraw.Draw(im)
    for (x0, y0), (x1, y1) in strokes + shift:
        draw.line([(float(x0), float(y0)), (float(x1), float(y1))], fill=0, width=4)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_fake_omniglot_runs(out_dir: os.PathLike, seed: int = 0, n_runs: int = 20, n_way: int = 20,
                             name: str = "all_runs.zip") -> Path:
    """Write ``out_dir/all_runs.zip`` (official layout, module docstring) and return its path. ``n_runs`` and
    ``n_way`` other than 20 make an archive the reader must refuse."""
    rng = np.random.default_rng(seed)
    dest = Path(out_dir) / name
    with atomic_path(dest) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            for r in range(1, n_runs + 1):
                run = f"run{r:02d}"
                z.writestr(f"{run}/", "")
                z.writestr(f"{run}/training/", "")
                z.writestr(f"{run}/test/", "")
                order = rng.permutation(n_way) + 1
                lines = []
                for m in range(1, n_way + 1):
                    strokes = _character(np.random.default_rng([seed, r, m]))
                    z.writestr(f"{run}/training/class{m:02d}.png", _draw(strokes, np.zeros(2)))
                for i, cls in enumerate(order, start=1):
                    strokes = _character(np.random.default_rng([seed, r, int(cls)]))
                    z.writestr(f"{run}/test/item{i:02d}.png", _draw(strokes, rng.uniform(-2, 2, size=2)))
                    lines.append(f"{run}/test/item{i:02d}.png {run}/training/class{cls:02d}.png\n")
                z.writestr(f"{run}/class_labels.txt", "".join(lines), zipfile.ZIP_DEFLATED)
    return dest

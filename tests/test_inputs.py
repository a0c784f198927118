"""The input contract (fsl_lsskd.inputs): one resize and one preparation, the same pixels on every path."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fsl_lsskd.data.base import SplitData
from fsl_lsskd.inputs import InputSpec, resize_uint8

MEAN, STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)


def _images(n=6, size=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_prepare_is_the_published_arithmetic():
    """prepare = antialiased bilinear resize rounded to 0..255, then (x - 255 mean) / (255 std) in float32: the
    formula the published features were computed with, written out here by hand, bit for bit."""
    imgs = _images()
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    y = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    y = y.round().clamp(0, 255)
    m = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    want = (y - m) / s
    got = InputSpec(MEAN, STD, 16).prepare(imgs)
    assert got.dtype == torch.float32 and got.shape == (6, 3, 16, 16)
    assert torch.equal(got, want)
    # at its own size nothing is resized: plain normalisation
    assert torch.equal(InputSpec(MEAN, STD, 20).prepare(imgs), (x - m) / s)
    assert torch.equal(InputSpec(MEAN, STD).prepare(imgs), (x - m) / s)


def test_every_resize_gives_the_same_pixels():
    """The split cache's resize (SplitData.resized), the uint8 resize of the image readouts and prepare's
    float resize see the same integers."""
    imgs = _images(n=5, size=64, seed=1)
    spec = InputSpec(MEAN, STD, 32)
    cached = SplitData(imgs, np.arange(5), [str(i) for i in range(5)], "x", "test").resized(32, chunk=2).images
    as_uint8 = spec.resize_uint8(torch.from_numpy(imgs).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    as_float = spec.resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).float())
    assert np.array_equal(cached, as_uint8)
    assert torch.equal(as_float, torch.from_numpy(as_uint8).permute(0, 3, 1, 2).float())
    # resizing the cached images again is a no-op, so preparing either gives the same input
    assert torch.equal(spec.prepare(imgs), spec.prepare(cached))
    x = torch.from_numpy(imgs[:1]).permute(0, 3, 1, 2)
    assert resize_uint8(x, 64) is x


def test_training_affine_matches_prepare_to_float_rounding():
    imgs = _images(size=8)
    spec = InputSpec(MEAN, STD)
    scale, shift = spec.affine()
    fused = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() * scale + shift
    assert torch.allclose(fused, spec.prepare(imgs), rtol=0, atol=1e-5)


def test_from_meta_precedence_and_checks():
    ds = InputSpec((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), 64)
    assert InputSpec.from_meta({}, ds) == ds
    meta = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "image_size": 32}
    assert InputSpec.from_meta(meta, ds) == InputSpec((0.5,) * 3, (0.25,) * 3, 32)
    assert InputSpec.from_meta(meta, ds, image_size=40, mean=(0, 0, 0)).image_size == 40
    assert InputSpec.from_meta(meta, ds, mean=(0, 0, 0)).mean == (0.0, 0.0, 0.0)
    assert InputSpec.from_meta({}) == InputSpec((0.5,) * 3, (0.25,) * 3, None)
    with pytest.raises(ValueError, match="per RGB channel"):
        InputSpec((0.5, 0.5), (0.25,) * 3)
    with pytest.raises(ValueError, match="> 0"):
        InputSpec((0.5,) * 3, (0.25, 0.0, 0.25))
    with pytest.raises(ValueError, match=">= 1"):
        InputSpec(image_size=0)

"""The backbone's input contract, in one place: :class:`InputSpec` (per-channel ``mean``/``std`` and the input
``image_size``) and the one resize every path uses.

A split holds uint8 images ``[N, H, W, 3]`` (RGB, channels last; :class:`~fsl_lsskd.data.base.SplitData`). A
backbone takes float32 ``[B, 3, S, S]`` normalised with its training data's statistics. Everything between the two
lives here:

* :func:`resize_uint8_range` -- the only resize: bilinear, antialiased, ``align_corners=False``, rounded back to
  integers 0..255 (what the published scores used: the decoded-split cache at the training size, the frozen
  features, the fine-tuning readout and the ONNX/edge inputs all see the same pixels).
* :meth:`InputSpec.prepare` -- uint8 ``[B, H, W, 3]`` -> normalised float32 ``[B, 3, S, S]``:
  ``(x - 255 mean) / (255 std)``, the evaluation's arithmetic.
* :meth:`InputSpec.affine` -- the training loader's fused form of the same normalisation, ``x * scale + shift``
  (one multiply-add per pixel on the augmented batch). It equals ``prepare``'s result up to float rounding (about
  1e-7 relative); each path keeps its own arithmetic because the published weights and scores were produced with
  it.

The spec is read once from the backbone's metadata (:meth:`InputSpec.from_meta`: the ``mean``/``std``/
``image_size`` that training wrote into ``model.json`` and the exported backbone's ``export.json``), falling back
to the dataset's statistics for a backbone that has none (an untrained or foreign checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # torch is imported where it is used: the CLI starts without it
    import numpy as np
    import torch

#: normalisation of a backbone whose metadata and dataset name none (fractions of 255)
DEFAULT_MEAN: Tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_STD: Tuple[float, float, float] = (0.25, 0.25, 0.25)


def resize_uint8_range(x: "torch.Tensor", size: int) -> "torch.Tensor":
    """``x`` float ``[B, C, H, W]`` with values 0..255 -> float32 ``[B, C, size, size]``, resized bilinearly with
    antialiasing (``align_corners=False``) and rounded back to integers in 0..255. ``x`` is returned as it is when
    it already has that size. The one resize of the package: see the module docstring."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == (int(size), int(size)):
        return x
    y = F.interpolate(x, size=(int(size), int(size)), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255)


def resize_uint8(x: "torch.Tensor", size: int) -> "torch.Tensor":
    """uint8 ``[B, C, H, W]`` -> uint8 ``[B, C, size, size]`` through :func:`resize_uint8_range` (``x`` itself
    when it already has that size)."""
    import torch

    if tuple(x.shape[-2:]) == (int(size), int(size)):
        return x
    return resize_uint8_range(x.float(), size).to(torch.uint8)


def _triple(values: Sequence[float], name: str) -> Tuple[float, float, float]:
    out = tuple(float(v) for v in values)
    if len(out) != 3:
        raise ValueError(f"{name} needs one value per RGB channel, got {list(values)!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects of its input.

    Attributes:
        mean: per-channel (R, G, B) mean, as fractions of 255 (the training data's).
        std: per-channel standard deviation, fractions of 255 (all > 0).
        image_size: side ``S`` in pixels of the square input the backbone was built for; None keeps the images'
            own size (no resize).

    Raises ``ValueError`` for a mean/std without three values, a std <= 0 or an image size < 1."""

    mean: Tuple[float, float, float] = DEFAULT_MEAN
    std: Tuple[float, float, float] = DEFAULT_STD
    image_size: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _triple(self.mean, "mean"))
        object.__setattr__(self, "std", _triple(self.std, "std"))
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0 per channel, got {list(self.std)}")
        if self.image_size is not None:
            if int(self.image_size) < 1:
                raise ValueError(f"image_size must be >= 1, got {self.image_size}")
            object.__setattr__(self, "image_size", int(self.image_size))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], default: Optional["InputSpec"] = None, *,
                  mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                  image_size: Optional[int] = None) -> "InputSpec":
        """The spec of a backbone from its metadata (``model.json``, ``export.json`` or
        :func:`fsl_lsskd.checkpoint.load_backbone`'s meta: keys ``mean``, ``std``, ``image_size``). Precedence per
        field: the explicit ``mean``/``std``/``image_size`` argument, then ``meta``, then ``default`` (e.g. the
        dataset's statistics at the split's size), then :data:`DEFAULT_MEAN`/:data:`DEFAULT_STD` and no resize."""
        base = default if default is not None else cls()
        return cls(mean=mean if mean is not None else (meta.get("mean") or base.mean),
                   std=std if std is not None else (meta.get("std") or base.std),
                   image_size=image_size or meta.get("image_size") or base.image_size)

    def with_size(self, image_size: Optional[int]) -> "InputSpec":
        """The same normalisation at another input size (None: no resize)."""
        return InputSpec(self.mean, self.std, image_size)

    def resize(self, x: "torch.Tensor") -> "torch.Tensor":
        """float ``[B, 3, H, W]`` in 0..255 -> float ``[B, 3, S, S]`` in 0..255 (:func:`resize_uint8_range`; no
        change without an ``image_size`` or at that size already)."""
        return x if self.image_size is None else resize_uint8_range(x, self.image_size)

    def resize_uint8(self, x: "torch.Tensor") -> "torch.Tensor":
        """uint8 ``[B, 3, H, W]`` -> uint8 ``[B, 3, S, S]`` (:func:`resize_uint8`; ``x`` without an
        ``image_size``)."""
        return x if self.image_size is None else resize_uint8(x, self.image_size)

    def normalize(self, x: "torch.Tensor") -> "torch.Tensor":
        """float ``[B, 3, H, W]`` in 0..255 (or uint8) -> ``(x - 255 mean) / (255 std)`` float32, on ``x``'s
        device (the evaluation's arithmetic)."""
        import torch

        m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
        s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1) * 255.0
        return (x.float() - m) / s

    def prepare(self, images: "np.ndarray | torch.Tensor", device: Any = "cpu") -> "torch.Tensor":
        """uint8 ``[B, H, W, 3]`` images (numpy, memmap or tensor) -> the backbone's input: float32
        ``[B, 3, S, S]`` on ``device``, resized to ``image_size`` when they differ (:func:`resize_uint8_range`)
        and normalised (:meth:`normalize`). The memory format is whatever is cheapest (channels_last strides);
        call ``.contiguous()`` for a plain NCHW array. What the frozen features, the fine-tuning readouts and
        the exported (ONNX) runtimes are fed."""
        import numpy as np
        import torch

        x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))
        x = x.to(device).permute(0, 3, 1, 2).float()
        return self.normalize(self.resize(x))

    def affine(self, device: Any = "cpu") -> Tuple["torch.Tensor", "torch.Tensor"]:
        """``(scale, shift)``, float32 ``[1, 3, 1, 1]`` on ``device``, with ``x * scale + shift ==
        (x / 255 - mean) / std`` up to float rounding: the training loader's fused normalisation of uint8 pixel
        values (kept as trained: the published weights were trained on exactly these values)."""
        import torch

        std_t = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        mean_t = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return 1.0 / (255.0 * std_t), -mean_t / std_t

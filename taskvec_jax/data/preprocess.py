"""Image preprocessing: channels, resizing to the model's resolution, normalization.

Every source hands over ``uint8`` images ``[H, W, C]`` (tfds decodes them; the embedded
suite stores them so). :class:`Preprocess` turns them into the model's input, in order:

1. channels: grayscale to RGB by repeating the channel; RGB to grayscale with ITU-R 601
   luma ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` (Pillow's integer formula, so a
   gray image that was stored as RGB comes back exactly); an alpha channel is dropped;
2. resizing (only when the size differs): ``"crop"`` scales the image so it covers the
   target and takes the center (CLIP's and the task-vector literature's evaluation
   transform), ``"squash"`` resizes to the target directly; Pillow does the resampling;
3. ``float32`` and normalization ``(x / 255 - mean) / std`` per channel.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np
import PIL.Image

from taskvec_jax.clip.model import IMAGE_MEAN, IMAGE_STD

__all__ = ["NORMALIZATIONS", "Preprocess", "resize", "to_channels"]

# (mean, std) of x / 255, per channel; a single value applies to every channel.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "unit": ((0.0,), (1.0,)),                 # [0, 1]
    "symmetric": ((0.5,), (0.5,)),            # [-1, 1]
    "clip": (IMAGE_MEAN, IMAGE_STD),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

_RESAMPLE = {"bilinear": PIL.Image.Resampling.BILINEAR,
             "bicubic": PIL.Image.Resampling.BICUBIC,
             "nearest": PIL.Image.Resampling.NEAREST,
             "lanczos": PIL.Image.Resampling.LANCZOS}


def _pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (int(size), int(size))
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be a positive int or (height, width), got {size}")
    return size


def to_channels(image: np.ndarray, channels: int | None) -> np.ndarray:
    """A ``uint8`` ``[..., H, W, C]`` image (or a ``[H, W]`` one) with ``channels`` channels.

    ``C = 1 -> 3`` repeats; ``3 -> 1`` is Pillow's integer luma; an alpha channel
    (``C = 2`` or ``4``) is dropped first. ``channels=None`` keeps ``C``.
    """
    if image.ndim == 2:
        image = image[..., None]
    c = image.shape[-1]
    if c in (2, 4):
        image, c = image[..., :c - 1], c - 1
    if channels is None or channels == c:
        return image
    if channels == 3 and c == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 1 and c == 3:
        rgb = image.astype(np.uint32)
        luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) >> 16
        return luma.astype(np.uint8)[..., None]
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def resize(image: np.ndarray, size: tuple[int, int], *, mode: str = "crop",
           interpolation: str = "bilinear") -> np.ndarray:
    """Resizes a ``uint8`` ``[H, W, C]`` image (``C`` in 1, 3) to ``size = (h, w)``.

    ``mode="crop"``: scale by ``s = max(h / H, w / W)`` to
    ``(max(h, round(H s)), max(w, round(W s)))`` and take the centered ``h x w`` window;
    ``mode="squash"``: resize to ``h x w`` directly. An image already of ``size`` is
    returned unchanged.
    """
    h, w = size
    height, width, c = image.shape
    if (height, width) == (h, w):
        return image
    if mode not in ("crop", "squash"):
        raise ValueError(f"resize mode must be 'crop' or 'squash', got {mode!r}")
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got "
                         f"{interpolation!r}")
    pil = PIL.Image.fromarray(image[..., 0] if c == 1 else image)
    if mode == "squash":
        out = np.asarray(pil.resize((w, h), _RESAMPLE[interpolation]))
    else:
        s = max(h / height, w / width)
        nh, nw = max(h, int(round(height * s))), max(w, int(round(width * s)))
        out = np.asarray(pil.resize((nw, nh), _RESAMPLE[interpolation]))
        top, left = (nh - h) // 2, (nw - w) // 2
        out = out[top:top + h, left:left + w]
    return out.reshape(h, w, c)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Turns ``uint8`` images into normalized ``float32`` model inputs.

    Attributes:
      image_size: target ``size`` or ``(height, width)``; ``None`` keeps each image's
        size (then a batch needs images of equal size).
      channels: 1 or 3 output channels; ``None`` keeps the source's.
      normalization: a name in :data:`NORMALIZATIONS` or ``(mean, std)`` (scalars or
        per-channel sequences) applied to ``x / 255``.
      resize_mode: ``"crop"`` (cover, then center crop) or ``"squash"``.
      interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"lanczos"``.
    """

    image_size: int | tuple[int, int] | None = None
    channels: int | None = None
    normalization: str | tuple = "unit"
    resize_mode: Literal["crop", "squash"] = "crop"
    interpolation: str = "bilinear"

    def __post_init__(self):
        _pair(self.image_size)
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1, 3 or None, got {self.channels!r}")
        self.mean_std()

    @property
    def size(self) -> tuple[int, int] | None:
        return _pair(self.image_size)

    def mean_std(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` as float32 arrays broadcastable over ``[..., C]``."""
        norm = self.normalization
        if isinstance(norm, str):
            if norm not in NORMALIZATIONS:
                raise ValueError(f"unknown normalization {norm!r}; choose one of "
                                 f"{sorted(NORMALIZATIONS)} or pass (mean, std)")
            norm = NORMALIZATIONS[norm]
        if len(norm) != 2:
            raise ValueError(f"normalization must be a name or (mean, std), got {norm!r}")
        mean, std = (np.atleast_1d(np.asarray(v, np.float32)) for v in norm)
        if np.any(std <= 0):
            raise ValueError(f"normalization std must be positive, got {std.tolist()}")
        return mean, std

    def raw(self, image: np.ndarray) -> np.ndarray:
        """Channels and resizing only: ``uint8 [H, W, C]`` -> ``uint8 [h, w, C']``."""
        image = to_channels(np.asarray(image, np.uint8), self.channels)
        if self.size is not None:
            image = resize(image, self.size, mode=self.resize_mode,
                           interpolation=self.interpolation)
        return image

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """``(images / 255 - mean) / std`` in float32 over a ``uint8 [..., C]`` array."""
        mean, std = self.mean_std()
        c = images.shape[-1]
        if mean.size not in (1, c) or std.size not in (1, c):
            raise ValueError(f"normalization has {max(mean.size, std.size)} channel values "
                             f"but the images have {c} channels; pass channels="
                             f"{max(mean.size, std.size)} or a matching (mean, std)")
        out = images.astype(np.float32) / np.float32(255)
        if np.any(mean != 0):
            out -= mean
        if np.any(std != 1):
            out /= std
        return out

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """One image: ``uint8 [H, W, C]`` (or ``[H, W]``) -> ``float32 [h, w, C']``."""
        return self.normalize(self.raw(image))

    def batch(self, images: np.ndarray | Sequence[np.ndarray], *,
              task: str = "data") -> np.ndarray:
        """A batch: a ``uint8 [B, H, W, C]`` array or a list of ``[H, W, C]`` images.

        A stacked array whose size needs no change is converted in one vectorized pass.

        Raises:
          ValueError: if the images end up with different shapes (variable-size images
            with ``image_size=None``), naming ``task``.
        """
        if isinstance(images, np.ndarray) and images.ndim == 4 and (
                self.size is None or tuple(images.shape[1:3]) == self.size):
            return self.normalize(to_channels(images.astype(np.uint8, copy=False),
                                              self.channels))
        raw = [self.raw(im) for im in images]
        shapes = {r.shape for r in raw}
        if len(shapes) > 1:
            raise ValueError(f"{task}: images have different shapes "
                             f"{sorted(shapes)[:4]}; pass image_size to resize them to one "
                             "resolution")
        if not raw:
            raise ValueError(f"{task}: empty batch")
        return self.normalize(np.stack(raw))

"""Image transforms for Re-ID training and testing, in plain torch (no torchvision).

The usual Re-ID recipe (Luo et al., "Bag of Tricks", 2019)::

    train: PIL -> tensor -> resize -> random flip -> pad 10 + random crop -> normalise -> random erasing
    test:  PIL -> tensor -> resize -> normalise

Every transform but the first takes and returns a float tensor [3, H, W]. Random transforms draw
from torch's global generator (or the ``generator`` given to them): in DataLoader workers that
generator is seeded from the loader's seeded generator, so a run is reproducible.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_chw(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise TypeError(f"{name}: expected a tensor [C, H, W], got "
                        f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")


def _rand(generator: Optional[torch.Generator]) -> float:
    return float(torch.rand((), generator=generator))


def _check_box_args(name: str, p: float, scale: Sequence[float], ratio: Sequence[float]) -> None:
    """The arguments of a transform that draws a random rectangle with probability p."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: p must be in [0, 1], got {p}")
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name}: scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"{name}: ratio must satisfy 0 < lo <= hi, got {ratio}")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose({inner}\n)"


class ToTensor:
    """PIL image (any mode) -> float32 tensor [3, H, W] in [0, 1]."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"ToTensor: expected a PIL.Image, got {type(img).__name__}")
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8).copy()  # copy: PIL buffers are read-only
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def __repr__(self) -> str:
        return "ToTensor()"


class Resize:
    """Bilinear resize to (height, width), antialiased when shrinking (as PIL does)."""

    def __init__(self, height: int, width: int):
        if int(height) < 1 or int(width) < 1:
            raise ValueError(f"Resize: height and width must be positive, got {height}x{width}")
        self.size = (int(height), int(width))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "Resize")
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x.unsqueeze(0), size=self.size, mode="bilinear", align_corners=False,
                             antialias=True).squeeze(0)

    def __repr__(self) -> str:
        return f"Resize(height={self.size[0]}, width={self.size[1]})"


class RandomHorizontalFlip:
    """Mirror left-right with probability p (people look the same mirrored; cameras do not care)."""

    def __init__(self, p: float = 0.5, generator: Optional[torch.Generator] = None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p, self.generator = float(p), generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "RandomHorizontalFlip")
        return x.flip(-1) if _rand(self.generator) < self.p else x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Pad:
    """Pad every side by ``padding`` pixels with a constant ``fill`` (0: black, as in the recipe)."""

    def __init__(self, padding: int, fill: float = 0.0):
        if int(padding) < 0:
            raise ValueError(f"Pad: padding must be >= 0, got {padding}")
        self.padding, self.fill = int(padding), float(fill)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "Pad")
        p = self.padding
        return F.pad(x, (p, p, p, p), mode="constant", value=self.fill) if p else x

    def __repr__(self) -> str:
        return f"Pad(padding={self.padding}, fill={self.fill})"


class RandomCrop:
    """Crop a random (height, width) window; with Pad first this is a random translation."""

    def __init__(self, height: int, width: int, generator: Optional[torch.Generator] = None):
        self.size, self.generator = (int(height), int(width)), generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "RandomCrop")
        h, w = self.size
        H, W = x.shape[-2:]
        if H < h or W < w:
            raise ValueError(f"RandomCrop: input {H}x{W} is smaller than the crop {h}x{w}")
        top = int(torch.randint(0, H - h + 1, (), generator=self.generator))
        left = int(torch.randint(0, W - w + 1, (), generator=self.generator))
        return x[:, top:top + h, left:left + w]

    def __repr__(self) -> str:
        return f"RandomCrop(height={self.size[0]}, width={self.size[1]})"


class Normalize:
    """(x - mean) / std per channel; ImageNet statistics by default."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"Normalize: mean and std must have the same length and std > 0, "
                             f"got mean={mean}, std={std}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "Normalize")
        if x.shape[0] != self.mean.shape[0]:
            raise ValueError(f"Normalize: input has {x.shape[0]} channels, mean/std have {self.mean.shape[0]}")
        return (x - self.mean.to(x)) / self.std.to(x)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomErasing:
    """Random erasing (Zhong et al., AAAI 2020): with probability p, fill one random rectangle.

    The rectangle covers a fraction in ``scale`` of the image with aspect ratio (h/w) in ``ratio``
    (log-uniform). ``value`` is a number, a per-channel sequence, or "random" (normal noise). Applied
    after Normalize, the default value 0 is the dataset mean colour, which is what the Re-ID recipe
    fills with. Up to ``attempts`` draws are tried for a rectangle that fits; if none fits, the
    image is returned unchanged.
    """

    def __init__(self, p: float = 0.5, scale: Tuple[float, float] = (0.02, 0.4),
                 ratio: Tuple[float, float] = (0.3, 3.3), value: Union[float, Sequence[float], str] = 0.0,
                 attempts: int = 10, generator: Optional[torch.Generator] = None) -> None:
        _check_box_args("RandomErasing", p, scale, ratio)
        self.p, self.scale, self.ratio, self.value = float(p), tuple(scale), tuple(ratio), value
        self.attempts, self.generator = int(attempts), generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "RandomErasing")
        if _rand(self.generator) >= self.p:
            return x
        C, H, W = x.shape
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(self.attempts):
            area = H * W * (self.scale[0] + (self.scale[1] - self.scale[0]) * _rand(self.generator))
            r = math.exp(log_r[0] + (log_r[1] - log_r[0]) * _rand(self.generator))
            h, w = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
            if 0 < h < H and 0 < w < W:
                top = int(torch.randint(0, H - h + 1, (), generator=self.generator))
                left = int(torch.randint(0, W - w + 1, (), generator=self.generator))
                x = x.clone()
                if isinstance(self.value, str):
                    if self.value != "random":
                        raise ValueError(f"RandomErasing: value must be a number, a sequence or "
                                         f"'random', got {self.value!r}")
                    x[:, top:top + h, left:left + w] = torch.randn((C, h, w), generator=self.generator,
                                                                  dtype=x.dtype)
                else:
                    v = torch.as_tensor(self.value, dtype=x.dtype).reshape(-1, 1, 1)
                    x[:, top:top + h, left:left + w] = v
                return x
        return x

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, scale={self.scale}, ratio={self.ratio}, value={self.value!r})"


class RandomPatch:
    """With probability p, paste over a random place a patch cut from an image seen *before*.

    An occlusion by other content (as in Re-ID augmentation; the KSL paper's "random patch", §4.8):
    every call cuts one random rectangle (a fraction in ``scale`` of the image, aspect ratio h/w in
    ``ratio``) of its input into a pool of the last ``pool_size`` patches, and, with probability p
    and once the pool holds ``min_pool`` patches, pastes one drawn from the pool. So the pasted content
    comes from other images (other identities, mostly) of the same stream.
    """

    def __init__(self, p: float = 0.5, scale: Tuple[float, float] = (0.01, 0.1),
                 ratio: Tuple[float, float] = (0.5, 2.0), pool_size: int = 1000, min_pool: int = 10,
                 generator: Optional[torch.Generator] = None):
        _check_box_args("RandomPatch", p, scale, ratio)
        if pool_size < 1 or min_pool < 1:
            raise ValueError(f"RandomPatch: pool_size and min_pool must be >= 1, got {pool_size}, {min_pool}")
        self.p, self.scale, self.ratio = float(p), tuple(scale), tuple(ratio)
        self.pool_size, self.min_pool, self.generator = int(pool_size), int(min_pool), generator
        self.pool: List[torch.Tensor] = []

    def _box(self, H: int, W: int) -> Tuple[int, int]:
        area = H * W * (self.scale[0] + (self.scale[1] - self.scale[0]) * _rand(self.generator))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        r = math.exp(lo + (hi - lo) * _rand(self.generator))
        return min(max(int(round(math.sqrt(area * r))), 1), H), min(max(int(round(math.sqrt(area / r))), 1), W)

    def _at(self, H: int, W: int, h: int, w: int) -> Tuple[int, int]:
        return (int(torch.randint(0, H - h + 1, (), generator=self.generator)),
                int(torch.randint(0, W - w + 1, (), generator=self.generator)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_chw(x, "RandomPatch")
        _, H, W = x.shape
        out = x
        if _rand(self.generator) < self.p and len(self.pool) >= self.min_pool:
            patch = self.pool[int(torch.randint(0, len(self.pool), (), generator=self.generator))]
            h, w = min(patch.shape[1], H), min(patch.shape[2], W)
            top, left = self._at(H, W, h, w)
            out = x.clone()
            out[:, top:top + h, left:left + w] = patch[:, :h, :w]
        h, w = self._box(H, W)
        top, left = self._at(H, W, h, w)
        self.pool.append(x[:, top:top + h, left:left + w].clone())
        if len(self.pool) > self.pool_size:
            self.pool.pop(0)
        return out

    def __repr__(self) -> str:
        return f"RandomPatch(p={self.p}, scale={self.scale}, ratio={self.ratio}, pool_size={self.pool_size})"


def crop_padding(height: int) -> int:
    """The pad-and-crop padding for an input of this height: the usual 10 pixels at 256x128, scaled with
    the input (a fixed 10 would shift a 64x32 input by a third of its width)."""
    return max(1, round(10 * height / 256))


def build_transforms(height: int, width: int, train: bool, *, flip_p: float = 0.5, padding: int = 10,
                     erasing_p: float = 0.5, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD) -> Compose:
    """PIL.Image -> float tensor [3, height, width]; train adds flip, pad-crop and random erasing."""
    steps: List[Callable] = [ToTensor(), Resize(height, width)]
    if train:
        if flip_p > 0:
            steps.append(RandomHorizontalFlip(flip_p))
        if padding > 0:
            steps += [Pad(padding), RandomCrop(height, width)]
    steps.append(Normalize(mean, std))
    if train and erasing_p > 0:
        steps.append(RandomErasing(erasing_p))
    return Compose(steps)

"""Stand-ins for torchvision and pytorchvideo, installed into sys.modules by video_probe.py (tests only).

Importing ``videollava`` imports every LanguageBind modality, whose processors import torchvision and
pytorchvideo at module level. Neither works here: PyPI's torchvision wheels are built for a different torch
than the local CPU torch 2.13.0 (``import torchvision`` fails on its compiled ops), and pytorchvideo imports
torchvision. Video-LLaVA's decord path uses six transforms (processing_video.py L43-54): those are written
here with plain torch ops, following torchvision 0.15 / pytorchvideo 0.1.5; every other name is a
placeholder that raises when used. The real decord (frame reading and selection) and cv2 are used.
``flips`` records RandomHorizontalFlipVideo's decisions so that tests can check the eval-time seeding.
"""
from __future__ import annotations

import math
import random
import sys
import types

import torch
import torch.nn.functional as F

flips: list[bool] = []


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class NormalizeVideo:
    """clip float [C, T, H, W] -> (clip - mean) / std per channel (torchvision _transforms_video)."""

    def __init__(self, mean, std, inplace=False):
        self.mean, self.std = mean, std

    def __call__(self, clip):
        mean = torch.as_tensor(self.mean, dtype=clip.dtype, device=clip.device)[:, None, None, None]
        std = torch.as_tensor(self.std, dtype=clip.dtype, device=clip.device)[:, None, None, None]
        return (clip - mean) / std


class ShortSideScale:
    """[C, T, H, W]: bilinear resize so that the short side is ``size`` (pytorchvideo.transforms.functional)."""

    def __init__(self, size, interpolation="bilinear", backend="pytorch"):
        self.size = size

    def __call__(self, x):
        _, _, h, w = x.shape
        if w < h:
            new_h, new_w = int(math.floor((float(h) / w) * self.size)), self.size
        else:
            new_h, new_w = self.size, int(math.floor((float(w) / h) * self.size))
        return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


class CenterCropVideo:
    def __init__(self, crop_size):
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)

    def __call__(self, clip):
        h, w = clip.shape[-2:]
        th, tw = self.crop_size
        i, j = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return clip[..., i:i + th, j:j + tw]


class RandomHorizontalFlipVideo:
    """Flips [..., W] with probability p, drawing from Python's ``random`` as torchvision does."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, clip):
        flip = random.random() < self.p
        flips.append(flip)
        return clip.flip(-1) if flip else clip


def _placeholder(module: str, name: str):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"{module}.{name} is a test stand-in (tests/baselines/video_stubs.py): "
                                  f"only Video-LLaVA's decord video path is implemented")
    return type(name, (), {"__init__": fail, "__call__": fail})


def _missing(module: str, attr: str):
    if attr.startswith("__"):
        raise AttributeError(f"module {module!r} (test stand-in) has no attribute {attr!r}")
    return _placeholder(module, attr)


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    mod.__getattr__ = lambda attr: _missing(name, attr)  # PEP 562: unknown names -> placeholders
    mod.__path__ = []  # a package, so that submodules import
    sys.modules[name] = mod
    return mod


def install() -> None:
    """Register the stand-ins; refuses to shadow a real torchvision or pytorchvideo already imported."""
    for real in ("torchvision", "pytorchvideo"):
        if real in sys.modules and not getattr(sys.modules[real], "_video_stub", False):
            raise RuntimeError(f"{real} is already imported; the stand-ins would shadow it")
    video = _module("torchvision.transforms._transforms_video", NormalizeVideo=NormalizeVideo,
                    CenterCropVideo=CenterCropVideo, RandomHorizontalFlipVideo=RandomHorizontalFlipVideo)
    transforms = _module("torchvision.transforms", Compose=Compose, Lambda=Lambda, _transforms_video=video)
    _module("torchvision", transforms=transforms, _video_stub=True)
    _module("pytorchvideo", _video_stub=True)
    _module("pytorchvideo.data")
    _module("pytorchvideo.data.encoded_video")
    _module("pytorchvideo.transforms", ShortSideScale=ShortSideScale)

"""Files the synthetic VQA generator draws with: one bold TrueType font and a few real photographs.

Nothing is downloaded. On a development machine both come from packages that ship them (matplotlib's DejaVu fonts and
sample photo, scikit-image's and scikit-learn's bundled test photos, whichever are installed). A machine without
those packages (the GPU box) gets them from a folder made by ``export_assets(dest)`` and named by ``STUDY_ASSETS=dest``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import shutil
from pathlib import Path

from PIL import Image

ASSETS_ENV = "STUDY_ASSETS"
FONT_NAME = "DejaVuSans-Bold.ttf"
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
EXPORT_LONG_SIDE = 640
EXPORT_JPEG_QUALITY = 90

# Photographs (not plots, logos or scans) bundled by each package, relative to its data folder. Whatever exists is used.
_MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)
_SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                   "motorcycle_right.png")
_SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def _assets_dir() -> Path | None:
    value = os.environ.get(ASSETS_ENV)
    if not value:
        return None
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"error: {ASSETS_ENV}={value} is not a folder; point it at a folder made by "
                                f"study.assets.export_assets(dest), or unset it")
    return path


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing may be slow or fetch data)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _matplotlib_data_dir() -> Path | None:
    package = _package_dir("matplotlib")
    return None if package is None else package / "mpl-data"


def font_path() -> Path:
    """The bold TrueType font glyphs are drawn with: ``$STUDY_ASSETS/DejaVuSans-Bold.ttf``, else matplotlib's copy."""
    assets = _assets_dir()
    if assets is not None:
        path = assets / FONT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"error: {path} is missing; rerun study.assets.export_assets({assets}) on a "
                                    f"machine with matplotlib installed")
        return path
    data_dir = _matplotlib_data_dir()
    path = None if data_dir is None else data_dir / "fonts" / "ttf" / FONT_NAME
    if path is None or not path.is_file():
        raise FileNotFoundError(f"error: no {FONT_NAME} found; install matplotlib (pip install matplotlib), or set "
                                f"{ASSETS_ENV} to a folder made by study.assets.export_assets(dest)")
    return path


def photo_files() -> list[Path]:
    """Paths of the background photographs available here, in a fixed order (so generation is reproducible)."""
    assets = _assets_dir()
    if assets is not None:
        return sorted(p for p in assets.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    found: list[Path] = []
    data_dir = _matplotlib_data_dir()
    if data_dir is not None:
        found += [data_dir / "sample_data" / name for name in _MATPLOTLIB_PHOTOS]
    skimage = _package_dir("skimage")
    if skimage is not None:
        found += [skimage / "data" / name for name in _SKIMAGE_PHOTOS]
    sklearn = _package_dir("sklearn")
    if sklearn is not None:
        found += [sklearn / "datasets" / "images" / name for name in _SKLEARN_PHOTOS]
    return [path for path in found if path.is_file()]


def _export_jpeg(path: Path) -> bytes:
    """A package photo as ``export_assets`` stores it: long side <= 640 px, JPEG quality 90."""
    with Image.open(path) as image:
        photo = image.convert("RGB")
    photo.thumbnail((EXPORT_LONG_SIDE, EXPORT_LONG_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=EXPORT_JPEG_QUALITY)
    return buffer.getvalue()


@functools.lru_cache(maxsize=4)
def _load_photos(paths: tuple[Path, ...], from_packages: bool) -> tuple[Image.Image, ...]:
    photos = []
    for path in paths:
        # Package photos go through the export's downscale + JPEG step, so a machine using an exported folder
        # (STUDY_ASSETS) draws the very same background pixels (same Pillow version assumed).
        source = io.BytesIO(_export_jpeg(path)) if from_packages else path
        with Image.open(source) as image:
            photos.append(image.convert("RGB"))
    return tuple(photos)


def background_photos() -> list[Image.Image]:
    """The available real photographs as RGB images (loaded once per process; treat them as read-only).

    May be empty: the generator then uses synthetic backgrounds only.
    """
    return list(_load_photos(tuple(photo_files()), _assets_dir() is None))


def photos_fingerprint() -> str:
    """sha256 over the background photos' pixels: equal wherever the same photos are in use (packages or export)."""
    digest = hashlib.sha256()
    for photo in background_photos():
        digest.update(f"{photo.size}".encode())
        digest.update(photo.tobytes())
    return digest.hexdigest()


def export_assets(dest: Path) -> list[Path]:
    """Copy the font and the photos (long side <= 640 px, JPEG q90) into ``dest``; returns the files written.

    Use the folder on a machine without matplotlib/scikit-image/scikit-learn via ``STUDY_ASSETS=dest``; images
    generated there equal those generated here.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    from_packages = _assets_dir() is None
    written = [dest / FONT_NAME]
    if font_path().resolve() != written[0].resolve():
        shutil.copyfile(font_path(), written[0])
    for index, path in enumerate(photo_files()):
        # A numeric prefix keeps the exported order equal to the source order (photo choice is seeded by index).
        target = dest / (f"{index:02d}_{path.stem}.jpg" if from_packages else path.name)
        if from_packages:
            target.write_bytes(_export_jpeg(path))
        elif path.resolve() != target.resolve():
            shutil.copyfile(path, target)
        written.append(target)
    return written

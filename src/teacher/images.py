"""Image files: decode with EXIF orientation applied, or read only the header for the size.

Kept in its own module so the data stages (inspect, validate) depend on this file only, not on
the torch datasets (``teacher.sam.data``, ``teacher.dino.data``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from teacher.errors import TeacherError

ORIENTATION_TAG = 0x0112  # EXIF Orientation; 5..8 mean the stored image is transposed
_TRANSPOSED = (5, 6, 7, 8)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError as e:
        raise TeacherError(f"{path}: image file not found") from e
    except (UnidentifiedImageError, OSError) as e:
        raise TeacherError(f"{path}: not a readable image ({e})") from e


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) from the already-parsed header; 1 when absent."""
    raw = img.info.get("exif")
    if raw is None and img.format == "TIFF":
        return int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
    if raw is None:
        return 1
    try:
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block: display the pixels as stored
        return 1


def file_name_problem(file_name: object) -> str | None:
    """Why ``file_name`` may not be used under an image root (absolute, ``..``, empty), or None.

    Backslashes count as separators (Windows exports); the fix to ``/`` is validate's job.
    """
    if not isinstance(file_name, str) or not file_name.strip():
        return "file_name is missing or empty"
    name = file_name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "file_name is an absolute path"
    if ".." in name.split("/"):
        return "file_name contains '..' and would leave the image root"
    return None


def image_path(root: str | Path, file_name: str) -> Path:
    """``root / file_name`` for a safe relative ``file_name``; ``TeacherError`` otherwise."""
    problem = file_name_problem(file_name)
    if problem:
        raise TeacherError(f"{file_name!r}: {problem}; paths must be relative to the image root")
    return Path(root) / file_name.replace("\\", "/")


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), from the header only.

    Raises ``TeacherError`` naming the file when it is missing or not an image.
    """
    path = Path(path)
    with _open(path) as img:
        width, height = img.size
        if exif_orientation(img) in _TRANSPOSED:
            width, height = height, width
    return int(width), int(height)


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image: ``HxWx3 uint8`` RGB with EXIF orientation applied.

    Grayscale, palette, alpha and 16-bit images are converted to RGB. Raises ``TeacherError``
    naming the file when it is missing, truncated or not an image.
    """
    path = Path(path)
    with _open(path) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I", "F"):  # scale 16/32-bit gray to 8 bits before RGB
                arr = np.asarray(img, dtype=np.float64)
                top = arr.max() if arr.size and arr.max() > 255 else 255.0
                img = Image.fromarray((arr * (255.0 / top)).clip(0, 255).astype(np.uint8))
            rgb = img.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:
            raise TeacherError(f"{path}: cannot decode image ({e}); re-export or remove it") from e
    return np.asarray(rgb, dtype=np.uint8).copy()


def is_grayscale(path: str | Path, *, thumb: int = 64) -> bool:
    """True when the image has one channel, or three equal ones (checked on a small
    thumbnail; JPEGs decode at reduced scale)."""
    path = Path(path)
    with _open(path) as img:
        if img.mode in GRAY_MODES:
            return True
        img.draft("RGB", (thumb, thumb))
        img.thumbnail((thumb, thumb))
        arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool(np.abs(arr[..., 0] - arr[..., 1]).max(initial=0) <= 2
                and np.abs(arr[..., 1] - arr[..., 2]).max(initial=0) <= 2)

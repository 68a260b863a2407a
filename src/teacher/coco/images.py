"""Image files: decode with EXIF orientation applied, or read only the header for the size.

Kept in its own module so the data stages (inspect, validate) depend on this file only, not on
the torch datasets (``teacher.sam.data``, ``teacher.dino.data``).

Decoding goes through a fallback chain: PIL, then tifffile, then OpenCV, so formats PIL
cannot decode (16-bit single-band planar GeoTIFFs as satellite tooling writes them, float
TIFFs) still read; TIFFs of more than 8 bits per sample in several bands skip PIL, which would
keep only each sample's high byte. Every decoder's pixels go through one conversion, :func:`to_rgb8`: integer data
wider than 8 bits and float data are scaled linearly so the image's maximum maps to 255
(data already within 0..255 is kept as is); one band is repeated to RGB, two bands (gray +
alpha) keep the gray one, four or more keep the first three. Truncated files are not passed
to the next decoder (OpenCV would return a partly grey image): they are errors.

Pixel limits (explicit, not PIL's decompression-bomb guard):

- :data:`MAX_PIXELS`: larger images are downscaled on decode by the smallest integer factor
  that brings width x height under it (:func:`downscale_factor`); validate rescales the
  annotations of such images in its copy, ``teacher predict`` scales its detections back.
- :data:`MAX_DECODE_PIXELS`: larger images are refused with a message naming the file.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from teacher.core.errors import TeacherError

ORIENTATION_TAG = 0x0112  # EXIF Orientation; 5..8 mean the stored image is transposed
_TRANSPOSED = (5, 6, 7, 8)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
MAX_PIXELS = 100_000_000  # width x height above which an image is downscaled on decode
MAX_DECODE_PIXELS = 1 << 30  # width x height above which an image is refused (~1.07 GP)
_TRUNCATED = ("truncated", "broken data stream", "premature end")
Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS  # PIL's guard at our limit (its error at 2x)


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except FileNotFoundError as e:
        raise TeacherError(f"{path}: image file not found") from e
    except Image.DecompressionBombError as e:
        raise TeacherError(
            f"{path}: image too large to decode (more than {MAX_DECODE_PIXELS:,} "
            "pixels); split it into tiles or downscale it"
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise TeacherError(f"{path}: not a readable image ({e})") from e


def exif_orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8) from the already-parsed header; 1 when absent."""
    raw = img.info.get("exif")
    try:
        if raw is None and img.format == "TIFF":
            return int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
        if raw is None:
            return 1
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
    if "\x00" in name:
        return "file_name contains a NUL character"
    if any(len(part.encode("utf-8", "replace")) > 255 for part in name.split("/")):
        return "file_name has a path component longer than 255 bytes (no file system holds it)"
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


def downscale_factor(width: int, height: int, *, max_pixels: int = MAX_PIXELS) -> int:
    """The smallest integer ``k`` with ``(width / k) x (height / k) <= max_pixels``; 1 when the
    image is within the limit."""
    pixels = width * height
    if pixels <= max_pixels:
        return 1
    k = max(2, math.ceil(math.sqrt(pixels / max_pixels)))
    while math.ceil(width / k) * math.ceil(height / k) > max_pixels:
        k += 1
    return k


def to_rgb8(arr: np.ndarray) -> np.ndarray:
    """Any decoded pixel array -> ``HxWx3 uint8`` RGB (see the module docstring for the rule).

    ``arr`` is ``HxW`` or ``HxWxC`` (channels last, RGB order), any integer or float dtype.
    """
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] == 0:
        raise ValueError(f"pixel array of shape {arr.shape} is not an image")
    bands = arr.shape[2]
    arr = arr[:, :, :1] if bands == 2 else arr[:, :, :3]
    if arr.dtype != np.uint8:
        data = arr.astype(np.float64)
        data[~np.isfinite(data)] = 0
        top = float(data.max()) if data.size else 0.0
        scale = 255.0 / top if top > 255 or (arr.dtype.kind == "f" and 0 < top <= 1) else 1.0
        arr = (data * scale).clip(0, 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def decoded_size(width: int, height: int, *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of the array :func:`load_image` returns for an image of that size."""
    k = downscale_factor(width, height, max_pixels=max_pixels)
    return (width, height) if k == 1 else (math.ceil(width / k), math.ceil(height / k))


def _pil_pixels(path: Path, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL's pixels (JPEGs drafted at reduced scale when too large) and the full size."""
    with _open(path) as img:
        if img.format == "TIFF" and img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
            bits = getattr(img, "tag_v2", {}).get(258, (8,))
            if max(bits if isinstance(bits, tuple) else (bits,)) > 8:
                raise ValueError(f"{bits}-bit samples: PIL would keep only the high byte")
        full = img.size
        if exif_orientation(img) in _TRANSPOSED:
            full = full[::-1]
        if full[0] * full[1] > MAX_DECODE_PIXELS:
            raise TeacherError(
                f"{path}: image too large to decode ({full[0]}x{full[1]} pixels, "
                f"more than {MAX_DECODE_PIXELS:,}); split it into tiles or "
                "downscale it"
            )
        want = decoded_size(*img.size, max_pixels=max_pixels)
        if want != img.size and img.format == "JPEG":
            img.draft(img.mode, want)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(img)
        else:
            arr = np.asarray(img.convert("RGB"))
    return arr, full


def _cv2_pixels(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    import cv2

    try:
        arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise ValueError(f"OpenCV: {e}") from e
    if arr is None:
        raise ValueError("OpenCV cannot read it")
    if arr.ndim == 3 and arr.shape[2] >= 3:  # BGR(A) -> RGB
        arr = arr[:, :, [2, 1, 0]]
    return arr, (arr.shape[1], arr.shape[0])


def _tifffile_pixels(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    import tifffile

    try:
        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            arr, axes = series.asarray(), series.axes
    except Exception as e:  # tifffile's own errors (not a TIFF, damaged, ...)
        raise ValueError(f"tifffile: {e}") from e
    if arr.ndim == 3 and axes[0] in "SC":  # planar: bands first -> channels last
        arr = np.moveaxis(arr, 0, -1)
    return arr, (arr.shape[1], arr.shape[0])


def _fit(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` resized (box filter) to ``size`` = (width, height) when it differs."""
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image: ``HxWx3 uint8`` RGB with EXIF orientation applied; larger than
    ``max_pixels``, downscaled to :func:`decoded_size`.

    Decoders are tried in turn (PIL, OpenCV, tifffile); pixels go through :func:`to_rgb8`.
    Raises ``TeacherError`` naming the file (and each decoder's reason) when it is missing,
    truncated, too large (:data:`MAX_DECODE_PIXELS`) or not an image.
    """
    return _decode(Path(path), max_pixels=max_pixels)[0]


def load_image_and_size(
    path: str | Path, *, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_image` and the file's full ``(width, height)`` (larger than the array's
    when the image was downscaled)."""
    return _decode(Path(path), max_pixels=max_pixels)


def _decode(path: Path, *, max_pixels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_image`'s array and the file's full (width, height)."""
    if not path.is_file():
        raise TeacherError(f"{path}: image file not found")
    reasons = []
    for name, decode in (
        ("PIL", lambda: _pil_pixels(path, max_pixels)),
        ("tifffile", lambda: _tifffile_pixels(path)),
        ("OpenCV", lambda: _cv2_pixels(path)),
    ):
        try:
            arr, full = decode()
        except ImportError:
            continue
        except TeacherError as e:
            if "too large" in str(e):
                raise
            reasons.append(f"{name}: {str(e).removeprefix(f'{path}: ')}")
            continue
        except (OSError, ValueError, SyntaxError, TypeError, MemoryError) as e:
            if any(t in str(e).lower() for t in _TRUNCATED):
                raise TeacherError(
                    f"{path}: image file is truncated or damaged ({e}); re-export or remove it"
                ) from e
            reasons.append(f"{name}: {e}")
            continue
        if full[0] * full[1] > MAX_DECODE_PIXELS:
            raise TeacherError(
                f"{path}: image too large to decode ({full[0]}x{full[1]} pixels, "
                f"more than {MAX_DECODE_PIXELS:,}); split it into tiles or "
                "downscale it"
            )
        try:
            rgb = _fit(to_rgb8(arr), decoded_size(*full, max_pixels=max_pixels))
            return (rgb if rgb.flags.writeable else rgb.copy()), full
        except ValueError as e:
            reasons.append(f"{name}: {e}")
    raise TeacherError(
        f"{path}: cannot decode image ({'; '.join(reasons) or 'no decoder'}); "
        "re-export it as PNG or JPEG, or remove it"
    )


def probe_image(path: str | Path, *, decode: bool = True) -> tuple[int, int]:
    """The file's full ``(width, height)`` as displayed. ``decode``: the pixels are decoded as
    :func:`load_image` decodes them (a truncated or undecodable file raises); otherwise only
    the header is read (falling back to a decode when PIL cannot read it)."""
    path = Path(path)
    if not decode:
        try:
            return read_image_size(path)
        except TeacherError:
            pass
    return _decode(path, max_pixels=MAX_PIXELS)[1]


def is_grayscale(path: str | Path, *, thumb: int = 64) -> bool:
    """True when the image has one channel, or three equal ones (checked on a small
    thumbnail; JPEGs decode at reduced scale)."""
    path = Path(path)
    with _open(path) as img:
        if img.mode in GRAY_MODES:
            return True
        try:
            img.draft("RGB", (thumb, thumb))
            img.thumbnail((thumb, thumb))
            arr = np.asarray(img.convert("RGB"), dtype=np.int16)
        except (OSError, ValueError, SyntaxError, MemoryError) as e:
            raise TeacherError(f"{path}: cannot decode image ({e}); re-export or remove it") from e
    return bool(
        np.abs(arr[..., 0] - arr[..., 1]).max(initial=0) <= 2
        and np.abs(arr[..., 1] - arr[..., 2]).max(initial=0) <= 2
    )

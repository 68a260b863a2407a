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

Working size (``max_edge``): the teachers never look at more than their input size (Grounding
DINO resizes to at most ``dino.longest_edge``, SAM to 1024), so ``teacher predict``, ``label``
and ``teacher serve`` decode an image whose longest side is over it straight to that side
(:func:`working_size`), and scale the detections back to the file's size. The memory of a
decode is then bounded by the file's pixels in its own mode, not by what follows: a JPEG is
drafted (decoded at 1/2, 1/4 or 1/8 scale), any other image is decoded in its own mode (1 byte a
pixel for a 1-bit or gray image, at most 4) and reduced there (:meth:`PIL.Image.Image.reduce`,
a box average; 1-bit, palette and 16-bit images are first converted to a mode it takes, at most
4 bytes a pixel), and only the reduced image becomes RGB. Smaller images decode as before. The
fallback decoders (tifffile, OpenCV) hold the whole image; their pixels are shrunk before the
conversion to 8 bits, whose float copy would take 24 bytes a pixel.

Only regular files are read (:func:`file_problem`): a FIFO would block the reader forever.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from teacher.core.errors import TeacherError

ORIENTATION_TAG = 0x0112  # EXIF Orientation; 5..8 mean the stored image is transposed
_TRANSPOSED = (5, 6, 7, 8)
_TRANSPOSE = {  # EXIF orientation -> the transpose that displays it (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
MAX_PIXELS = 100_000_000  # width x height above which an image is downscaled on decode
MAX_DECODE_PIXELS = 1 << 30  # width x height above which an image is refused (~1.07 GP)
_TRUNCATED = ("truncated", "broken data stream", "premature end")
Image.MAX_IMAGE_PIXELS = MAX_DECODE_PIXELS  # PIL's guard at our limit (its error at 2x)


def file_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` is when it is not a regular file (``"a FIFO"``...); None for a
    regular file."""
    for test, kind in (
        (stat.S_ISREG, None),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "a special file"


def file_problem(path: str | Path, *, name: str | None = None) -> str | None:
    """Why ``path`` is not read as an image, found without opening it; None when it may be.

    ``name``, when given, is the file's name as it is to be recorded (a COCO ``file_name``): it
    must be UTF-8, as strict JSON readers require. The file must exist and be a regular file
    (symlinks followed): a FIFO would block the reader forever, a device never end.
    """
    if name is not None and name != name.encode("utf-8", "replace").decode("utf-8"):
        return "file name is not UTF-8; rename it (e.g. convmv -f latin1 -t utf8)"
    try:
        kind = file_kind(os.stat(path).st_mode)
    except FileNotFoundError:
        return "image file not found"
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    if kind is not None:
        return f"{kind}, not a regular file: only image files are read; remove it"
    return None


def display_path(path: str | Path) -> str:
    """``path`` as valid UTF-8 text for reports (bytes of a non-UTF-8 name shown as ``\\xff``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _open(path: Path) -> Image.Image:
    problem = file_problem(path)
    if problem:
        raise TeacherError(f"{display_path(path)}: {problem}")
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


def working_size(width: int, height: int, *, max_edge: int) -> tuple[int, int]:
    """``(width, height)`` scaled so that the longest side is ``max_edge`` (aspect kept, each
    side at least 1); unchanged when it is already at most that."""
    longest = max(width, height)
    if longest <= max_edge:
        return width, height
    scale = max_edge / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def decoded_size(
    width: int, height: int, *, max_pixels: int = MAX_PIXELS, max_edge: int | None = None
) -> tuple[int, int]:
    """``(width, height)`` of the array :func:`load_image` returns for an image of that size:
    the :func:`working_size` when ``max_edge`` is given, else within ``max_pixels``."""
    if max_edge is not None:
        width, height = working_size(width, height, max_edge=max_edge)
    k = downscale_factor(width, height, max_pixels=max_pixels)
    return (width, height) if k == 1 else (math.ceil(width / k), math.ceil(height / k))


# Modes Image.reduce refuses (or would average meaninglessly: palette indexes) -> the mode they
# are reduced in: 1 byte a pixel for 1-bit, 4 for 16-bit (as 32-bit) and palette (as RGBA)
_REDUCE_AS = {"1": "L", "P": "RGBA", "PA": "RGBA", "I;16": "I", "I;16B": "I", "I;16L": "I"}


def reduced(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``img`` (loaded) box-averaged in its own mode by the largest integer factor that keeps it
    at least ``size`` = (width, height) (both as stored); ``img`` itself when that factor is 1."""
    factor = min(img.width // max(1, size[0]), img.height // max(1, size[1]))
    if factor < 2:
        return img
    if img.mode in _REDUCE_AS:
        img = img.convert(_REDUCE_AS[img.mode])  # the one full-size copy: at most 4 bytes a pixel
    return img.reduce(factor)


def pil_pixels(
    img: Image.Image, *, max_pixels: int = MAX_PIXELS, max_edge: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """An opened PIL image's pixels, EXIF orientation applied, at least its :func:`decoded_size`
    (JPEGs drafted, others :func:`reduced` in their own mode) and at most the file's size: RGB
    uint8, or the 16/32-bit gray and float pixels as they are (for :func:`to_rgb8`); and the
    file's (width, height) as displayed."""
    stored = img.size
    want = decoded_size(*stored, max_pixels=max_pixels, max_edge=max_edge)
    if want != stored and img.format == "JPEG":
        img.draft(img.mode, want)
    img.load()
    try:  # as ImageOps.exif_transpose reads it (EXIF, XMP or TIFF tags), from the file's image
        orientation = int(img.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels as stored
        orientation = 1
    img = reduced(img, want)
    if orientation in _TRANSPOSE:
        img = img.transpose(_TRANSPOSE[orientation])
    full = stored[::-1] if orientation in _TRANSPOSED else stored
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(img), full
    return np.asarray(img.convert("RGB")), full


def _pil_pixels(
    path: Path, max_pixels: int, max_edge: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """PIL's pixels and the full size (:func:`pil_pixels`)."""
    with _open(path) as img:
        if img.format == "TIFF" and img.mode not in ("I;16", "I;16B", "I;16L", "I", "F"):
            bits = getattr(img, "tag_v2", {}).get(258, (8,))
            if max(bits if isinstance(bits, tuple) else (bits,)) > 8:
                raise ValueError(f"{bits}-bit samples: PIL would keep only the high byte")
        full = img.size
        if full[0] * full[1] > MAX_DECODE_PIXELS:
            raise TeacherError(
                f"{path}: image too large to decode ({full[0]}x{full[1]} pixels, "
                f"more than {MAX_DECODE_PIXELS:,}); split it into tiles or "
                "downscale it"
            )
        return pil_pixels(img, max_pixels=max_pixels, max_edge=max_edge)


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


def _shrunk(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A fallback decoder's pixels brought near ``size`` = (width, height) before
    :func:`to_rgb8` (whose float copy takes 24 bytes a pixel): area-averaged by OpenCV where it
    takes the dtype, else every k-th pixel (a view)."""
    factor = min(arr.shape[1] // max(1, size[0]), arr.shape[0] // max(1, size[1]))
    if factor < 2:
        return arr
    target = (arr.shape[1] // factor, arr.shape[0] // factor)
    try:
        import cv2

        return cv2.resize(arr, target, interpolation=cv2.INTER_AREA)
    except Exception:  # noqa: BLE001 - no OpenCV, or a dtype / band count it does not take
        return arr[::factor, ::factor]


def to_rgb_size(
    arr: np.ndarray, full: tuple[int, int], *, max_pixels: int = MAX_PIXELS, max_edge: int | None
) -> np.ndarray:
    """A decoder's pixels of an image of ``full`` = (width, height) -> HxWx3 uint8 RGB at its
    :func:`decoded_size` (writable)."""
    size = decoded_size(*full, max_pixels=max_pixels, max_edge=max_edge)
    rgb = _fit(to_rgb8(_shrunk(arr, size)), size)
    return rgb if rgb.flags.writeable else rgb.copy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` (h, w) bool at ``size`` = (width, height), nearest neighbour; ``mask`` itself at
    its own size. How a mask made on a downscaled copy reaches the file's size: one mask at a
    time (a full-size mask takes a byte a pixel)."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    small = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    return np.asarray(small.resize(size, Image.Resampling.NEAREST)) > 127


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an image: ``HxWx3 uint8`` RGB with EXIF orientation applied; larger than
    ``max_pixels``, downscaled to :func:`decoded_size`.

    Decoders are tried in turn (PIL, OpenCV, tifffile); pixels go through :func:`to_rgb8`.
    Raises ``TeacherError`` naming the file (and each decoder's reason) when it is missing,
    truncated, too large (:data:`MAX_DECODE_PIXELS`) or not an image.
    """
    return _decode(Path(path), max_pixels=max_pixels)[0]


def load_image_and_size(
    path: str | Path, *, max_pixels: int = MAX_PIXELS, max_edge: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_image` and the file's full ``(width, height)`` (larger than the array's
    when the image was downscaled). With ``max_edge``, an image whose longest side is over it
    is decoded straight to its :func:`working_size` (see the module docstring)."""
    return _decode(Path(path), max_pixels=max_pixels, max_edge=max_edge)


def _decode(
    path: Path, *, max_pixels: int, max_edge: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`load_image`'s array and the file's full (width, height)."""
    problem = file_problem(path)
    if problem:
        raise TeacherError(f"{display_path(path)}: {problem}")
    reasons = []
    for name, decode in (
        ("PIL", lambda: _pil_pixels(path, max_pixels, max_edge)),
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
            return to_rgb_size(arr, full, max_pixels=max_pixels, max_edge=max_edge), full
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

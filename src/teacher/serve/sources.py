"""Task images from Label Studio URLs, with limits on size, pixels and time.

A task's image is one of:
- ``/data/local-files/?d=<path>``: Label Studio's local-files storage; read from ``local_root``
  (Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``) when set, the resolved path must stay under it;
- another Label Studio path (``/data/upload/1/x.jpg``, ``/tasks/3/presign/?fileuri=...``):
  fetched from ``ls_url`` (``LABEL_STUDIO_URL``) with the API key: a legacy token is sent as
  ``Authorization: Token <key>``; a personal access token (a JWT) is exchanged at
  ``/api/token/refresh/`` for an access token sent as ``Bearer`` (cached for a minute);
- ``http(s)://...``: fetched; the API key is sent only when the URL is on ``ls_url``'s origin.
Anything else (``s3://``, plain paths, ``file://``) is refused with a message.

Only regular files are read under the local-files root (a FIFO would hang the request, as
``--fetch-timeout`` covers downloads only). Error messages reach Label Studio: they name the
task's URL or the path under the root, never the server's own paths.

Memory: an image is decoded as ``teacher predict`` decodes it (:mod:`teacher.coco.images`):
straight to the teachers' working size (``max_edge``) when larger, so that what follows the
decode costs the same for any image. The decodes themselves share one budget of ``max_pixels``
pixels in flight (:class:`PixelBudget`), whatever the number of calls and download threads.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from teacher.coco.images import file_kind, pil_pixels, to_rgb_size

LOCAL_FILES = "/data/local-files/"
ACCESS_CACHE_S = 60.0  # reuse an access token got from a personal access token this long
_access: dict[tuple[str, str], tuple[str, float]] = {}  # (ls_url, key) -> (token, expiry)
_access_lock = threading.Lock()


class ImageSourceError(ValueError):
    """An image that cannot be had: the message names the URL and the reason."""


@dataclass(frozen=True)
class ImageSources:
    """Where task images may come from and how much of them the server accepts."""

    local_root: Path | None = None  # Label Studio's LOCAL_FILES_DOCUMENT_ROOT; None: via ls_url
    ls_url: str | None = None  # LABEL_STUDIO_URL, e.g. http://localhost:8080
    api_key: str | None = None  # Label Studio API key (legacy token), sent to ls_url only
    max_bytes: int = 50 * 2**20  # per image file
    max_pixels: int = 80_000_000  # per image (width x height), before decoding
    timeout_s: float = 20.0  # per image download, whole transfer
    allow_http: bool = True  # fetch http(s) URLs outside Label Studio
    max_edge: int | None = None  # the teachers' working size: longer sides are decoded to it


@dataclass(frozen=True)
class TaskImage:
    """A task's image as the teachers get it: ``pixels`` (h, w, 3) uint8 RGB, EXIF orientation
    applied, at most ``max_edge`` on its longest side; ``size`` the file's (width, height) as
    displayed, which Label Studio's regions refer to (larger than the pixels' when downscaled)."""

    pixels: np.ndarray
    size: tuple[int, int]


@dataclass(frozen=True)
class Located:
    """A resolved image URL: a local file, or an http URL (with Label Studio's key or not)."""

    path: Path | None = None
    url: str | None = None
    with_key: bool = False  # send the Label Studio API key (the URL is on Label Studio)
    name: str = ""  # a local file's path under the root, for messages


class PixelBudget:
    """The decodes in flight in this process hold their image's pixel count; one waits while
    the sum would pass ``limit`` (an image over the limit holds all of it).

    What the limit covers, per pixel held (:mod:`teacher.coco.images`): the image decoded in its
    own mode (at most 4 bytes) and one converted copy where ``reduce`` refuses that mode (at most
    4 more); the reduced image and all that follows take at most ``max_edge``^2 x 6 bytes an
    image. So the decodes of all calls together hold about 8 bytes x ``limit`` at most (640 MB
    at 80 MP), however many images arrive at once.
    """

    def __init__(self) -> None:
        self.held = 0
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, *, limit: int) -> Iterator[None]:
        pixels = min(pixels, limit)
        with self.changed:
            self.changed.wait_for(lambda: self.held + pixels <= limit)
            self.held += pixels
        try:
            yield
        finally:
            with self.changed:
                self.held -= pixels
                self.changed.notify_all()


_decoding = PixelBudget()


def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def is_personal_access_token(key: str) -> bool:
    """Label Studio's personal access tokens are JWTs (three dot-separated parts)."""
    return key.count(".") == 2


def label_studio_headers(sources: ImageSources) -> dict[str, str]:
    """The ``Authorization`` header for Label Studio (none without a key)."""
    key = sources.api_key
    if not key:
        return {}
    if not is_personal_access_token(key):
        return {"Authorization": f"Token {key}"}
    import httpx

    ls_url = sources.ls_url
    assert ls_url is not None, "the key is only sent to URLs on ls_url"
    with _access_lock:
        token, expiry = _access.get((ls_url, key), ("", 0.0))
        if time.monotonic() >= expiry:
            url = urljoin(ls_url.rstrip("/") + "/", "api/token/refresh/")
            try:
                r = httpx.post(url, json={"refresh": key}, timeout=sources.timeout_s)
                token = r.json()["access"] if r.status_code == 200 else ""
            except (httpx.HTTPError, ValueError, KeyError):
                token = ""
            if not token:
                raise ImageSourceError(
                    f"{url}: Label Studio refused the personal access token "
                    "in LABEL_STUDIO_API_KEY; create a new one"
                )
            _access[(ls_url, key)] = (token, time.monotonic() + ACCESS_CACHE_S)
    return {"Authorization": f"Bearer {token}"}


def local_file(root: Path, relative: str) -> Path:
    """``root / relative`` resolved (symlinks too); refused when it leaves ``root``."""
    if "\x00" in relative:
        raise ImageSourceError(
            f"{relative!r}: a path with a NUL character names no file; fix the task's URL"
        )
    base = root.resolve()
    path = (base / relative.lstrip("/")).resolve()
    if path != base and base not in path.parents:
        raise ImageSourceError(
            f"{relative}: leaves the local-files root (LOCAL_FILES_DOCUMENT_ROOT; a '..' or a "
            "symlink out of it); refused: put the image under the root"
        )
    return path


def locate(url: str, sources: ImageSources) -> Located:
    """Where the image of ``url`` is read from (no I/O)."""
    if not isinstance(url, str):
        raise ImageSourceError(
            f"the task's image URL is a {type(url).__name__}, not a string; put the image's "
            "URL in the task's data"
        )
    if not url.strip():
        raise ImageSourceError("the task's image URL is empty; put the image's URL in its data")
    parts = urlsplit(url)
    if parts.path.startswith(LOCAL_FILES) and not parts.scheme and sources.local_root is not None:
        rel = parse_qs(parts.query).get("d", [""])[0]
        if not rel:
            raise ImageSourceError(f"{url}: local-files URL without ?d=<path>")
        name = unquote(rel).lstrip("/")
        return Located(path=local_file(sources.local_root, name), name=name)
    if url.startswith("/") and not url.startswith("//"):
        if not sources.ls_url:
            hint = (
                "or --local-files-root (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)"
                if parts.path.startswith(LOCAL_FILES)
                else ""
            )
            raise ImageSourceError(
                f"{url} is a Label Studio path: start the server with "
                f"LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY set {hint}".strip()
            )
        return Located(
            url=urljoin(sources.ls_url.rstrip("/") + "/", url.lstrip("/")), with_key=True
        )
    if parts.scheme in ("http", "https"):
        if sources.ls_url and _same_origin(url, sources.ls_url):
            return Located(url=url, with_key=True)
        if not sources.allow_http:
            raise ImageSourceError(
                f"{url}: http images outside Label Studio are disabled (--no-http)"
            )
        return Located(url=url)
    raise ImageSourceError(
        f"{url}: unsupported image URL; use Label Studio local files, uploads, or http(s)"
    )


def read_local(path: Path, sources: ImageSources, *, name: str | None = None) -> bytes:
    """The bytes of a regular file under the local-files root; refused past ``max_bytes``.

    Checked before opening (``os.stat``) and on the file opened (``O_NONBLOCK``, so that a FIFO
    put there in between cannot block): a FIFO, socket or device is refused. Messages name the
    file as ``name`` (its path under the root), not the server's path.
    """
    name = name or path.name
    where = f"{name} (under the local-files root)"
    try:
        kind = file_kind(os.stat(path).st_mode)
        if kind is not None:
            raise ImageSourceError(_not_a_file(where, kind))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageSourceError(
            f"{where}: cannot read ({e.strerror or e}); check the path in the task"
        ) from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageSourceError(_not_a_file(where, file_kind(st.st_mode) or "special"))
        if st.st_size > sources.max_bytes:
            raise ImageSourceError(
                f"{where}: {st.st_size} bytes, over the limit of {sources.max_bytes} "
                "(--max-image-mb)"
            )
        data = f.read(sources.max_bytes + 1)  # a file growing meanwhile stops at the limit
    if len(data) > sources.max_bytes:
        raise ImageSourceError(f"{where}: over the limit of {sources.max_bytes} bytes")
    return data


def _not_a_file(where: str, kind: str) -> str:
    return f"{where}: {kind}, not a regular file; point the task at an image file"


def download(url: str, headers: dict[str, str], sources: ImageSources) -> bytes:
    """The body of ``url``; refused past ``max_bytes`` or ``timeout_s`` (whole transfer)."""
    import httpx

    deadline = time.monotonic() + sources.timeout_s
    chunks, total = [], 0
    try:
        with (
            httpx.Client(
                timeout=sources.timeout_s, follow_redirects=True, max_redirects=3
            ) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code != 200:
                raise ImageSourceError(f"{url}: HTTP {response.status_code}")
            for chunk in response.iter_bytes():
                total += len(chunk)
                if total > sources.max_bytes:
                    raise ImageSourceError(f"{url}: over the limit of {sources.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageSourceError(f"{url}: took over {sources.timeout_s} s")
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise ImageSourceError(
            f"{url}: cannot download ({type(e).__name__}: {e}); check that the server reaches it"
        ) from e
    return b"".join(chunks)


def decode_image(
    data: bytes, *, name: str, max_pixels: int, max_edge: int | None = None
) -> TaskImage:
    """Image bytes -> :class:`TaskImage`: pixel count checked first (from the header), then
    decoded straight to ``max_edge`` when larger (:func:`teacher.coco.images.pil_pixels`),
    within this process's :class:`PixelBudget`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageSourceError(
                    f"{name}: {width}x{height} pixels, over the limit of {max_pixels}"
                )
            with _decoding.hold(width * height, limit=max_pixels):
                arr, size = pil_pixels(img, max_pixels=max_pixels, max_edge=max_edge)
                pixels = to_rgb_size(arr, size, max_pixels=max_pixels, max_edge=max_edge)
    except ImageSourceError:
        raise
    except UnidentifiedImageError as e:
        raise ImageSourceError(
            f"{name}: not a readable image (no image format PIL knows); send a PNG, JPEG, "
            "TIFF, WebP or BMP file"
        ) from e
    except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as e:
        raise ImageSourceError(
            f"{name}: not a readable image ({e}); re-export it as PNG or JPEG"
        ) from e
    return TaskImage(pixels=pixels, size=size)


def load_task_image(url: str, sources: ImageSources) -> TaskImage:
    """The image of a task's URL (:class:`TaskImage`); ``ImageSourceError`` saying why not."""
    where = locate(url, sources)
    if where.path is not None:
        data = read_local(where.path, sources, name=where.name)
    else:
        assert where.url is not None  # locate gives a path or a URL
        headers = label_studio_headers(sources) if where.with_key else {}
        data = download(where.url, headers, sources)
    return decode_image(data, name=url, max_pixels=sources.max_pixels, max_edge=sources.max_edge)

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
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


@dataclass(frozen=True)
class Located:
    """A resolved image URL: a local file, or an http URL (with Label Studio's key or not)."""

    path: Path | None = None
    url: str | None = None
    with_key: bool = False  # send the Label Studio API key (the URL is on Label Studio)


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
    base = root.resolve()
    path = (base / relative.lstrip("/")).resolve()
    if path != base and base not in path.parents:
        raise ImageSourceError(f"{relative!r} leaves the local-files root {root}; refused")
    return path


def locate(url: str, sources: ImageSources) -> Located:
    """Where the image of ``url`` is read from (no I/O)."""
    if not isinstance(url, str) or not url.strip():
        raise ImageSourceError(f"image URL {url!r} is empty")
    parts = urlsplit(url)
    if parts.path.startswith(LOCAL_FILES) and not parts.scheme and sources.local_root is not None:
        rel = parse_qs(parts.query).get("d", [""])[0]
        if not rel:
            raise ImageSourceError(f"{url}: local-files URL without ?d=<path>")
        return Located(path=local_file(sources.local_root, unquote(rel)))
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


def read_local(path: Path, sources: ImageSources) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageSourceError(f"{path}: cannot read ({e.strerror})") from e
    if size > sources.max_bytes:
        raise ImageSourceError(f"{path}: {size} bytes, over the limit of {sources.max_bytes}")
    return path.read_bytes()


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
        raise ImageSourceError(f"{url}: {type(e).__name__} {e}") from e
    return b"".join(chunks)


def decode_image(data: bytes, *, name: str, max_pixels: int) -> np.ndarray:
    """Image bytes -> HxWx3 uint8 RGB, EXIF orientation applied; pixel count checked first."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ImageSourceError(
                    f"{name}: {img.width}x{img.height} pixels, over the limit of {max_pixels}"
                )
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except ImageSourceError:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as e:
        raise ImageSourceError(f"{name}: not a readable image ({e})") from e
    return np.asarray(rgb, dtype=np.uint8).copy()


def load_task_image(url: str, sources: ImageSources) -> np.ndarray:
    """The image of a task's URL, HxWx3 uint8 RGB; ``ImageSourceError`` saying why not."""
    where = locate(url, sources)
    if where.path is not None:
        data = read_local(where.path, sources)
    else:
        assert where.url is not None  # locate gives a path or a URL
        headers = label_studio_headers(sources) if where.with_key else {}
        data = download(where.url, headers, sources)
    return decode_image(data, name=url, max_pixels=sources.max_pixels)

"""Content hashes: of files, and of params + data (a run's fingerprint)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(*objects: Any) -> str:
    """sha256 over canonical JSON of ``objects``; a ``Path`` to a file contributes its content hash.

    Dataclasses (params sections) are converted to dicts; tuples to lists. Used to tell whether
    a checkpoint belongs to the same params and data.
    """
    return hashlib.sha256(
        json.dumps([_canonical(o) for o in objects], sort_keys=True).encode()
    ).hexdigest()


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__type__": type(obj).__name__, **_canonical(dataclasses.asdict(obj))}
    if isinstance(obj, Path):
        return {"__file__": obj.name, "sha256": file_sha256(obj)} if obj.is_file() else str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"fingerprint: cannot hash {type(obj).__name__}")


def images_digest(root: Path | str, *cocos: Mapping[str, Any]) -> str:
    """sha256 over (file name, content sha256) of every image the COCO dicts list under ``root``.

    A run's fingerprint includes it, so an edited image invalidates a checkpoint while moving
    the image folder does not. A missing file contributes ``"missing"``.
    """
    root = Path(root)
    names = sorted({str(im.get("file_name")) for coco in cocos for im in coco.get("images", [])})
    entries = []
    for name in names:
        path = root / name
        entries.append([name, file_sha256(path) if path.is_file() else "missing"])
    return fingerprint(entries)


def folder_digest(folder: Path | str, *, pattern: str = "*") -> str:
    """sha256 over (relative path, content sha256) of every file under ``folder`` matching
    ``pattern``; ``"missing"`` when there is no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return "missing"
    files = sorted(p for p in folder.rglob(pattern) if p.is_file())
    return fingerprint([[p.relative_to(folder).as_posix(), file_sha256(p)] for p in files])


def code_digest() -> str:
    """The ``teacher`` package's source, as one hash: what made an artifact, for reuse checks."""
    return folder_digest(Path(__file__).resolve().parents[1], pattern="*.py")

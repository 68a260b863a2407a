"""Labeling a pool as a batch job: shards that survive a crash, shared out between processes.

The pool (every image under a folder, sorted by relative path) is cut into shards of
``shard_size`` images. A process labels a shard, then writes it at once, atomically (a temporary
file renamed into place), as JSON lines: a header with the settings that made it, then one line
per image (its content sha256, size and detections, or why it was unreadable). A shard is never
half written: a crash, ``kill -9`` or a full disk leaves the temporary file, which no run reads.

A rerun reads the shards' headers and image keys (file name, sha256): images whose key is in a
shard made under the same settings are not labeled again; a shard made under other settings is
discarded, saying which settings differ. Images added to the pool are labeled, images removed
are left out, an edited image (new sha256) is labeled again. The remaining images are cut into
shards the same way as in the first run, so a resumed run writes the same shards an
uninterrupted one would, and :func:`write_merged` the same bytes.

Processes: ``label.processes`` spawns them on this machine (``teacher.train.distributed``), and
inside ``accelerate launch`` / torchrun every rank takes part. The main process plans and
broadcasts the plan; each process labels its contiguous share of the shards (accelerate's
``split_between_processes``); ranks need not finish together: the main process waits for
every planned shard file, showing one progress bar for all processes, then merges.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from teacher.coco.images import file_problem
from teacher.coco.io import atomic_text_file, dumps_coco, write_text_atomic
from teacher.core.digest import file_sha256, fingerprint

SHARD_GLOB = "shard-*.jsonl"
FORMAT = 1  # the shard layout; a shard of another format is discarded


@dataclass(frozen=True)
class PoolImage:
    """One image of the pool: its path relative to the pool (posix) and its content hash; or,
    for a file that is not read (``problem``: not a regular file, a name that is not UTF-8), an
    empty hash: it is reported unreadable without being opened."""

    file_name: str
    sha256: str
    problem: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.file_name, self.sha256)


@dataclass(frozen=True)
class Shard:
    """A planned shard: the images it labels, in pool order."""

    images: tuple[PoolImage, ...]

    @property
    def name(self) -> str:
        """``shard-<hash>.jsonl``: the same images give the same name in every run."""
        return f"shard-{fingerprint([im.key for im in self.images])[:20]}.jsonl"


def pool_images(folder: Path, paths: Sequence[Path]) -> list[PoolImage]:
    """The pool's images (``paths`` under ``folder``) with their content hashes, in order; a
    file :func:`teacher.coco.images.file_problem` refuses is not opened (a FIFO would block)."""
    images = []
    for p in paths:
        name = p.relative_to(folder).as_posix()
        problem = file_problem(p, name=name)
        images.append(PoolImage(name, "" if problem else file_sha256(p), problem))
    return images


def plan_shards(
    images: Sequence[PoolImage], done: set[tuple[str, str]], *, shard_size: int
) -> list[Shard]:
    """The images not yet ``done``, cut into shards of ``shard_size`` in pool order."""
    pending = [im for im in images if im.key not in done]
    return [Shard(tuple(pending[i : i + shard_size])) for i in range(0, len(pending), shard_size)]


def share_of(shards: Sequence[Shard], *, rank: int, processes: int) -> list[Shard]:
    """This process's contiguous share (accelerate's ``split_between_processes`` split)."""
    per, extra = divmod(len(shards), processes)
    start = rank * per + min(rank, extra)
    return list(shards[start : start + per + (rank < extra)])


# --- shard files -----------------------------------------------------------------------------


def shard_text(settings: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    """A shard file's contents: a header line, then one JSON line per image record."""
    header = {"format": FORMAT, "settings": settings, "images": len(records)}
    lines = [json.dumps(header, sort_keys=True)]
    lines += [json.dumps(r, sort_keys=True) for r in records]
    return "\n".join(lines) + "\n"


def write_shard(folder: Path, shard: Shard, settings: Mapping[str, Any], records: list) -> Path:
    """Write a finished shard atomically (``TeacherError`` naming the file when it cannot)."""
    path = folder / shard.name
    write_text_atomic(path, shard_text(settings, records))
    return path


def read_shard(path: Path) -> tuple[dict[str, Any], list[tuple[str, str]]] | None:
    """A shard's header and its images' keys (file name, sha256), read in one pass; None when
    the file is not a whole shard of this format."""
    try:
        with path.open(encoding="utf-8") as f:
            header = json.loads(f.readline())
            keys = [(r["file_name"], r["sha256"]) for r in map(json.loads, f)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None
    return (header, keys) if header.get("images") == len(keys) else None


def read_header(path: Path) -> dict[str, Any] | None:
    """A shard's header, or None when the file is not a whole shard of this format."""
    shard = read_shard(path)
    return None if shard is None else shard[0]


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """A shard's image records, one at a time (the header skipped)."""
    with path.open(encoding="utf-8") as f:
        f.readline()
        for line in f:
            yield json.loads(line)


@dataclass
class Existing:
    """What the shard folder holds for this run: reusable shards and the images they label."""

    shards: list[Path]  # whole shards made under the same settings
    done: set[tuple[str, str]]  # (file name, sha256) labeled in them
    discarded: list[str]  # one line per shard not reused, with the reason


def scan_shards(folder: Path, settings: Mapping[str, Any]) -> Existing:
    """Sort the shard files of ``folder`` into reusable ones and discarded ones (left on disk,
    never read again by this run; the next successful run removes them)."""
    existing = Existing([], set(), [])
    for path in sorted(folder.glob(SHARD_GLOB)):
        shard = read_shard(path)
        if shard is None:
            existing.discarded.append(f"{path.name}: not a whole shard")
            continue
        header, keys = shard
        changed = sorted(
            k
            for k in {*settings, *header["settings"]}
            if header["settings"].get(k) != settings.get(k)
        )
        if changed:
            existing.discarded.append(f"{path.name}: made with other {', '.join(changed)}")
            continue
        existing.shards.append(path)
        existing.done |= set(keys)
    return existing


# --- progress across processes ----------------------------------------------------------------


def write_progress(folder: Path, rank: int, *, done: int, unreadable: int) -> None:
    """This process's count of images labeled so far (read by the main process's bar)."""
    write_text_atomic(
        folder / f"progress-{rank}.json", json.dumps({"done": done, "unreadable": unreadable})
    )


def read_progress(folder: Path) -> tuple[int, int]:
    """(images done, unreadable so far) summed over every process's progress file."""
    done = unreadable = 0
    for path in folder.glob("progress-*.json"):
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced right now: next poll
        done += int(counts.get("done", 0))
        unreadable += int(counts.get("unreadable", 0))
    return done, unreadable


def wait_for_shards(
    folder: Path, names: Sequence[str], *, on_poll: Callable[[], None], poll_s: float = 0.5
) -> None:
    """Block until every shard in ``names`` exists in ``folder`` (other processes write them)."""
    missing = [n for n in names if not (folder / n).is_file()]
    while missing:
        on_poll()
        time.sleep(poll_s)
        missing = [n for n in missing if not (folder / n).is_file()]


# --- the merged COCO document, streamed ------------------------------------------------------


def ordered_records(
    shards: Sequence[Path], images: Sequence[PoolImage]
) -> Iterator[dict[str, Any]]:
    """Every current pool image's record, shards in the order of their first pool image and
    records in shard order (pool order when nothing changed between runs); records of images
    no longer in the pool are left out, and an image held by two shards is given once."""
    position = {im.key: i for i, im in enumerate(images)}
    firsts = []
    for path in shards:
        first = next(
            (
                position[k]
                for r in iter_records(path)
                if (k := (r["file_name"], r["sha256"])) in position
            ),
            None,
        )
        if first is not None:
            firsts.append((first, path))
    seen: set[tuple[str, str]] = set()
    for _, path in sorted(firsts):
        for record in iter_records(path):
            key = (record["file_name"], record["sha256"])
            if key in position and key not in seen:
                seen.add(key)
                yield record


def write_merged(
    out: Path,
    records: Callable[[], Iterator[dict[str, Any]]],
    *,
    categories: Sequence[Mapping[str, Any]],
    info: Mapping[str, Any],
) -> dict[str, Any]:
    """Write the COCO document of ``records`` (called twice: annotations, then images) to
    ``out`` atomically, byte for byte what :func:`teacher.coco.io.save_coco` writes for the same
    document, holding one record at a time. ``info`` gains ``unreadable``. Returns the counts of
    images and annotations, and the unreadable images (``{"file", "reason"}``)."""
    unreadable: list[dict[str, str]] = []
    with atomic_text_file(out) as f:
        f.write("{\n")
        n_anns = _write_list(f, "annotations", _annotations(records(), unreadable))
        f.write(",\n")
        _write_list(f, "categories", iter(categories))
        f.write(",\n")
        n_images = _write_list(f, "images", _images(records()))
        f.write(",\n")
        doc_info = {**info, "unreadable": unreadable}
        f.write(dumps_coco({"info": doc_info})[2:-3])  # ` "info": {...}`
        f.write("\n}\n")
    return {"images": n_images, "annotations": n_anns, "unreadable": unreadable}


def _write_list(f: TextIO, key: str, items: Iterator[Any]) -> int:
    """`` "key": [`` items one per line ``]`` as ``dumps_coco`` lays out a list; ``[]`` if empty."""
    n = 0
    for item in items:
        f.write(
            (f" {json.dumps(key)}: [\n" if n == 0 else ",\n")
            + "  "
            + json.dumps(item, sort_keys=True)
        )
        n += 1
    f.write("\n ]" if n else f" {json.dumps(key)}: []")
    return n


def _annotations(
    records: Iterator[dict[str, Any]], unreadable: list[dict[str, str]]
) -> Iterator[dict[str, Any]]:
    """Annotations with ids (images numbered 1.. in record order, annotations likewise)."""
    image_id = ann_id = 0
    for record in records:
        if "unreadable" in record:
            unreadable.append({"file": record["path"], "reason": record["unreadable"]})
            continue
        image_id += 1
        for ann in record["annotations"]:
            ann_id += 1
            yield {**ann, "id": ann_id, "image_id": image_id}


def _images(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    image_id = 0
    for record in records:
        if "unreadable" not in record:
            image_id += 1
            yield {
                "id": image_id,
                "file_name": record["file_name"],
                "width": record["width"],
                "height": record["height"],
            }

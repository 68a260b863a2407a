"""Read and write COCO files; index them; decode instance masks through pycocotools.

A COCO dataset is kept as the plain ``dict`` json gives (``images``, ``annotations``,
``categories`` and any other top-level keys, all preserved). Boxes are COCO ``xywh`` in
absolute pixels. Masks come in three forms, named by :func:`mask_kind`:

- ``"polygon"``: ``segmentation`` is a list of ``[x1, y1, x2, y2, ...]`` rings (a flat list
  of numbers is read as one ring);
- ``"rle_compressed"``: ``{"size": [h, w], "counts": "<COCO string>"}``;
- ``"rle_uncompressed"``: ``{"size": [h, w], "counts": [n0, n1, ...]}`` (column-major runs,
  starting with background), as COCO stores most ``iscrowd`` regions;

plus ``"none"`` (no or empty ``segmentation``) and ``"invalid"`` (anything else).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from pycocotools import mask as mask_utils

from teacher.core.errors import TeacherError

REQUIRED_KEYS = ("images", "annotations", "categories")
FAR = 10  # image sizes outside the image beyond which a coordinate is absurd, not a sloppy vertex
_PROMPT_DELIMITERS = re.compile(r"[.?]")  # '.' and '?' delimit labels in a Grounding DINO prompt
SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]")  # BERT's special tokens
_SPECIAL_TOKENS = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)), re.IGNORECASE)
MASK_KINDS = ("polygon", "rle_compressed", "rle_uncompressed", "none", "invalid")


class CocoFormatError(TeacherError):
    """The file is not JSON (``rule == "not_json"``) or not a COCO dataset (``"not_coco"``)."""

    def __init__(self, message: str, *, rule: str) -> None:
        super().__init__(message)
        self.rule = rule


# --- files ---------------------------------------------------------------------------------


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or non-JSON file raises :class:`CocoFormatError`."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CocoFormatError(
            f"{path}: file not found; check data.annotations in params.yaml", rule="not_json"
        ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoFormatError(
            f"{path}: not valid JSON ({e}); export the dataset as COCO JSON", rule="not_json"
        ) from e
    except RecursionError as e:
        raise CocoFormatError(
            f"{path}: JSON nested too deeply to read (not a COCO export); export the dataset "
            "as COCO JSON",
            rule="not_json",
        ) from e
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise CocoFormatError(
            f"{path}: cannot read the file ({e.strerror or e}); check "
            "data.annotations and its permissions",
            rule="not_json",
        ) from e


def coco_format_problem(data: Any) -> str | None:
    """Why ``data`` is not a COCO dataset dict, or None when it has the three lists."""
    if not isinstance(data, dict):
        return f"top level is a {type(data).__name__}, not an object (a results file?)"
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    wrong = [k for k in REQUIRED_KEYS if not isinstance(data[k], list)]
    if wrong:
        return f"key(s) {', '.join(wrong)} must be lists"
    not_objects = [k for k in REQUIRED_KEYS if any(not isinstance(r, dict) for r in data[k])]
    if not_objects:
        return f"every entry of {', '.join(not_objects)} must be an object"
    return None


def load_coco(path: str | Path) -> dict[str, Any]:
    """Read a COCO dataset: a JSON object with ``images``, ``annotations``, ``categories`` lists.

    Raises :class:`CocoFormatError` (a ``TeacherError``) naming the file when it is missing,
    not JSON, or not COCO. Records are not checked here: see ``teacher.dataset.validation``.
    """
    data = read_json(path)
    problem = coco_format_problem(data)
    if problem:
        raise CocoFormatError(
            f"{path}: not a COCO dataset: {problem}; expected an object with 'images', "
            "'annotations' and 'categories' lists (COCO instances format)",
            rule="not_coco",
        )
    return data


def dumps_coco(data: dict[str, Any]) -> str:
    """Deterministic, diff-friendly JSON: sorted top-level keys, one record per line."""
    lines = ["{"]
    keys = sorted(data)
    for i, key in enumerate(keys):
        value = data[key]
        comma = "," if i < len(keys) - 1 else ""
        if isinstance(value, list) and value:
            lines.append(f" {json.dumps(key)}: [")
            items = [" " * 2 + json.dumps(v, sort_keys=True) for v in value]
            lines.append(",\n".join(items))
            lines.append(f" ]{comma}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_text_file(path: str | Path) -> Iterator[TextIO]:
    """A text file opened for writing that appears at ``path`` only when the block ends: it is
    written to a temporary file beside it and renamed into place, so nothing half written is
    ever at ``path``. A read-only folder or a full disk is a ``TeacherError`` naming the path;
    an existing file at ``path`` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise TeacherError(
            f"{path}: cannot write here ({e.strerror or e}); choose a writable "
            "folder or free disk space"
        ) from e
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 is not the user's choice
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise TeacherError(
            f"{path}: cannot write ({e.strerror or e}); free disk space or choose a writable folder"
        ) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` at once (:func:`atomic_text_file`)."""
    with atomic_text_file(path) as f:
        f.write(text)


def save_coco(data: dict[str, Any], path: str | Path) -> None:
    """Write a COCO dict atomically and deterministically (same dict -> same bytes)."""
    write_text_atomic(path, dumps_coco(data))


def save_json(data: Any, path: str | Path) -> None:
    """Write any JSON document atomically, sorted keys, indent 2 (reports, facts)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- indexes -------------------------------------------------------------------------------


def images_by_id(coco: dict[str, Any]) -> dict[Any, dict]:
    """``{image id: image record}`` (the first record wins for duplicated ids)."""
    out: dict[Any, dict] = {}
    for img in coco["images"]:
        out.setdefault(img.get("id"), img)
    return out


def index_by_image(coco: dict[str, Any]) -> dict[Any, list[dict]]:
    """``{image id: [annotations]}`` for every image (empty list for negatives), file order."""
    out: dict[Any, list[dict]] = {img.get("id"): [] for img in coco["images"]}
    for ann in coco["annotations"]:
        if ann.get("image_id") in out:
            out[ann["image_id"]].append(ann)
    return out


def categories_by_id(coco: dict[str, Any]) -> dict[Any, dict]:
    """``{category id: category record}`` in file order."""
    out: dict[Any, dict] = {}
    for cat in coco["categories"]:
        out.setdefault(cat.get("id"), cat)
    return out


def category_names(coco: dict[str, Any]) -> dict[Any, str]:
    """``{category id: name}`` in file order (original ids, never remapped here)."""
    return {cid: str(cat.get("name", "")) for cid, cat in categories_by_id(coco).items()}


def subset_coco(coco: dict[str, Any], image_ids: Iterable[Any]) -> dict[str, Any]:
    """The images ``image_ids`` and their annotations, in file order; every other key and
    the full category list kept."""
    keep = set(image_ids)
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [img for img in coco["images"] if img.get("id") in keep]
    out["annotations"] = [a for a in coco["annotations"] if a.get("image_id") in keep]
    return out


# --- masks ---------------------------------------------------------------------------------


_NUMBER_TYPES = {int, float}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _all_numbers(values: list) -> bool:
    return set(map(type, values)) <= _NUMBER_TYPES or all(_is_number(v) for v in values)


def mask_kind(ann: dict[str, Any]) -> str:
    """How ``ann["segmentation"]`` stores its mask: one of :data:`MASK_KINDS`."""
    seg = ann.get("segmentation")
    if seg is None or (isinstance(seg, (list, dict)) and len(seg) == 0):
        return "none"
    if isinstance(seg, list):
        if _all_numbers(seg):
            return "polygon"
        if all(isinstance(p, list) and _all_numbers(p) for p in seg):
            return "polygon" if any(len(p) > 0 for p in seg) else "none"
        return "invalid"
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)
        ):
            return "invalid"
        if isinstance(seg["counts"], (str, bytes)):
            return "rle_compressed"
        if isinstance(seg["counts"], list):
            return "rle_uncompressed"
    return "invalid"


def polygons(ann: dict[str, Any]) -> list[list[float]]:
    """The polygon rings of a ``"polygon"`` annotation (a flat list read as one ring)."""
    seg = ann.get("segmentation") or []
    if seg and _all_numbers(seg):
        return [list(seg)]
    return [list(p) for p in seg]


def valid_polygons(ann: dict[str, Any]) -> list[list[float]]:
    """Rings with at least 3 points (6 numbers, even length); shorter ones cannot be drawn."""
    return [p for p in polygons(ann) if len(p) >= 6 and len(p) % 2 == 0]


def _coordinates(ann: dict[str, Any]) -> tuple[list[float], list[float]]:
    """x and y numbers of the bbox corners and polygon vertices (numbers only)."""
    xs: list[float] = []
    ys: list[float] = []
    box = ann.get("bbox")
    if isinstance(box, list) and len(box) == 4 and _all_numbers(box):
        xs += [box[0], box[0] + box[2]] if math.isfinite(box[0]) else [box[0]]
        ys += [box[1], box[1] + box[3]] if math.isfinite(box[1]) else [box[1]]
        xs.append(box[2])
        ys.append(box[3])
    if mask_kind(ann) == "polygon":
        for ring in polygons(ann):
            xs += ring[0::2]
            ys += ring[1::2]
    return xs, ys


def geometry_problem(ann: dict[str, Any], *, width: float, height: float) -> tuple[str, str] | None:
    """``(rule, detail)`` when the bbox or polygon holds numbers that cannot be geometry: NaN
    or Infinity (``"non_finite_coordinates"``), or a point more than :data:`FAR` image sizes outside
    the image (``"coordinates_far_outside"``: rasterising it would take unbounded memory);
    None when the numbers are sane. Checked before any mask is rasterised."""
    xs, ys = _coordinates(ann)
    if not all(math.isfinite(v) for v in xs + ys):
        return "non_finite_coordinates", "NaN or Infinity in bbox/segmentation"
    if any(v < -FAR * width or v > (FAR + 1) * width for v in xs) or any(
        v < -FAR * height or v > (FAR + 1) * height for v in ys
    ):
        far = max([abs(v) for v in xs + ys], default=0.0)
        return "coordinates_far_outside", f"a coordinate of {far:g} in a {width:g}x{height:g} image"
    return None


def _compressed_counts_short(raw: bytes) -> list[int] | None:
    """:func:`_compressed_counts` in plain Python (faster for short strings)."""
    out: list[int] = []
    p, n = 0, len(raw)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or not 48 <= raw[p] < 112:
                return None
            c = raw[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        if x < 0:
            return None
        out.append(x)
    return out


def _compressed_counts(counts: str | bytes) -> np.ndarray | list[int] | None:
    """Decode COCO's compressed RLE string into run lengths (pycocotools ``rleFrString``,
    vectorised); None if malformed (pycocotools itself would read past the string)."""
    raw = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
    if len(raw) < 128:
        return _compressed_counts_short(raw)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() >= 64 or c[-1] & 0x20:
        return None
    last = (c & 0x20) == 0  # a value's last character
    group = np.concatenate([[0], np.cumsum(last)[:-1]])  # value index of each character
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    k = np.arange(c.size) - starts[group]  # position within its value
    if k.max() > 9:  # more than 50 bits: not a run length
        return None
    vals = np.bincount(group, weights=(c & 0x1F) << (5 * k)).astype(np.int64)  # exact < 2**53
    ends = np.flatnonzero(last)
    negative = (c[ends] & 0x10) != 0
    vals[negative] -= np.left_shift(1, 5 * (k[ends][negative] + 1))
    out = vals.copy()  # run i > 2 is stored as the difference to run i - 2
    if out.size > 3:
        out[3::2] = out[1] + np.cumsum(vals[3::2])
    if out.size > 4:
        out[4::2] = out[2] + np.cumsum(vals[4::2])
    return None if (out < 0).any() else out


def rle_problem(seg: dict[str, Any]) -> str | None:
    """Why an RLE ``segmentation`` cannot be decoded (runs not summing to h*w...), or None."""
    h, w = seg["size"]
    if h <= 0 or w <= 0:
        return f"RLE size {seg['size']} is not positive"
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            return "uncompressed RLE counts must be non-negative integers"
    elif isinstance(counts, str) and not counts.isascii():
        return "compressed RLE counts holds non-ASCII characters (not a COCO RLE string)"
    else:
        counts = _compressed_counts(counts)
        if counts is None:
            return "compressed RLE counts is not a valid COCO RLE string"
    total = int(np.sum(counts, dtype=np.int64))
    if total != h * w:
        return f"RLE runs sum to {total}, not size {h}x{w} = {h * w}"
    return None


def annotation_rle(
    ann: dict[str, Any], height: int, width: int, *, check: bool = True
) -> dict[str, Any]:
    """The mask of ``ann`` as one pycocotools compressed RLE (``counts`` bytes) of ``height x
    width``. Polygon rings with fewer than 3 points are ignored.

    Raises ``TeacherError`` naming the annotation id when it has no mask, an invalid
    segmentation, or an RLE whose size is not ``[height, width]``. ``check=False`` skips the
    RLE checks, for callers that ran :func:`rle_problem` and the size check already.
    """
    kind = mask_kind(ann)
    where = f"annotation {ann.get('id')!r}"
    if kind == "polygon":
        rings = valid_polygons(ann)
        if not rings:
            raise TeacherError(f"{where}: no polygon with at least 3 points")
        absurd = geometry_problem({"segmentation": rings}, width=width, height=height)
        if absurd:
            raise TeacherError(
                f"{where}: {absurd[1]} ({absurd[0]}); fix the polygon or run "
                "validate with on_error: drop"
            )
        return mask_utils.merge(mask_utils.frPyObjects(rings, height, width))
    if kind in ("rle_compressed", "rle_uncompressed"):
        seg = ann["segmentation"]
        problem = rle_problem(seg) if check else None
        if problem:
            raise TeacherError(f"{where}: {problem}")
        if check and list(seg["size"]) != [height, width]:
            raise TeacherError(
                f"{where}: RLE size {seg['size']} differs from its image [height, width] "
                f"[{height}, {width}]"
            )
        if kind == "rle_uncompressed":
            return mask_utils.frPyObjects(seg, height, width)
        counts = seg["counts"]
        return {
            "size": [height, width],
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }
    raise TeacherError(f"{where}: no usable mask (segmentation is {kind})")


def annotation_mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
    """The instance mask of ``ann``: a ``bool`` array of shape ``(height, width)``.

    Handles polygons, compressed and uncompressed RLE (see :func:`annotation_rle` for errors).
    """
    rle = annotation_rle(ann, height, width)
    with warnings.catch_warnings():  # pycocotools 2.0.x vs numpy 2 "copy keyword" notice
        warnings.filterwarnings("ignore", message=".*copy keyword", category=DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def rle_area_bbox(rle: dict[str, Any]) -> tuple[float, list[float]]:
    """``(pixel area, COCO xywh bbox)`` of a compressed RLE, without decoding it."""
    return float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """``HxW`` bool/0-1 mask -> JSON-ready compressed RLE ``{"size": [h, w], "counts": str}``."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """``HxW`` mask -> uncompressed RLE ``{"size": [h, w], "counts": [runs]}`` (column-major,
    first run is background, as COCO's ``iscrowd`` annotations)."""
    mask = np.asarray(mask, dtype=bool)
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0, *runs]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


# --- what an annotation holds: the one definition of crowd / has a mask / has a box ---------

MASKED_KINDS = ("polygon", "rle_compressed", "rle_uncompressed")  # mask kinds that decode


def is_crowd(ann: dict[str, Any]) -> bool:
    """``iscrowd`` is 1 (or true): a region of many objects, never an instance to learn or match."""
    return ann.get("iscrowd") in (1, True)


def has_mask(ann: dict[str, Any]) -> bool:
    """The annotation carries a decodable instance mask (polygon or RLE, not empty, not invalid)."""
    return mask_kind(ann) in MASKED_KINDS


def has_usable_box(ann: dict[str, Any]) -> bool:
    """``bbox`` is four numbers (COCO xywh) with positive width and height."""
    box = ann.get("bbox")
    return (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(_is_number(v) for v in box)
        and box[2] > 0
        and box[3] > 0
    )


def clean_name(name: str) -> str:
    """A category name as a text prompt writes it: '.' and '?' (label delimiters for Grounding
    DINO) and BERT's special tokens ([SEP], [CLS], ...) removed, whitespace collapsed.
    ``"St. Bernard"`` -> ``"St Bernard"``."""
    return " ".join(_PROMPT_DELIMITERS.sub(" ", _SPECIAL_TOKENS.sub(" ", name)).split())

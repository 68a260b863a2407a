"""Category ids <-> prompt indexes <-> names, and the text prompts Grounding DINO reads.

The one place that maps COCO category ids to 0..N-1 prompt indexes (categories sorted by id)
and builds the prompt ``"a . b . c ."``. When the prompt would exceed the text encoder's
token limit it is split into chunks of whole classes; a training sample uses the chunk that
holds its classes and inference runs every chunk. Evaluation and prediction reuse this
module; ``labels.json`` beside the DINO adapter is its saved form.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from teacher.coco import clean_name  # the one cleaning rule, shared with validation
from teacher.errors import TeacherError

MAX_TEXT_TOKENS = 256  # Grounding DINO's text encoder limit (config.max_text_len)


@dataclass(frozen=True)
class LabelMap:
    """Prompt index i (0..N-1) <-> COCO category id <-> class name, plus prompt chunks.

    ``chunks[k]`` lists the prompt indexes whose names form prompt ``k``, in order; within a
    chunk a class's position is its label for the loss (``class_labels``).
    """

    category_ids: tuple[int, ...]  # prompt index -> original COCO category id
    names: tuple[str, ...]  # prompt index -> name as written in the prompt
    chunks: tuple[tuple[int, ...], ...]  # prompt indexes per prompt chunk

    @property
    def prompts(self) -> list[str]:
        """One prompt per chunk, ``"a . b . c ."``."""
        return [prompt_text([self.names[i] for i in chunk]) for chunk in self.chunks]

    def index_of(self, category_id: int) -> int:
        """Prompt index of a COCO category id."""
        try:
            return self.category_ids.index(category_id)
        except ValueError:
            raise TeacherError(
                f"category id {category_id} is not in the label map {list(self.category_ids)}; "
                "retrain the adapter on data that has it, or fix the annotation's category_id"
            ) from None

    def chunk_of(self, category_id: int) -> int:
        """Index of the prompt chunk holding a category."""
        index = self.index_of(category_id)
        return next(k for k, chunk in enumerate(self.chunks) if index in chunk)

    def local_label(self, category_id: int, chunk: int) -> int:
        """Position of a category inside prompt chunk ``chunk`` (the loss's class label)."""
        return self.chunks[chunk].index(self.index_of(category_id))


def prompt_text(names: Sequence[str]) -> str:
    """``["cat", "dog"]`` -> ``"cat . dog ."``."""
    return " ".join(f"{n} ." for n in names)


def chunk_names(
    names: Sequence[str], *, count_tokens: Callable[[str], int], max_tokens: int = MAX_TEXT_TOKENS
) -> list[list[int]]:
    """Split names (in order) into chunks whose prompt fits ``max_tokens`` tokens.

    ``count_tokens(text)`` counts the tokens of ``text`` without special tokens; a chunk costs
    [CLS] + [SEP] + per class its tokens + one '.'. Returns lists of indexes into ``names``.
    """
    chunks: list[list[int]] = [[]]
    used = 2  # [CLS] and [SEP]
    for i, name in enumerate(names):
        cost = count_tokens(name) + 1
        if cost == 1:
            raise TeacherError(f"class name {name!r} gives no tokens; rename the category")
        if cost + 2 > max_tokens:
            raise TeacherError(
                f"class name {name!r} needs {cost - 1} tokens, more than a prompt holds "
                f"({max_tokens}); shorten it in the annotation file's categories"
            )
        if used + cost > max_tokens and chunks[-1]:
            chunks.append([])
            used = 2
        chunks[-1].append(i)
        used += cost
    return chunks if chunks[0] else []


def build_label_map(
    categories: Sequence[dict], *, tokenizer, max_tokens: int = MAX_TEXT_TOKENS
) -> LabelMap:
    """Label map from COCO ``categories`` (dicts with ``id`` and ``name``), sorted by id.

    ``tokenizer`` is the text encoder's (a Hugging Face tokenizer) and decides the chunking.
    """
    cats = sorted(categories, key=lambda c: c["id"])
    if not cats:
        raise TeacherError("the dataset has no categories; add them to the COCO file's 'categories'")
    names = [clean_name(str(c["name"])) for c in cats]
    empty = [c["id"] for c, n in zip(cats, names, strict=True) if not n]
    if empty:
        raise TeacherError(f"categories {empty} have empty names; give them names in the COCO file")

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    chunks = chunk_names(names, count_tokens=count, max_tokens=max_tokens)
    return LabelMap(
        category_ids=tuple(int(c["id"]) for c in cats),
        names=tuple(names),
        chunks=tuple(tuple(c) for c in chunks),
    )


def save_labels(label_map: LabelMap, path: str | Path) -> None:
    """Write ``labels.json``: prompts, chunks and per prompt index its id and name."""
    doc = {
        "prompts": label_map.prompts,
        "chunks": [list(c) for c in label_map.chunks],
        "categories": [
            {"index": i, "id": cid, "name": name}
            for i, (cid, name) in enumerate(zip(label_map.category_ids, label_map.names, strict=True))
        ],
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def load_labels(path: str | Path) -> LabelMap:
    """Read a ``labels.json`` written by :func:`save_labels`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        cats = sorted(doc["categories"], key=lambda c: c["index"])
        return LabelMap(
            category_ids=tuple(int(c["id"]) for c in cats),
            names=tuple(str(c["name"]) for c in cats),
            chunks=tuple(tuple(int(i) for i in c) for c in doc["chunks"]),
        )
    except FileNotFoundError:
        raise TeacherError(f"{path}: not found; run the train_dino stage first") from None
    except (ValueError, KeyError, TypeError) as e:
        raise TeacherError(f"{path}: not a valid labels.json ({e}); re-run train_dino") from None

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
from dataclasses import dataclass, field
from pathlib import Path

from teacher.coco.io import clean_name  # the one cleaning rule, shared with validation
from teacher.core.errors import TeacherError

MAX_TEXT_TOKENS = 256  # Grounding DINO's text encoder limit (config.max_text_len)
PROGRESS_FROM = 10_000  # class lists this long show a progress bar while they are built


@dataclass(frozen=True)
class LabelMap:
    """Prompt index i (0..N-1) <-> COCO category id <-> class name, plus prompt chunks.

    ``chunks[k]`` lists the prompt indexes whose names form prompt ``k``, in order; within a
    chunk a class's position is its label for the loss (``class_labels``).
    """

    category_ids: tuple[int, ...]  # prompt index -> original COCO category id
    names: tuple[str, ...]  # prompt index -> name as written in the prompt
    chunks: tuple[tuple[int, ...], ...]  # prompt indexes per prompt chunk
    # lookups built once (linear), so 50,000 classes cost no quadratic scans
    _index: dict = field(init=False, repr=False, compare=False)
    _place: dict = field(init=False, repr=False, compare=False)  # index -> (chunk, position)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.category_ids)})
        object.__setattr__(
            self,
            "_place",
            {i: (k, pos) for k, chunk in enumerate(self.chunks) for pos, i in enumerate(chunk)},
        )

    @property
    def prompts(self) -> list[str]:
        """One prompt per chunk, ``"a . b . c ."``."""
        return [prompt_text([self.names[i] for i in chunk]) for chunk in self.chunks]

    def index_of(self, category_id: int) -> int:
        """Prompt index of a COCO category id."""
        try:
            return self._index[category_id]
        except (KeyError, TypeError):
            raise TeacherError(
                f"category id {category_id} is not in the label map {list(self.category_ids)}; "
                "retrain the adapter on data that has it, or fix the annotation's category_id"
            ) from None

    def chunk_of(self, category_id: int) -> int:
        """Index of the prompt chunk holding a category."""
        return self._place[self.index_of(category_id)][0]

    def local_label(self, category_id: int, chunk: int) -> int:
        """Position of a category inside prompt chunk ``chunk`` (the loss's class label)."""
        where, position = self._place[self.index_of(category_id)]
        if where != chunk:
            raise TeacherError(f"category id {category_id} is in prompt chunk {where}, not {chunk}")
        return position


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


def tokenize_names(names: Sequence[str], *, tokenizer) -> list[list[int]]:
    """Token ids of each name (no special tokens): linear in the number of names, with a
    progress bar from :data:`PROGRESS_FROM` names on. (One call per name: batching measured no
    faster with the fast tokenizer.)"""
    from tqdm import tqdm  # type: ignore[import-untyped]

    return [
        list(tokenizer(name, add_special_tokens=False)["input_ids"])
        for name in tqdm(names, desc="class names", unit="name", disable=len(names) < PROGRESS_FROM)
    ]


def check_distinct(
    cats: Sequence[dict], tokens: Sequence[list[int]], *, unk_id: int | None
) -> None:
    """``TeacherError`` when names made only of unknown tokens ([UNK]) read the same to the
    text encoder: those classes could not be told apart."""
    if unk_id is None:
        return
    groups: dict[tuple[int, ...], list] = {}
    for cat, ids in zip(cats, tokens, strict=True):
        if ids and all(i == unk_id for i in ids):
            groups.setdefault(tuple(ids), []).append(cat)
    clashes = [g for g in groups.values() if len(g) > 1]
    if clashes:
        shown = "; ".join(", ".join(f"{c['id']} {c['name']!r}" for c in g[:5]) for g in clashes[:3])
        raise TeacherError(
            f"{sum(map(len, clashes))} category names become only [UNK] tokens for the text "
            f"encoder and cannot be told apart ({shown}); rename them with words the "
            "tokenizer knows (letters, digits)"
        )


def build_label_map(
    categories: Sequence[dict], *, tokenizer, max_tokens: int = MAX_TEXT_TOKENS
) -> LabelMap:
    """Label map from COCO ``categories`` (dicts with ``id`` and ``name``), sorted by id.

    ``tokenizer`` is the text encoder's (a Hugging Face tokenizer) and decides the chunking.
    """
    cats = sorted(categories, key=lambda c: c["id"])
    if not cats:
        raise TeacherError(
            "the dataset has no categories; add them to the COCO file's 'categories'"
        )
    names = [clean_name(str(c["name"])) for c in cats]
    empty = [c["id"] for c, n in zip(cats, names, strict=True) if not n]
    if empty:
        raise TeacherError(f"categories {empty} have empty names; give them names in the COCO file")

    tokens = tokenize_names(names, tokenizer=tokenizer)
    check_distinct(cats, tokens, unk_id=getattr(tokenizer, "unk_token_id", None))
    count = {n: len(t) for n, t in zip(names, tokens, strict=True)}
    chunks = chunk_names(names, count_tokens=count.__getitem__, max_tokens=max_tokens)
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
            for i, (cid, name) in enumerate(
                zip(label_map.category_ids, label_map.names, strict=True)
            )
        ],
    }
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def load_labels(path: str | Path) -> LabelMap:
    """Read a ``labels.json`` written by :func:`save_labels`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        cats = sorted(doc["categories"], key=lambda c: c["index"])
        chunks = tuple(tuple(int(i) for i in c) for c in doc["chunks"])
        flat = sorted(i for c in chunks for i in c)
        if flat != list(range(len(cats))) or [c["index"] for c in cats] != flat:
            raise ValueError(f"chunks must hold each prompt index 0..{len(cats) - 1} once")
        return LabelMap(
            category_ids=tuple(int(c["id"]) for c in cats),
            names=tuple(str(c["name"]) for c in cats),
            chunks=chunks,
        )
    except FileNotFoundError:
        raise TeacherError(f"{path}: not found; run the train_dino stage first") from None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise TeacherError(f"{path}: not a valid labels.json ({e}); re-run train_dino") from None

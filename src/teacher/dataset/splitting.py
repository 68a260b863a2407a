"""Seeded, stratified train/val/test split of a COCO dataset, by image.

Multi-label stratification (iterative, rarest category first, after Sechidis et al. 2011;
instance masks count as one more label, so the few masks of a mostly-box dataset reach val and
test too, where SAM is validated and scored):
every category with at least :data:`MIN_IMAGES_PER_SPLIT` images is first given one image
in every split with a non-zero fraction; then each remaining image goes to the split that
still lacks the most of its rarest category. Images without annotations (negatives) are
spread by the same fractions. Same data, fractions and seed -> same split. Every split with a
non-zero fraction gets at least one annotated image; too few for that is a ``TeacherError``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from teacher.coco.io import has_mask, is_crowd, subset_coco
from teacher.core.errors import TeacherError

SPLITS = ("train", "val", "test")
MIN_IMAGES_PER_SPLIT = 3  # a category with this many images appears in every split
MASKED = ("mask",)  # the label of images with a non-crowd instance mask (never a category id)


def split_sizes(
    n: int, fractions: Mapping[str, float], *, at_least_one: bool = False
) -> dict[str, int]:
    """``n`` items shared by ``fractions`` (largest remainder; ties to the earlier split). With
    ``at_least_one``, each split with a non-zero fraction left empty then takes one from the
    largest, while n allows."""
    exact = {s: n * f for s, f in fractions.items()}
    sizes = {s: int(v) for s, v in exact.items()}
    order = sorted(fractions, key=lambda s: -(exact[s] - sizes[s]))  # stable on ties
    for s in order[: n - sum(sizes.values())]:
        sizes[s] += 1
    for s in [s for s, f in fractions.items() if at_least_one and f > 0 and sizes[s] == 0]:
        largest = max(sizes, key=lambda k: sizes[k])  # the earlier split on ties
        if sizes[largest] > 1:
            sizes[largest] -= 1
            sizes[s] = 1
    return sizes


def check_enough_images(n: int, *, total: int, fractions: Mapping[str, float]) -> None:
    """TeacherError unless ``n`` annotated images (of ``total``) give every split with a
    non-zero fraction at least one."""
    active = [s for s, f in fractions.items() if f > 0]
    if n >= len(active):
        return
    shown = "/".join(f"{s} {fractions[s]:g}" for s in fractions)
    raise TeacherError(
        f"{n} image(s) with annotations ({total} images in all) cannot fill {len(active)} "
        f"splits ({shown}): each needs at least one annotated image. Add annotated images "
        f"to the dataset (at least {len(active)})."
    )


def split_size_warning(n: int, *, fractions: Mapping[str, float]) -> str | None:
    """A warning when ``n`` annotated images are too few for ``fractions``: the split stage
    would fail, or a split would get less than one image by its fraction (forced to one: its
    metrics are one image's). None when the data fills every split."""
    active = {s: f for s, f in fractions.items() if f > 0}
    shown = "/".join(f"{s} {f:g}" for s, f in fractions.items())
    if n < len(active):
        return (
            f"{n} annotated image(s) cannot fill the {len(active)} splits ({shown}): the "
            f"split stage will stop; add annotated images (at least {len(active)})"
        )
    thin = [f"{s} ({n} x {f:g} = {n * f:.2g})" for s, f in active.items() if n * f < 1]
    if thin:
        return (
            f"{n} annotated image(s) are too few for the split ({shown}): {', '.join(thin)} "
            "would get less than one image and is given one; its metrics will be noise. "
            "Add images or change the split fractions"
        )
    return None


class _Assigner:
    """Book-keeping of the split in progress: remaining room and per-category demand."""

    def __init__(self, labels: dict[Any, set], fractions: Mapping[str, float], room: dict) -> None:
        self.labels = labels
        self.active = [s for s, f in fractions.items() if f > 0]
        self.room = dict(room)
        per_cat: dict[Any, int] = {}
        for cats in labels.values():
            for c in cats:
                per_cat[c] = per_cat.get(c, 0) + 1
        self.images_of = per_cat
        self.demand = {s: {c: fractions[s] * n for c, n in per_cat.items()} for s in fractions}
        self.has: dict[str, set] = {s: set() for s in fractions}
        self.assigned: dict[Any, str] = {}

    def place(self, image: Any, split: str) -> None:
        self.assigned[image] = split
        self.room[split] -= 1
        for c in self.labels[image]:
            self.demand[split][c] -= 1
            self.has[split].add(c)

    def best_split(self, cat: Any) -> str:
        open_ = [s for s in self.active if self.room[s] > 0] or self.active
        return max(open_, key=lambda s: (self.demand[s][cat], self.room[s]))


def assign_images(
    coco: dict[str, Any], *, fractions: Mapping[str, float], seed: int
) -> dict[Any, str]:
    """``{image id: split name}`` for every image of ``coco`` (see module docstring)."""
    rng = random.Random(seed)
    order = [im["id"] for im in coco["images"]]
    rng.shuffle(order)
    labels: dict[Any, set] = {i: set() for i in order}
    for ann in coco["annotations"]:
        if ann["image_id"] in labels:
            labels[ann["image_id"]].add(ann["category_id"])
            if not is_crowd(ann) and has_mask(ann):
                labels[ann["image_id"]].add(MASKED)
    positives = [i for i in order if labels[i]]
    negatives = [i for i in order if not labels[i]]
    check_enough_images(len(positives), total=len(order), fractions=fractions)
    state = _Assigner(labels, fractions, split_sizes(len(positives), fractions, at_least_one=True))
    rarest = sorted(state.images_of, key=lambda c: (state.images_of[c], str(c)))
    rank = {c: k for k, c in enumerate(rarest)}
    by_rarity = sorted(positives, key=lambda i: (min(rank[c] for c in labels[i]), len(labels[i])))
    images_with: dict[Any, list] = {c: [] for c in rarest}
    for i in by_rarity:
        for c in labels[i]:
            images_with[c].append(i)
    for cat in rarest:  # 1. one image of each category in each split, rarest first
        if state.images_of[cat] < MIN_IMAGES_PER_SPLIT:
            continue
        for split in state.active:
            if cat in state.has[split]:
                continue
            free = [i for i in images_with[cat] if i not in state.assigned]
            if free:
                state.place(min(free, key=lambda i: len(labels[i])), split)
    for image in by_rarity:  # 2. the rest by the demand of their rarest category
        if image not in state.assigned:
            rare = min(labels[image], key=lambda c: rank[c])
            state.place(image, state.best_split(rare))
    neg_sizes = split_sizes(len(negatives), fractions)  # 3. negatives, proportionally
    start = 0
    for split, size in neg_sizes.items():
        for image in negatives[start : start + size]:
            state.assigned[image] = split
        start += size
    return state.assigned


def split_coco(
    coco: dict[str, Any], *, fractions: Mapping[str, float], seed: int
) -> dict[str, dict]:
    """``{split name: COCO subset}``; each keeps the full category list and every other key.

    ``fractions`` maps split names (usually train/val/test) to fractions summing to 1.
    """
    assigned = assign_images(coco, fractions=fractions, seed=seed)
    return {s: subset_coco(coco, [i for i, a in assigned.items() if a == s]) for s in fractions}

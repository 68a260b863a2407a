"""Category names: a name the text prompt can carry (no tokenizer token, words left once the
prompt delimiters are removed), numbers as text, and names that read as the same prompt."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from teacher.coco.io import SPECIAL_TOKENS, clean_name
from teacher.dataset.validation.findings import Findings


def _number_name(name: Any) -> str | None:
    """A numeric name as text (``1.0`` -> ``"1"``, ``2.5`` -> ``"2.5"``); None otherwise."""
    if isinstance(name, bool) or not isinstance(name, (int, float)) or not math.isfinite(name):
        return None
    return str(int(name)) if float(name).is_integer() else repr(float(name))


def category_name_problem(name: str) -> str | None:
    """The rule a category name breaks in a text prompt, or None (pure: no tokenizer)."""
    if any(tok in name.upper() for tok in SPECIAL_TOKENS):
        return "category_name_special_token"
    if not " ".join(re.sub(r"[.?]", " ", name).split()):
        return "category_name_not_prompt"
    return None


def check_categories(coco: dict, found: Findings) -> None:
    """Categories need a name the prompt can carry (error); numbers become text (fix);
    shared names are ambiguous prompts, names without letters may read as [UNK] (warning).
    Linear in the number of categories."""
    kept = []
    for cat in coco["categories"]:
        name = cat.get("name")
        as_text = _number_name(name)
        if as_text is not None:
            found.add("category_name_number", cat["id"], f"{name!r} -> {as_text!r}")
            cat["name"] = name = as_text
        problem = (
            category_name_problem(name)
            if isinstance(name, str) and name.strip()
            else "category_name_missing"
        )
        if problem:
            found.add(problem, cat["id"], f"name {name!r}")
            found.dropped["categories"][cat["id"]] = problem
            continue
        if not any(ch.isalnum() for ch in name):
            found.add("category_name_no_letters", cat["id"], f"name {name!r}")
        kept.append(cat)
    coco["categories"] = kept
    # the text encoder lower-cases: "St. Bernard" / "st bernard", "dog?" / "dog" read the same
    names = Counter(clean_name(c["name"]).lower() for c in kept)
    for cat in kept:
        prompt = clean_name(cat["name"]).lower()
        if names[prompt] > 1:
            found.add(
                "duplicate_category_name",
                cat["id"],
                f"name {cat['name']!r} (prompt text {prompt!r})",
            )

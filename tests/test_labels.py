"""Label map: ids <-> prompt indexes <-> names, prompts, chunking, labels.json round trip."""

from __future__ import annotations

import pytest

from teacher.dino.labels import (
    MAX_TEXT_TOKENS,
    build_label_map,
    chunk_names,
    clean_name,
    load_labels,
    prompt_text,
    save_labels,
)
from teacher.dino.model import tiny_tokenizer
from teacher.errors import TeacherError


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_prompt_order_is_category_id_order(tokenizer):
    cats = [{"id": 7, "name": "star"}, {"id": 2, "name": "circle"}, {"id": 5, "name": "square"}]
    lm = build_label_map(cats, tokenizer=tokenizer)
    assert lm.category_ids == (2, 5, 7)
    assert lm.prompts == ["circle . square . star ."]
    assert [lm.index_of(c) for c in (2, 5, 7)] == [0, 1, 2]
    assert lm.local_label(7, 0) == 2
    with pytest.raises(TeacherError, match="category id 9"):
        lm.index_of(9)


def test_names_lose_delimiters():
    assert clean_name("st. bernard?") == "st bernard"
    assert prompt_text(["a", "b c"]) == "a . b c ."


def test_tokenizer_uses_bert_ids(tokenizer):
    ids = tokenizer("cat . dog ?")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and 1012 in ids and 1029 in ids
    assert tokenizer.pad_token_id == 0


def test_300_classes_are_chunked_under_the_token_limit(tokenizer):
    cats = [{"id": i + 1, "name": f"class number {i}"} for i in range(300)]
    lm = build_label_map(cats, tokenizer=tokenizer)
    assert len(lm.chunks) > 1
    # every class in exactly one chunk, in order
    assert [i for chunk in lm.chunks for i in chunk] == list(range(300))
    for prompt, chunk in zip(lm.prompts, lm.chunks, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        assert len(ids) <= MAX_TEXT_TOKENS
        assert ids.count(1012) == len(chunk)  # one '.' per class: the label count Grounding DINO sees
    # greedy: a chunk could not have taken the next class
    first_len = len(tokenizer(lm.prompts[0])["input_ids"])
    next_cost = len(tokenizer(lm.names[lm.chunks[1][0]], add_special_tokens=False)["input_ids"]) + 1
    assert first_len + next_cost > MAX_TEXT_TOKENS
    assert lm.chunk_of(300) == len(lm.chunks) - 1


def test_chunking_rejects_a_name_longer_than_a_prompt():
    with pytest.raises(TeacherError, match="tokens"):
        chunk_names(["x" * 10], count_tokens=lambda s: 300)


def test_labels_json_round_trip(tmp_path, tokenizer):
    cats = [{"id": i * 3, "name": f"thing {i}"} for i in range(1, 120)]
    lm = build_label_map(cats, tokenizer=tokenizer)
    save_labels(lm, tmp_path / "labels.json")
    assert load_labels(tmp_path / "labels.json") == lm
    with pytest.raises(TeacherError, match="not found"):
        load_labels(tmp_path / "missing.json")

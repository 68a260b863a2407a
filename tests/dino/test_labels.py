"""Label map: ids <-> prompt indexes <-> names, prompts, chunking, labels.json round trip."""

from __future__ import annotations

import pytest

from teacher.core.errors import TeacherError
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
        assert ids.count(1012) == len(
            chunk
        )  # one '.' per class: the label count Grounding DINO sees
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


# --- issue 16: names the prompt cannot carry; 50,000 classes -------------------------------------


def test_special_tokens_are_removed_from_names():
    assert clean_name("cat [SEP] dog") == "cat dog" and clean_name("[cls]") == ""
    assert clean_name(" . ") == ""


def test_names_of_special_tokens_or_delimiters_only_are_refused(tokenizer):
    for name in ("[SEP]", " . "):
        with pytest.raises(TeacherError, match="empty names"):
            build_label_map(
                [{"id": 1, "name": "cat"}, {"id": 2, "name": name}], tokenizer=tokenizer
            )


def test_a_special_token_inside_a_name_does_not_shift_the_labels(tokenizer):
    lm = build_label_map(
        [{"id": 1, "name": "cat [SEP] x"}, {"id": 2, "name": "dog"}], tokenizer=tokenizer
    )
    assert lm.prompts == ["cat x . dog ."]
    ids = tokenizer(lm.prompts[0])["input_ids"]
    assert ids.count(tokenizer.sep_token_id) == 1  # only the closing [SEP]


def test_names_that_all_become_unk_are_refused(tokenizer):
    cats = [{"id": 1, "name": "★"}, {"id": 2, "name": "☆"}, {"id": 3, "name": "cat"}]
    with pytest.raises(TeacherError, match=r"\[UNK\].*1 '★', 2 '☆'"):
        build_label_map(cats, tokenizer=tokenizer)


def test_fifty_thousand_classes_build_in_linear_time(tokenizer):
    import time

    cats = [{"id": i, "name": f"class {i}"} for i in range(50_000)]
    start = time.perf_counter()
    lm = build_label_map(cats, tokenizer=tokenizer)
    lookups = {c: (lm.chunk_of(c), lm.local_label(c, lm.chunk_of(c))) for c in lm.category_ids}
    elapsed = time.perf_counter() - start
    assert len(lookups) == 50_000 and len(lm.chunks) > 100
    assert elapsed < 30, elapsed


@pytest.mark.parametrize(
    "doc",
    [
        '{"prompts": [], "chunks": [[0, 5]], "categories": [{"index": 0, "id": 1, "name": "a"}]}',
        '{"prompts": [], "chunks": [[-1]], "categories": [{"index": 0, "id": 1, "name": "a"}]}',
        '{"prompts": [], "chunks": [[0]], "categories": [{"index": 0, "id": [1], "name": "a"}]}',
        '{"prompts": [], "chunks": [[0]], "categories": "abc"}',
        "[1, 2]",
        "not json",
    ],
)
def test_damaged_labels_json_is_one_clear_error(tmp_path, doc):
    (tmp_path / "labels.json").write_text(doc)
    with pytest.raises(TeacherError, match="labels.json: not a valid labels.json"):
        load_labels(tmp_path / "labels.json")

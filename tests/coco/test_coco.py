import json

import numpy as np
import pytest

from teacher.coco import io as C
from teacher.core.errors import TeacherError


def square_mask(h=8, w=10):
    m = np.zeros((h, w), bool)
    m[2:6, 3:7] = True
    return m


def test_load_coco_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TeacherError, match="bad.json.*not valid JSON") as e:
        C.load_coco(bad)
    assert e.value.rule == "not_json"
    results = tmp_path / "results.json"
    results.write_text("[]")
    with pytest.raises(TeacherError, match="results.json.*not a COCO dataset") as e:
        C.load_coco(results)
    assert e.value.rule == "not_coco"
    partial = tmp_path / "partial.json"
    partial.write_text('{"images": [], "annotations": []}')
    with pytest.raises(TeacherError, match="missing key.*categories"):
        C.load_coco(partial)
    with pytest.raises(TeacherError, match="not found"):
        C.load_coco(tmp_path / "absent.json")


def test_save_coco_is_deterministic_readable_and_round_trips(tmp_path):
    data = {
        "images": [{"width": 4, "id": 1, "file_name": "a.jpg", "height": 3}],
        "annotations": [],
        "categories": [{"id": 0, "name": "cat"}],
        "info": None,
    }
    C.save_coco(data, tmp_path / "a.json")
    C.save_coco(dict(reversed(list(data.items()))), tmp_path / "b.json")
    text = (tmp_path / "a.json").read_text()
    assert text == (tmp_path / "b.json").read_text()
    assert json.loads(text) == data
    assert '  {"file_name": "a.jpg", "height": 3, "id": 1, "width": 4}' in text.splitlines()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temp left


def test_indexes():
    data = {
        "images": [{"id": 1}, {"id": 2}],
        "categories": [{"id": 0, "name": "a"}, {"id": 7, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 7},
            {"id": 2, "image_id": 2, "category_id": 0},
        ],
    }
    assert C.index_by_image(data) == {1: [], 2: data["annotations"]}
    assert C.category_names(data) == {0: "a", 7: "b"}
    assert list(C.categories_by_id(data)) == [0, 7]
    assert C.images_by_id(data)[2] == {"id": 2}
    sub = C.subset_coco({**data, "info": {"x": 1}}, [1])
    assert (
        sub["images"] == [{"id": 1}]
        and sub["annotations"] == []
        and sub["categories"] == data["categories"]
    )
    assert sub["info"] == {"x": 1}


@pytest.mark.parametrize(
    "seg, kind",
    [
        (None, "none"),
        ([], "none"),
        ([[]], "none"),
        ([[0, 0, 4, 0, 4, 4]], "polygon"),
        ([0, 0, 4, 0, 4, 4], "polygon"),
        ({"size": [2, 2], "counts": "04"}, "rle_compressed"),
        ({"size": [2, 2], "counts": [1, 3]}, "rle_uncompressed"),
        ({"size": [2], "counts": [4]}, "invalid"),
        ("abc", "invalid"),
        ([{"a": 1}], "invalid"),
    ],
)
def test_mask_kind(seg, kind):
    assert C.mask_kind({"segmentation": seg}) == kind


def test_three_mask_forms_decode_to_the_same_mask():
    m = square_mask()
    poly = {"id": 1, "segmentation": [[3, 2, 7, 2, 7, 6, 3, 6]]}
    rle = {"id": 2, "segmentation": C.mask_to_rle(m)}
    raw = {"id": 3, "segmentation": C.mask_to_uncompressed_rle(m)}
    assert isinstance(rle["segmentation"]["counts"], str)
    for ann in (poly, rle, raw):
        out = C.annotation_mask(ann, 8, 10)
        assert out.dtype == bool and out.shape == (8, 10)
        np.testing.assert_array_equal(out, m)
    area, bbox = C.rle_area_bbox(C.annotation_rle(raw, 8, 10))
    assert area == 16 and bbox == [3, 2, 4, 4]


def test_uncompressed_rle_starting_with_foreground():
    m = np.ones((3, 2), bool)
    m[2, 1] = False
    raw = C.mask_to_uncompressed_rle(m)
    assert raw["counts"][0] == 0 and sum(raw["counts"]) == 6
    np.testing.assert_array_equal(C.annotation_mask({"segmentation": raw}, 3, 2), m)


def test_short_polygon_rings_are_ignored_and_flat_polygons_read():
    ann = {"id": 5, "segmentation": [[1, 1, 2, 2], [3, 2, 7, 2, 7, 6, 3, 6]]}
    np.testing.assert_array_equal(C.annotation_mask(ann, 8, 10), square_mask())
    flat = {"id": 6, "segmentation": [3, 2, 7, 2, 7, 6, 3, 6]}
    np.testing.assert_array_equal(C.annotation_mask(flat, 8, 10), square_mask())
    with pytest.raises(TeacherError, match="annotation 7: no polygon"):
        C.annotation_mask({"id": 7, "segmentation": [[1, 1, 2, 2]]}, 8, 10)


def test_bad_rle_is_refused_not_decoded_as_garbage():
    assert "sum to 3" in C.rle_problem({"size": [2, 2], "counts": [1, 2]})
    assert "not a valid" in C.rle_problem({"size": [2, 2], "counts": "~~"})
    assert C.rle_problem(C.mask_to_rle(square_mask())) is None
    with pytest.raises(TeacherError, match="annotation 9: RLE runs sum"):
        C.annotation_mask({"id": 9, "segmentation": {"size": [2, 2], "counts": [1, 2]}}, 2, 2)
    with pytest.raises(TeacherError, match="differs from its image"):
        C.annotation_mask({"id": 9, "segmentation": C.mask_to_rle(square_mask())}, 10, 8)
    with pytest.raises(TeacherError, match="no usable mask"):
        C.annotation_mask({"id": 9, "segmentation": []}, 2, 2)


def test_compressed_counts_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for shape, p in [((37, 23), 0.6), ((300, 200), 0.999), ((5, 5), 0.0), ((64, 64), 1.1)]:
        m = rng.random(shape) > p
        m[: shape[0] // 3] |= rng.random() > 0.5  # long runs: multi-character values
        rle = C.mask_to_rle(m)
        counts = C._compressed_counts(rle["counts"])
        assert list(counts) == C.mask_to_uncompressed_rle(m)["counts"]
        assert list(C._compressed_counts_short(rle["counts"].encode())) == list(counts)
        np.testing.assert_array_equal(C.annotation_mask({"segmentation": rle}, *shape), m)
    assert C._compressed_counts("0\x7f") is None and C._compressed_counts("o") is None


def test_annotation_predicates_crowd_mask_box():
    from teacher.coco.io import has_mask, has_usable_box, is_crowd

    poly = {"segmentation": [[0, 0, 4, 0, 4, 4]], "bbox": [0, 0, 4, 4], "iscrowd": 0}
    assert not is_crowd(poly) and has_mask(poly) and has_usable_box(poly)
    assert is_crowd({"iscrowd": 1}) and is_crowd({"iscrowd": True}) and not is_crowd({})
    assert has_mask({"segmentation": {"size": [2, 2], "counts": [0, 4]}})
    assert not has_mask({"segmentation": []}) and not has_mask({"segmentation": [[]]})
    assert not has_mask({"segmentation": "x"}) and not has_mask({})
    assert not has_usable_box({"bbox": [0, 0, 0, 4]}) and not has_usable_box({"bbox": [0, 0, 4]})
    assert not has_usable_box({"bbox": None}) and not has_usable_box({"bbox": [0, 0, "4", 4]})


def test_unwritable_destination_is_one_clear_error(tmp_path):
    """Issue 16: a read-only folder or a full disk named the file, not a traceback."""
    import os

    from teacher.coco.io import save_coco
    from teacher.core.errors import TeacherError

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(TeacherError, match="ro/out.json: cannot write here"):
            save_coco({"images": [], "annotations": [], "categories": []}, ro / "out.json")
    finally:
        ro.chmod(0o755)


def test_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    from teacher.coco.io import save_json
    from teacher.core.errors import TeacherError

    (tmp_path / "r.json").write_text("old")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(TeacherError, match="r.json: cannot write .No space left on device"):
        save_json({"a": 1}, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == []

"""Every validation rule and fix, on small hand-made COCO dicts."""

import copy

import pytest

from teacher.coco.io import mask_to_rle, mask_to_uncompressed_rle
from teacher.dataset.validation.registry import RULES
from teacher.dataset.validation.report import summary_text, validation_report
from teacher.dataset.validation.validator import validate_coco, validate_file

SQUARE = [[10, 10, 30, 10, 30, 30, 10, 30]]  # 20x20 polygon -> area 400, bbox [10,10,20,20]


def clean():
    return {
        "info": {"note": "kept"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
            {"id": 2, "file_name": "b.jpg", "width": 50, "height": 50},
        ],
        "annotations": [
            {
                "id": i,
                "image_id": 1 if i <= 8 else 2,
                "category_id": 1 + (i % 3),
                "iscrowd": 0,
                "bbox": [10, 10, 20, 20],
                "area": 400.0,
                "segmentation": SQUARE,
            }
            for i in range(1, 13)
        ],
        "categories": [
            {"id": 1, "name": "circle"},
            {"id": 2, "name": "square"},
            {"id": 3, "name": "star"},
        ],
    }


def sizes(**extra):
    table = {"a.jpg": (100, 80), "b.jpg": (50, 50), **extra}
    return lambda name: table.get(name, "image_missing")


def run(data, **kw):
    kw.setdefault("probe", sizes())
    return validate_coco(data, **kw)


def ann(result, ann_id):
    return next(a for a in result.coco["annotations"] if a["id"] == ann_id)


def fired(result):
    return {f["rule"]: f["ids"] for f in result.findings}


def test_clean_data_passes_untouched():
    data = clean()
    before = copy.deepcopy(data)
    r = run(data)
    assert r.ok and r.findings == [] and r.coco == before
    assert data == before  # input never modified


def test_rules_have_known_severities_and_fix_text():
    assert {r.severity for r in RULES.values()} == {"error", "fix", "warning"}
    assert all(r.message and r.fix for r in RULES.values())


@pytest.mark.parametrize(
    "key, rule, ids",
    [
        ("images", "duplicate_image_id", [1]),
        ("annotations", "duplicate_annotation_id", [1]),
        ("categories", "duplicate_category_id", [1]),
    ],
)
def test_duplicate_ids_are_errors_first_record_kept(key, rule, ids):
    data = clean()
    dup = copy.deepcopy(data[key][0])
    if key == "images":
        dup["file_name"] = "b.jpg"
    data[key].append(dup)
    r = run(data)
    assert fired(r)[rule] == ids and not r.ok
    assert sum(1 for rec in r.coco[key] if rec["id"] == 1) == 1


def test_unknown_image_and_category():
    data = clean()
    data["annotations"][0]["image_id"] = 999
    data["annotations"][1]["category_id"] = 0
    r = run(data, on_error="drop")
    assert fired(r)["unknown_image"] == [1] and fired(r)["unknown_category"] == [2]
    assert {a["id"] for a in r.coco["annotations"]} == set(range(3, 13))
    assert r.findings[0]["fix"] == "annotation dropped"


def test_error_fix_text_says_nothing_applied_in_fail_mode():
    data = clean()
    data["annotations"][0]["image_id"] = 999
    finding = run(data, on_error="fail").findings[0]
    assert finding["fix"].startswith("none applied (on_error=fail)")


def test_category_id_zero_and_extra_keys_are_fine():
    data = clean()
    data["categories"][0]["id"] = 0
    for a in data["annotations"]:
        a["category_id"] = 0 if a["category_id"] == 1 else a["category_id"]
        a["attributes"] = {"occluded": False}
    r = run(data)
    assert r.ok and r.findings == []
    assert r.coco["annotations"][0]["attributes"] == {"occluded": False}


def test_missing_and_unreadable_image_files_drop_the_image_and_its_annotations():
    data = clean()
    r = run(data, probe=lambda n: "image_missing" if n == "b.jpg" else (100, 80), on_error="drop")
    assert fired(r)["image_missing"] == [2]
    assert fired(r)["annotations_of_dropped_image"] == [9, 10, 11, 12]
    assert [im["id"] for im in r.coco["images"]] == [1]
    r = run(data, probe=lambda n: "image_unreadable" if n == "a.jpg" else (50, 50))
    assert fired(r)["image_unreadable"] == [1]


@pytest.mark.parametrize(
    "name, rule",
    [
        ("/etc/passwd", "unsafe_file_name"),
        ("../outside.jpg", "unsafe_file_name"),
        ("sub/../../x.jpg", "unsafe_file_name"),
        ("C:\\\\img.jpg", "unsafe_file_name"),
        ("", "file_name_missing"),
        (None, "file_name_missing"),
    ],
)
def test_file_names_leaving_the_root_or_missing_are_errors(name, rule):
    data = clean()
    data["images"][0]["file_name"] = name
    r = run(data)
    assert fired(r)[rule] == [1]


def test_backslashes_fixed_and_subfolders_allowed():
    data = clean()
    data["images"][0]["file_name"] = "sub\\a.jpg"
    r = run(data, probe=sizes(**{"sub/a.jpg": (100, 80)}))
    assert r.ok and fired(r) == {"file_name_backslash": [1]}
    assert r.coco["images"][0]["file_name"] == "sub/a.jpg"


def test_image_size_from_file_when_missing_or_wrong():
    data = clean()
    del data["images"][0]["width"]
    data["images"][1]["height"] = 49
    r = run(data)
    assert fired(r) == {"image_size_from_file": [1, 2]} and r.ok
    assert (r.coco["images"][0]["width"], r.coco["images"][1]["height"]) == (100, 50)


def test_zero_size_without_a_file_to_tell_is_an_error():
    data = clean()
    data["images"][1]["height"] = 0
    r = run(data, probe=None, on_error="drop")
    assert fired(r)["invalid_image_size"] == [2]
    assert [im["id"] for im in r.coco["images"]] == [1]


def test_numeric_string_ids_become_int_and_references_follow():
    data = clean()
    data["images"][0]["id"] = "1"
    data["annotations"][1]["image_id"] = "1"  # as in faster_coco_eval's gt_ignore_test
    data["annotations"][2]["id"] = "3"
    r = run(data)
    assert r.ok and sorted(fired(r)["string_id"]) == [1, 2, 3]
    assert r.coco["images"][0]["id"] == 1 and ann(r, 2)["image_id"] == 1 and ann(r, 3)["id"] == 3


def test_non_numeric_ids_are_errors_and_missing_annotation_ids_assigned():
    data = clean()
    data["images"][1]["id"] = "img-b"
    del data["annotations"][0]["id"]
    r = run(data, on_error="drop")
    assert fired(r)["invalid_id"] == ["img-b"]
    assert fired(r)["annotation_id_missing"] == [13]
    assert fired(r)["unknown_image"] == [9, 10, 11, 12]


def test_bbox_from_mask_when_missing_empty_or_zero():
    data = clean()
    del data["annotations"][0]["bbox"]
    data["annotations"][1]["bbox"] = []
    data["annotations"][2]["bbox"] = [10, 10, 0, 20]
    data["annotations"][3]["bbox"] = [10, 10, 20, 20]
    r = run(data)
    assert fired(r) == {"bbox_from_mask": [1, 2, 3]} and r.ok
    assert all(ann(r, i)["bbox"] == [10, 10, 20, 20] for i in (1, 2, 3))


def test_no_box_and_no_mask_is_missing_geometry():
    data = clean()
    data["annotations"][0].update(bbox=[5, 5, -3, 4], segmentation=[])
    data["annotations"][1].update(bbox=[5, 5, 0, 0])
    del data["annotations"][1]["segmentation"]
    r = run(data, on_error="drop")
    assert fired(r)["missing_geometry"] == [1, 2]
    assert 1 not in {a["id"] for a in r.coco["annotations"]}


def test_empty_mask_without_box():
    import numpy as np

    data = clean()
    data["annotations"][0].update(bbox=None, segmentation=mask_to_rle(np.zeros((80, 100), bool)))
    assert fired(run(data))["empty_mask"] == [1]


def test_bbox_partly_outside_clipped_fully_outside_error():
    data = clean()
    data["annotations"][0].update(bbox=[90, 70, 20, 20], segmentation=[], area=100.0)
    data["annotations"][2].update(bbox=[200, 10, 20, 20], segmentation=[])
    r = run(data, on_error="drop")
    assert fired(r)["bbox_clipped"] == [1] and ann(r, 1)["bbox"] == [90, 70, 10, 10]
    assert fired(r)["bbox_outside_image"] == [3]


def test_area_recomputed_when_missing_or_wrong_but_not_for_small_noise():
    data = clean()
    del data["annotations"][0]["area"]
    data["annotations"][1]["area"] = 8000.0  # the whole image, as sahi's terrain files
    data["annotations"][2]["area"] = 0
    data["annotations"][3]["area"] = 420.0  # within tolerance: kept
    data["annotations"][4].update(segmentation=[], area=250.0)  # box only, object inside: kept
    data["annotations"][5].update(segmentation=[], area=900.0)  # box only, larger than box
    r = run(data)
    assert fired(r) == {"area_recomputed": [1, 2, 3, 6]}
    assert ann(r, 2)["area"] == 400.0 and ann(r, 4)["area"] == 420.0 and ann(r, 5)["area"] == 250.0


def test_polygon_area_is_geometric_as_coco():
    from teacher.dataset.validation.geometry import polygon_area

    assert polygon_area([[0, 0, 3, 0, 3, 2]]) == 3.0
    data = clean()
    data["annotations"][0].update(
        segmentation=[[10, 10, 13, 10, 13, 12]], bbox=[10, 10, 3, 2], area=3.0
    )
    assert run(data).findings == []


def test_bbox_far_from_mask_is_a_warning():
    data = clean()
    data["annotations"][0]["bbox"] = [50, 50, 20, 20]
    assert fired(run(data)) == {"bbox_mask_mismatch": [1]}


def test_short_polygons_dropped_and_flat_polygons_wrapped():
    data = clean()
    data["annotations"][0]["segmentation"] = [[1, 1, 2, 2], SQUARE[0]]
    data["annotations"][1]["segmentation"] = [[1, 1, 2, 2]]  # nothing left: box only
    data["annotations"][2]["segmentation"] = list(SQUARE[0])
    r = run(data)
    assert fired(r) == {"polygon_dropped": [1, 2], "polygon_flat": [3]}
    assert ann(r, 1)["segmentation"] == SQUARE and ann(r, 2)["segmentation"] == []
    assert ann(r, 3)["segmentation"] == SQUARE


def test_rle_forms_accepted_and_bad_rle_rejected():
    import numpy as np

    m = np.zeros((80, 100), bool)
    m[10:30, 10:30] = True
    data = clean()
    data["annotations"][0]["segmentation"] = mask_to_rle(m)
    data["annotations"][2]["segmentation"] = mask_to_uncompressed_rle(m)
    data["annotations"][2]["iscrowd"] = 1
    assert run(data).ok
    data["annotations"][4]["segmentation"] = {"size": [80, 100], "counts": [5, 5]}
    data["annotations"][6]["segmentation"] = mask_to_rle(np.zeros((10, 10), bool))
    data["annotations"][8]["segmentation"] = {"polygon": 1}
    assert fired(run(data))["invalid_segmentation"] == [5, 7, 9]


def test_iscrowd_missing_set_to_zero():
    data = clean()
    del data["annotations"][0]["iscrowd"]
    data["annotations"][1]["iscrowd"] = True
    r = run(data)
    assert fired(r) == {"iscrowd_missing": [1, 2]}
    assert ann(r, 1)["iscrowd"] == 0 and ann(r, 2)["iscrowd"] == 1


def test_warnings():
    data = clean()
    data["categories"].append({"id": 9, "name": "unused"})
    data["categories"].append({"id": 10, "name": "Circle"})
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 3 or a["id"] == 2]
    data["annotations"][0].update(bbox=[10, 10, 1, 20], segmentation=[], area=20.0)
    data["images"].append({"id": 3, "file_name": "a.jpg", "width": 100, "height": 80})
    r = run(data, min_instances=3, min_box_size=2)
    f = fired(r)
    assert r.ok and f["unused_category"] == [9, 10] and f["rare_category"] == [3]
    assert f["small_box"] == [1] and f["image_without_annotations"] == [3]
    assert f["duplicate_category_name"] == [1, 10] and f["shared_file_name"] == [1, 3]


def test_names_that_clean_to_the_same_prompt_text_warn():
    data = clean()
    data["categories"] += [
        {"id": 11, "name": "St. Bernard"},
        {"id": 12, "name": "st  bernard"},
        {"id": 13, "name": "dog?"},
        {"id": 14, "name": "dog"},
        {"id": 15, "name": "dogs"},
    ]
    f = fired(run(data))
    assert f["duplicate_category_name"] == [11, 12, 13, 14]


def test_category_without_name_is_an_error():
    data = clean()
    data["categories"][2]["name"] = " "
    r = run(data, on_error="drop")
    assert fired(r)["category_name_missing"] == [3]
    # the cause is the category: its annotations are reported under it, not as unknown
    assert fired(r)["annotations_of_dropped_category"] == [2, 5, 8, 11]
    assert "unknown_category" not in fired(r)


def test_report_and_summary(tmp_path):
    data = clean()
    data["images"].append(copy.deepcopy(data["images"][0]))
    r = run(data)
    report = validation_report(r, on_error="fail", source={"annotations": "x.json"})
    assert report["ok"] is False and report["errors"] == 1 and report["duplicate_image_id"] == 1
    assert all(report[name] == r.counts[name] for name in RULES)
    assert report["findings"][0]["rule"] == "duplicate_image_id"
    text = summary_text(r, source="x.json", report_path="metrics/validate.json")
    assert (
        "duplicate_image_id" in text
        and "metrics/validate.json" in text
        and "on_error: drop" in text
    )


def test_validate_file_not_json_or_not_coco(tmp_path):
    (tmp_path / "a.json").write_text("nope")
    r = validate_file(tmp_path / "a.json", images=None)
    assert r.counts["not_json"] == 1 and not r.ok
    (tmp_path / "b.json").write_text('{"images": []}')
    assert validate_file(tmp_path / "b.json", images=None).counts["not_coco"] == 1


def test_missing_image_folder_is_one_clear_error(tmp_path):
    from teacher.core.errors import TeacherError

    (tmp_path / "a.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(TeacherError, match="image folder not found"):
        validate_file(tmp_path / "a.json", images=tmp_path / "nope")


def test_summary_of_a_non_coco_file_does_not_suggest_dropping_records(tmp_path):
    (tmp_path / "labelme.json").write_text('{"version": "4.4.0", "shapes": []}')
    text = summary_text(
        validate_file(tmp_path / "labelme.json", images=None), source="labelme.json"
    )
    assert "not_coco" in text and "on_error: drop" not in text and "COCO instances JSON" in text


# --- issue 16: causes, not consequences -------------------------------------------------------


def test_numeric_category_names_are_names():
    data = clean()
    data["categories"][0]["name"] = 1.0  # a float column
    data["categories"][1]["name"] = 7
    r = run(data)
    assert r.ok and fired(r) == {"category_name_number": [1, 2]}
    assert [c["name"] for c in r.coco["categories"]] == ["1", "7", "star"]


def test_knock_on_effects_are_reported_under_their_cause():
    data = clean()
    data["categories"].append({"id": 4, "name": None})
    data["annotations"] += [  # image 3's only annotations are of the nameless category
        {
            "id": 20 + i,
            "image_id": 3,
            "category_id": 4,
            "bbox": [1, 1, 5, 5],
            "iscrowd": 0,
            "area": 25.0,
        }
        for i in range(3)
    ]
    data["images"].append({"id": 3, "file_name": "c.jpg", "width": 50, "height": 50})
    data["images"].append({"id": 4, "file_name": "d.jpg", "width": 50, "height": 50})
    r = run(data, probe=sizes(**{"c.jpg": (50, 50), "d.jpg": (50, 50)}), on_error="drop")
    f = fired(r)
    assert f["category_name_missing"] == [4]
    assert f["annotations_of_dropped_category"] == [20, 21, 22]
    assert "unknown_category" not in f and "unused_category" not in f
    assert f["image_without_annotations"] == [4]  # 3 had annotations in the file


def test_annotations_of_an_image_with_an_invalid_id_name_the_image():
    data = clean()
    data["images"][1]["id"] = "img-b"
    for a in data["annotations"][8:]:
        a["image_id"] = "img-b"
    r = run(data, on_error="drop")
    assert fired(r)["invalid_id"] == ["img-b"]
    assert fired(r)["annotations_of_dropped_image"] == [9, 10, 11, 12]
    assert "unknown_image" not in fired(r)


@pytest.mark.parametrize("bad", ["--5", "²", [1], {"a": 1}, 1.5, True, "1e3"])
def test_ids_that_are_not_integers_are_named_not_crashed_on(bad):
    data = clean()
    data["images"][1]["id"] = bad
    data["categories"][2]["id"] = bad
    data["annotations"][0]["id"] = bad
    data["annotations"][1]["image_id"] = bad
    data["annotations"][2]["category_id"] = bad
    r = run(data, on_error="drop")
    assert len(fired(r)["invalid_id"]) == 3 and not r.ok
    validation_report(r, on_error="drop", source={})  # JSON-ready
    import json

    json.dumps(validation_report(r, on_error="drop", source={}))


# --- issue 16: numbers that cannot be geometry ------------------------------------------------


def test_non_finite_and_absurd_coordinates_are_named_before_rasterising():
    import time

    data = clean()
    data["annotations"][0]["segmentation"] = [[10, 10, float("nan"), 10, 30, 30]]
    data["annotations"][1]["segmentation"] = [[10, 10, float("inf"), 10, 30, 30]]
    data["annotations"][2]["segmentation"] = [[10, 10, 1e300, 10, 30, 30]]
    data["annotations"][3]["bbox"] = [10, float("nan"), 20, 20]
    data["annotations"][4]["bbox"] = [10, 10, 1e12, 20]
    start = time.perf_counter()
    r = run(data, on_error="drop")
    assert time.perf_counter() - start < 2
    assert fired(r)["non_finite_coordinates"] == [1, 2, 4]
    assert fired(r)["coordinates_far_outside"] == [3, 5]
    assert {a["id"] for a in r.coco["annotations"]} == set(range(6, 13))


def test_rasterising_an_absurd_polygon_is_refused():
    from teacher.coco.io import annotation_mask
    from teacher.core.errors import TeacherError

    with pytest.raises(TeacherError, match="annotation 7.*coordinates_far_outside"):
        annotation_mask({"id": 7, "segmentation": [[0, 0, 1e300, 0, 5, 5]]}, 10, 10)


def test_infinite_width_without_images_is_invalid_size():
    data = clean()
    data["images"][0]["width"] = float("inf")
    r = run(data, probe=None, on_error="drop")
    assert fired(r)["invalid_image_size"] == [1]


def test_non_ascii_rle_counts_are_invalid_segmentation():
    data = clean()
    data["annotations"][0]["segmentation"] = {"size": [80, 100], "counts": "é" * 200}
    data["annotations"][1]["segmentation"] = {"size": [80, 100], "counts": "ab\u00e9"}
    assert fired(run(data))["invalid_segmentation"] == [1, 2]


def test_a_5000_character_file_name_is_named(tmp_path):
    from teacher.dataset.validation.images import file_probe

    data = clean()
    data["images"][0]["file_name"] = "x" * 5000 + ".jpg"
    r = run(data, probe=file_probe(tmp_path))
    assert fired(r)["unsafe_file_name"] == [1]
    assert file_probe(tmp_path)("y" * 5000) == "image_missing"


# --- issue 16: a drop that leaves nothing -----------------------------------------------------


def test_dropping_everything_is_an_error_naming_the_dominant_rule():
    data = clean()
    r = run(data, probe=lambda name: "image_missing", on_error="drop")
    assert fired(r)["too_much_dropped"] == [None] and r.fatal and not r.ok
    detail = next(f for f in r.findings if f["rule"] == "too_much_dropped")["details"][0]
    assert "image_missing" in detail and "data.images" in detail
    text = summary_text(r, source="x.json")
    assert "on_error: drop" not in text and "data.images" in text


def test_drop_share_threshold():
    data = clean()
    probe = sizes(**{"b.jpg": "image_missing"})
    assert "too_much_dropped" not in fired(run(data, probe=probe, on_error="drop"))
    r = run(data, probe=probe, on_error="drop", max_drop_fraction=0.25)
    assert fired(r)["too_much_dropped"] == [None] and r.fatal


# --- issue 16: boxes that contradict their masks ----------------------------------------------


def test_boxes_mostly_contradicting_masks_are_an_error_unless_recomputed():
    data = clean()
    for a in data["annotations"][:8]:
        a["bbox"] = [50, 50, 20, 20]  # masks are at [10, 10, 20, 20]
    r = run(data, on_error="drop")
    assert len(fired(r)["bbox_mask_mismatch"]) == 8
    assert fired(r)["boxes_contradict_masks"] == [None] and r.fatal
    r = run(data, box_from_mask=True)
    assert r.ok and fired(r) == {"bbox_replaced_by_mask": list(range(1, 9))}
    assert ann(r, 1)["bbox"] == [10.0, 10.0, 20.0, 20.0]


def test_image_smaller_than_recorded_says_boxes_are_out_of_scale():
    data = clean()  # image 1 is recorded 100x80; its boxes reach 30x30
    r = run(data, probe=sizes(**{"a.jpg": (25, 20)}), on_error="drop")
    assert fired(r)["image_smaller_than_recorded"] == [1]
    detail = next(f for f in r.findings if f["rule"] == "image_smaller_than_recorded")["details"][0]
    assert "out of scale" in detail and "100x80" in detail and "25x20" in detail
    r = run(data, probe=sizes(**{"a.jpg": (40, 40)}))  # smaller, but every box fits: a size fix
    assert fired(r) == {"image_size_from_file": [1]}


def test_images_over_the_pixel_limit_are_read_downscaled_with_their_annotations():
    from teacher.coco.images import MAX_PIXELS

    data = clean()
    data["images"][0].update(width=20_000, height=10_000)  # 200 MP > MAX_PIXELS
    assert 20_000 * 10_000 > MAX_PIXELS
    r = run(data, probe=sizes(**{"a.jpg": (20_000, 10_000)}))
    assert fired(r) == {"image_downscaled": [1]} and r.ok
    assert (r.coco["images"][0]["width"], r.coco["images"][0]["height"]) == (10_000, 5_000)
    assert ann(r, 1)["bbox"] == [5, 5, 10, 10] and ann(r, 1)["segmentation"] == [
        [5, 5, 15, 5, 15, 15, 5, 15]
    ]
    assert ann(r, 1)["area"] == 100


# --- issue 16: class names the prompt cannot carry --------------------------------------------


@pytest.mark.parametrize(
    "name, rule",
    [
        ("cat [SEP] dog", "category_name_special_token"),
        ("[CLS]", "category_name_special_token"),
        ("[pad]", "category_name_special_token"),
        (" . ", "category_name_not_prompt"),
        ("?", "category_name_not_prompt"),
    ],
)
def test_names_the_prompt_cannot_carry_are_errors(name, rule):
    data = clean()
    data["categories"][1]["name"] = name
    r = run(data, on_error="drop")
    assert fired(r)[rule] == [2] and fired(r)["annotations_of_dropped_category"] == [1, 4, 7, 10]


def test_names_without_letters_are_a_warning():
    data = clean()
    data["categories"][1]["name"] = "★"
    assert fired(run(data)) == {"category_name_no_letters": [2]}


def test_fifty_thousand_categories_in_linear_time():
    import time

    data = clean()
    data["categories"] += [{"id": 100 + i, "name": f"class {i}"} for i in range(50_000)]
    start = time.perf_counter()
    r = run(data)
    assert time.perf_counter() - start < 5
    assert len(r.coco["categories"]) == 50_003 and r.counts["unused_category"] == 50_000


def test_deeply_nested_json_is_not_json_not_a_traceback(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    r = validate_file(tmp_path / "deep.json", images=None)
    assert r.counts["not_json"] == 1 and "nested too deeply" in r.findings[0]["details"][0]
    r = validate_file(tmp_path, images=None)  # a folder given as the annotation file
    assert r.counts["not_json"] == 1


def test_cli_refuses_out_or_report_equal_to_the_input(tmp_path, capsys):
    import json

    from teacher.cli import main

    path = tmp_path / "in.json"
    path.write_text(json.dumps(clean()))
    before = path.read_bytes()
    for flag in ("--out", "--report"):
        assert (
            main(
                [
                    "validate",
                    str(path),
                    flag,
                    str(tmp_path / "." / "in.json"),
                    "--params",
                    str(tmp_path / "none.yaml"),
                ]
            )
            == 1
        )
        assert "same file" in capsys.readouterr().err and path.read_bytes() == before


def test_cli_warns_when_the_dataset_is_too_small_for_the_split(tmp_path, capsys):
    import json

    from teacher.cli import main

    path = tmp_path / "in.json"
    path.write_text(json.dumps(clean()))  # 2 annotated images, 3 splits
    assert main(["validate", str(path), "--params", str(tmp_path / "none.yaml")]) == 0
    out = capsys.readouterr().out
    assert "warning: 2 annotated image(s) cannot fill the 3 splits" in out


def test_the_dominant_rule_counts_the_annotations_its_drops_took_along():
    data = clean()  # category 1 (4 annotations) dropped by its name, 2 boxes outside image 2
    data["categories"][0]["name"] = "circle [SEP]"
    data["annotations"][9]["bbox"] = data["annotations"][11]["bbox"] = [60, 60, 5, 5]
    for i in (9, 11):
        data["annotations"][i]["segmentation"] = []
    r = run(data, on_error="drop", max_drop_fraction=0.25)
    detail = next(f for f in r.findings if f["rule"] == "too_much_dropped")["details"][0]
    assert "5 of 12 annotations" in detail and "most by category_name_special_token" in detail

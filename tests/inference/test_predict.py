"""teacher.inference.predict and `teacher predict`: filtering, COCO output, one SAM embedding per image."""

import json
from pathlib import Path

import numpy as np
import pytest
from fake_adapters import (
    TINY_DINO,
    TINY_SAM,
    write_dino_adapter,
    write_sam_adapter,
    write_tiny_coco,
    write_tiny_params,
)
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from teacher.cli import main as teacher_main
from teacher.coco.detections import Detections
from teacher.coco.images import load_image
from teacher.core.errors import TeacherError
from teacher.core.params import LabelParams
from teacher.inference.predict import (
    Filter,
    filter_from_args,
    nms_across_classes,
    nms_per_class,
    parse_classes,
    predict_images,
    select,
    to_annotations,
)

REPO = Path(__file__).resolve().parents[2]


def _det():
    return Detections(
        boxes=np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 5, 5]], float),
        scores=np.array([0.9, 0.8, 0.7, 0.1], np.float32),
        category_ids=np.array([1, 1, 2, 1]),
    )


def test_nms_is_per_class_and_sorted_by_score():
    d = _det()
    assert nms_per_class(d.boxes, d.scores, d.category_ids, iou_threshold=0.5).tolist() == [0, 2, 3]
    assert nms_per_class(d.boxes, d.scores, d.category_ids, iou_threshold=1.0).tolist() == [
        0,
        1,
        2,
        3,
    ]


def test_select_applies_threshold_nms_and_cap():
    kept = select(_det(), Filter(score_threshold=0.5, nms_iou=0.5, max_detections=10))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7])
    assert kept.category_ids.tolist() == [1, 2]
    assert len(select(_det(), Filter(score_threshold=0.0, nms_iou=1.0, max_detections=2))) == 2


def test_agnostic_nms_drops_the_lower_scoring_name_of_one_object():
    # box 0 (class 1, 0.9) and box 2 (class 2, 0.7) are one object named twice
    d = _det()
    assert nms_across_classes(d.boxes, d.scores, iou_threshold=0.5).tolist() == [0, 3]
    kept = select(d, Filter(score_threshold=0.0, nms_iou=0.5, agnostic_iou=0.5))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.1])
    assert kept.category_ids.tolist() == [1, 1]
    off = select(d, Filter(score_threshold=0.0, nms_iou=0.5, agnostic_iou=1.0))
    assert off.category_ids.tolist() == [1, 2, 1]


@pytest.mark.parametrize(
    ("nms_iou", "agnostic_iou"), [(0.7, 0.8), (0.5, 0.5), (1.0, 0.6), (0.3, 1.0)]
)
def test_select_equals_torchvision_batched_nms_then_nms(nms_iou, agnostic_iou):
    import torch
    from torchvision.ops import batched_nms, nms

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 60, (200, 2))
    wh = rng.uniform(5, 40, (200, 2))
    det = Detections(
        boxes=np.concatenate([xy, wh], axis=1),
        scores=rng.permutation(200).astype(np.float32) / 200,  # distinct: no ties
        category_ids=rng.integers(1, 4, 200),
    )
    keep = Filter(
        score_threshold=0.2, nms_iou=nms_iou, agnostic_iou=agnostic_iou, max_detections=30
    )
    got = select(det, keep)
    above = np.flatnonzero(det.scores >= 0.2)
    xyxy = torch.as_tensor(np.concatenate([xy, xy + wh], axis=1)[above], dtype=torch.float32)
    scores = torch.as_tensor(det.scores[above])
    idx = torch.arange(len(above))
    if nms_iou < 1:
        idx = batched_nms(xyxy, scores, torch.as_tensor(det.category_ids[above]), nms_iou)
    if agnostic_iou < 1:
        idx = idx[nms(xyxy[idx], scores[idx], agnostic_iou)]
    idx = idx[torch.argsort(scores[idx], descending=True)][:30]
    assert got.scores.tolist() == pytest.approx(det.scores[above][idx.numpy()].tolist())
    assert got.category_ids.tolist() == det.category_ids[above][idx.numpy()].tolist()


def test_command_line_filters_take_the_label_stage_agnostic_nms_unless_given():
    from argparse import Namespace

    args = Namespace(score_threshold=None, nms_iou=0.7, max_detections=100)
    assert filter_from_args(args, default_score=0.25).agnostic_iou == LabelParams().agnostic_nms_iou
    args.agnostic_nms_iou = 0.0
    assert filter_from_args(args, default_score=0.25).agnostic_iou == 0.0


def test_detections_check_lengths_and_keep_masks_with_their_boxes():
    det = _det().with_masks(np.arange(4)[:, None, None] * np.ones((4, 2, 3), bool) > 1)
    assert det.boxes.dtype == np.float64 and det.category_ids.dtype == np.int64
    best = det.best(2)
    assert best.scores.tolist() == pytest.approx([0.9, 0.8]) and best.masks.sum() == 0
    assert len(Detections.concat([det, Detections.empty()])) == 4
    assert Detections.concat([det, _det()]).masks is None  # not every part has masks
    assert det.scaled(2).masks.shape == (4, 4, 6)
    with pytest.raises(ValueError, match="3 scores"):
        Detections(np.zeros((2, 4)), np.zeros(3), np.zeros(2))


def test_annotations_carry_rle_masks_and_mask_area():
    det = select(_det(), Filter(score_threshold=0.5, nms_iou=0.5))
    masks = np.zeros((2, 20, 30), bool)
    masks[0, :5, :4] = True
    anns = to_annotations(det.with_masks(masks), image_id=7, first_id=3)
    assert [a["id"] for a in anns] == [3, 4] and anns[0]["area"] == 20 and anns[1]["area"] == 0
    assert (
        mask_utils.decode(
            {**anns[0]["segmentation"], "counts": anns[0]["segmentation"]["counts"].encode()}
        ).sum()
        == 20
    )
    json.dumps(anns)  # JSON-ready


def test_parse_classes():
    assert parse_classes(" cat, dog,,bird ") == ["cat", "dog", "bird"]
    with pytest.raises(TeacherError, match="repeats cat"):
        parse_classes("cat,cat")
    with pytest.raises(TeacherError, match="names no class"):
        parse_classes(" , ")


def test_sam_embeds_each_image_once_for_all_its_boxes(tmp_path):
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import load_dino
    from teacher.inference.predict import Teachers
    from teacher.sam.build import load_sam

    gt = write_tiny_coco(tmp_path, n_images=2)
    dino = load_dino(TINY_DINO)
    teachers = Teachers(
        dino=dino,
        sam=load_sam(TINY_SAM),
        label_map=build_label_map(gt["categories"], tokenizer=dino.processor.tokenizer),
    )
    calls = []
    teachers.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    images = [load_image(tmp_path / im["file_name"]) for im in gt["images"]]
    dets = predict_images(
        teachers,
        images,
        keep=Filter(score_threshold=0.0, nms_iou=1.0, max_detections=20),
        text_threshold=0.0,
    )
    assert [len(d.scores) for d in dets] == [20, 20]
    assert calls == [1, 1]  # one embedding per image, not per box
    assert all(d.masks.shape == (20, 48, 64) for d in dets)
    calls.clear()
    none = predict_images(teachers, images, keep=Filter(score_threshold=1.01), text_threshold=0.0)
    assert [d.masks.shape for d in none] == [(0, 48, 64)] * 2
    assert calls == []  # no detection: no encoder pass


def _params(tmp_path):
    return write_tiny_params(tmp_path / "params.yaml")


def test_cli_predict_folder_round_trips_through_pycocotools(tmp_path, capsys):
    folder = tmp_path / "unlabeled"
    write_tiny_coco(folder / "sub", n_images=2)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "labels.json"
    rc = teacher_main(
        [
            "predict",
            str(folder),
            "--classes",
            "box, round thing",
            "--out",
            str(out),
            "--params",
            str(_params(tmp_path)),
            "--score-threshold",
            "0",
            "--text-threshold",
            "0",
            "--max-detections",
            "5",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [im["file_name"] for im in doc["images"]] == ["sub/img_0.png", "sub/img_1.png"]
    assert all((im["width"], im["height"]) == (64, 48) for im in doc["images"])
    assert [c["name"] for c in doc["categories"]] == ["box", "round thing"]
    assert len(doc["annotations"]) == 10
    assert [u["file"] for u in doc["info"]["unreadable"]] == [str(folder / "broken.jpg")]
    assert "broken.jpg" in capsys.readouterr().err
    gt = COCO()
    gt.dataset = {k: doc[k] for k in ("images", "categories")} | {"annotations": []}
    gt.createIndex()
    res = gt.loadRes(doc["annotations"])  # pycocotools accepts the teacher's labels
    for ann in res.dataset["annotations"]:
        assert mask_utils.decode(res.annToRLE(ann)).shape == (48, 64)
        assert 0 <= ann["score"] <= 1 and ann["category_id"] in (1, 2)


@pytest.mark.parametrize("sam_model", ["tiny-random", "tiny-random-sam2"])
def test_cli_predict_with_adapters_uses_their_classes(tmp_path, sam_model):
    gt = write_tiny_coco(tmp_path / "images", n_images=1)
    write_dino_adapter(tmp_path / "models" / "dino", gt["categories"])
    write_sam_adapter(tmp_path / "models" / "sam", model=sam_model)
    out = tmp_path / "labels.json"
    rc = teacher_main(
        [
            "predict",
            str(tmp_path / "images"),
            "--adapters",
            str(tmp_path / "models"),
            "--out",
            str(out),
            "--params",
            str(write_tiny_params(tmp_path / "params.yaml", sam_model=sam_model)),
            "--score-threshold",
            "0",
            "--text-threshold",
            "0",
            "--max-detections",
            "3",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["categories"] == [{"id": 1, "name": "box"}, {"id": 5, "name": "round thing"}]
    assert {a["category_id"] for a in doc["annotations"]} <= {1, 5} and len(doc["annotations"]) == 3
    assert all(a["segmentation"]["counts"] for a in doc["annotations"])  # masks from sam_model


def test_cli_predict_without_classes_or_adapters_says_what_to_do(tmp_path, capsys):
    write_tiny_coco(tmp_path / "images", n_images=1)
    rc = teacher_main(
        [
            "predict",
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "x.json"),
            "--params",
            str(_params(tmp_path)),
        ]
    )
    assert rc == 1 and "--classes" in capsys.readouterr().err


@pytest.mark.skipif(not (REPO / "data/sample/images").is_dir(), reason="data/sample not generated")
def test_predict_on_sample_images_round_trips(tmp_path):
    import shutil

    sample = json.loads((REPO / "data/sample/annotations.json").read_text())
    folder = tmp_path / "sample"
    folder.mkdir()
    for im in sample["images"][:4]:  # a few: the tests' time budget is small
        shutil.copy(REPO / "data/sample/images" / im["file_name"], folder)
    out = tmp_path / "labels.json"
    names = ",".join(c["name"] for c in sample["categories"])
    rc = teacher_main(
        [
            "predict",
            str(folder),
            "--classes",
            names,
            "--out",
            str(out),
            "--params",
            str(_params(tmp_path)),
            "--score-threshold",
            "0",
            "--text-threshold",
            "0",
            "--max-detections",
            "2",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in sample["images"]}
    assert {im["file_name"]: (im["width"], im["height"]) for im in doc["images"]} == {
        name: sizes[name] for name in sorted(p.name for p in folder.iterdir())
    }
    gt = COCO()
    gt.dataset = {"images": doc["images"], "categories": sample["categories"], "annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(doc["annotations"]).anns) == 2 * len(doc["images"])


def test_chunked_segmentation_equals_one_call(tmp_path):
    from teacher.inference.predict import segment_detections
    from teacher.sam.build import load_sam
    from teacher.sam.predictor import segment

    gt = write_tiny_coco(tmp_path, n_images=1)
    image = load_image(tmp_path / gt["images"][0]["file_name"])
    sam = load_sam(TINY_SAM)
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 30, (7, 2)), rng.uniform(4, 30, (7, 2))], axis=1)
    whole, _ = segment(sam, image, boxes)
    det = Detections(boxes=boxes, scores=np.ones(7), category_ids=np.ones(7, int))
    chunked = segment_detections(sam, image, det, chunk=3).masks
    assert chunked.shape == (7, 48, 64)
    assert (chunked != whole).mean() <= 1e-3  # decoder batches of 3 vs 7: a tolerance, not bitwise
    assert segment_detections(sam, image, det.take(slice(0, 0))).masks.shape == (0, 48, 64)


# --- issue 16 ---------------------------------------------------------------------------------


def test_predict_over_only_unreadable_images_exits_non_zero(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not a jpeg")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "labels.json"
    rc = teacher_main(
        [
            "predict",
            str(folder),
            "--classes",
            "box",
            "--out",
            str(out),
            "--params",
            str(_params(tmp_path)),
            "--boxes-only",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert "a.jpg" in err and "b.png" in err and "no image could be read" in err
    (folder / "a.jpg").unlink()
    (folder / "b.png").unlink()
    assert (
        teacher_main(
            [
                "predict",
                str(folder),
                "--classes",
                "box",
                "--out",
                str(out),
                "--params",
                str(_params(tmp_path)),
                "--boxes-only",
            ]
        )
        == 1
    )
    assert "no image files found" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--score-threshold", "1.5"),
        ("--score-threshold", "-0.1"),
        ("--text-threshold", "nan"),
        ("--nms-iou", "2"),
        ("--max-detections", "0"),
        ("--batch-size", "-3"),
        ("--batch-size", "x"),
    ],
)
def test_predict_flags_are_range_checked(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        teacher_main(["predict", str(tmp_path), "--out", str(tmp_path / "x.json"), flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_predicted_boxes_are_clipped_to_the_image():
    from teacher.inference.predict import clip_detections

    det = Detections(
        boxes=np.array([[-5, -5, 20, 20], [50, 30, 40, 40]], float),
        scores=np.ones(2),
        category_ids=np.ones(2, int),
    )
    clipped = clip_detections(det, width=64, height=48).boxes
    assert clipped.tolist() == [[0, 0, 15, 15], [50, 30, 14, 18]]


def test_detections_on_a_downscaled_image_are_scaled_back_to_the_file():
    masks = np.zeros((1, 10, 20), bool)
    masks[0, 2:4, 5:10] = True
    det = Detections(
        boxes=np.array([[5, 2, 5, 2]], float),
        scores=np.ones(1),
        category_ids=np.ones(1, int),
        masks=masks,
    )
    ann = to_annotations(det, image_id=1, first_id=1, size=(40, 20), detected_size=(20, 10))[0]
    assert ann["bbox"] == [10, 4, 10, 4] and ann["segmentation"]["size"] == [20, 40]
    assert ann["area"] == 40


def test_predict_output_respects_the_umask(tmp_path):
    import os

    from teacher.coco.io import save_coco

    old = os.umask(0o022)
    try:
        save_coco({"images": [], "annotations": [], "categories": []}, tmp_path / "o.json")
    finally:
        os.umask(old)
    assert (tmp_path / "o.json").stat().st_mode & 0o777 == 0o644


def _tiny_teachers(sam: bool = False):
    from teacher.dino.labels import build_label_map
    from teacher.dino.model import load_dino
    from teacher.inference.predict import Teachers
    from teacher.sam.build import load_sam

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    dino = load_dino(TINY_DINO)
    cats = [{"id": 1, "name": "box"}, {"id": 2, "name": "round thing"}]
    return Teachers(
        dino=dino,
        sam=load_sam(TINY_SAM) if sam else None,
        label_map=build_label_map(cats, tokenizer=dino.processor.tokenizer),
    )


def test_scores_do_not_depend_on_the_batch():
    """Mixed sizes in one batch were padded and the padding leaked into the backbone: up to 0.4
    of score for the same image on the tiny model. Batches now hold one image size."""
    from teacher.dino.detect import detect, same_size_batches

    assert same_size_batches([(2, 3), (4, 5), (2, 3), (2, 3)], batch_size=2) == [[0, 2], [3], [1]]
    teachers = _tiny_teachers()
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, s, dtype=np.uint8)
        for s in [(48, 64, 3), (64, 48, 3), (30, 90, 3), (48, 64, 3)]
    ]
    kw = {"box_threshold": 0.0, "text_threshold": 0.0, "max_detections": 900}
    alone = [detect(teachers.dino, [im], teachers.label_map, **kw)[0] for im in images]
    together = detect(teachers.dino, images, teachers.label_map, batch_size=4, **kw)
    for a, t in zip(alone, together, strict=True):
        assert np.abs(np.sort(a.scores) - np.sort(t.scores)).max() < 1e-4
        assert np.abs(np.sort(a.boxes, axis=0) - np.sort(t.boxes, axis=0)).max() < 1e-2


@pytest.mark.parametrize("height", [1, 3])
def test_images_one_or_three_pixels_high(height):
    """A 3-pixel-high image was read as channels-first by the image processor (scrambled)."""
    teachers = _tiny_teachers(sam=True)
    image = np.zeros((height, 64, 3), np.uint8)
    image[:, :32] = 255
    dets = predict_images(
        teachers,
        [image],
        keep=Filter(score_threshold=0.0, nms_iou=1.0, max_detections=3),
        text_threshold=0.0,
    )
    assert dets[0].masks.shape == (3, height, 64)
    assert (dets[0].boxes[:, 1] + dets[0].boxes[:, 3] <= height + 1e-6).all()
    pixels = teachers.dino.processor.image_processor(
        images=[image], return_tensors="pt", input_data_format="channels_last"
    )
    assert pixels["pixel_values"].shape[1] == 3


def test_only_images_too_small_for_the_encoder_are_padded():
    from teacher.dino.model import pad_for_queries

    real = {"num_queries": 900, "shortest_edge": 800, "longest_edge": 1333}
    photo = np.zeros((480, 640, 3), np.uint8)
    assert pad_for_queries(photo, **real) is photo  # the real model: ordinary images untouched
    line = pad_for_queries(np.ones((1, 1000, 3), np.uint8), **real)
    assert line.shape[1] == 1000 and line.shape[0] > 1 and line[0].all() and not line[1:].any()
    tiny = {"num_queries": 64, "shortest_edge": 64, "longest_edge": 96}
    square = pad_for_queries(np.zeros((192, 192, 3), np.uint8), **tiny)  # coarsest level 1x1
    assert square.shape[1] == 192 and square.shape[0] > 192

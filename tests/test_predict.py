"""teacher.predict and `teacher predict`: filtering, COCO output, one SAM embedding per image."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_adapters import (
    TINY_DINO,
    TINY_SAM,
    write_dino_adapter,
    write_sam_adapter,
    write_tiny_coco,
)
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from teacher.cli import main as teacher_main
from teacher.detections import Detections
from teacher.errors import TeacherError
from teacher.images import load_image
from teacher.predict import (
    Filter,
    nms_per_class,
    parse_classes,
    predict_images,
    select,
    to_annotations,
)

REPO = Path(__file__).resolve().parents[1]


def _det():
    return Detections(boxes=np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 5, 5]], float),
                      scores=np.array([0.9, 0.8, 0.7, 0.1], np.float32),
                      category_ids=np.array([1, 1, 2, 1]))


def test_nms_is_per_class_and_sorted_by_score():
    d = _det()
    assert nms_per_class(d.boxes, d.scores, d.category_ids, iou_threshold=0.5).tolist() == [0, 2, 3]
    assert nms_per_class(d.boxes, d.scores, d.category_ids, iou_threshold=1.0).tolist() == [0, 1, 2, 3]


def test_select_applies_threshold_nms_and_cap():
    kept = select(_det(), Filter(score_threshold=0.5, nms_iou=0.5, max_detections=10))
    assert kept.scores.tolist() == pytest.approx([0.9, 0.7])
    assert kept.category_ids.tolist() == [1, 2]
    assert len(select(_det(), Filter(score_threshold=0.0, nms_iou=1.0, max_detections=2))) == 2


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
    assert mask_utils.decode({**anns[0]["segmentation"], "counts": anns[0]["segmentation"]["counts"].encode()}).sum() == 20
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
    from teacher.predict import Teachers
    from teacher.sam.model import load_sam

    gt = write_tiny_coco(tmp_path, n_images=2)
    dino = load_dino(TINY_DINO)
    teachers = Teachers(dino=dino, sam=load_sam(TINY_SAM),
                        label_map=build_label_map(gt["categories"], tokenizer=dino.processor.tokenizer))
    calls = []
    teachers.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    images = [load_image(tmp_path / im["file_name"]) for im in gt["images"]]
    dets = predict_images(teachers, images, keep=Filter(score_threshold=0.0, nms_iou=1.0,
                                                        max_detections=20), text_threshold=0.0)
    assert [len(d.scores) for d in dets] == [20, 20]
    assert calls == [1, 1]  # one embedding per image, not per box
    assert all(d.masks.shape == (20, 48, 64) for d in dets)


def _params(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({
        "dino": {"model": "tiny-random", "shortest_edge": TINY_DINO.shortest_edge,
                 "longest_edge": TINY_DINO.longest_edge},
        "sam": {"model": TINY_SAM.model}}))
    return path


def test_cli_predict_folder_round_trips_through_pycocotools(tmp_path, capsys):
    folder = tmp_path / "unlabeled"
    write_tiny_coco(folder / "sub", n_images=2)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image")
    out = tmp_path / "labels.json"
    rc = teacher_main(["predict", str(folder), "--classes", "box, round thing", "--out", str(out),
                       "--params", str(_params(tmp_path)), "--score-threshold", "0",
                       "--text-threshold", "0", "--max-detections", "5"])
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


def test_cli_predict_with_adapters_uses_their_classes(tmp_path):
    gt = write_tiny_coco(tmp_path / "images", n_images=1)
    write_dino_adapter(tmp_path / "models" / "dino", gt["categories"])
    write_sam_adapter(tmp_path / "models" / "sam")
    out = tmp_path / "labels.json"
    rc = teacher_main(["predict", str(tmp_path / "images"), "--adapters", str(tmp_path / "models"),
                       "--out", str(out), "--params", str(_params(tmp_path)),
                       "--score-threshold", "0", "--text-threshold", "0", "--max-detections", "3"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["categories"] == [{"id": 1, "name": "box"}, {"id": 5, "name": "round thing"}]
    assert {a["category_id"] for a in doc["annotations"]} <= {1, 5} and len(doc["annotations"]) == 3


def test_cli_predict_without_classes_or_adapters_says_what_to_do(tmp_path, capsys):
    write_tiny_coco(tmp_path / "images", n_images=1)
    rc = teacher_main(["predict", str(tmp_path / "images"), "--out", str(tmp_path / "x.json"),
                       "--params", str(_params(tmp_path))])
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
    rc = teacher_main(["predict", str(folder), "--classes", names, "--out", str(out),
                       "--params", str(_params(tmp_path)), "--score-threshold", "0",
                       "--text-threshold", "0", "--max-detections", "2"])
    assert rc == 0
    doc = json.loads(out.read_text())
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in sample["images"]}
    assert {im["file_name"]: (im["width"], im["height"]) for im in doc["images"]} == {
        name: sizes[name] for name in sorted(p.name for p in folder.iterdir())}
    gt = COCO()
    gt.dataset = {"images": doc["images"], "categories": sample["categories"], "annotations": []}
    gt.createIndex()
    assert len(gt.loadRes(doc["annotations"]).anns) == 2 * len(doc["images"])


def test_chunked_segmentation_equals_one_call(tmp_path):
    from teacher.predict import segment_detections
    from teacher.sam.model import load_sam, segment

    gt = write_tiny_coco(tmp_path, n_images=1)
    image = load_image(tmp_path / gt["images"][0]["file_name"])
    sam = load_sam(TINY_SAM)
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 30, (7, 2)), rng.uniform(4, 30, (7, 2))], axis=1)
    whole, _ = segment(sam, image, boxes)
    det = Detections(boxes=boxes, scores=np.ones(7), category_ids=np.ones(7, int))
    chunked = segment_detections(sam, image, det, chunk=3).masks
    assert chunked.shape == (7, 48, 64) and (chunked == whole).all()
    assert segment_detections(sam, image, det.take(slice(0, 0))).masks.shape == (0, 48, 64)

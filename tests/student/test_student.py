"""The student: targets from our COCO code, RF-DETR tiny-random, training, evaluation, ONNX, labeling."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_adapters import (
    write_tiny_coco,
)

from teacher.cli import main as teacher_main
from teacher.coco.images import load_image
from teacher.coco.io import (
    annotation_mask,
    dumps_coco,
    load_coco,
    mask_to_rle,
    mask_to_uncompressed_rle,
    save_coco,
)
from teacher.core.errors import TeacherError
from teacher.core.params import StudentParams, TrainParams
from teacher.inference.job import Job, run_job
from teacher.inference.predict import Filter
from teacher.inference.shards import ordered_records, write_merged
from teacher.inference.student import student_detector
from teacher.student.data import (
    MASK_AT,
    Instances,
    Source,
    StudentDataset,
    collate_student,
    has_masks,
    instance_targets,
    load_teacher_labels,
    model_targets,
    teacher_label_problems,
    teacher_source,
)
from teacher.student.evaluate import evaluate_student
from teacher.student.loss import use_student_loss
from teacher.student.model import (
    StudentOutputs,
    build_student,
    decode,
    load_student,
    predict,
    resolve_name,
)
from teacher.student.onnx import export_onnx, load_any_student
from teacher.student.stage import pool_note
from teacher.student.task import train_student, training_step

TINY = StudentParams(model="tiny-random")
SHORT = TrainParams(epochs=1, batch_size=2, lr=3e-3, warmup_steps=1, patience=0)


def _masks(h=20, w=30):
    m1 = np.zeros((h, w), bool)
    m1[2:8, 3:9] = True
    m2 = np.zeros((h, w), bool)
    m2[10:18, 15:28] = True
    crowd = np.zeros((h, w), bool)
    crowd[0:5, 20:30] = True
    return m1, m2, crowd


def _crowd_anns():
    m1, m2, crowd = _masks()
    return [
        {
            "id": 1,
            "category_id": 1,
            "iscrowd": 1,
            "bbox": [20, 0, 10, 5],
            "area": 50,
            "segmentation": mask_to_uncompressed_rle(crowd),
        },
        {
            "id": 2,
            "category_id": 2,
            "iscrowd": 0,
            "bbox": [3, 2, 6, 6],
            "area": 36,
            "segmentation": mask_to_rle(m1),
        },  # compressed RLE
        {
            "id": 3,
            "category_id": 3,
            "iscrowd": 0,
            "bbox": [15, 10, 13, 8],
            "area": 104,
            "segmentation": mask_to_uncompressed_rle(m2),
        },
    ]


# --- targets -------------------------------------------------------------------------------------


def test_targets_keep_masks_aligned_with_labels_when_a_crowd_region_is_present():
    m1, m2, _ = _masks()
    inst = instance_targets(
        _crowd_anns(), height=20, width=30, label_of={1: 0, 2: 1, 3: 2}, masks=True
    )
    boxes, labels, masks = inst.boxes, inst.labels, inst.masks
    assert inst.has_mask.all() and not inst.ignore.any() and (inst.weight == 1).all()
    assert labels.tolist() == [1, 2]  # the crowd region (category 1) is out, with its mask
    assert boxes.tolist() == [[3, 2, 6, 6], [15, 10, 13, 8]]
    assert np.array_equal(masks[0], m1) and np.array_equal(masks[1], m2)


def test_targets_read_compressed_rle_and_polygons_like_coco():
    ann = {
        "id": 9,
        "category_id": 2,
        "bbox": [3, 2, 6, 6],
        "iscrowd": 0,
        "segmentation": [[3, 2, 9, 2, 9, 8, 3, 8]],
    }
    rle = {**ann, "segmentation": mask_to_rle(annotation_mask(ann, 20, 30))}
    for a in (ann, rle):
        masks = instance_targets([a], height=20, width=30, label_of={2: 0}, masks=True).masks
        assert np.array_equal(masks[0], annotation_mask(ann, 20, 30))


def test_the_rf_detr_processor_helper_fails_on_both_cases_we_handle():
    """Why targets are ours: transformers 5.24's helper (pinned here; if this starts passing,
    upstream fixed it) misaligns masks with a crowd region present and cannot read compressed RLE."""
    from transformers.models.rf_detr.image_processing_rf_detr import (
        prepare_coco_detection_annotation,
    )

    image = torch.zeros(3, 20, 30)
    crowd, polygon = (
        _crowd_anns()[0],
        {**_crowd_anns()[1], "segmentation": [[3, 2, 9, 2, 9, 8, 3, 8]]},
    )
    with pytest.raises(IndexError):  # 2 masks (crowd included) indexed by 1 kept label
        prepare_coco_detection_annotation(
            image, {"image_id": 1, "annotations": [crowd, polygon]}, return_segmentation_masks=True
        )
    with pytest.raises((ValueError, TypeError)):
        prepare_coco_detection_annotation(
            image,
            {"image_id": 1, "annotations": [_crowd_anns()[1]]},
            return_segmentation_masks=True,
        )


def test_model_targets_normalise_boxes_and_resize_masks_to_the_input():
    m1, m2, _ = _masks()
    inst = Instances(
        np.array([[3, 2, 6, 6]], np.float32),
        np.array([1]),
        m1[None],
        np.array([True]),
        np.array([0.7], np.float32),
        np.array([False]),
    )
    t = model_targets(inst, width=30, height=20, resolution=64, image_weight=0.5)
    assert t["weight"].tolist() == pytest.approx([0.7]) and float(t["image_weight"]) == 0.5
    assert t["has_mask"].tolist() == [True] and t["ignore"].tolist() == [False]
    assert t["boxes"][0].tolist() == pytest.approx([6 / 30, 5 / 20, 6 / 30, 6 / 20])
    assert t["class_labels"].tolist() == [1] and t["masks"].shape == (1, 64, 64)
    assert not has_masks({"annotations": [{"bbox": [0, 0, 1, 1], "segmentation": []}]})
    assert has_masks({"annotations": _crowd_anns()})


def test_box_only_instances_in_segmentation_data_get_their_filled_box_for_matching_only():
    ann = {"id": 1, "category_id": 1, "bbox": [2, 3, 4, 5], "iscrowd": 0}
    inst = instance_targets([ann], height=10, width=10, label_of={1: 0}, masks=True)
    assert inst.masks[0].sum() == 20 and inst.masks[0][3:8, 2:6].all()
    assert inst.has_mask.tolist() == [False]  # the loss gives it no mask term


def test_teacher_labels_are_weighted_by_score_and_uncertain_ones_are_ignore_regions():
    anns = [
        {"id": i, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0, "score": s}
        for i, s in enumerate((0.9, 0.25, 0.5))
    ]
    inst = instance_targets(anns, height=10, width=10, label_of={1: 0}, masks=False, min_score=0.3)
    assert inst.weight.tolist() == pytest.approx([0.9, 0.25, 0.5])
    assert inst.ignore.tolist() == [False, True, False]
    flat = instance_targets(
        anns, height=10, width=10, label_of={1: 0}, masks=False, min_score=0.3, score_weight=False
    )
    assert flat.weight.tolist() == [1, 1, 1] and flat.ignore.tolist() == [False, True, False]
    human = instance_targets(anns, height=10, width=10, label_of={1: 0}, masks=False)
    assert human.weight.tolist() == [1, 1, 1] and not human.ignore.any()


# --- the teachers' labels ---------------------------------------------------------------------------


def _teacher_doc():
    return {
        "images": [{"id": 1, "file_name": "a.png", "width": 30, "height": 20}],
        "categories": [{"id": 2, "name": "x"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5], "score": 0.9},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [8, 1, 5, 5], "score": 0.1},
        ],
    }


def test_teacher_labels_below_min_score_are_left_out():
    src = teacher_source(
        _teacher_doc(),
        path=Path("t.json"),
        pool=Path("pool"),
        categories={2: {}},
        min_score=0.3,
        weight=0.5,
    )
    assert [a["id"] for a in src.coco["annotations"]] == [1] and src.weight == 0.5


@pytest.mark.parametrize(
    "edit, said",
    [
        (lambda d: d["annotations"][0].pop("score"), "annotation 1: score None"),
        (
            lambda d: d["annotations"][1].update(category_id=7),
            "annotation 2: category_id 7 is not a category",
        ),
        (lambda d: d["annotations"][0].update(bbox=[1, 2]), "annotation 1: bbox [1, 2]"),
        (lambda d: d["annotations"][0].update(image_id=5), "annotation 1: image_id 5"),
        (
            lambda d: d["annotations"][0].update(bbox=[float("nan"), 5, 10, 10]),
            "annotation 1: bbox [nan, 5, 10, 10]: NaN or Infinity in bbox or polygon",
        ),
        (
            lambda d: d["annotations"][1].update(bbox=[5, 5, float("inf"), 10]),
            "annotation 2: bbox [5, 5, inf, 10]: NaN or Infinity",
        ),
        (
            lambda d: d["annotations"][0].update(bbox=[1e6, 5, 10, 10]),
            "annotation 1: bbox [1000000.0, 5, 10, 10]: bbox or polygon reaches more than 10 "
            "image sizes outside its image",
        ),
        (
            lambda d: d["annotations"][0].update(bbox=[5, -400, 10, 10]),
            "[coordinates_far_outside]",
        ),
        (
            lambda d: d["annotations"][0].update(segmentation=[[1, 1, 9, 1, 9, float("nan")]]),
            "[non_finite_coordinates]",
        ),
    ],
)
def test_bad_teacher_labels_name_the_file_the_record_and_the_fix(edit, said):
    doc = _teacher_doc()
    edit(doc)
    with pytest.raises(TeacherError) as e:
        teacher_source(
            doc,
            path=Path("data/teacher_labels.json"),
            pool=Path("p"),
            categories={2: {}},
            min_score=0.3,
            weight=0.5,
        )
    assert "data/teacher_labels.json" in str(e.value) and said in str(e.value)
    assert "dvc repro label" in str(e.value)


def test_nan_teacher_boxes_on_disk_stop_before_training_with_the_rule(tmp_path):
    """json writes NaN and Infinity and reads them back: the labels file as the student loads
    it (masks left on disk) is refused before instance_targets would fail on the NaN."""
    doc = _teacher_doc()
    doc["annotations"][0]["bbox"] = [float("nan"), 5, 10, 10]
    doc["annotations"][1]["bbox"] = [5, 5, float("inf"), 10]
    doc["annotations"][1]["segmentation"] = mask_to_rle(np.ones((20, 30), bool))
    path = tmp_path / "teacher_labels.json"
    path.write_text(dumps_coco(doc))
    loaded = load_teacher_labels(path)
    assert MASK_AT in loaded["annotations"][1]
    problems = teacher_label_problems(loaded, categories={2: {}})
    assert [p.split(":")[0] for p in problems] == ["annotation 1", "annotation 2"]
    assert all("[non_finite_coordinates]" in p for p in problems)
    assert teacher_label_problems(_teacher_doc(), categories={2: {}}) == []


def test_without_a_pool_the_stage_says_human_labels_alone():
    assert "human labels alone" in pool_note(0, 0, weight=0.5, min_score=0.3, path=Path("t.json"))
    assert "human labels alone" in pool_note(5, 9, weight=0.0, min_score=0.3, path=Path("t.json"))
    assert "9 teacher labels" in pool_note(5, 9, weight=0.5, min_score=0.3, path=Path("t.json"))
    nothing = pool_note(0, 0, weight=0.5, min_score=0.3, path=Path("t.json"), nothing_found=400)
    assert "human labels alone" in nothing and "no detection scoring >= 0.3 on the 400" in nothing


# --- model ----------------------------------------------------------------------------------------


def test_auto_picks_the_smallest_rf_detr_of_the_data_kind():
    assert resolve_name("auto", masks=True) == "Roboflow/rf-detr-seg-nano"
    assert resolve_name("auto", masks=False) == "Roboflow/rf-detr-nano"
    assert resolve_name("some/other", masks=True) == "some/other"


def test_tiny_random_is_the_same_every_time_and_the_class_fits_the_data():
    a, res, name = build_student(TINY, names=["a", "b"], masks=True)
    b, _, _ = build_student(TINY, names=["a", "b"], masks=True)
    assert (
        type(a).__name__ == "RfDetrForInstanceSegmentation" and res == 64 and name == "tiny-random"
    )
    assert all(
        torch.equal(p, q)
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    det, _, _ = build_student(TINY, names=["a", "b"], masks=False)
    assert type(det).__name__ == "RfDetrForObjectDetection" and det.config.num_labels == 2


def test_a_resolution_the_backbone_cannot_cut_is_refused_with_the_fix():
    with pytest.raises(TeacherError, match="not a multiple of 16.*use 48 or 64"):
        build_student(StudentParams(model="tiny-random", resolution=50), names=["a"], masks=False)


def test_an_unreachable_hub_model_says_how_to_supply_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="huggingface-cli download .*tiny-random"):
        build_student(StudentParams(model="auto"), names=["a"], masks=False)


def test_decode_scales_boxes_and_keeps_the_top_scores():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 0], logits[0, 2, 1] = 3.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 1, 1], [0.25, 0.5, 0.5, 1.0], [0.5, 0.25, 0.2, 0.1]]])
    masks = torch.full((1, 3, 4, 4), -1.0)
    masks[0, 1, :, :2] = 1.0
    det = decode([logits, boxes, masks], sizes=[(40, 20)], category_ids=[3, 7], max_detections=2)[0]
    assert det.category_ids.tolist() == [3, 7]
    assert det.boxes[0].tolist() == pytest.approx([0, 0, 20, 20])
    assert (
        det.masks.shape == (2, 20, 40)
        and det.masks[0][:, :19].all()
        and not det.masks[0][:, 21:].any()
    )


# --- training, evaluation, export, labeling -------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny-random student trained one epoch on 4 human + 2 teacher-labeled images."""
    import subprocess

    root = tmp_path_factory.mktemp("student")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)  # dvclive wants a repository
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        cwd=root,
        check=True,
    )
    coco = write_tiny_coco(root / "images", n_images=4)
    pool = write_tiny_coco(root / "pool", n_images=2)
    for a in pool["annotations"]:
        a["score"] = 0.9
    teacher = Source("teacher", pool, root / "pool", 0.5)
    torch.set_num_threads(1)
    metrics = train_student(
        train_coco=coco,
        val_coco=coco,
        image_root=root / "images",
        teacher=teacher,
        masks=True,
        student=TINY,
        train=SHORT,
        augment_policy={
            "policy": "none",
            "hflip": 0.0,
            "scale_min": 1.0,
            "scale_max": 1.0,
            "crop": 0.0,
            "color_jitter": 0.0,
        },
        seed=0,
        out_dir=root / "student",
        checkpoint_dir=root / "ckpt",
        live_dir=root / "live",
        fingerprint="test",
    )
    return root, coco, metrics


def test_training_writes_a_loadable_student_and_logs_the_pool(trained):
    root, coco, metrics = trained
    assert {"val_map", "val_map_50", "val_segm_map", "best_epoch"} <= set(metrics)
    info = json.loads((root / "student/student.json").read_text())
    assert info["masks"] and info["category_ids"] == [1, 5] and info["resolution"] == 64
    summary = json.loads((root / "live/metrics.json").read_text())
    assert summary["teacher_images"] == 2 and summary["human_images"] == 4
    student = load_student(root / "student")
    det = predict(student, [load_image(root / "images/img_0.png")], max_detections=5)[0]
    assert det.boxes.shape == (5, 4) and det.masks.shape == (5, 48, 64)
    assert set(det.category_ids.tolist()) <= {1, 5}


def test_evaluation_reports_student_keys_and_latency(trained):
    root, coco, _ = trained
    m = evaluate_student(
        coco,
        root / "images",
        student_dir=root / "student",
        score_threshold=0.0,
        max_detections=10,
        log=lambda s: None,
    )
    assert {
        "student/box/map",
        "student/segm/map",
        "student/box/map/box",
        "student/ms_per_image",
    } <= set(m)
    assert m["student/ms_per_image"] > 0


def test_onnx_export_runs_in_onnxruntime_with_pytorch_outputs(trained, tmp_path):
    root, coco, _ = trained
    path = export_onnx(root / "student", tmp_path / "export")
    onnx_student = load_any_student(tmp_path / "export")
    torch_student = load_student(root / "student")
    x = torch.randn(3, 3, 64, 64)  # a batch size other than the exported one
    with torch.no_grad():
        want = torch_student.forward(x)
    got = onnx_student.forward(x)
    assert path.name == "student.onnx" and len(got) == 3
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_predict_student_labels_a_folder_with_pytorch_and_onnx_alike(trained, tmp_path):
    root, coco, _ = trained
    folder = tmp_path / "pool"
    folder.mkdir()
    for name in ("img_0.png", "img_1.png"):
        (folder / name).write_bytes((root / "images" / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    assert (
        teacher_main(["export", "--student", str(root / "student"), "--out", str(tmp_path / "x")])
        == 0
    )
    docs = []
    for student in (root / "student", tmp_path / "x"):
        out = tmp_path / f"{student.name}.json"
        assert (
            teacher_main(
                [
                    "predict",
                    str(folder),
                    "--student",
                    str(student),
                    "--out",
                    str(out),
                    "--score-threshold",
                    "0",
                    "--max-detections",
                    "5",
                    "--params",
                    str(tmp_path / "absent.yaml"),
                ]
            )
            == 0
        )
        docs.append(load_coco(out))
    torch_doc, onnx_doc = docs
    assert [i["file_name"] for i in torch_doc["images"]] == ["img_0.png", "img_1.png"]
    assert [u["file"].endswith("broken.jpg") for u in torch_doc["info"]["unreadable"]] == [True]
    assert len(torch_doc["annotations"]) == 10 and "segmentation" in torch_doc["annotations"][0]
    for a, b in zip(torch_doc["annotations"], onnx_doc["annotations"], strict=True):
        assert a["category_id"] == b["category_id"] and a["bbox"] == pytest.approx(
            b["bbox"], abs=0.05
        )


def test_predict_student_from_a_wrong_folder_says_what_to_pass(tmp_path, capsys):
    assert (
        teacher_main(
            [
                "predict",
                str(tmp_path),
                "--student",
                str(tmp_path / "nope"),
                "--out",
                str(tmp_path / "o.json"),
            ]
        )
        == 1
    )
    assert "models/student" in capsys.readouterr().err


def test_the_pytorch_student_labels_like_the_library(trained, tmp_path):
    root, _, _ = trained
    done = run_job(
        Job(
            folder=root / "images",
            shard_dir=tmp_path / "shards",
            loader=partial(
                student_detector,
                path=root / "student",
                keep=Filter(score_threshold=0.0, nms_iou=1.0, max_detections=3),
            ),
            settings={},
            progress=False,
        )
    )
    assert done is not None
    counts = write_merged(
        tmp_path / "o.json",
        lambda: ordered_records(done.shards, done.images),
        categories=[{"id": c, "name": n} for c, n in done.categories],
        info={},
    )
    doc = load_coco(tmp_path / "o.json")
    assert counts["images"] == len(doc["images"]) == 4
    assert counts["annotations"] == len(doc["annotations"]) == 12


def test_student_outputs_module_returns_masks_only_when_segmenting():
    det, _, _ = build_student(TINY, names=["a"], masks=False)
    with torch.no_grad():
        assert len(StudentOutputs(det).eval()(torch.zeros(1, 3, 64, 64))) == 2


def test_the_train_student_stage_without_teacher_labels_says_run_label(tmp_path, capsys):
    from stages.train_student import main

    coco = write_tiny_coco(tmp_path / "images", n_images=1)
    for name in ("train", "val"):
        save_coco(coco, tmp_path / f"{name}.json")
    (tmp_path / "inspect.json").write_text("{}")
    (tmp_path / "params.yaml").write_text("student:\n  model: tiny-random\n")
    code = main(
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--inspect",
            str(tmp_path / "inspect.json"),
            "--train",
            str(tmp_path / "train.json"),
            "--val",
            str(tmp_path / "val.json"),
            "--images",
            str(tmp_path / "images"),
            "--pool",
            str(tmp_path / "pool"),
            "--teacher-labels",
            str(tmp_path / "absent.json"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 1
    assert "absent.json: not found" in capsys.readouterr().err


def test_a_batch_without_any_instance_trains_a_segmenting_student(tmp_path):
    """Pool images the teachers found nothing on: transformers' mask loss returns empty tensors
    there (an empty total loss); ours gives zeros on the graph and the loss stays a scalar."""
    model, _, _ = build_student(TINY, names=["box", "round thing"], masks=True)
    use_student_loss(model, masks=True)
    coco = write_tiny_coco(tmp_path / "images", n_images=2)
    empty = {**coco, "annotations": []}
    items = StudentDataset(
        [Source("teacher", empty, tmp_path / "images", 0.5)],
        label_of={1: 0, 5: 1},
        masks=True,
        seed=0,
    )
    batch = collate_student([items[0], items[1]], resolution=64)
    terms = training_step(model, batch, terms=("loss_ce", "loss_mask_ce", "loss_mask_dice"))
    assert all(v.shape == () and torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()


@pytest.mark.slow
def test_two_processes_train_the_student_without_hanging(tmp_path):
    """gloo, 2 processes, batch 1 each: one process may see a teacher image while the other sees a
    human one and one pool image has no instance; the loss has no collective inside
    (teacher.student.loss normalises by this process's boxes), so the step does not hang."""
    import subprocess

    from teacher.train.distributed import launch

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        cwd=tmp_path,
        check=True,
    )
    coco = write_tiny_coco(tmp_path / "images", n_images=4)
    pool = write_tiny_coco(tmp_path / "pool", n_images=2)
    pool["annotations"] = [dict(a, score=0.9) for a in pool["annotations"][:1]]
    metrics = launch(
        train_student,
        processes=2,
        kwargs=dict(
            train_coco=coco,
            val_coco=coco,
            image_root=tmp_path / "images",
            teacher=Source("teacher", pool, tmp_path / "pool", 0.5),
            masks=True,
            student=TINY,
            train=TrainParams(epochs=1, batch_size=1, lr=1e-3, warmup_steps=0, processes=2),
            augment_policy={
                "policy": "none",
                "hflip": 0.0,
                "scale_min": 1.0,
                "scale_max": 1.0,
                "crop": 0.0,
                "color_jitter": 0.0,
            },
            seed=0,
            out_dir=tmp_path / "out",
            checkpoint_dir=tmp_path / "ckpt",
            live_dir=tmp_path / "live",
            fingerprint="mp",
        ),
    )
    assert metrics["steps"] == 3 and (tmp_path / "out/model.safetensors").is_file()

"""The evaluate stage: metrics, PR curves and gallery from tiny-random teachers; SKIPPED handling;
through `dvc repro` (after the real train stages) its outputs are DVC metrics and plots."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import STAT_KEYS, set_params
from fake_adapters import (
    TINY_DINO,
    TINY_SAM,
    write_dino_adapter,
    write_sam_adapter,
    write_skipped,
    write_tiny_coco,
)

from stages.evaluate import main as evaluate_main
from teacher.evaluation.report import gains

TINY_PARAMS = {
    "dino.model": "tiny-random",
    "dino.shortest_edge": TINY_DINO.shortest_edge,
    "dino.longest_edge": TINY_DINO.longest_edge,
    "sam.model": TINY_SAM.model,
    "evaluate.score_threshold": 0.0,
    "evaluate.gallery_images": 2,
    # every key the stage declares must exist in params.yaml for DVC
    "dino.revision": "main",
    "dino.box_threshold": 0.25,
    "sam.multimask": True,
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Tiny data and both adapters, written once for the module."""
    root = tmp_path_factory.mktemp("eval")
    gt = write_tiny_coco(root / "images", n_images=3)
    (root / "test.json").write_text(json.dumps(gt))
    write_dino_adapter(root / "models" / "dino", gt["categories"])
    write_sam_adapter(root / "models" / "sam")
    write_sam_adapter(root / "models" / "sam2", model="tiny-random-sam2")
    return root


def _run(root: Path, tmp_path: Path, *, dino: Path, sam: Path, **extra) -> tuple[int, dict, Path]:
    params = tmp_path / "params.yaml"
    params.write_text("")
    set_params(tmp_path, {**TINY_PARAMS, **extra})
    out = tmp_path / "metrics" / "evaluate"
    rc = evaluate_main(
        [
            "--test",
            str(root / "test.json"),
            "--images",
            str(root / "images"),
            "--dino",
            str(dino),
            "--sam",
            str(sam),
            "--out",
            str(out),
            "--params",
            str(params),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text()) if rc == 0 else {}
    return rc, metrics, out


def test_stage_writes_every_metric_family_and_plots(adapters, tmp_path):
    rc, m, out = _run(
        adapters, tmp_path, dino=adapters / "models/dino", sam=adapters / "models/sam"
    )
    assert rc == 0
    for family in ("box", "segm", "base/box", "base/segm"):
        assert all(f"{family}/{k}" in m for k in STAT_KEYS), family
        assert {f"{family}/map/box", f"{family}/map/round thing"} <= set(m)
    for prefix in ("", "base/"):
        assert {
            f"{prefix}mask/miou",
            f"{prefix}mask/miou/box",
            f"{prefix}mask/miou/round thing",
            f"{prefix}mask/miou_point",
        } <= set(m)
    assert 0.0 <= m["mask/miou"] <= 1.0 and all(isinstance(v, float) for v in m.values())
    assert 0.0 <= m["mask/miou_point"] <= 1.0  # a click, not a box: another number, its own gain
    assert m["gain/mask/miou_point"] == pytest.approx(
        m["mask/miou_point"] - m["base/mask/miou_point"]
    )
    # the perturbed adapters change SAM's masks, so a gain is measured and is the difference
    assert m["gain/mask/miou"] == pytest.approx(m["mask/miou"] - m["base/mask/miou"])
    assert m["gain/mask/miou"] != 0.0
    assert "gain/box/map_large" not in m  # -1 (no large objects) is not a number to subtract
    curves = sorted(p.name for p in (out / "plots" / "pr").iterdir())
    assert curves == ["box.csv", "round_thing.csv"]
    lines = (out / "plots/pr/box.csv").read_text().splitlines()
    assert lines[0] == "recall,precision" and len(lines) == 102
    gallery = sorted(p.name for p in (out / "plots" / "gallery").iterdir())
    assert gallery == ["1_img_0.png", "2_img_1.png"]


def test_skipped_sam_gives_no_mask_metrics_and_says_why(adapters, tmp_path, capsys):
    skipped = write_skipped(tmp_path / "sam_skipped", "no masks in the training data")
    rc, m, out = _run(
        adapters, tmp_path, dino=adapters / "models/dino", sam=skipped, **{"evaluate.base": False}
    )
    assert rc == 0
    assert "box/map" in m and not any(k.startswith(("mask/", "segm/", "base/", "gain/")) for k in m)
    assert "no masks in the training data" in capsys.readouterr().out
    assert len(list((out / "plots" / "gallery").iterdir())) == 2


def test_skipped_dino_gives_no_box_metrics(adapters, tmp_path, capsys):
    skipped = write_skipped(tmp_path / "dino_skipped", "no boxes")
    rc, m, out = _run(
        adapters, tmp_path, dino=skipped, sam=adapters / "models/sam", **{"evaluate.base": False}
    )
    assert rc == 0 and set(m) == {
        "mask/miou",
        "mask/miou_point",  # one click per object, beside the true boxes
        "mask/miou/box",
        "mask/miou/round thing",
        *(f"scale/{s}/mask/miou" for s in ("0", "0.5", "1")),  # SAM's adapter scaled alone
    }
    assert "no dino metrics" in capsys.readouterr().out
    assert list((out / "plots" / "pr").iterdir()) == []


def test_gains_skip_unmeasured_values():
    assert gains({"a": 0.5, "b": -1.0, "c": 0.2}, {"a": 0.25, "b": 0.1}) == {"gain/a": 0.25}


def test_missing_adapter_is_a_clear_error(adapters, tmp_path, capsys):
    rc, _, _ = _run(adapters, tmp_path, dino=tmp_path / "nowhere", sam=adapters / "models/sam")
    assert rc == 1
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err


def test_box_only_objects_are_ignore_regions_in_mask_ap():
    """Half of a class has no mask: a perfect model scores 1.0 (deleting them gave ~0.6)."""
    from teacher.coco.io import mask_to_rle
    from teacher.coco.metrics import coco_eval, segm_ground_truth

    h, w = 60, 80
    images, anns, results = [], [], []
    for i in range(4):
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
        for j, (x, y) in enumerate(((5, 5), (40, 25))):
            yy, xx = np.mgrid[:h, :w]
            disc = (yy - (y + 10)) ** 2 + (xx - (x + 10)) ** 2 <= 100  # in its 20 x 20 box
            ann = {
                "id": 10 * i + j + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [x, y, 20, 20],
                "area": float(disc.sum()),
                "segmentation": mask_to_rle(disc) if j == 0 else [],
            }  # second object: box only
            anns.append(ann)
            results.append(
                {
                    "image_id": i + 1,
                    "category_id": 1,
                    "score": 0.5 + 0.1 * i + 0.05 * j,
                    "segmentation": mask_to_rle(disc),
                }
            )  # the true shape of each object
    gt = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "disc"}]}
    fair = coco_eval(segm_ground_truth(gt), results, iou_type="segm")
    assert fair["map"] == pytest.approx(1.0) and fair["mar_100"] == pytest.approx(1.0)
    deleted = coco_eval(
        {**gt, "annotations": [a for a in anns if a["segmentation"]]}, results, iou_type="segm"
    )
    assert deleted["map"] < 0.9  # what deleting the box-only objects did
    assert gt["annotations"][1]["segmentation"] == []  # the input is not modified


@pytest.mark.parametrize("sam_model", ["tiny-random", "tiny-random-sam2"])
def test_one_sam_encoder_pass_per_image_and_model(adapters, sam_model):
    """Grounded-SAM and the true-box mIoU share one embedding per image (3 images, 2 passes),
    SAM and SAM 2 alike."""
    from teacher.evaluation.report import load_teachers, run_variant
    from teacher.inference.predict import Filter

    gt = json.loads((adapters / "test.json").read_text())
    sam_dir = adapters / "models" / ("sam" if sam_model == "tiny-random" else "sam2")
    calls = []
    for scale in (1.0, None):  # adapted, base
        teachers = load_teachers(
            gt,
            dino_dir=adapters / "models/dino",
            sam_dir=sam_dir,
            dino_params=TINY_DINO,
            sam_params=dataclasses.replace(TINY_SAM, model=sam_model),
            adapter_scale=scale,
        )
        encoder = getattr(teachers.sam, "image_encoder", None) or teachers.sam.vision_encoder
        encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        out = run_variant(
            gt,
            adapters / "images",
            teachers,
            keep=Filter(score_threshold=0.0),
            text_threshold=0.0,
            multimask=False,
            batch_size=2,
            gallery_ids=[1],
        )
        assert out.metrics["segm/map"] >= 0 and out.metrics["mask/miou"] >= 0
    assert calls == [1] * 6

"""`teacher export`: merged full models predict what the adapters predict, without peft."""

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from fake_adapters import (
    TINY_DINO,
    TINY_SAM,
    write_dino_adapter,
    write_sam_adapter,
    write_skipped,
    write_tiny_coco,
)

from teacher.cli import main as teacher_main
from teacher.coco.images import load_image
from teacher.core.errors import TeacherError
from teacher.core.params import SamParams
from teacher.dino.detect import detect
from teacher.dino.labels import load_labels
from teacher.dino.model import load_dino
from teacher.inference.export import export_all
from teacher.sam.build import load_base_sam, load_sam
from teacher.sam.predictor import segment
from teacher.train.lora import load_adapter

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    gt = write_tiny_coco(root / "images", n_images=2)
    write_dino_adapter(root / "models" / "dino", gt["categories"])
    write_sam_adapter(root / "models" / "sam")
    written = export_all(root / "models", root / "out", dino=TINY_DINO, sam=TINY_SAM)
    images = [load_image(root / "images" / im["file_name"]) for im in gt["images"]]
    return root, written, images, gt


def _detect(bundle, images, label_map):
    return detect(
        bundle, images, label_map, box_threshold=0.0, text_threshold=0.0, max_detections=50
    )


def test_merged_dino_predicts_as_the_adapter(exported):
    root, written, images, _ = exported
    labels = load_labels(root / "models" / "dino" / "labels.json")
    assert load_labels(written["dino"] / "labels.json") == labels
    adapted = _detect(load_dino(TINY_DINO, adapter_dir=root / "models" / "dino"), images, labels)
    merged = _detect(
        load_dino(dataclasses.replace(TINY_DINO, model=str(written["dino"]))), images, labels
    )
    base = _detect(load_dino(TINY_DINO), images, labels)
    for a, m, b in zip(adapted, merged, base, strict=True):
        np.testing.assert_allclose(m.scores, a.scores, atol=1e-4)
        np.testing.assert_allclose(m.boxes, a.boxes, atol=1e-2)
        assert (m.category_ids == a.category_ids).all()
        assert np.abs(b.scores - a.scores).max() > 1e-3  # the adapter does change outputs


def test_merged_sam_predicts_as_the_adapter(exported):
    root, written, images, gt = exported
    unmerged = load_adapter(load_base_sam("tiny-random"), root / "models" / "sam").eval()
    merged = load_sam(SamParams(model=str(written["sam"])))
    boxes = np.array([a["bbox"] for a in gt["annotations"] if a["image_id"] == 1], float)
    m_u, s_u = segment(unmerged, images[0], boxes)
    m_m, s_m = segment(merged, images[0], boxes)
    m_b, s_b = segment(load_base_sam("tiny-random"), images[0], boxes)
    np.testing.assert_allclose(s_m, s_u, atol=1e-4)
    assert (m_m == m_u).mean() > 0.999
    assert np.abs(s_b - s_u).max() > 1e-4  # the adapter does change outputs


def test_exported_models_load_and_predict_without_peft(exported):
    root, written, _, _ = exported
    script = textwrap.dedent(f"""
        import sys
        sys.modules["peft"] = None  # any import of peft now fails
        import numpy as np
        from teacher.dino.detect import detect
        from teacher.dino.model import load_dino
        from teacher.coco.images import load_image
        from teacher.dino.labels import load_labels
        from teacher.core.params import DinoParams, SamParams
        from teacher.sam.build import load_sam
        from teacher.sam.predictor import segment
        image = load_image({str(root / "images" / "img_0.png")!r})
        bundle = load_dino(DinoParams(model={str(written["dino"])!r}, shortest_edge=64, longest_edge=96))
        det = detect(bundle, [image], load_labels({str(written["dino"] / "labels.json")!r}),
                     box_threshold=0.0, text_threshold=0.0, max_detections=3)[0]
        masks, _ = segment(load_sam(SamParams(model={str(written["sam"])!r})), image, det.boxes)
        assert "peft" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
        print("ok", masks.shape)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok (3, 48, 64)" in proc.stdout


def test_cli_export_leaves_out_a_skipped_teacher(tmp_path, capsys):
    gt = write_tiny_coco(tmp_path / "images", n_images=1)
    write_dino_adapter(tmp_path / "models" / "dino", gt["categories"])
    write_skipped(tmp_path / "models" / "sam", "no masks in the data: SAM cannot be trained")
    params = tmp_path / "params.yaml"
    params.write_text("dino:\n  model: tiny-random\nsam:\n  model: tiny-random\n")
    rc = teacher_main(
        [
            "export",
            "--adapters",
            str(tmp_path / "models"),
            "--out",
            str(tmp_path / "out"),
            "--params",
            str(params),
        ]
    )
    assert rc == 0
    assert (tmp_path / "out" / "dino" / "config.json").exists()
    assert not (tmp_path / "out" / "sam.pth").exists()
    assert "no masks in the data" in capsys.readouterr().out


def test_export_without_adapters_is_an_error(tmp_path):
    with pytest.raises(TeacherError, match="no dino/ or sam/ adapter"):
        export_all(tmp_path, tmp_path / "out", dino=TINY_DINO, sam=TINY_SAM)


# --- the --out folder -------------------------------------------------------------------------


def _old_export(out: Path) -> dict[Path, bytes]:
    """A folder as an earlier export left it; returns its files' bytes."""
    (out / "dino").mkdir(parents=True)
    (out / "dino" / "old_only.json").write_text("{}")
    (out / "sam.pth").write_bytes(b"the old sam")
    return {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_refuses_a_non_empty_out_and_writes_nothing(exported, tmp_path):
    root = exported[0]
    before = _old_export(tmp_path / "out")
    with pytest.raises(TeacherError, match=r"out is not empty \(dino, sam.pth\).*--force"):
        export_all(root / "models", tmp_path / "out", dino=TINY_DINO, sam=TINY_SAM)
    assert _files(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_force_replaces_the_old_export_whole(exported, tmp_path):
    root, written, _, _ = exported
    _old_export(tmp_path / "out")
    got = export_all(root / "models", tmp_path / "out", dino=TINY_DINO, sam=TINY_SAM, force=True)
    assert got == {"dino": tmp_path / "out" / "dino", "sam": tmp_path / "out" / "sam.pth"}
    assert not (tmp_path / "out" / "dino" / "old_only.json").exists()  # no old file mixed in
    assert sorted(p.name for p in (tmp_path / "out" / "dino").iterdir()) == sorted(
        p.name for p in written["dino"].iterdir()
    )
    assert (tmp_path / "out" / "sam.pth").read_bytes() != b"the old sam"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old copy and staging gone


def test_a_failed_forced_export_leaves_the_old_folder_as_it_was(exported, tmp_path):
    root = exported[0]
    adapters = tmp_path / "models"
    shutil.copytree(root / "models", adapters)
    (adapters / "sam" / "adapter_model.safetensors").write_bytes(
        b"truncated"
    )  # dino exports, sam fails
    before = _old_export(tmp_path / "out")
    with pytest.raises(Exception):  # noqa: B017 - whatever the damaged file raises
        export_all(adapters, tmp_path / "out", dino=TINY_DINO, sam=TINY_SAM, force=True)
    assert _files(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"]


def test_cli_export_out_needs_force_and_never_the_adapters_folder(exported, tmp_path, capsys):
    root = exported[0]
    _old_export(tmp_path / "out")
    params = tmp_path / "params.yaml"
    params.write_text("dino:\n  model: tiny-random\nsam:\n  model: tiny-random\n")
    args = ["export", "--adapters", str(root / "models"), "--params", str(params), "--out"]
    assert teacher_main([*args, str(tmp_path / "out")]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert teacher_main([*args, str(root / "models"), "--force"]) == 1
    assert "which replacing it would delete" in capsys.readouterr().err
    assert (root / "models" / "dino" / "adapter_config.json").exists()
    student = ["export", "--student", str(tmp_path / "no-student"), "--out", str(tmp_path / "out")]
    assert teacher_main(student) == 1  # refused before the student is looked for
    assert "is not empty" in capsys.readouterr().err
    assert teacher_main([*args, str(tmp_path / "out"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dino", "sam.pth"]


def test_sam2_exports_as_a_transformers_folder_that_predicts_as_the_adapter(tmp_path):
    """sam.model: tiny-random-sam2: the merged model is written with save_pretrained (``sam/``),
    loads with plain Sam2Model / Sam2Processor and as sam.model, and predicts as the adapter."""
    import torch
    from transformers import Sam2Model, Sam2Processor

    gt = write_tiny_coco(tmp_path / "images", n_images=1)
    write_sam_adapter(tmp_path / "models" / "sam", model="tiny-random-sam2", decoder=True)
    params = SamParams(model="tiny-random-sam2")
    written = export_all(tmp_path / "models", tmp_path / "out", dino=TINY_DINO, sam=params)
    assert written == {"sam": tmp_path / "out" / "sam"}
    assert json.loads((written["sam"] / "config.json").read_text())["architectures"] == [
        "Sam2Model"
    ]
    image = load_image(tmp_path / "images" / gt["images"][0]["file_name"])
    boxes = np.array([a["bbox"] for a in gt["annotations"]], float)
    unmerged = load_adapter(load_base_sam("tiny-random-sam2"), tmp_path / "models" / "sam").eval()
    m_u, s_u = segment(unmerged, image, boxes)
    m_m, s_m = segment(load_sam(SamParams(model=str(written["sam"]))), image, boxes)
    m_b, s_b = segment(load_base_sam("tiny-random-sam2"), image, boxes)
    np.testing.assert_allclose(s_m, s_u, atol=1e-4)
    assert (m_m == m_u).mean() > 0.999
    assert np.abs(s_b - s_u).max() > 1e-4  # the adapter does change outputs
    plain = Sam2Model.from_pretrained(written["sam"]).eval()  # transformers alone
    processor = Sam2Processor.from_pretrained(written["sam"])
    xyxy = boxes[:1].copy()
    xyxy[:, 2:] += xyxy[:, :2]
    inputs = processor(images=image, input_boxes=[xyxy.tolist()], return_tensors="pt")
    with torch.no_grad():
        out = plain(
            pixel_values=inputs["pixel_values"],
            input_boxes=inputs["input_boxes"],
            multimask_output=False,
        )
    assert float(out.iou_scores[0, 0, 0]) == pytest.approx(float(s_u[0]), abs=1e-4)

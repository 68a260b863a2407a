"""The forgetting guard (issue 13): the adapter scale, and retention of the open vocabulary.

- The adapter scale on the real teachers (tiny-random, adapters whose LoRA weights and fully
  trained heads / decoder moved): scale 0 gives the base model's outputs bitwise, 1 the
  adapter's, 0.5 lies strictly between for some output.
- Retention as pure functions on hand-made detections.
- The evaluate stage writes ``retention/...``, ``scale/<s>/...`` and ``plots/tradeoff.json``, and
  the passes it reuses for scales 0 and 1 are the base and adapted ones (equal, tested).
- ``teacher predict``, ``teacher export`` and ``teacher serve`` take ``--adapter-scale``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import set_params
from fake_adapters import (
    TINY_DINO,
    TINY_SAM,
    write_dino_adapter,
    write_sam_adapter,
    write_tiny_coco,
)

from stages.evaluate import main as evaluate_main
from teacher.cli import main as teacher_main
from teacher.coco.detections import Detections
from teacher.coco.images import load_image
from teacher.core.errors import TeacherError
from teacher.core.params import EvaluateParams
from teacher.dino.model import load_dino
from teacher.evaluation.report import load_teachers, retention_label_map, run_variant
from teacher.evaluation.retention import (
    COCO_CLASSES,
    reference_ground_truth,
    retention_classes,
    retention_scores,
    tradeoff_rows,
)
from teacher.inference.predict import Filter, merged
from teacher.sam.build import load_base_sam, load_sam
from teacher.sam.predictor import segment

RETENTION = ["ring", "cross", "box"]  # "box" is a class of the tiny data: left out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny data; adapters whose LoRA weights, DINO box heads and SAM decoder all moved."""
    root = tmp_path_factory.mktemp("forgetting")
    gt = write_tiny_coco(root / "images", n_images=3)
    (root / "test.json").write_text(json.dumps(gt))
    write_dino_adapter(root / "models" / "dino", gt["categories"], heads=True)
    write_sam_adapter(root / "models" / "sam", decoder=True)
    images = [load_image(root / "images" / im["file_name"]) for im in gt["images"]]
    return root, gt, images


# --- the scale on the real teachers ------------------------------------------------------------


@torch.no_grad()
def dino_outputs(bundle, images) -> torch.Tensor:
    """Logits and boxes of one prompt over ``images``, concatenated: (B, Q, 256 + 4)."""
    pixels = bundle.processor.image_processor(
        images=images, return_tensors="pt", input_data_format="channels_last"
    )
    text = bundle.processor.tokenizer(["box . round thing ."] * len(images), return_tensors="pt")
    out = bundle.model.eval()(
        pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"], **text
    )
    return torch.cat([out.logits, out.pred_boxes], -1)


def strictly_between(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((x > torch.minimum(a, b)) & (x < torch.maximum(a, b))).any())


def test_dino_scale_0_is_the_base_model_and_1_the_adapter_bitwise(world):
    root, _, images = world
    adapter = root / "models" / "dino"
    at = {
        s: dino_outputs(merged(load_dino(TINY_DINO, adapter_dir=adapter, adapter_scale=s)), images)
        for s in (0.0, 0.5, 1.0)
    }
    base = dino_outputs(load_dino(TINY_DINO), images)
    tuned = dino_outputs(merged(load_dino(TINY_DINO, adapter_dir=adapter)), images)
    assert torch.equal(at[0.0], base)
    assert torch.equal(at[1.0], tuned)
    assert not torch.equal(base, tuned)
    assert strictly_between(at[0.5], base, tuned)


def test_dino_scale_blends_the_heads_and_keeps_them_tied(world):
    root = world[0]
    base = load_dino(TINY_DINO).model
    half = merged(load_dino(TINY_DINO, adapter_dir=root / "models/dino", adapter_scale=0.5)).model
    tuned = merged(load_dino(TINY_DINO, adapter_dir=root / "models/dino")).model
    name = "model.enc_output.weight"  # a fully trained head (no LoRA inside)
    expected = 0.5 * base.get_parameter(name) + 0.5 * tuned.get_parameter(name)
    torch.testing.assert_close(half.get_parameter(name), expected, rtol=0, atol=1e-7)
    assert not torch.equal(base.get_parameter(name), tuned.get_parameter(name))
    tied = ("bbox_embed.0.layers.0.weight", "model.decoder.bbox_embed.1.layers.0.weight")
    assert half.get_parameter(tied[0]) is half.get_parameter(tied[1])  # ties survive
    expected = 0.5 * base.get_parameter(tied[0]) + 0.5 * tuned.get_parameter(tied[0])
    torch.testing.assert_close(half.get_parameter(tied[0]), expected, rtol=0, atol=1e-7)


def test_sam_scale_0_is_the_base_model_and_1_the_adapter_bitwise(world):
    root, gt, images = world
    adapter = root / "models" / "sam"
    base = load_base_sam("tiny-random")
    at_0 = load_sam(TINY_SAM, adapter_dir=adapter, adapter_scale=0.0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(at_0.state_dict().values(), base.state_dict().values(), strict=True)
    )
    boxes = np.array([a["bbox"] for a in gt["annotations"] if a["image_id"] == 1], float)
    scores = {
        s: torch.as_tensor(
            segment(load_sam(TINY_SAM, adapter_dir=adapter, adapter_scale=s), images[0], boxes)[1]
        )
        for s in (0.0, 0.5, 1.0)
    }
    reference = torch.as_tensor(segment(base, images[0], boxes)[1])
    tuned = torch.as_tensor(segment(load_sam(TINY_SAM, adapter_dir=adapter), images[0], boxes)[1])
    assert torch.equal(scores[0.0], reference) and torch.equal(scores[1.0], tuned)
    assert strictly_between(scores[0.5], reference, tuned)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_bad_scales_are_a_clear_error_before_loading(world, scale):
    with pytest.raises(TeacherError, match="finite number >= 0"):
        load_dino(TINY_DINO, adapter_dir=world[0] / "models/dino", adapter_scale=scale)
    with pytest.raises(Exception, match="adapter_scales"):
        EvaluateParams(adapter_scales=(0.5, scale))


# --- retention, pure ---------------------------------------------------------------------------


def _det(boxes, scores, cats) -> Detections:
    return Detections(
        boxes=np.asarray(boxes, float).reshape(-1, 4),
        scores=np.asarray(scores, np.float32),
        category_ids=np.asarray(cats, np.int64),
    )


IMAGES = [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}, {"id": 2, "file_name": "b.png", "width": 100, "height": 80}]  # fmt: skip


def test_default_retention_classes_are_coco_minus_the_dataset():
    names, dropped = retention_classes(None, ["Dog", "widget", "traffic  light"])
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert "dog" not in names and "traffic light" not in names and "cat" in names
    assert len(names) == 78 and dropped == []
    names, dropped = retention_classes(["Ring", "ring", "widget"], ["WIDGET"])
    assert (names, dropped) == (["Ring"], ["widget"])


def test_retention_is_1_against_itself_and_falls_when_boxes_go():
    base = {
        1: _det([[10, 10, 20, 20], [50, 40, 30, 20], [0, 0, 5, 5]], [0.9, 0.6, 0.1], [1, 2, 1]),
        2: _det([[5, 5, 40, 40]], [0.7], [2]),
    }
    ref = reference_ground_truth(
        IMAGES, base, threshold=0.5, category_ids=[1, 2], names=["ring", "cross"]
    )
    assert len(ref["annotations"]) == 3  # the 0.1 detection is not confident
    assert retention_scores(ref, base, max_detections=100)["map"] == pytest.approx(1.0)
    forgot = {1: base[1].take(np.array([0])), 2: base[2]}  # the cross of image 1 is gone
    lower = retention_scores(ref, forgot, max_detections=100)["map"]
    assert 0.0 < lower < 1.0
    moved = {k: Detections(d.boxes + 15, d.scores, d.category_ids) for k, d in base.items()}
    assert retention_scores(ref, moved, max_detections=100)["map"] < lower
    empty = reference_ground_truth(
        IMAGES, base, threshold=0.95, category_ids=[1, 2], names=["ring", "cross"]
    )
    assert retention_scores(empty, base, max_detections=100) == {"map": -1.0, "map_50": -1.0}


def test_tradeoff_rows_need_a_base_and_keep_unmeasured_retention_as_minus_1():
    m = {
        "base/box/map": 0.2,
        "scale/0/box/map": 0.2,
        "scale/0/retention/box/map": 1.0,
        "scale/0.5/box/map": 0.3,
        "scale/1/box/map": 0.35,
    }
    rows = tradeoff_rows(m, [0.0, 0.5, 1.0])
    assert [r["scale"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0] == {"scale": 0.0, "retention": 1.0, "gain": 0.0}
    assert rows[1]["retention"] == -1.0 and rows[2]["gain"] == pytest.approx(0.15)
    assert tradeoff_rows({k: v for k, v in m.items() if k != "base/box/map"}, [0.5]) == []


# --- the evaluate stage ------------------------------------------------------------------------

PARAMS = {
    "dino.model": "tiny-random",
    "dino.shortest_edge": TINY_DINO.shortest_edge,
    "dino.longest_edge": TINY_DINO.longest_edge,
    "sam.model": TINY_SAM.model,
    "evaluate.score_threshold": 0.0,
    "evaluate.gallery_images": 0,
    "evaluate.retention_classes": RETENTION,
    "evaluate.retention_threshold": 0.3,
}


def run_evaluate(root: Path, tmp_path: Path, **extra) -> tuple[int, dict, Path]:
    (tmp_path / "params.yaml").write_text("")
    set_params(tmp_path, {**PARAMS, **extra})
    out = tmp_path / "metrics" / "evaluate"
    args = ["--test", str(root / "test.json"), "--images", str(root / "images")]
    args += ["--dino", str(root / "models/dino"), "--sam", str(root / "models/sam")]
    rc = evaluate_main([*args, "--out", str(out), "--params", str(tmp_path / "params.yaml")])
    metrics = json.loads((out / "metrics.json").read_text()) if rc == 0 else {}
    return rc, metrics, out


def test_evaluate_writes_retention_scale_keys_and_the_tradeoff_plot(world, tmp_path, capsys):
    root = world[0]
    rc, m, out = run_evaluate(root, tmp_path)
    assert rc == 0
    log = capsys.readouterr().out
    assert "['box'] are dataset classes: left out" in log
    assert m["retention/reference_boxes"] > 0, log
    for s in ("0", "0.5", "1"):
        for key in ("box/map", "segm/map", "mask/miou", "retention/box/map"):
            assert f"scale/{s}/{key}" in m, (s, key)
        assert f"evaluate: adapter scale {s}: box/map" in log
    for key in ("box/map", "segm/map", "mask/miou", "retention/box/map"):
        assert m[f"scale/1/{key}"] == m[key]
    for key in ("box/map", "segm/map", "mask/miou"):
        assert m[f"scale/0/{key}"] == m[f"base/{key}"]
    assert m["scale/0/retention/box/map"] == pytest.approx(1.0)  # the base against itself
    assert 0.0 <= m["retention/box/map"] < 1.0  # the perturbed adapter forgets
    assert "base/retention/box/map" not in m and "gain/retention/box/map" not in m
    rows = json.loads((out / "plots" / "tradeoff.json").read_text())
    assert [r["scale"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["gain"] == 0.0 and rows[0]["retention"] == pytest.approx(1.0)
    assert rows[2]["gain"] == pytest.approx(m["gain/box/map"])
    assert rows[2]["retention"] == m["retention/box/map"]


def test_nothing_to_measure_is_minus_1_and_said():
    """No confident base detection of any retention class: -1 (the project's rule), logged."""
    from teacher.dino.labels import LabelMap
    from teacher.evaluation.report import ADAPTED, BASE, Pass, VariantOutput, forgetting_metrics

    faint = {1: _det([[10, 10, 20, 20]], [0.2], [1]), 2: Detections.empty()}
    runs = {
        ADAPTED: VariantOutput(metrics={"box/map": 0.3}, retention=faint),
        BASE: VariantOutput(metrics={"box/map": 0.2}, retention=faint),
        Pass("scaled", 0.5): VariantOutput(metrics={"box/map": 0.25}, retention=faint),
    }
    lines: list[str] = []
    m = forgetting_metrics(
        {"images": IMAGES},
        runs,
        params=EvaluateParams(retention_threshold=0.5),
        retention=LabelMap(category_ids=(1,), names=("ring",), chunks=((0,),)),
        log=lines.append,
    )
    assert m["retention/reference_boxes"] == 0.0
    assert m["retention/box/map"] == -1.0 and m["scale/0.5/retention/box/map"] == -1.0
    assert m["scale/0.5/box/map"] == 0.25 and m["scale/0/box/map"] == 0.2
    assert any("retention/box/*: nothing to measure (-1)" in line for line in lines)


def test_a_labelled_retention_set_gives_true_ap_for_base_and_adapted(world, tmp_path):
    root = world[0]
    other = write_tiny_coco(tmp_path / "other", n_images=2)
    other["categories"] = [{"id": 1, "name": "ring"}, {"id": 5, "name": "cross"}]
    (tmp_path / "other.json").write_text(json.dumps(other))
    rc, m, _ = run_evaluate(
        root,
        tmp_path,
        **{
            "evaluate.retention_data": str(tmp_path / "other.json"),
            "evaluate.retention_images": str(tmp_path / "other"),
            "evaluate.adapter_scales": [0.5],
        },
    )
    assert rc == 0
    for key in ("retention/true/box/map", "retention/true/box/map_50"):
        assert 0.0 <= m[key] <= 1.0 and 0.0 <= m[f"base/{key}"] <= 1.0
    assert m["gain/retention/true/box/map"] == pytest.approx(
        m["retention/true/box/map"] - m["base/retention/true/box/map"]
    )
    assert "scale/0.5/retention/true/box/map" in m and "scale/0/box/map" not in m


def test_a_missing_retention_set_is_a_clear_error(world, tmp_path, capsys):
    rc, _, _ = run_evaluate(world[0], tmp_path, **{"evaluate.retention_data": "nowhere.json"})
    assert rc == 1
    err = capsys.readouterr().err
    assert "evaluate.retention_data: nowhere.json is not a file" in err and "Traceback" not in err


def test_the_reused_scale_passes_equal_passes_at_scales_0_and_1(world):
    """evaluate scores scale 0 with the base pass and 1 with the adapted one: a pass at adapter
    scale 0 gives exactly the base pass's metrics and detections."""
    root, gt, _ = world
    retention = None
    outputs = []
    for scale in (None, 0.0):
        teachers = load_teachers(
            gt,
            dino_dir=root / "models/dino",
            sam_dir=root / "models/sam",
            dino_params=TINY_DINO,
            sam_params=TINY_SAM,
            adapter_scale=scale,
        )
        retention = retention or retention_label_map(
            EvaluateParams(retention_classes=("ring", "cross")),
            dataset_names=["box"],
            tokenizer=teachers.dino.processor.tokenizer,
            log=print,
        )
        outputs.append(
            run_variant(
                gt,
                root / "images",
                teachers,
                keep=Filter(score_threshold=0.0),
                text_threshold=0.0,
                multimask=False,
                batch_size=2,
                gallery_ids=[],
                retention=retention,
            )
        )
    base, at_0 = outputs
    assert at_0.metrics == base.metrics
    assert base.retention is not None and at_0.retention is not None
    for image_id, det in base.retention.items():
        other = at_0.retention[image_id]
        assert np.array_equal(det.boxes, other.boxes) and np.array_equal(det.scores, other.scores)


# --- the commands ------------------------------------------------------------------------------


def _cli_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    dino = {"model": "tiny-random", "shortest_edge": 64, "longest_edge": 96}
    path.write_text(yaml.safe_dump({"dino": dino, "sam": {"model": "tiny-random"}}))
    return path


def _predict(world, tmp_path, *extra) -> dict:
    root = world[0]
    out = tmp_path / f"labels{len(list(tmp_path.glob('labels*')))}.json"
    rc = teacher_main(
        ["predict", str(root / "images"), "--out", str(out), "--params", str(_cli_params(tmp_path))]
        + ["--classes", "box,round thing", "--score-threshold", "0", "--text-threshold", "0"]
        + list(extra)
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_predict_adapter_scale_0_labels_as_the_base_models(world, tmp_path):
    adapters = str(world[0] / "models")
    base = _predict(world, tmp_path)
    at_0 = _predict(world, tmp_path, "--adapters", adapters, "--adapter-scale", "0")
    tuned = _predict(world, tmp_path, "--adapters", adapters)
    assert at_0["annotations"] == base["annotations"]
    assert tuned["annotations"] != base["annotations"]


def test_predict_refuses_a_negative_scale(world, tmp_path, capsys):
    rc = teacher_main(
        ["predict", str(world[0] / "images"), "--out", str(tmp_path / "x.json")]
        + ["--adapters", str(world[0] / "models"), "--adapter-scale", "-0.5"]
        + ["--params", str(_cli_params(tmp_path))]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "adapter scale -0.5: must be a finite number >= 0" in err and "Traceback" not in err


def test_export_at_scale_0_writes_the_base_weights(world, tmp_path):
    rc = teacher_main(
        ["export", "--adapters", str(world[0] / "models"), "--out", str(tmp_path / "out")]
        + ["--adapter-scale", "0", "--params", str(_cli_params(tmp_path))]
    )
    assert rc == 0
    exported = torch.load(tmp_path / "out" / "sam.pth", weights_only=True)
    base = load_base_sam("tiny-random").state_dict()
    assert exported.keys() == base.keys()
    assert all(torch.equal(exported[k], base[k]) for k in base)
    folder = dataclasses.replace(TINY_DINO, model=str(tmp_path / "out" / "dino"))
    dino = load_dino(folder).model.state_dict()
    reference = load_dino(TINY_DINO).model.state_dict()
    assert dino.keys() == reference.keys()
    assert all(torch.equal(dino[k], reference[k]) for k in reference)


def test_serve_takes_the_scale_and_its_model_version_names_it(world):
    import argparse

    from teacher.serve.command import configure
    from teacher.serve.teachers import adapters_version

    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args(["--adapter-scale", "0.5"]).adapter_scale == 0.5
    assert parser.parse_args([]).adapter_scale == 1.0
    models = world[0] / "models"
    version = {
        s: adapters_version(models, dino_model="a", sam_model="b", adapter_scale=s)
        for s in (1.0, 0.5)
    }
    assert version[1.0] == adapters_version(models, dino_model="a", sam_model="b")
    assert version[0.5] != version[1.0]


# --- the proving ground (tiny-pretrained teachers, teacher.dataset.synth) ------------------------------

PRESET = dataclasses.replace(
    TINY_DINO, model="tiny-pretrained", shortest_edge=128, longest_edge=160
)
# "Confident" for the committed DINO preset, few of whose scores reach 0.3 (max 0.42;
# docs/PROVING_GROUND.md): its ~430 best detections of the pretraining classes on 32 held-out
# images.
PROVING_THRESHOLD = 0.15


def _proving_ground_run(tmp_path: Path, *, retain_weight: float) -> dict[str, dict[float, float]]:
    """DINO (LoRA + heads, the train_dino recipe) fine-tuned on 64 images of the fine-tuning
    domain (seed 1) with ``dino.retain_weight``, the pretraining classes as the retention names;
    per adapter scale 0 / 0.5 / 1: the retention of the pretraining classes on held-out
    pretraining-domain images and the box mAP@50 gain on held-out fine-tuning-domain images."""
    from teacher.coco.metrics import coco_eval
    from teacher.core.params import AugmentParams, LoraParams, TrainParams
    from teacher.dataset import synth
    from teacher.dataset.augment import resolve_policy
    from teacher.dino.detect import coco_results, score
    from teacher.dino.labels import build_label_map
    from teacher.dino.task import train_dino
    from teacher.inference.predict import Teachers, predict_images

    train, train_px = synth.make_dataset(synth.FINETUNE, n_images=64, seed=1)
    synth.save_dataset(train, train_px, tmp_path / "train")
    test, test_px = synth.make_dataset(synth.FINETUNE, n_images=32, seed=777_777)
    held, held_px = synth.make_dataset(synth.PRETRAIN, n_images=32, seed=888_888)
    dino = dataclasses.replace(PRESET, retain_weight=retain_weight)
    train_dino(
        train_coco=train,
        val_coco=train,
        image_root=tmp_path / "train" / "images",
        dino=dino,
        lora=LoraParams(rank=8, alpha=16.0, dropout=0.0),
        train=TrainParams(epochs=6, batch_size=4, lr=1e-3, warmup_steps=5, patience=0),
        augment_policy=resolve_policy(AugmentParams(policy="none"), {}),
        seed=0,
        out_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "checkpoints",
        live_dir=tmp_path / "live",
        fingerprint="proving-ground",
        retention_classes=[c["name"] for c in held["categories"]],
    )
    keep = Filter(score_threshold=0.05)  # evaluate.score_threshold, text_threshold: the defaults
    task_map = retention = None
    gain_50, found = {}, {}
    for scale in (0.0, 0.5, 1.0):
        bundle = merged(load_dino(PRESET, adapter_dir=tmp_path / "model", adapter_scale=scale))
        tokenizer = bundle.processor.tokenizer
        task_map = task_map or build_label_map(test["categories"], tokenizer=tokenizer)
        retention = retention or build_label_map(held["categories"], tokenizer=tokenizer)
        scored = score(bundle, test_px, task_map)
        results = coco_results(scored, [i["id"] for i in test["images"]])
        gain_50[scale] = coco_eval(test, results, per_class=False)["map_50"]
        dets = predict_images(
            Teachers(dino=bundle, sam=None, label_map=retention),
            held_px,
            keep=keep,
            text_threshold=0.05,
        )
        found[scale] = dict(zip([i["id"] for i in held["images"]], dets, strict=True))
    reference = reference_ground_truth(
        held["images"],
        found[0.0],
        threshold=PROVING_THRESHOLD,
        category_ids=retention.category_ids,
        names=retention.names,
    )
    assert len(reference["annotations"]) >= 50
    kept = {s: retention_scores(reference, found[s], max_detections=100)["map"] for s in found}
    return {"retention": kept, "gain": {s: gain_50[s] - gain_50[0.0] for s in gain_50}}


@pytest.mark.slow
def test_proving_ground_fine_tuning_forgets_a_smaller_scale_and_the_retain_term_recover(
    tmp_path, one_thread
):
    """Without the term, fine-tuning lowers retention of the pretraining classes and adapter
    scale 0.5 recovers part of it while keeping part of the gain; with the term (the default
    weight, 16) the model keeps more of it at scale 1 and still gains."""
    off = _proving_ground_run(tmp_path / "off", retain_weight=0.0)
    on = _proving_ground_run(tmp_path / "on", retain_weight=16.0)
    for name, run in (("off", off), ("on", on)):
        print(
            f"retain {name}: "
            + "; ".join(
                f"scale {s:g}: retention {run['retention'][s]:.3f}, gain {run['gain'][s]:+.3f}"
                for s in run["retention"]
            )
        )
    kept, gain = off["retention"], off["gain"]
    assert kept[0.0] == pytest.approx(1.0)
    assert kept[1.0] < 0.9  # fine-tuning lowers retention of the pretraining classes
    assert kept[1.0] < kept[0.5] < kept[0.0]  # scale 0.5 recovers part of it ...
    assert gain[1.0] > 0 and gain[0.5] > 0  # ... and keeps part of the gain
    assert PRESET.retain_weight == 16.0  # the term is on by default, at this weight
    assert on["retention"][1.0] > kept[1.0] + 0.1  # the term keeps more of the vocabulary
    assert on["gain"][1.0] > 0  # ... and the model still learns the new classes


@pytest.mark.parametrize("command", ["predict", "export"])
def test_the_student_has_no_adapter_to_scale(tmp_path, capsys, command):
    args = [str(tmp_path)] if command == "predict" else ["--out", str(tmp_path / "out")]
    args += ["--student", str(tmp_path / "student"), "--adapter-scale", "0.5"]
    if command == "predict":
        args += ["--out", str(tmp_path / "x.json")]
    assert teacher_main([command, *args]) == 1
    err = capsys.readouterr().err
    assert "the student (--student) has none" in err and "Traceback" not in err


def test_the_label_stage_labels_at_label_adapter_scale(world):
    from teacher.inference.labeling import load_label_teachers

    root = world[0]

    def teachers(scale: float):
        return load_label_teachers(
            dino_dir=root / "models" / "dino",
            sam_dir=root / "models" / "sam",
            dino=TINY_DINO,
            sam=TINY_SAM,
            adapter_scale=scale,
            log=lambda _: None,
        )

    at_0, at_1 = teachers(0.0), teachers(1.0)
    base_dino, base_sam = load_dino(TINY_DINO).model.state_dict(), load_base_sam("tiny-random")
    assert all(torch.equal(v, base_dino[k]) for k, v in at_0.dino.model.state_dict().items())
    assert any(not torch.equal(v, base_dino[k]) for k, v in at_1.dino.model.state_dict().items())
    sam_0 = at_0.sam.state_dict()
    assert all(torch.equal(sam_0[k], v) for k, v in base_sam.state_dict().items())

"""rf-detr's fine-tuning recipe in the student (teacher.student.task / model), each choice pinned
against the reference's own formula, plus the pool's overlap check and the one scoring protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_adapters import write_tiny_coco

from teacher.coco.io import mask_to_rle
from teacher.coco.metrics import coco_eval, segm_ground_truth
from teacher.core.params import StudentParams, TrainParams
from teacher.student.data import HUMAN, TEACHER, Source, drop_known_images
from teacher.student.model import (
    StudentInfo,
    architecture_config,
    build_student,
    class_heads,
    model_class,
    save_student,
    upsample_masks,
)
from teacher.student.task import num_vit_layers, rf_detr_param_groups

TINY = StudentParams(model="tiny-random")


def rf_detr_lr(name: str, *, lr: float, lr_encoder: float, num_layers: int) -> float:
    """rf-detr's learning rate of one parameter, written from get_param_dicts.py and
    backbone.py's get_named_param_lr_pairs / get_dinov2_lr_decay_rate, with rf-detr's module
    names (backbone.0.encoder..., transformer.decoder...)."""
    if name.startswith("backbone.0.encoder"):
        layer_id = num_layers + 1
        if "embeddings" in name:
            layer_id = 0
        elif ".layer." in name and ".residual." not in name:
            layer_id = int(name[name.find(".layer.") :].split(".")[2]) + 1
        return lr_encoder * 0.8 ** (num_layers + 1 - layer_id) * 0.7**2
    if "transformer.decoder" in name:
        return lr * 0.7
    return lr


def rf_detr_name(hf: str) -> str:
    """transformers' RF-DETR parameter name -> rf-detr's module path (the parts the lr reads)."""
    if ".backbone.backbone." in "." + hf:
        return "backbone.0.encoder." + hf.split("backbone.backbone.", 1)[1]
    if ".decoder." in "." + hf and "model.decoder." in hf:
        return "transformer.decoder." + hf.split("model.decoder.", 1)[1]
    return "other." + hf


@pytest.mark.parametrize("arch", ["rf-detr-nano", "rf-detr-seg-nano"])
def test_learning_rates_are_rf_detrs_for_every_parameter(arch):
    config = architecture_config(arch, names=["a", "b"])
    model = model_class(arch == "rf-detr-seg-nano")(config)
    params = list(model.named_parameters())
    train = TrainParams(lr=1e-4, weight_decay=1e-4)
    groups = rf_detr_param_groups(
        params,
        train,
        num_layers=num_vit_layers(config),
        lr_encoder=1.5e-4,
        layer_decay=0.8,
        component_decay=0.7,
    )
    assert num_vit_layers(config) == 13  # rf-detr: out_feature_indexes[-1] + 1 = 12 + 1
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(lr_of) == len(params)
    for name, p in params:
        expected = rf_detr_lr(rf_detr_name(name), lr=1e-4, lr_encoder=1.5e-4, num_layers=13)
        assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), name
    top = "model.backbone.backbone.encoder.layer.11.mlp.fc1.weight"
    named = dict(params) if arch == "rf-detr-nano" else {}
    if named:
        assert lr_of[id(named[top])] == pytest.approx(1.5e-4 * 0.8**2 * 0.49)
        assert (
            wd_of[
                id(named["model.backbone.backbone.embeddings.patch_embeddings.projection.weight"])
            ]
            == 0
        )
        assert wd_of[id(named["class_embed.bias"])] == 1e-4  # rf-detr decays heads' biases
    assert groups[0]["lr"] == 1e-4  # the heads' group first: the loop logs its lr


def test_class_heads_start_from_the_pretrained_rows(tmp_path):
    """rf-detr's reinitialize_detection_head: rows repeated, the first K kept; not a random draw."""
    pretrained, _, _ = build_student(TINY, names=["p0", "p1", "p2"], masks=False)
    with torch.no_grad():
        for head in class_heads(pretrained):
            head.weight.normal_()
            head.bias.uniform_(-5, -1)
    save_student(
        pretrained,
        tmp_path / "pre",
        info=StudentInfo("tiny-random", False, 64, (1, 2, 3), ("p0", "p1", "p2")),
    )
    fewer, _, _ = build_student(
        StudentParams(model=str(tmp_path / "pre")), names=["a", "b"], masks=False
    )
    more, _, _ = build_student(
        StudentParams(model=str(tmp_path / "pre")), names=list("abcde"), masks=False
    )
    for old, few, many in zip(
        class_heads(pretrained), class_heads(fewer), class_heads(more), strict=True
    ):
        assert torch.equal(few.weight, old.weight[:2]) and torch.equal(few.bias, old.bias[:2])
        rows = [0, 1, 2, 0, 1]
        assert torch.equal(many.weight, old.weight[rows]) and torch.equal(many.bias, old.bias[rows])
    assert fewer.config.num_labels == 2 and more.config.id2label[4] == "e"
    out = more(pixel_values=torch.zeros(1, 3, 64, 64))
    assert out.logits.shape[-1] == 5


def test_the_tiny_student_has_the_layers_its_docstring_says():
    model, _, _ = build_student(TINY, names=["a"], masks=False)
    bb = model.config.backbone_config
    assert (bb.num_hidden_layers, bb.num_attention_heads) == (4, 2)
    assert model.config.dropout == 0.0  # rf-detr fine-tunes without dropout


def test_pool_images_equal_to_a_human_split_image_are_left_out_with_a_line(tmp_path):
    human = write_tiny_coco(tmp_path / "images", n_images=3)
    pool = write_tiny_coco(tmp_path / "pool", n_images=3, size=(40, 56))
    same = tmp_path / "pool" / pool["images"][1]["file_name"]
    same.write_bytes((tmp_path / "images" / human["images"][2]["file_name"]).read_bytes())
    pool["annotations"] = [dict(a, score=0.9) for a in pool["annotations"]]
    source = Source(TEACHER, pool, tmp_path / "pool", 0.5)
    test = {**human, "images": human["images"][2:]}
    kept, lines = drop_known_images(
        source,
        [
            ("train", {**human, "images": human["images"][:2]}, tmp_path / "images"),
            ("test", test, tmp_path / "images"),
        ],
    )
    assert [i["id"] for i in kept.coco["images"]] == [
        pool["images"][0]["id"],
        pool["images"][2]["id"],
    ]
    assert all(a["image_id"] != pool["images"][1]["id"] for a in kept.coco["annotations"])
    assert lines == [
        f"pool image {pool['images'][1]['file_name']} is test image "
        f"{human['images'][2]['file_name']} (same bytes): left out"
    ]
    assert pool["images"][1] in source.coco["images"]  # the input is not modified
    untouched, none = drop_known_images(Source(HUMAN, pool, tmp_path / "pool", 1.0), [])
    assert none == [] and untouched.coco is pool


def test_perfect_student_and_perfect_teacher_get_the_same_mask_ap():
    """One protocol: box-only objects are ignore regions in both segm scores."""
    h, w = 20, 30
    m = np.zeros((h, w), bool)
    m[2:8, 3:9] = True
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [3, 2, 6, 6],
                "area": 36,
                "iscrowd": 0,
                "segmentation": mask_to_rle(m),
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 1,
                "bbox": [15, 10, 10, 6],
                "area": 60,
                "iscrowd": 0,
            },
        ],
    }
    b = np.zeros((h, w), bool)
    b[10:16, 15:25] = True
    perfect = [
        {
            "image_id": 1,
            "category_id": 1,
            "bbox": [3, 2, 6, 6],
            "score": 0.9,
            "segmentation": mask_to_rle(m),
        },
        {
            "image_id": 1,
            "category_id": 1,
            "bbox": [15, 10, 10, 6],
            "score": 0.8,
            "segmentation": mask_to_rle(b),
        },
    ]
    ap = coco_eval(segm_ground_truth(gt), perfect, iou_type="segm", per_class=False)["map"]
    assert ap == pytest.approx(1.0)


def test_masks_upsample_in_chunks_as_at_once(monkeypatch):
    import teacher.student.model as student_model

    logits = torch.randn(7, 16, 16)
    whole = (
        torch.nn.functional.interpolate(
            logits[None], size=(45, 61), mode="bilinear", align_corners=False
        )[0]
        > 0
    ).numpy()
    monkeypatch.setattr(student_model, "MASK_CHUNK_PIXELS", 45 * 61 * 2)  # two masks a chunk
    # another batch shape may take another vectorised path: a pixel whose logit is within the
    # last bits of 0 may flip, nothing more
    assert (upsample_masks(logits, height=45, width=61) != whole).mean() <= 1e-3
    assert upsample_masks(logits[:0], height=5, width=6).shape == (0, 5, 6)


def test_a_pool_where_the_teachers_kept_nothing_has_no_targets(tmp_path):
    """No evidence, only its absence: the stage trains on human labels alone (a proving-ground
    student trained on 400 such images at weight 0.5 scored box mAP@50 0.0)."""
    from teacher.student.data import has_targets

    pool = write_tiny_coco(tmp_path / "pool", n_images=2)
    scored = [dict(a, score=0.25) for a in pool["annotations"]]
    uncertain = Source(TEACHER, {**pool, "annotations": scored}, tmp_path, 0.5, min_score=0.3)
    assert not has_targets(uncertain)  # ignore regions only
    sure = Source(TEACHER, {**pool, "annotations": [dict(scored[0], score=0.9)]}, tmp_path, 0.5,
                  min_score=0.3)  # fmt: skip
    assert has_targets(sure)

"""The student's loss (teacher.student.loss): transformers' RF-DETR criterion where every label is
human, and teacher labels as evidence where they are not."""

from __future__ import annotations

import pytest
import torch
from fake_adapters import write_tiny_coco

from teacher.core.params import StudentParams
from teacher.student.data import HUMAN, Source, StudentDataset, collate_student
from teacher.student.loss import EvidenceLoss, _criterion, use_student_loss
from teacher.student.model import build_student, tiny_config

TINY = StudentParams(model="tiny-random")
NAMES = ["box", "round thing"]


def _batch(tmp_path, *, masks: bool, sources=None):
    root = tmp_path / "images"
    coco = write_tiny_coco(root, n_images=2)
    items = StudentDataset(
        sources or [Source(HUMAN, coco, root, 1.0)], label_of={1: 0, 5: 1}, masks=masks, seed=0
    )
    return collate_student([items[i] for i in range(len(items))], resolution=64)


@pytest.mark.parametrize("masks", [False, True])
def test_human_labels_give_transformers_rf_detr_loss_term_by_term(tmp_path, masks):
    """The reference: transformers' own loss_function of the same model on the same batch (every
    label human, weight 1, every mask real, boxes present), the RNG of the point sampling reset."""
    model, _, _ = build_student(TINY, names=NAMES, masks=masks)
    model.train()  # query groups on; no dropout in the student
    batch = _batch(tmp_path, masks=masks)
    assert sum(len(t["class_labels"]) for t in batch["labels"]) > 0
    torch.manual_seed(0)
    stock = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    use_student_loss(model, masks=masks)
    torch.manual_seed(0)
    ours = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    shared = [k for k in stock.loss_dict if k in ours.loss_dict]
    assert len(shared) == len(ours.loss_dict) >= (15 if masks else 9)
    for k in shared:
        assert float(ours.loss_dict[k]) == pytest.approx(float(stock.loss_dict[k]), rel=1e-5), k
    assert float(ours.loss) == pytest.approx(float(stock.loss), rel=1e-5)


# --- the criterion on hand-made outputs ----------------------------------------------------------


def _setup(*, masks: bool = False, groups: int = 1, queries: int = 6, seed: int = 0):
    config = tiny_config(names=NAMES)
    config.group_detr = groups
    criterion: EvidenceLoss = _criterion(config, masks=masks, device="cpu")
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, queries * groups, 2, generator=g, requires_grad=True)
    boxes = (0.2 + 0.6 * torch.rand(2, queries * groups, 4, generator=g)).requires_grad_(True)
    out = {"logits": logits, "pred_boxes": boxes}
    if masks:
        out["pred_masks"] = torch.randn(
            2, queries * groups, 16, 16, generator=g, requires_grad=True
        )
    return criterion, out


def _target(boxes, labels, *, weight=None, ignore=None, has_mask=None, image_weight=1.0):
    n = len(labels)
    box = torch.tensor(boxes, dtype=torch.float32).reshape(n, 4)
    t = {
        "class_labels": torch.tensor(labels, dtype=torch.long),
        "boxes": box,
        "weight": torch.tensor(weight or [1.0] * n),
        "ignore": torch.tensor(ignore or [False] * n, dtype=torch.bool),
        "has_mask": torch.tensor(has_mask or [True] * n, dtype=torch.bool),
        "image_weight": torch.tensor(float(image_weight)),
    }
    masks = torch.zeros(n, 16, 16)
    for i, (cx, cy, w, h) in enumerate(box.tolist()):
        x0, x1 = int((cx - w / 2) * 16), int((cx + w / 2) * 16)
        y0, y1 = int((cy - h / 2) * 16), int((cy + h / 2) * 16)
        masks[i, y0:y1, x0:x1] = 1
    t["masks"] = masks
    return t


def _empty():
    return _target([], [])


A = [0.3, 0.3, 0.2, 0.2]
B = [0.7, 0.6, 0.3, 0.2]


def test_a_query_matched_to_an_ignore_region_has_zero_class_and_box_loss():
    criterion, out = _setup()
    targets = [_target([A, B], [0, 1], ignore=[False, True]), _empty()]
    indices = criterion.matcher(out, targets, 1)
    q_ignored = int(indices[0][0][indices[0][1] == 1][0])
    q_kept = int(indices[0][0][indices[0][1] == 0][0])
    terms = criterion.loss_labels(out, targets, indices, 1.0)
    terms.update(criterion.loss_boxes(out, targets, indices, 1.0))
    sum(terms.values()).backward()
    assert torch.count_nonzero(out["logits"].grad[0, q_ignored]) == 0  # no class loss at all
    assert torch.count_nonzero(out["pred_boxes"].grad[0, q_ignored]) == 0
    assert torch.count_nonzero(out["logits"].grad[0, q_kept]) == 2
    others = [q for q in range(6) if q != q_ignored]
    assert torch.count_nonzero(out["logits"].grad[0, others]) == 2 * len(others)  # background


def test_the_ignore_region_takes_part_in_matching_in_every_query_group():
    criterion, out = _setup(groups=3)
    targets = [_target([A, B], [0, 1], ignore=[False, True]), _empty()]
    criterion(out, targets)["loss_ce"].backward()
    rows = out["logits"].grad[0].abs().sum(1)
    assert int((rows == 0).sum()) == 3  # one query per group is the ignore region's


def test_the_teacher_score_weighs_the_positive_class_term_only():
    grads = []
    for w in (1.0, 0.4):
        criterion, out = _setup(seed=3)
        targets = [_target([A], [1], weight=[w]), _empty()]
        indices = criterion.matcher(out, targets, 1)
        criterion.loss_labels(out, targets, indices, 1.0)["loss_ce"].backward()
        q = int(indices[0][0][0])
        grads.append((out["logits"].grad[0, q].clone(), out["logits"].grad[1].clone()))
    (full_q, full_rest), (weak_q, weak_rest) = grads
    assert float(weak_q[1]) == pytest.approx(0.4 * float(full_q[1]), rel=1e-5)  # the positive
    assert float(weak_q[0]) == pytest.approx(float(full_q[0]), rel=1e-6)  # its other class
    assert torch.allclose(weak_rest, full_rest)  # the other image


def test_image_weights_scale_every_term_of_their_image():
    terms = []
    for iw in (1.0, 0.5):
        criterion, out = _setup(masks=True, seed=5)
        torch.manual_seed(0)
        pair = [_target([A, B], [0, 1], image_weight=iw), _target([B], [1], image_weight=iw)]
        terms.append(criterion(out, pair))
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_mask_ce", "loss_mask_dice"):
        assert float(terms[1][k]) == pytest.approx(0.5 * float(terms[0][k]), rel=1e-5), k


def test_the_batch_normaliser_counts_every_box_once_and_empty_batches_once_per_group():
    """DETR divides by the batch's boxes x groups; the reference clamps that product at 1, so a
    batch of empty pool images weighed its background loss groups (13) times more than ours."""
    groups = 3
    criterion, out = _setup(groups=groups)
    targets = [_empty(), _empty()]
    loss = criterion(out, targets)["loss_ce"]
    prob = out["logits"].sigmoid()
    background = (-(prob**2) * (1 - prob).log()).sum()
    assert float(loss) == pytest.approx(float(background) / groups, rel=1e-5)
    # with boxes: per image, the sum of its terms; the batch divides by all its boxes x groups
    criterion, out = _setup(groups=groups)
    both = [_target([A, B], [0, 1]), _empty()]
    torch.manual_seed(0)
    loss = float(criterion(out, both)["loss_ce"])
    assert loss * groups * 2 == pytest.approx(
        float(
            criterion.loss_labels(out, both, criterion.matcher(out, both, groups), 1.0)["loss_ce"]
        ),
        rel=1e-5,
    )


def test_ignore_regions_do_not_count_in_the_normaliser():
    criterion, out = _setup()
    with_ignore = [_target([A, B], [0, 1], ignore=[False, True]), _empty()]
    indices = criterion.matcher(out, with_ignore, 1)
    raw = float(criterion.loss_boxes(out, with_ignore, indices, 1.0)["loss_bbox"])
    assert float(criterion(out, with_ignore)["loss_bbox"]) == pytest.approx(raw / 1, rel=1e-5)


def test_box_only_instances_get_no_mask_loss():
    criterion, out = _setup(masks=True)
    boxes_only = [_target([A, B], [0, 1], has_mask=[False, False]), _empty()]
    terms = criterion(out, boxes_only)
    assert float(terms["loss_mask_ce"]) == 0.0 and float(terms["loss_mask_dice"]) == 0.0
    assert terms["loss_mask_ce"].requires_grad  # still on the graph
    mixed = [_target([A, B], [0, 1], has_mask=[True, False]), _empty()]
    torch.manual_seed(0)
    one = criterion(out, mixed)
    assert float(one["loss_mask_ce"]) > 0


def test_the_loss_runs_in_float32_under_autocast(tmp_path):
    model, _, _ = build_student(TINY, names=NAMES, masks=False)
    use_student_loss(model, masks=False)
    batch = _batch(tmp_path, masks=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)

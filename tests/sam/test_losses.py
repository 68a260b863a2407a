"""Segmentation losses against values worked out by hand (comments show the arithmetic)."""

import math

import pytest
import torch

from teacher.sam.losses import dice_loss, focal_loss, iou_prediction_loss, mask_iou, sam_loss

LN2 = math.log(2)
WEIGHTS = dict(
    focal_weight=20.0, dice_weight=1.0, iou_weight=1.0, focal_alpha=0.25, focal_gamma=2.0
)


def test_focal_loss_hand_computed():
    # pixel 1: logit 0 -> p = .5, target 1: ce = ln2, (1 - p_t)^2 = .25, alpha_t = .25
    # pixel 2: logit ln3 -> p = .75, target 0: ce = ln4, (1 - p_t)^2 = .5625, alpha_t = .75
    logits = torch.tensor([[[0.0, math.log(3)]]])
    target = torch.tensor([[[1.0, 0.0]]])
    expected = (0.25 * 0.25 * LN2 + 0.75 * 0.5625 * 2 * LN2) / 2
    got = focal_loss(logits, target, alpha=0.25, gamma=2.0)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # gamma 0 and no alpha weighting: plain BCE mean = (ln2 + ln4) / 2
    plain = focal_loss(logits, target, alpha=-1, gamma=0.0)
    assert plain.item() == pytest.approx(1.5 * LN2, rel=1e-6)


def test_dice_loss_hand_computed():
    # p = .5 everywhere, one target pixel of four: intersection .5, sum p = 2, sum t = 1
    logits = torch.zeros(2, 2)
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert dice_loss(logits, target, smooth=1.0).item() == pytest.approx(1 - 2 / 4)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - 1 / 3)
    # confident and right: ~0; empty target and empty prediction: 0 thanks to smoothing
    assert dice_loss(target * 40 - 20, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(torch.full((2, 2), -40.0), torch.zeros(2, 2)).item() == pytest.approx(
        0.0, abs=1e-6
    )


def test_mask_iou_and_iou_prediction_loss():
    pred = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 0], [1, 0]], dtype=torch.bool)
    assert mask_iou(pred, target).item() == pytest.approx(1 / 3)  # 1 shared of 3 covered
    assert mask_iou(torch.zeros(2, 2), torch.zeros(2, 2)).item() == 1.0
    logits = pred.float() * 2 - 1  # > 0 exactly where pred is
    mse = iou_prediction_loss(torch.tensor(0.5), logits, target.float())
    assert mse.item() == pytest.approx((0.5 - 1 / 3) ** 2)


def test_sam_loss_single_mask_hand_computed():
    # logits 0: p = .5 everywhere; one positive pixel of four.
    # focal = (.0625 ln2 + 3 * .1875 ln2) / 4 = .15625 ln2; dice (smooth 1) = .5;
    # prediction (logit > 0) is empty -> actual IoU 0, predicted .5 -> mse .25
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    out = sam_loss(logits, torch.tensor([[0.5]]), target, **WEIGHTS)
    assert out["focal"].item() == pytest.approx(0.15625 * LN2, rel=1e-6)
    assert out["dice"].item() == pytest.approx(0.5)
    assert out["iou_mse"].item() == pytest.approx(0.25)
    assert out["loss"].item() == pytest.approx(20 * 0.15625 * LN2 + 0.5 + 0.25, rel=1e-6)


def test_sam_loss_takes_best_of_three_and_backprops_only_through_it():
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    perfect = target[0] * 40 - 20
    candidates = torch.stack([-perfect, torch.zeros(2, 2), perfect])[None]  # best is index 2
    logits = candidates.clone().requires_grad_(True)
    iou_pred = torch.tensor([[0.0, 0.0, 1.0]])  # actual IoUs: 0, 0 (empty prediction), 1
    out = sam_loss(logits, iou_pred, target, **WEIGHTS)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-5)
    out["loss"].backward()
    assert logits.grad[0, :2].abs().sum() == 0  # the worse candidates get no gradient
    # the same candidates in another order give the same loss (selection, not position)
    shuffled = sam_loss(candidates[:, [2, 0, 1]], iou_pred[:, [2, 0, 1]], target, **WEIGHTS)
    assert shuffled["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-7)


def test_sam_loss_weights_are_keyword_only():
    with pytest.raises(TypeError):
        sam_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1), torch.zeros(1, 2, 2), 20.0, 1.0)


def test_loss_mask_iou_follows_the_metrics_rule():
    """The loss's tensor IoU and the metrics' IoU (validation, test) agree, empty pairs included."""
    import numpy as np

    from teacher.coco.metrics import mask_iou as metric_iou

    rng = np.random.default_rng(0)
    pred = rng.random((6, 9, 7)) > 0.5
    gt = rng.random((6, 9, 7)) > 0.6
    pred[0], gt[0] = False, False  # nothing on either side: 1
    pred[1] = False  # nothing predicted where something is: 0
    ours = mask_iou(torch.from_numpy(pred), torch.from_numpy(gt)).double().numpy()
    np.testing.assert_allclose(ours, metric_iou(pred, gt), rtol=1e-6)
    assert ours[0] == 1.0 and ours[1] == 0.0

import numpy as np
import pytest
import torch

from teacher.coco import boxes as B

XYWH = [[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 5.0, 5.0]]


def test_xywh_xyxy_round_trip_numpy():
    xyxy = B.xywh_to_xyxy(np.array(XYWH))
    assert xyxy.tolist() == [[10, 20, 40, 60], [0, 0, 5, 5]]
    assert B.xyxy_to_xywh(xyxy).tolist() == XYWH


def test_torch_keeps_type_and_dtype():
    t = torch.tensor(XYWH, dtype=torch.float32)
    out = B.xywh_to_xyxy(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.tolist() == [[10, 20, 40, 60], [0, 0, 5, 5]]
    assert B.xywh_to_xyxy(torch.tensor([[1, 2, 3, 4]])).is_floating_point()


def test_cxcywh_norm_round_trip_and_values():
    norm = B.xywh_to_cxcywh_norm(np.array(XYWH), width=100, height=200)
    assert norm[0].tolist() == pytest.approx([0.25, 0.2, 0.3, 0.2])
    back = B.cxcywh_norm_to_xywh(norm, width=100, height=200)
    np.testing.assert_allclose(back, XYWH)
    xyxy = B.cxcywh_norm_to_xyxy(torch.tensor(norm), width=100, height=200)
    assert xyxy[0].tolist() == pytest.approx([10, 20, 40, 60])
    assert B.xyxy_to_cxcywh_norm([10, 20, 40, 60], width=100, height=200).tolist() == pytest.approx(
        [0.25, 0.2, 0.3, 0.2]
    )


def test_single_box_as_list():
    assert B.xywh_to_xyxy([1, 2, 3, 4]).tolist() == [1, 2, 4, 6]


def test_clip_and_area():
    clipped = B.clip_xywh(
        np.array([[-5.0, 10.0, 20.0, 100.0], [200.0, 0, 10, 10]]), width=50, height=60
    )
    assert clipped.tolist() == [[0, 10, 15, 50], [50, 0, 0, 10]]
    assert B.area_xywh(clipped).tolist() == [750, 0]
    assert B.clip_xywh(torch.tensor([[-1.0, -1.0, 5.0, 5.0]]), width=3, height=3).tolist() == [
        [0, 0, 3, 3]
    ]
    assert B.area_xywh(np.array([0, 0, -2.0, 3])) == 0


def test_is_xywh():
    assert B.is_xywh([0, 0, 1, 1])
    assert not B.is_xywh([0, 0, 1]) and not B.is_xywh(None) and not B.is_xywh([0, 0, "1", 1])
    assert not B.is_xywh([0, 0, float("nan"), 1]) and not B.is_xywh([True, 0, 1, 1])

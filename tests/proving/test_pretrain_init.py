"""scripts/pretrain_tiny.py's reference_init: Grounding DINO's from-scratch initialisation of the
detector (IDEA-Research/GroundingDINO ``Transformer._reset_parameters``, Deformable DETR's
``MSDeformAttn._reset_parameters``, the box MLPs' default draw with the last layer zero), checked
against the reference's rules written out here, not against the function's own code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.models.grounding_dino import modeling_grounding_dino as gd

from teacher.core.params import DinoParams
from teacher.dino.model import build_tiny_pretrained


@pytest.fixture(scope="module")
def models():
    from teacher.proving.pretrain import DINO_SIZE, reference_init

    torch.manual_seed(0)
    hf, _ = build_tiny_pretrained(DinoParams(model="tiny-pretrained", **DINO_SIZE), weights=False)
    ours, _ = build_tiny_pretrained(DinoParams(model="tiny-pretrained", **DINO_SIZE), weights=False)
    ours.load_state_dict(hf.state_dict())
    torch.manual_seed(1)
    reference_init(ours)
    return hf, ours


def xavier_bound(w: torch.Tensor) -> float:
    fan_out, fan_in = w.shape[0], w[0].numel()
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_transformer_weights_are_xavier_not_std_002(models):
    """Every linear weight of the encoder (deformable, text-enhancer and fusion layers), the
    decoder's layers and query-position MLP and ``enc_output``: Xavier-uniform (bounded by
    √(6 / (fan_in + fan_out)) and filling it), where transformers draws std 0.02."""
    _, ours = models
    m = ours.model
    checked = 0
    for part in (m.encoder, m.decoder.layers, m.decoder.reference_points_head, m.enc_output):
        for name, module in part.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            w = module.weight.detach()
            bound = xavier_bound(w)
            if w.abs().max() == 0:  # deformable attention's zeroed offsets / attention weights
                assert name.endswith(("sampling_offsets", "attention_weights")), name
                continue
            assert w.abs().max() <= bound + 1e-6, name
            assert w.abs().max() > 0.8 * bound, name  # uniform over the whole bound
            assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.35 * bound / math.sqrt(3), name
            checked += 1
    assert checked >= 20


def test_box_mlps_default_draw_last_layer_zero_and_tied(models):
    """The box MLPs are built outside the reference's transformer: PyTorch's default draw
    (kaiming-uniform a=√5: bound 1/√fan_in, bias too), last layer zero. The decoder's MLP is one
    module shared by its layers and by the head (``dec_pred_bbox_embed_share``)."""
    _, ours = models
    for mlp in (ours.bbox_embed[0], ours.model.encoder_output_bbox_embed):
        for lin in mlp.layers[:-1]:
            bound = 1 / math.sqrt(lin.in_features)
            assert lin.weight.abs().max() <= bound + 1e-6
            assert lin.weight.abs().max() > 0.8 * bound
            assert lin.bias.abs().max() <= bound + 1e-6 and lin.bias.abs().max() > 0
        assert not mlp.layers[-1].weight.any() and not mlp.layers[-1].bias.any()
    head = ours.bbox_embed[0].layers[0].weight
    assert ours.bbox_embed[1].layers[0].weight.data_ptr() == head.data_ptr()
    assert ours.model.decoder.bbox_embed[0].layers[0].weight.data_ptr() == head.data_ptr()


def test_deformable_attention_reset_as_deformable_detr(models):
    """Each deformable attention: sampling offsets on the heads' directions, written as Deformable
    DETR's loop; attention weights zero; value and output projections Xavier with zero biases."""
    _, ours = models
    found = 0
    for module in ours.modules():
        if not isinstance(module, gd.GroundingDinoMultiscaleDeformableAttention):
            continue
        heads, levels, points = module.n_heads, module.n_levels, module.n_points
        thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (
            (grid_init / grid_init.abs().max(-1, keepdim=True)[0])
            .view(heads, 1, 1, 2)
            .repeat(1, levels, points, 1)
        )
        for i in range(points):
            grid_init[:, :, i, :] *= i + 1
        torch.testing.assert_close(module.sampling_offsets.bias.detach(), grid_init.view(-1))
        assert not module.sampling_offsets.weight.any()
        assert not module.attention_weights.weight.any()
        assert not module.attention_weights.bias.any()
        for lin in (module.value_proj, module.output_proj):
            assert not lin.bias.any()
            assert lin.weight.abs().max() <= xavier_bound(lin.weight) + 1e-6
        found += 1
    assert found == 3  # the encoder's one layer, the decoder's two


def test_attention_biases_zero_others_default(models):
    """``nn.MultiheadAttention`` (the reference's text-enhancer and decoder self / text
    attention) and the fusion's bi-attention zero their biases; the other linear layers keep
    PyTorch's default bias draw."""
    _, ours = models
    m = ours.model
    for module in m.modules():
        if isinstance(
            module, (gd.GroundingDinoMultiheadAttention, gd.GroundingDinoBiMultiHeadAttention)
        ):
            for lin in module.modules():
                if isinstance(lin, nn.Linear):
                    assert not lin.bias.any()
    fc1 = m.decoder.layers[0].fc1
    assert 0 < fc1.bias.abs().max() <= 1 / math.sqrt(fc1.in_features) + 1e-6


def test_the_rest_of_the_reference_draw_and_what_stays(models):
    """Input projections and the text projection Xavier with zero biases, the content queries
    Xavier; the Swin and BERT keep their draw (not the detector's to initialise)."""
    hf, ours = models
    m = ours.model
    for conv in (p[0] for p in m.input_proj_vision):
        assert conv.weight.abs().max() <= xavier_bound(conv.weight) + 1e-6
        assert conv.weight.abs().max() > 0.8 * xavier_bound(conv.weight)
        assert not conv.bias.any()
    q = m.query_position_embeddings.weight
    assert q.abs().max() <= xavier_bound(q) + 1e-6 and q.abs().max() > 0.8 * xavier_bound(q)
    assert not m.text_projection.bias.any()
    before = hf.state_dict()
    for name, value in ours.state_dict().items():
        if name.startswith(("model.backbone.", "model.text_backbone.")):
            torch.testing.assert_close(value, before[name], rtol=0, atol=0)

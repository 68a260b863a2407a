"""LoRA on a small real torch module: frozen base, parity, save/reload, merge, tied heads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from teacher.core.errors import TeacherError
from teacher.core.params import LoraParams
from teacher.train import lora as lora_mod

LORA = LoraParams(rank=4, alpha=8.0, dropout=0.0)
TARGETS = r"blocks\.\d+\.(fc1|fc2)|conv"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """Conv stem, two blocks, and a class head shared by 'decoder layers' (as Grounding DINO ties
    its ModuleList heads, also reachable as ``decoder.class_embed``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(), Block()])
        head = nn.Linear(8, 3)
        self.class_embed = nn.ModuleList([head, head])
        self.decoder = nn.Module()
        self.decoder.class_embed = self.class_embed

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        outs = []
        for block, head in zip(self.blocks, self.class_embed, strict=True):
            h = block(h)
            outs.append(head(h))
        return torch.stack(outs)


def base(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def trained(train_modules=("class_embed.0",)) -> nn.Module:
    """A wrapped model whose LoRA and head weights moved, as after training."""
    model = lora_mod.apply_lora(
        base(), lora=LORA, targets=TARGETS, train_modules=list(train_modules)
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_base_frozen_only_lora_and_heads_train(capsys):
    model = lora_mod.apply_lora(base(), lora=LORA, targets=TARGETS, train_modules=["class_embed.0"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or ".class_embed.0." in n for n in names)
    assert any(".conv.lora_A" in n for n in names) and any("fc2.lora_B" in n for n in names)
    trainable, total = lora_mod.count_parameters(model)
    assert 0 < trainable < total
    assert f"{trainable:,} trainable / {total:,} total" in capsys.readouterr().out


def test_no_match_lists_candidates():
    with pytest.raises(
        TeacherError, match=r"matches no module of Net.*blocks\.N\.fc1.*class_embed\.N"
    ):
        lora_mod.apply_lora(base(), lora=LORA, targets=r"encoder\..*")
    with pytest.raises(TeacherError, match="Fully trained modules"):
        lora_mod.apply_lora(base(), lora=LORA, targets=TARGETS, train_modules=["nope"])


def test_list_targets_match_by_name_suffix():
    model = lora_mod.apply_lora(base(), lora=LORA, targets=["fc1"])
    wrapped = {n for n in lora_mod.lora_parameter_names(model)}
    assert len(wrapped) == 4 and all(".fc1.lora_" in n for n in wrapped)


def test_fresh_adapter_changes_no_output():
    ref = base()(X)
    model = lora_mod.apply_lora(base(), lora=LORA, targets=TARGETS, train_modules=["class_embed.0"])
    torch.testing.assert_close(
        model.eval()(X), ref, rtol=1e-5, atol=1e-6
    )  # peft's module tree: another code path


def test_save_reload_identical_and_heads_stay_tied(tmp_path):
    model = trained()
    out = model(X)
    assert not torch.allclose(out, base()(X))
    lora_mod.save_adapter(model, tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert "trained_modules.safetensors" not in names  # the head once, in peft's file
    assert "trained_modules.json" in names  # and its tied aliases
    reloaded = lora_mod.load_adapter(base(), tmp_path)
    torch.testing.assert_close(
        reloaded(X), out, rtol=1e-5, atol=1e-6
    )  # a reload: a tolerance, not bitwise
    inner = reloaded.get_base_model()
    assert inner.class_embed[0] is inner.class_embed[1] is inner.decoder.class_embed[0]
    assert torch.equal(inner.class_embed[1].weight, model.get_base_model().class_embed[0].weight)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_aliases_restored_by_name_when_the_base_is_untied(tmp_path):
    model = trained()
    lora_mod.save_adapter(model, tmp_path)
    untied = base()
    untied.class_embed[1] = nn.Linear(8, 3)  # a base built without the tie
    reloaded = lora_mod.load_adapter(untied, tmp_path).get_base_model()
    assert torch.equal(reloaded.class_embed[1].weight, reloaded.class_embed[0].weight)


def test_trained_parameters_are_stored_once_in_peft_file(tmp_path):
    model = trained(train_modules=["blocks.1"])
    lora_mod.save_adapter(model, tmp_path)
    stored = load_file(str(tmp_path / "adapter_model.safetensors"))
    full = [n for n in stored if "lora_" not in n]
    expected = {f"base_model.model.{n}" for n in lora_mod.trained_parameters(model)}
    assert set(full) == expected and full  # once each, under the base-model name
    size = sum(t.numel() * t.element_size() for t in stored.values())
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < size + 16_384  # + header


def test_an_adapter_is_the_same_bytes_every_time_it_is_saved(tmp_path):
    """Resumed training must end byte-identical (tests/pipeline/test_pipeline.py): no file of the folder
    may hold a map that safetensors writes in hash order (two or more metadata keys)."""
    model = trained()
    for k in range(4):
        lora_mod.save_adapter(model, tmp_path / str(k))
    for name in ("adapter_model.safetensors", "trained_modules.json", "adapter_config.json"):
        assert len({(tmp_path / str(k) / name).read_bytes() for k in range(4)}) == 1, name


def test_a_folder_of_the_older_layout_loads_the_same(tmp_path):
    """Folders written before the trained tensors were stored once also hold them in
    trained_modules.safetensors (the aliases in its "aliases" metadata): still read."""
    from safetensors.torch import save_file

    model = trained()
    lora_mod.save_adapter(model, tmp_path)
    groups = lora_mod.trained_parameters(model)
    inner = model.get_base_model()
    save_file(
        {n: inner.get_parameter(n).detach().contiguous() for n in groups},
        str(tmp_path / "trained_modules.safetensors"),
        metadata={"aliases": json.dumps(groups)},
    )
    for scale in (1.0, 0.5):
        older = lora_mod.load_adapter(base(), tmp_path, scale=scale)
        (tmp_path / "trained_modules.safetensors").rename(tmp_path / "aside")
        newer = lora_mod.load_adapter(base(), tmp_path, scale=scale)
        (tmp_path / "aside").rename(tmp_path / "trained_modules.safetensors")
        torch.testing.assert_close(older(X), newer(X), rtol=0, atol=0)  # the same tensors
    inner = older.get_base_model()
    assert inner.class_embed[0] is inner.class_embed[1] is inner.decoder.class_embed[0]


def test_lora_inside_a_fully_trained_module_is_kept(tmp_path):
    # peft's modules_to_save would silently drop LoRA on blocks.1.fc1/fc2 here
    model = trained(train_modules=["blocks.1"])
    assert any("blocks.1.fc1.lora_A" in n for n in lora_mod.lora_parameter_names(model))
    lora_mod.save_adapter(model, tmp_path)
    torch.testing.assert_close(
        lora_mod.load_adapter(base(), tmp_path)(X), model(X), rtol=1e-5, atol=1e-6
    )


def test_merged_equals_unmerged():
    model = trained()
    out = model(X)
    merged = lora_mod.merge(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(X), out, rtol=1e-5, atol=1e-6)


def test_loading_onto_another_architecture_is_a_clear_error(tmp_path):
    lora_mod.save_adapter(trained(train_modules=["class_embed.0"]), tmp_path)
    with pytest.raises(TeacherError, match="no adapter_config.json"):
        lora_mod.load_adapter(base(), tmp_path / "missing")


# --- issue 16: damaged or foreign adapter folders, NaN weights, absurd ranks -------------------


def _saved(tmp_path):
    lora_mod.save_adapter(trained(), tmp_path)
    return tmp_path


def _rewrite(path, change, metadata=None):
    from safetensors.torch import load_file, save_file

    tensors = change(load_file(str(path)))
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / "adapter_config.json").write_text("{nope"),
            "adapter_config.json: not JSON",
        ),
        (
            lambda d: (d / "adapter_config.json").write_text("[1, 2]"),
            "not a peft LoRA adapter_config",
        ),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(
                (d / "adapter_model.safetensors").read_bytes()[:100]
            ),
            "not a readable safetensors",
        ),
        (
            lambda d: (d / "adapter_model.safetensors").write_bytes(b"\xff" * 8 + b"{}"),
            "not a readable safetensors",
        ),
        (
            lambda d: _rewrite(
                d / "adapter_model.safetensors",
                lambda t: {k: torch.zeros(3, 3) if "fc1.lora_A" in k else v for k, v in t.items()},
            ),
            "peft cannot load it",
        ),
        (
            lambda d: _rewrite(
                d / "adapter_model.safetensors", lambda t: {"foreign.weight": torch.ones(2)}
            ),
            "an adapter of another model",
        ),
        (
            lambda d: _rewrite(
                d / "adapter_model.safetensors",
                lambda t: {k: v * float("nan") for k, v in t.items()},
            ),
            "NaN or Inf",
        ),
        (
            lambda d: (d / "trained_modules.json").write_text('{"aliases": [1, 2]}'),
            "'aliases' metadata is not a mapping",
        ),
        (
            lambda d: (d / "trained_modules.json").write_text("{"),
            "'aliases' metadata is not JSON",
        ),
    ],
)
def test_damaged_adapter_folders_are_one_clear_error(tmp_path, damage, message):
    folder = _saved(tmp_path)
    damage(folder)
    with pytest.raises(TeacherError, match=message) as e:
        lora_mod.load_adapter(base(), folder)
    assert str(folder) in str(e.value) and "re-run the training stage" in str(e.value)


def test_a_rank_no_layer_can_hold_is_refused_before_allocating():
    with pytest.raises(TeacherError, match=r"lora.rank=100000 is larger .* at most 8"):
        lora_mod.apply_lora(base(), lora=LoraParams(rank=100_000), targets=TARGETS)


def test_sam_params_json_list_valued_or_not_json_is_a_clear_error(tmp_path):
    from teacher.sam.build import check_adapter_base

    (tmp_path / "params.json").write_text('{"sam": [1]}')
    with pytest.raises(TeacherError, match="params.json: 'sam' is not a mapping"):
        check_adapter_base(tmp_path, "tiny-random")
    (tmp_path / "params.json").write_text("nope")
    with pytest.raises(TeacherError, match="params.json: not JSON"):
        check_adapter_base(tmp_path, "tiny-random")
    (tmp_path / "params.json").write_text("[1]")
    check_adapter_base(tmp_path, "tiny-random")  # no 'sam' section: nothing to compare


# --- issue 13: adapter scale ------------------------------------------------------------------


def _scaled(tmp_path, scale, *, merge=False, train_modules=("class_embed.0",)):
    """The saved ``trained()`` adapter loaded at ``scale`` (merged into the weights or not)."""
    if not (tmp_path / "adapter_config.json").exists():
        lora_mod.save_adapter(trained(train_modules=list(train_modules)), tmp_path)
    model = lora_mod.load_adapter(base(), tmp_path, scale=scale).eval()
    return lora_mod.merge(model) if merge else model


@pytest.mark.parametrize("merge", [False, True])
def test_scale_0_is_the_base_model_and_1_the_adapter_bitwise(tmp_path, merge):
    with torch.no_grad():
        at_0 = _scaled(tmp_path, 0.0, merge=merge)(X)
        at_1 = _scaled(tmp_path, 1.0, merge=merge)(X)
        adapter = lora_mod.load_adapter(base(), tmp_path).eval()
        adapter = lora_mod.merge(adapter) if merge else adapter
        half = _scaled(tmp_path, 0.5, merge=merge)(X)
        reference, tuned = base()(X), adapter(X)
    if merge:  # merged at 0: the base weights exactly, so the base model's own computation
        assert torch.equal(at_0, reference)
    else:  # peft's module tree adds LoRA's zero: equal to within rounding
        torch.testing.assert_close(at_0, reference, rtol=1e-6, atol=1e-7)
    assert torch.equal(at_1, tuned)
    low, high = torch.minimum(reference, tuned), torch.maximum(reference, tuned)
    strictly = (half > low) & (half < high)
    assert strictly.any(), "scale 0.5 lies strictly between base and adapter nowhere"


def test_scale_blends_fully_trained_parameters_and_keeps_ties(tmp_path):
    inner = _scaled(tmp_path, 0.5, merge=True)
    tuned = lora_mod.merge(lora_mod.load_adapter(base(), tmp_path))
    reference = base()
    expected = 0.5 * reference.class_embed[0].weight + 0.5 * tuned.class_embed[0].weight
    torch.testing.assert_close(inner.class_embed[0].weight, expected, rtol=0, atol=1e-7)
    assert inner.class_embed[0] is inner.class_embed[1] is inner.decoder.class_embed[0]
    at_0 = _scaled(tmp_path, 0.0, merge=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(at_0.state_dict().values(), reference.state_dict().values(), strict=True)
    )


def test_scale_of_lora_inside_a_fully_trained_module(tmp_path):
    at_0 = _scaled(tmp_path, 0.0, merge=True, train_modules=("blocks.1",))
    reference = base()
    assert all(
        torch.equal(a, b)
        for a, b in zip(at_0.state_dict().values(), reference.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("scale", [-0.5, float("nan"), float("inf"), "half"])
def test_negative_or_non_finite_scales_are_refused(tmp_path, scale):
    lora_mod.save_adapter(trained(), tmp_path)
    with pytest.raises(TeacherError, match="adapter scale .* finite number >= 0"):
        lora_mod.load_adapter(base(), tmp_path, scale=scale)


def test_scale_above_1_extrapolates(tmp_path):
    with torch.no_grad():
        tuned = _scaled(tmp_path, 1.0, merge=True)
        at_2 = _scaled(tmp_path, 2.0, merge=True)
    reference = base()
    w = {
        n: at_2.get_parameter(n) - 2 * tuned.get_parameter(n) + reference.get_parameter(n)
        for n in ("class_embed.0.weight", "blocks.0.fc1.weight", "conv.weight")
    }
    for name, residue in w.items():  # W(2) = 2 W(1) - W(0), LoRA deltas and trained heads alike
        torch.testing.assert_close(residue, torch.zeros_like(residue), rtol=0, atol=1e-6, msg=name)

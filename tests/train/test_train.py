"""The shared training package (teacher.train) on a small real torch module (no mocks of the loop)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from teacher.core.digest import fingerprint
from teacher.core.errors import TeacherError
from teacher.core.params import TrainParams
from teacher.train import distributed, loop, memory
from teacher.train.loop import Task, epoch_batches, fit, lr_factor

# ------------------------------------------------------------------ a tiny regression task


class ToyData(torch.utils.data.Dataset):
    """y = x·w + noise; the noise depends on (seed, epoch, index) like the real datasets' augmentation."""

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 1.0
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2**31)
        return self.x[i] + 0.01 * torch.randn(4, generator=g), self.y[i]


def collate(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def toy_model(*, dropout: float = 0.1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1)
    )
    model[0].requires_grad_(False)  # a frozen "backbone"; BN and the head follow
    with torch.no_grad():  # give BN running stats that a non-frozen BN would change
        model[1].running_mean.fill_(0.1)
    return model


def mse_step(model, batch):
    x, y = batch
    pred = model(x).squeeze(-1)
    loss = ((pred - y) ** 2).mean()
    return {"loss": loss, "abs_err": (pred - y).abs().mean()}


VAL = ToyData(n=16, seed=99)


def evaluate(model):
    x, y = collate([VAL[i] for i in range(len(VAL))])
    with torch.no_grad():
        mse = float(((model(x).squeeze(-1) - y) ** 2).mean())
    return {"val_loss": mse, "val_score": -mse}


def save_weights(model, out_dir: Path):
    import os

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in model.state_dict().items()}, out_dir / "weights.pt")
    (out_dir / f"saved_by_rank_{os.environ.get('RANK', '0')}").write_text("")


def make_task(*, dropout: float = 0.1, evaluate_fn=evaluate, step_fn=mse_step, n: int = 24) -> Task:
    return Task(
        name="toy",
        model=toy_model(dropout=dropout),
        train_dataset=ToyData(n=n),
        collate_fn=collate,
        step=step_fn,
        validate=evaluate_fn,
        monitor="val_score",
        save=save_weights,
    )


TRAIN = TrainParams(epochs=4, batch_size=4, lr=0.2, warmup_steps=2, patience=0)


def run_fit(
    tmp: Path, task: Task | None = None, train: TrainParams = TRAIN, fp: str = "fp", **kw
) -> dict:
    return fit(
        task or make_task(),
        train=train,
        seed=7,
        out_dir=tmp / "out",
        checkpoint_dir=tmp / "ckpt",
        live_dir=tmp / "live",
        fingerprint=fp,
        **kw,
    )


def weights(tmp: Path) -> dict[str, torch.Tensor]:
    return torch.load(tmp / "out" / "weights.pt", weights_only=True)


class Interrupt(Exception):
    pass


def interrupting_evaluate(at_epoch: int):
    calls = {"n": 0}

    def fn(model):
        calls["n"] += 1
        if calls["n"] == at_epoch:
            raise Interrupt()
        return evaluate(model)

    return fn


# ------------------------------------------------------------------ pure helpers


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_factor(s, warmup=4, total=20) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:], strict=False))
    assert values[20] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, warmup=4, total=20) == pytest.approx(0.5)


def test_epoch_batches_are_seeded_and_shard_across_processes():
    one = epoch_batches(10, batch_size=3, seed=1, epoch=2)
    assert one == epoch_batches(10, batch_size=3, seed=1, epoch=2)
    assert one != epoch_batches(10, batch_size=3, seed=1, epoch=3)
    assert sorted(i for b in one for i in b) == list(range(10)) and len(one[-1]) == 1
    r0 = epoch_batches(10, batch_size=3, seed=1, epoch=2, rank=0, world=3)
    r1 = epoch_batches(10, batch_size=3, seed=1, epoch=2, rank=1, world=3)
    r2 = epoch_batches(10, batch_size=3, seed=1, epoch=2, rank=2, world=3)
    assert len(r0) == len(r1) == len(r2) == 2  # 4 batches wrapped to 6
    assert {i for b in r0 + r1 + r2 for i in b} == set(range(10))


def test_fingerprint_tracks_params_and_file_content(tmp_path):
    f = tmp_path / "train.json"
    f.write_text("a")
    base = fingerprint(TRAIN, {"seed": 1}, f)
    assert base == fingerprint(TRAIN, {"seed": 1}, f)
    assert base != fingerprint(dataclasses.replace(TRAIN, lr=0.1), {"seed": 1}, f)
    f.write_text("b")
    assert base != fingerprint(TRAIN, {"seed": 1}, f)


def test_precision_auto_is_fp32_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert loop.resolve_precision("auto") == "no"
    with pytest.raises(TeacherError, match="fp16 needs a CUDA GPU"):
        loop.resolve_precision("fp16")


# ------------------------------------------------------------------ the loop


def test_fit_learns_logs_saves_and_cleans_up(tmp_path):
    task = make_task()
    bn_before = task.model[1].running_mean.clone()
    untrained = evaluate(task.model.eval())["val_loss"]
    result = run_fit(tmp_path, task)
    assert result["val_loss"] < 0.5 * untrained
    assert result["epochs"] == 4 and result["steps"] == 4 * 6 and 1 <= result["best_epoch"] <= 4
    assert torch.equal(task.model[1].running_mean, bn_before)  # frozen BatchNorm
    assert (tmp_path / "out" / "weights.pt").exists()
    assert not (tmp_path / "ckpt").exists()  # removed after success
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["best"]["val_score"] == pytest.approx(result["val_score"])
    assert set(summary["train"]) == {"loss", "abs_err", "lr"}
    loss_rows = (
        (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    )
    assert len(loss_rows) == 1 + 24  # header + one row per optimizer step
    assert (
        len((tmp_path / "live" / "plots" / "metrics" / "val_loss.tsv").read_text().splitlines())
        == 5
    )


def test_model_ends_with_best_weights_and_early_stopping(tmp_path):
    scores = iter([1.0, 3.0, 2.0, 2.5, 2.9, 5.0])
    snapshots = []

    def scripted(model):
        snapshots.append(model[4].weight.detach().clone())
        return {"val_score": next(scores)}

    train = dataclasses.replace(TRAIN, epochs=6, patience=3)
    task = make_task(evaluate_fn=scripted)
    result = run_fit(tmp_path, task, train)
    assert result["epochs"] == 5 and result["best_epoch"] == 2 and result["val_score"] == 3.0
    assert torch.equal(task.model[4].weight, snapshots[1])
    assert torch.equal(weights(tmp_path)["4.weight"], snapshots[1])


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    a = make_task(dropout=0.0)
    run_fit(tmp_path / "a", a, dataclasses.replace(TRAIN, epochs=2, batch_size=4))
    b = make_task(dropout=0.0)
    run_fit(tmp_path / "b", b, dataclasses.replace(TRAIN, epochs=2, batch_size=2, grad_accum=2))
    # same permutation cut in 2s and grouped by 2 == cut in 4s; mean of two half-batch means
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def first_step_change(tmp: Path, clip_norm: float) -> float:
    train = dataclasses.replace(
        TRAIN,
        epochs=1,
        max_steps_per_epoch=1,
        clip_norm=clip_norm,
        lr=1.0,
        warmup_steps=0,
        weight_decay=0.0,
    )
    task = make_task(dropout=0.0)
    head = task.model[4].weight
    before = head.detach().clone()
    assert run_fit(tmp, task, train)["steps"] == 1
    return (head - before).abs().max().item()


def test_clipping_and_max_steps_per_epoch(tmp_path):
    # AdamW's first update is lr * g / (|g| + eps): ~lr unclipped; clipped to a norm far below
    # eps, the update nearly vanishes -- so clipping is applied before the optimizer step.
    assert first_step_change(tmp_path / "a", 0.0) == pytest.approx(1.0, rel=1e-3)
    assert first_step_change(tmp_path / "b", 1e-12) < 0.01


def test_bf16_autocast_on_cpu_after_an_fp32_fit(tmp_path):
    run_fit(tmp_path / "a", train=dataclasses.replace(TRAIN, epochs=1))
    seen = []

    def step(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return mse_step(model, batch)

    result = run_fit(
        tmp_path / "b",
        make_task(step_fn=step),
        dataclasses.replace(TRAIN, epochs=1, precision="bf16"),
    )
    assert seen and all(seen) and math.isfinite(result["val_loss"])


def test_nonfinite_loss_stops_naming_the_step(tmp_path):
    calls = {"n": 0}

    def bad_step(model, batch):
        calls["n"] += 1
        terms = mse_step(model, batch)
        if calls["n"] == 3:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    with pytest.raises(
        TeacherError, match=r"non-finite loss at epoch 1, optimizer step 3 .*loss=nan"
    ):
        run_fit(tmp_path, make_task(step_fn=bad_step))


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    run_fit(tmp_path / "full")
    full_w = weights(tmp_path / "full")
    full_metrics = json.loads((tmp_path / "full" / "live" / "metrics.json").read_text())

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        run_fit(part, make_task(evaluate_fn=interrupting_evaluate(3)))
    assert sorted(p.name for p in (part / "ckpt").iterdir()) == ["epoch-0001", "epoch-0002"]
    import shutil

    shutil.rmtree(part / "live")  # DVC deletes a stage's outputs before re-running it
    result = run_fit(part)
    for k, v in full_w.items():
        assert torch.equal(weights(part)[k], v), k
    assert json.loads((part / "live" / "metrics.json").read_text()) == full_metrics
    for tsv in ["train/loss.tsv", "train/lr.tsv", "val_loss.tsv"]:
        a = (tmp_path / "full" / "live" / "plots" / "metrics" / tsv).read_text()
        assert (part / "live" / "plots" / "metrics" / tsv).read_text() == a
    assert result["epochs"] == 4


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    run_fit(tmp_path / "full")
    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        run_fit(part, make_task(evaluate_fn=interrupting_evaluate(3)))
    state = part / "ckpt" / "epoch-0002" / "state.pt"
    state.write_bytes(state.read_bytes()[:-100])
    run_fit(part)
    out = capsys.readouterr().out
    assert "epoch-0002: checkpoint is damaged" in out and "resuming after epoch 1" in out
    for k, v in weights(tmp_path / "full").items():
        assert torch.equal(weights(part)[k], v), k


def test_changed_fingerprint_trains_from_scratch(tmp_path, capsys):
    with pytest.raises(Interrupt):
        run_fit(tmp_path, make_task(evaluate_fn=interrupting_evaluate(2)))
    result = run_fit(tmp_path, fp="other")
    assert "from other params or data; training from scratch" in capsys.readouterr().out
    assert result["epochs"] == 4 and result["steps"] == 24


def test_unwritable_checkpoint_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "ckpt"
    blocker.write_text("a file where the checkpoint folder should be")
    with pytest.raises(TeacherError, match="cannot write a checkpoint"):
        run_fit(tmp_path)
    assert blocker.read_text().startswith("a file")


# ------------------------------------------------------------------ two processes


def train_toy(tmp: str, batch_size: int) -> dict:
    """Module-level so spawned processes can import it."""
    train = dataclasses.replace(TRAIN, epochs=2, batch_size=batch_size)
    return run_fit(Path(tmp), make_task(dropout=0.0), train)


def test_two_cpu_processes_agree_with_one(tmp_path):
    # 2 processes x batch 2 average the same 4 samples per step as 1 process x batch 4
    # (epoch_batches deals consecutive batches of one permutation to the processes).
    one = distributed.launch(train_toy, processes=1, args=(str(tmp_path / "one"), 4))
    two = distributed.launch(
        train_toy, processes=2, kwargs={"tmp": str(tmp_path / "two"), "batch_size": 2}
    )
    assert two["steps"] == one["steps"] == 12
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)  # float reduction order only
    assert sorted(p.name for p in (tmp_path / "two" / "out").iterdir()) == [
        "saved_by_rank_0",
        "weights.pt",
    ]
    for k, v in weights(tmp_path / "one").items():
        torch.testing.assert_close(weights(tmp_path / "two")[k], v, rtol=1e-4, atol=1e-5)
    rows = (tmp_path / "two" / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text()
    assert len(rows.splitlines()) == 1 + 12  # logged once, by the main process


# ------------------------------------------------------------------ faults and helpers


def test_record_goes_into_the_metrics_summary(tmp_path):
    run_fit(
        tmp_path,
        train=dataclasses.replace(TRAIN, epochs=1),
        record={"augment": {"hflip": 0.5, "reasons": ["a", "b"]}, "classes": 4},
    )
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert summary["augment"] == {"hflip": 0.5, "reasons": "a; b"} and summary["classes"] == 4


def test_unwritable_output_keeps_the_checkpoint_for_a_rerun(tmp_path):
    (tmp_path / "out").write_text("a file where the adapter folder should be")
    with pytest.raises(TeacherError, match="cannot write the trained model"):
        run_fit(tmp_path)
    assert (tmp_path / "ckpt" / "epoch-0004").is_dir()
    (tmp_path / "out").unlink()
    result = run_fit(tmp_path)  # resumes at the end: nothing left to train, saves the best
    assert result["epochs"] == 4 and (tmp_path / "out" / "weights.pt").exists()
    run_fit(tmp_path / "full")
    for k, v in weights(tmp_path / "full").items():
        assert torch.equal(weights(tmp_path)[k], v), k


def test_checkpoint_layers_keeps_gradients_and_kwargs():
    def grads(wrap: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        layers[0].weight.requires_grad_(False)
        if wrap:
            assert memory.checkpoint_layers(layers) == 2
        x = torch.randn(3, 4)
        y = layers[1](layers[0](input=x))  # keyword argument passes through
        y.square().sum().backward()
        return [p.grad.clone() for p in layers.parameters() if p.requires_grad]

    for a, b in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(a, b)


def test_run_without_grad_keeps_no_graph_and_refuses_trainable_parts():
    frozen = nn.Linear(4, 4).requires_grad_(False)
    memory.run_without_grad(frozen)
    assert not frozen(torch.randn(2, 4, requires_grad=True)).requires_grad
    with pytest.raises(TeacherError, match="has trainable parameters"):
        memory.run_without_grad(nn.Linear(2, 2))


KILL_SCRIPT = """
import sys, time
sys.path[:0] = [{tests!r}, {here!r}]
from pathlib import Path
import test_train as t
def slow(model, calls=[0]):
    calls[0] += 1
    if calls[0] == 3:
        time.sleep(120)  # killed here, after the epoch-2 checkpoint
    return t.evaluate(model)
t.run_fit(Path({tmp!r}), t.make_task(evaluate_fn=slow))
"""


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
    import subprocess
    import sys
    import time

    run_fit(tmp_path / "full")
    part = tmp_path / "part"
    here = Path(__file__).parent
    script = KILL_SCRIPT.format(tests=str(here.parent), here=str(here), tmp=str(part))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (part / "ckpt" / "epoch-0002").exists():
        assert proc.poll() is None and time.time() < deadline, "training process ended early"
        time.sleep(0.2)
    proc.kill()  # SIGKILL
    proc.wait()
    result = run_fit(part)
    assert result["epochs"] == 4
    for k, v in weights(tmp_path / "full").items():
        assert torch.equal(weights(part)[k], v), k
    assert json.loads((part / "live" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "full" / "live" / "metrics.json").read_text()
    )


def test_live_in_a_git_repo_without_commits_says_how_to_fix(tmp_path, monkeypatch):
    import subprocess

    from teacher.core.errors import TeacherError
    from teacher.train.live import open_live

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TeacherError, match="without commits.*git commit"):
        open_live(tmp_path / "live", {"steps": [], "epochs": []}, None)


def test_run_fingerprint_covers_image_content_not_the_folder_path(tmp_path):
    """A checkpoint belongs to the images' bytes: editing one invalidates it, moving the folder
    (same files) does not."""
    from teacher.core.digest import images_digest

    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "sub/b.png"}]}
    for root in (tmp_path / "one", tmp_path / "two"):
        (root / "sub").mkdir(parents=True)
        (root / "a.png").write_bytes(b"first image")
        (root / "sub" / "b.png").write_bytes(b"second image")
    assert images_digest(tmp_path / "one", coco) == images_digest(tmp_path / "two", coco)
    before = images_digest(tmp_path / "one", coco)
    (tmp_path / "one" / "sub" / "b.png").write_bytes(b"second image, edited")
    assert images_digest(tmp_path / "one", coco) != before
    (tmp_path / "two" / "a.png").unlink()
    assert images_digest(tmp_path / "two", coco) != images_digest(tmp_path / "one", coco)


def test_a_second_training_of_the_same_stage_is_refused(tmp_path):
    """Issue 16: kill -9 of dvc left the stage running and a second dvc repro trained a second
    copy into the same folders. The lock beside the checkpoint folder refuses the second."""
    import os
    import subprocess
    import sys

    from teacher.train.checkpoints import training_lock

    ckpt = tmp_path / "checkpoints" / "train_dino"
    with training_lock(ckpt):
        with pytest.raises(
            TeacherError,
            match=rf"another training of this stage is running \(process {os.getpid()}",
        ):
            with training_lock(ckpt):
                pass
        code = (
            "import sys; from teacher.train.checkpoints import training_lock\n"
            f"with training_lock({str(ckpt)!r}): pass\n"
        )
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and "another training" in other.stderr
    with training_lock(ckpt):  # released when the holder ends
        pass


# ------------------------------------------------------------------ EMA of the weights (Task.ema)


class RfDetrModelEma:
    """rf-detr's ModelEma (rfdetr/util/utils.py), as written there: the reference."""

    def __init__(self, model, decay=0.9997, tau=0):
        import copy

        self.module = copy.deepcopy(model)
        self.decay, self.tau, self.updates = decay, tau, 1

    def _get_decay(self):
        return (
            self.decay if self.tau == 0 else self.decay * (1 - math.exp(-self.updates / self.tau))
        )

    def update(self, model):
        decay = self._get_decay()
        with torch.no_grad():
            for ema_v, model_v in zip(
                self.module.state_dict().values(), model.state_dict().values(), strict=True
            ):
                ema_v.copy_(decay * ema_v + (1.0 - decay) * model_v)
        self.updates += 1


def test_ema_follows_rf_detr_model_ema_step_by_step():
    model = toy_model()
    params = loop.trainable_parameters(model)
    ours = loop.Ema(params, decay=0.993, tau=100)
    ref = RfDetrModelEma(model, decay=0.993, tau=100)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        with torch.no_grad():
            for _, p in params:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        ours.update(params)
        ref.update(model)
    ref_state = dict(ref.module.named_parameters())
    for name, _ in params:
        assert torch.allclose(ours.shadow[name], ref_state[name], rtol=1e-5, atol=1e-6), name
    assert ours.updates == 250


def ema_task(**kw) -> Task:
    return dataclasses.replace(make_task(**kw), ema=(0.9, 3))


def test_validation_keeps_the_better_of_the_ema_and_the_trained_weights(tmp_path):
    result = run_fit(tmp_path, ema_task())
    epochs = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert "ema_val_score" in epochs and "regular_val_score" in epochs
    model = toy_model()
    model.load_state_dict(weights(tmp_path))
    model.eval()
    # the saved weights are the ones that scored the best epoch, EMA or not
    assert evaluate(model)["val_score"] == pytest.approx(result["val_score"], rel=1e-6)
    assert result["val_score"] == max(result["ema_val_score"], result["regular_val_score"])


def test_resume_with_ema_equals_uninterrupted_run(tmp_path):
    run_fit(tmp_path / "full", ema_task())
    part = tmp_path / "part"
    with pytest.raises(Interrupt):  # two validations per epoch: trained, then EMA weights
        run_fit(part, ema_task(evaluate_fn=interrupting_evaluate(5)))
    import shutil

    shutil.rmtree(part / "live")
    run_fit(part, ema_task())
    for k, v in weights(tmp_path / "full").items():
        assert torch.equal(weights(part)[k], v), k
    full = json.loads((tmp_path / "full" / "live" / "metrics.json").read_text())
    assert json.loads((part / "live" / "metrics.json").read_text()) == full

"""teacher.proving.gpu_check (``make bench-gpu``): its CPU dry run end to end through
scripts/gpu_check.py (every section, the JSON it writes), and its pure parts (rows, the skip on
out-of-memory, the bars, the table) on hand-made rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"
ENV = {
    "gpu": "NVIDIA H100",
    "torch": "2.9.0",
    "cuda": "12.8",
    "peak_memory": "torch.cuda.max_memory_allocated",
    "train_dtype": "bf16 autocast",
}


@pytest.fixture(scope="module")
def gpu_check():
    from teacher.proving import gpu_check

    return gpu_check


def measured(gpu_check, section, model, mode, batch, **numbers):
    """A row as the parent assembles it, with ``numbers`` filled in and status ok."""
    row = gpu_check.base_row(gpu_check.Measurement(section, model, mode, batch), ENV)
    return {**row, "status": "ok", **numbers}


@pytest.mark.slow  # ~30 s on 2 cores: five processes, every section at toy size
def test_dry_run_measures_every_section_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["dry_run"] is True
    sections = report["sections"]
    assert set(sections) == {"dino", "sam", "predict", "student"}
    for name, rows in sections.items():
        assert rows, f"section {name} has no rows"
        for row in rows:
            where = f"{name} {row['model']} {row['mode']} batch {row['batch']}"
            assert row["gpu"] == "cpu (dry run)" and row["peak_memory"] == "process peak RSS", where
            assert row["torch"] and row["cuda"] and row["dtype"] == "float32", where
            assert row["status"] == "dry run", where
            time_key = (
                "ms_per_image"
                if row["mode"] in ("predict", "pytorch", "onnxruntime")
                else "step_ms"
            )
            for key in (time_key, "images_per_s", "peak_mib"):
                assert row[key] is not None and row[key] > 0, f"{where}: {key} = {row[key]}"
            for key in ("vs_full", "trainable"):
                assert row[key] is None or row[key] > 0, f"{where}: {key} = {row[key]}"
    modes = {(r["mode"], r["batch"]) for r in sections["dino"]}
    assert modes == {(m, b) for m in ("lora", "lora+ckpt", "full") for b in (2, 4)}
    assert {(r["model"], r["mode"]) for r in sections["sam"]} >= {
        ("vit_b", "decoder"),
        ("vit_h", "full"),
    }
    assert {r["batch"] for r in sections["predict"]} == {1, 8}
    assert {r["mode"] for r in sections["student"]} == {"train", "pytorch", "onnxruntime"}
    assert all(r["vs_full"] is not None for r in sections["dino"] if r["mode"] != "full")
    assert report["bars"] and {b["verdict"] for b in report["bars"]} == {"not applicable (dry run)"}
    assert "| section | model" in done.stdout and "not applicable (dry run)" in done.stdout


def test_out_of_memory_skips_the_row_and_other_errors_fail_it(gpu_check):
    import torch

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def broken():
        raise ValueError("shapes do not match\nmore detail")

    assert gpu_check.measure_safely(oom, dry_run=False) == {"status": "skipped: out of memory"}
    assert gpu_check.measure_safely(broken, dry_run=False)["status"] == (
        "failed: ValueError: shapes do not match"
    )
    ok = gpu_check.measure_safely(lambda: {"step_ms": 5.0}, dry_run=True)
    assert ok == {"status": "dry run", "step_ms": 5.0}
    stderr = "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20 GiB\n"
    assert gpu_check.failed_status(1, stderr) == "skipped: out of memory"
    assert gpu_check.failed_status(1, "RuntimeError: CUBLAS_STATUS_ALLOC_FAILED") == (
        "skipped: out of memory"
    )
    assert gpu_check.failed_status(-9, "") == "failed: killed by signal 9"
    assert gpu_check.failed_status(1, "boom\nKeyError: 'x'\n") == "failed: exit 1: KeyError: 'x'"


def test_a_job_past_its_section_cap_is_skipped_with_its_environment(gpu_check):
    job = [gpu_check.Measurement("student", "rf-detr-nano", m, 1) for m in ("train", "pytorch")]
    rows = gpu_check.run_job(job, env=ENV, steps=3, timeout=0)
    assert [r["status"] for r in rows] == ["skipped: time cap"] * 2
    assert [r["dtype"] for r in rows] == ["bf16 autocast", "float32"]  # training vs inference
    assert all(r["gpu"] == "NVIDIA H100" and r["cuda"] == "12.8" for r in rows)
    assert all(r["step_ms"] is None and r["peak_mib"] is None for r in rows)


def test_every_training_row_is_compared_with_full_fine_tuning_of_its_model_and_batch(gpu_check):
    rows = [
        measured(gpu_check, "dino", "grounding-dino-tiny", "lora", 2, peak_mib=6000.0),
        measured(gpu_check, "dino", "grounding-dino-tiny", "full", 2, peak_mib=20000.0),
        measured(gpu_check, "dino", "grounding-dino-tiny", "lora", 4, peak_mib=9000.0),  # no full
        measured(gpu_check, "sam", "vit_b", "decoder", 2, peak_mib=3000.0),
        measured(gpu_check, "sam", "vit_b", "full", 2, peak_mib=12000.0),
    ]
    ratios = [r["vs_full"] for r in gpu_check.add_full_ratios(rows)]
    assert ratios == [pytest.approx(0.3), None, None, pytest.approx(0.25), None]


def test_bars_are_met_missed_unmeasured_or_not_applicable(gpu_check):
    mib = 1024
    rows = gpu_check.add_full_ratios(
        [
            measured(gpu_check, "dino", "grounding-dino-tiny", "lora", 2, peak_mib=13.9 * mib),
            measured(gpu_check, "dino", "grounding-dino-tiny", "full", 2, peak_mib=20 * mib),
            measured(gpu_check, "sam", "vit_h", "lora", 2, peak_mib=9 * mib),
            measured(gpu_check, "sam", "vit_h", "full", 2, peak_mib=30 * mib),
            {
                **measured(gpu_check, "sam", "vit_b", "lora+ckpt", 2),
                "status": "skipped: out of memory",
            },
            measured(gpu_check, "sam", "vit_b", "decoder", 2, peak_mib=mib),  # no bar names it
        ]
    )
    verdicts = {
        (c["bar"], c["row"]): c["verdict"] for c in gpu_check.check_bars(rows, dry_run=False)
    }
    assert verdicts == {
        ("Grounding DINO LoRA peak <= 14 GiB", "grounding-dino-tiny lora batch 2"): "met",
        ("SAM LoRA peak <= 8 GiB", "vit_h lora batch 2"): "NOT met",
        (
            "SAM LoRA peak <= 8 GiB",
            "vit_b lora+ckpt batch 2",
        ): "not measured (skipped: out of memory)",
        ("LoRA / full peak <= 0.5", "grounding-dino-tiny lora batch 2"): "NOT met",  # 0.695
        ("LoRA / full peak <= 0.5", "vit_h lora batch 2"): "met",  # 0.3
        (
            "LoRA / full peak <= 0.5",
            "vit_b lora+ckpt batch 2",
        ): "not measured (skipped: out of memory)",
    }
    dry = gpu_check.check_bars(rows, dry_run=True)
    assert len(dry) == len(verdicts)
    assert {c["verdict"] for c in dry} == {"not applicable (dry run)"}
    printed = gpu_check.format_bars(dry)
    assert printed.count("\n") == len(dry) + 1 and "14 GiB" in printed


def test_the_table_has_one_line_per_row_and_dashes_for_what_was_not_measured(gpu_check):
    rows = [
        {
            **measured(gpu_check, "dino", "grounding-dino-tiny", "lora", 2),
            "input": "800x1333",
            "step_ms": 812.345,
            "images_per_s": 2.46,
            "peak_mib": 12345.6,
        },
        {**measured(gpu_check, "sam", "vit_h", "full", 2), "status": "skipped: out of memory"},
    ]
    lines = gpu_check.format_table(rows).splitlines()
    assert lines[0] == "NVIDIA H100, torch 2.9.0, CUDA 12.8; peak: torch.cuda.max_memory_allocated"
    assert len(lines) == 2 + 1 + len(rows)  # title, header, rule, rows
    assert len({len(line) for line in lines[1:]}) == 1  # columns padded alike
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells == [
        "dino", "grounding-dino-tiny", "lora", "800x1333", "2", "bf16 autocast",
        "812.3", "-", "2.5", "12,346", "-", "ok",
    ]  # fmt: skip
    assert lines[4].rstrip().endswith("| skipped: out of memory |")
    assert lines[4].count("| - ") >= 6


def test_on_a_gpu_each_training_measurement_has_a_process_of_its_own(gpu_check):
    gpu, dry = gpu_check.plan(dry_run=False), gpu_check.plan(dry_run=True)
    for jobs in gpu.values():
        for job in jobs:
            assert len(job) == 1 or all(m.mode in gpu_check.INFERENCE_MODES for m in job), job
    assert all(len(jobs) == 1 for jobs in dry.values())  # the dry run: one process per section
    assert {name: [m for job in jobs for m in job] for name, jobs in gpu.items()} == {
        name: jobs[0] for name, jobs in dry.items()
    }  # the same rows
    assert set(gpu) == set(gpu_check.SECTION_SHARES)
    assert sum(gpu_check.SECTION_SHARES.values()) == pytest.approx(1.0)

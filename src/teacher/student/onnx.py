"""The student as ONNX: export a trained student folder, run it with ONNX Runtime.

``export_onnx`` writes ``<out>/student.onnx`` (input ``pixel_values`` (B, 3, R, R) float32, batch
dynamic; outputs ``logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) and, for a segmenting student,
``pred_masks`` (B, Q, R/4, R/4)) and ``<out>/student.json`` (classes, input side). Pre- and
post-processing stay outside the graph (:func:`teacher.student.model.preprocess` /
:func:`~teacher.student.model.decode`), the same code for PyTorch and ONNX, so both give the
same detections up to float rounding.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from teacher.core.errors import TeacherError
from teacher.student.model import (
    INFO_FILE,
    Student,
    fixed_position_embeddings,
    load_info,
    load_student,
)

ONNX_FILE = "student.onnx"
OPSET = 17
OUTPUTS = ("logits", "pred_boxes", "pred_masks")


def export_onnx(student_dir: str | Path, out_dir: str | Path, *, opset: int = OPSET) -> Path:
    """Export the trained student of ``student_dir`` to ``out_dir/student.onnx`` (+ student.json)."""
    student_dir, out_dir = Path(student_dir), Path(out_dir)
    student = load_student(student_dir)
    module: Any = student.forward
    info = student.info
    out_dir.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, 3, info.resolution, info.resolution)
    names = list(OUTPUTS[: 3 if info.masks else 2])
    target = out_dir / ONNX_FILE
    tmp = target.with_suffix(".onnx.tmp")
    with fixed_position_embeddings(module, info.resolution), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic: sizes are fixed
        torch.onnx.export(
            module,
            (dummy,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=names,
            dynamic_axes={"pixel_values": {0: "batch"}, **{n: {0: "batch"} for n in names}},
        )
    tmp.replace(target)
    shutil.copyfile(student_dir / INFO_FILE, out_dir / INFO_FILE)
    return target


class OnnxStudent:
    """An ONNX Runtime session called like the PyTorch student: tensors in, tensors out."""

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort  # type: ignore[import-untyped]

        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(
                str(self.path), providers=ort.get_available_providers()
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise TeacherError(
                f"{self.path}: not a loadable ONNX model ({e}); export it again with "
                "`teacher export --student --format onnx`"
            ) from e

    def __call__(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        x = pixel_values.detach().cpu().numpy().astype(np.float32)
        return tuple(torch.from_numpy(o) for o in self.session.run(None, {"pixel_values": x}))


def load_any_student(path: str | Path, *, device: torch.device | str = "cpu") -> Student:
    """A student from a trained folder (PyTorch), an export folder holding ``student.onnx``, or
    a ``.onnx`` file with ``student.json`` beside it (ONNX Runtime)."""
    path = Path(path)
    if path.suffix == ".onnx" and path.is_file():
        return Student(forward=OnnxStudent(path), info=load_info(path.parent))
    if (path / ONNX_FILE).is_file():
        return Student(forward=OnnxStudent(path / ONNX_FILE), info=load_info(path))
    if path.is_dir():
        return load_student(path, device=device)
    raise TeacherError(
        f"{path}: no student here; pass models/student (PyTorch) or a folder "
        "written by `teacher export --student --format onnx`"
    )

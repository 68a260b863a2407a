"""Memory helpers: recompute activations in backward, run frozen parts without autograd."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from teacher.core.errors import TeacherError


def checkpoint_layers(layers: Iterable[nn.Module]) -> int:
    """Recompute each layer's forward during backward (``torch.utils.checkpoint``, non-reentrant).

    Trades compute for activation memory. Only active when grad is enabled and the layer is in
    training mode; keyword arguments pass through (the reentrant form rejects them and can
    silently leave LoRA inside the layer without gradients). Returns the number of layers wrapped.
    """
    n = 0
    for layer in layers:
        if getattr(layer, "_teacher_checkpointed", False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer, layer.forward)
        setattr(layer, "_teacher_checkpointed", True)  # noqa: B010 (nn.Module attrs are typed Tensor | Module)
        n += 1
    return n


def _checkpointed_forward(layer: nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> Any:
    if layer.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def run_without_grad(module: nn.Module) -> nn.Module:
    """Make a frozen module's forward run under ``torch.no_grad`` (no activations kept for backward).

    For parts no LoRA reaches and whose inputs need no gradient (e.g. an image backbone).
    Raises TeacherError if the module has trainable parameters.
    """
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    if trainable:
        raise TeacherError(
            f"run_without_grad: {type(module).__name__} has trainable parameters "
            f"{trainable[:5]}; only frozen parts may run without autograd"
        )
    forward = module.forward
    module.forward = functools.partial(_no_grad_forward, forward)
    return module


def _no_grad_forward(forward: Callable, *args: Any, **kwargs: Any) -> Any:
    with torch.no_grad():
        return forward(*args, **kwargs)

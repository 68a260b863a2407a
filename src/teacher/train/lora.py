"""LoRA adapters through peft: apply from params, verify what is frozen, save and load.

Model-agnostic: both teachers (Grounding DINO, SAM) call these functions. Modules are chosen
by their full names in the base model (``named_modules()``): a regex (full match) or a list of
names (exact, or a suffix after a dot, as peft matches).

Fully trained modules (``train_modules``, e.g. detection heads or SAM's mask decoder) are not
put in peft's ``modules_to_save`` (peft silently drops LoRA targets inside those). Their
parameters are marked trainable and saved once, in peft's ``adapter_model.safetensors`` under
their base-model names (``base_model.model.<name>``), which peft passes through to
``load_state_dict``: a plain ``PeftModel.from_pretrained`` loads them too. One tensor per
distinct parameter: tied parameters are stored under their first name, every alias name is
recorded in ``trained_modules.json`` (:data:`teacher.core.artifacts.TRAINED_ALIASES_FILE`) and
restored by name on load. Not in the weights file's metadata: safetensors writes a metadata
map of two or more keys in hash order, which changes from process to process, and an adapter
must be the same bytes however often training was interrupted and resumed.
Folders written before held them a second time in ``trained_modules.safetensors``
(:data:`teacher.core.artifacts.TRAINED_MODULES_FILE`); such a file is still read when present.

Adapter scale (:func:`load_adapter`'s ``scale``, the one place it is applied; evaluate, predict,
export and serve all load through it): s multiplies every LoRA delta (peft's per-layer
``scaling``), and a fully trained parameter becomes ``(1 - s) * W_base + s * W_trained``. s = 0 is
the base model, s = 1 the adapter as trained, values between blend the two (WiSE-FT), above 1
extrapolate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from teacher.core.artifacts import TRAINED_ALIASES_FILE, TRAINED_MODULES_FILE
from teacher.core.errors import TeacherError
from teacher.core.params import LoraParams, lora_pattern

PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # peft's file name (safe_serialization)
PEFT_PREFIX = "base_model.model."  # what peft prefixes base-model names with in that file
LORA_TAG = "lora_"  # peft's LoRA parameter names contain lora_A / lora_B / lora_embedding_*
_LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)

Targets = str | Sequence[str]


def matches(name: str, targets: Targets) -> bool:
    """Whether module ``name`` is selected by ``targets`` (preset names, or regex: full match;
    list: exact or suffix)."""
    targets = lora_pattern(targets)
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def candidate_names(model: nn.Module, *, limit: int = 60) -> list[str]:
    """Names of modules LoRA can wrap (Linear/Conv/Embedding), layer indexes collapsed to ``N``."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, _LORA_TYPES):
            seen.setdefault(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", name), None)
    names = list(seen)
    return names[:limit] + ([f"... ({len(names) - limit} more)"] if len(names) > limit else [])


def _matched_modules(model: nn.Module, targets: Targets) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if n and isinstance(m, _LORA_TYPES) and matches(n, targets)
    ]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameter elements; tied parameters counted once."""
    params = list(model.parameters())  # parameters() yields each shared Parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _no_match_error(model: nn.Module, targets: Targets, what: str) -> TeacherError:
    return TeacherError(
        f"{what} {targets!r} matches no module of {type(model).__name__}. Candidate module "
        f"names (N = any layer index): {', '.join(candidate_names(model))}. Fix the targets in "
        "params.yaml (a regex matched against the full module name, or a list of names)."
    )


def apply_lora(
    model: nn.Module,
    *,
    lora: LoraParams,
    targets: Targets,
    train_modules: Targets | None = None,
) -> PeftModel:
    """Wrap ``model`` with LoRA on the modules matching ``targets``; train ``train_modules`` fully.

    Every other base parameter is frozen. Raises TeacherError when no module matches, or when a
    base parameter outside ``train_modules`` is left trainable. Logs trainable / total counts.
    """
    targets = lora_pattern(targets)
    names = _matched_modules(model, targets)
    if not names:
        raise _no_match_error(model, targets, "LoRA targets")
    check_rank(model, names, rank=lora.rank)
    # peft gets the exact names: containers the pattern also matches are skipped, and a list
    # entry cannot suffix-match more than we counted.
    config = LoraConfig(
        # peft annotates lora_alpha as int but only divides by it (scaling = alpha / r); a
        # non-integral alpha is valid
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        target_modules="|".join(re.escape(n) for n in names),
        bias="none",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. a target that is a container, not a Linear/Conv
        raise TeacherError(f"LoRA targets {targets!r}: peft refused them: {e}") from e
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise TeacherError(
            f"lora.rank={lora.rank}: the LoRA weights do not fit in memory; "
            "choose a smaller lora.rank (4 to 64 is usual)"
        ) from e
    trained = _mark_trained(peft_model, train_modules)
    _verify_frozen(peft_model, trained)
    trainable, total = count_parameters(peft_model)
    print(
        f"LoRA: {trainable:,} trainable / {total:,} total parameters "
        f"({100.0 * trainable / max(total, 1):.3f}%), {len(names)} modules wrapped"
    )
    return peft_model


def module_sides(module: nn.Module) -> tuple[int, int]:
    """(input, output) width of a Linear / Conv / Embedding layer."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return int(getattr(module, "in_channels")), int(getattr(module, "out_channels"))  # noqa: B009


def check_rank(model: nn.Module, names: Sequence[str], *, rank: int) -> None:
    """``TeacherError`` when ``rank`` exceeds every targeted layer's smaller side: such a rank
    adds nothing (a layer's update has at most that rank) and can be too large to allocate."""
    modules = dict(model.named_modules())
    widest = max(
        (min(module_sides(modules[n])) for n in names if isinstance(modules[n], _LORA_TYPES)),
        default=None,
    )
    if widest is not None and rank > widest:
        raise TeacherError(
            f"lora.rank={rank} is larger than every targeted layer allows (the "
            f"largest holds rank {widest}); set lora.rank to at most {widest} "
            "(4 to 64 is usual)"
        )


def _mark_trained(peft_model: PeftModel, train_modules: Targets | None) -> set[int]:
    """Set requires_grad on every parameter under a module matching ``train_modules``.

    Returns the ids of those parameters (a tied parameter is one object under several names).
    """
    if not train_modules:
        return set()
    base = peft_model.get_base_model()
    train_modules = train_modules if isinstance(train_modules, str) else list(train_modules)
    names = {n for n, _ in base.named_modules() if n and matches(n, train_modules)}
    if not names:
        raise _no_match_error(base, train_modules, "Fully trained modules")
    trained = set()
    for name, param in base.named_parameters(remove_duplicate=False):
        if any(name.startswith(f"{m}.") for m in names):
            param.requires_grad_(True)
            trained.add(id(param))
    return trained


def _verify_frozen(peft_model: PeftModel, trained: set[int]) -> None:
    base = peft_model.get_base_model()
    loose = [
        n
        for n, p in base.named_parameters(remove_duplicate=False)
        if p.requires_grad and LORA_TAG not in n and id(p) not in trained
    ]
    if loose:
        raise TeacherError(f"LoRA: base parameters left trainable: {loose[:10]} (internal error)")
    if not any(LORA_TAG in n for n, _ in base.named_parameters()):
        raise TeacherError("LoRA: no LoRA parameters were created (internal error)")


def trained_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Fully trained (non-LoRA, requires_grad) parameters: canonical name -> all alias names.

    Tied parameters (one tensor reachable under several names) are grouped by storage.
    """
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    groups: dict[tuple, list[str]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        if param.requires_grad and LORA_TAG not in name:
            ptr = param.data_ptr()  # same storage and shape = the same tensor under two names
            key = (ptr, tuple(param.shape), param.stride()) if ptr else ("id", id(param))
            groups.setdefault(key, []).append(name)
    return {names[0]: names for names in groups.values()}


def save_adapter(model: PeftModel, out_dir: Path | str) -> None:
    """Write ``adapter_model.safetensors`` (LoRA and the fully trained parameters) and
    ``adapter_config.json`` to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / TRAINED_MODULES_FILE).unlink(missing_ok=True)  # an older layout's second copy
    aliases = out_dir / TRAINED_ALIASES_FILE
    groups = trained_parameters(model)
    if not groups:
        aliases.unlink(missing_ok=True)
        return
    base = model.get_base_model()
    tensors = {n: base.get_parameter(n).detach().cpu().contiguous().clone() for n in groups}
    _add_to_peft_file(out_dir / PEFT_WEIGHTS_FILE, tensors)
    aliases.write_text(json.dumps({"aliases": groups}, indent=1) + "\n", encoding="utf-8")


def _add_to_peft_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Put fully trained tensors into peft's weights file under ``base_model.model.<name>``.

    peft's ``set_peft_model_state_dict`` passes keys that are no adapter parameter through to
    ``load_state_dict``, so plain ``PeftModel.from_pretrained`` restores them (one name per tied
    tensor suffices: its aliases share the parameter).
    """
    metadata = _metadata(path)  # peft's one key ("format"): one key keeps the bytes the same
    weights = load_file(str(path))
    weights.update({f"{PEFT_PREFIX}{n}": t for n, t in tensors.items()})
    save_file(weights, str(path), metadata=metadata)


def _metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata; an unreadable file is a ``TeacherError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors' own error types (SafetensorError, ...)
        raise _damaged(path, f"not a readable safetensors file ({e})") from None


def trained_tensors(
    adapter_dir: Path | str, *, weights: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]], Path]:
    """An adapter folder's fully trained tensors by base-model name, their alias names, and the
    file they were read from: peft's weights file (``weights``, when the caller has read it
    already; aliases from ``trained_modules.json``), or ``trained_modules.safetensors`` in a
    folder written before the trained tensors were stored once (its copy and its "aliases"
    metadata are the ones read)."""
    adapter_dir = Path(adapter_dir)
    legacy = adapter_dir / TRAINED_MODULES_FILE
    if legacy.exists():
        raw = _metadata(legacy).get("aliases", "{}")
        return read_weights(legacy), _aliases(legacy, _json(legacy, raw)), legacy
    path = adapter_dir / PEFT_WEIGHTS_FILE
    tensors = {
        n.removeprefix(PEFT_PREFIX): t
        for n, t in (read_weights(path) if weights is None else weights).items()
        if n.startswith(PEFT_PREFIX) and LORA_TAG not in n
    }
    aliases = adapter_dir / TRAINED_ALIASES_FILE
    if not aliases.is_file():
        return tensors, {}, path  # no tied parameters: each name is its own
    doc = _json(aliases, aliases.read_bytes())
    return tensors, _aliases(aliases, doc.get("aliases") if isinstance(doc, dict) else None), path


def _json(path: Path, raw: str | bytes) -> Any:
    """``raw`` parsed as JSON; anything else is a ``TeacherError`` naming ``path``."""
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _damaged(path, "its 'aliases' metadata is not JSON") from None


def load_trained_modules(
    model: nn.Module,
    adapter_dir: Path | str,
    *,
    trainable: bool = False,
    weights: dict[str, torch.Tensor] | None = None,
) -> int:
    """Copy the folder's fully trained tensors (:func:`trained_tensors`) into ``model`` by name,
    every alias; returns tensors read."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    tensors, aliases, path = trained_tensors(adapter_dir, weights=weights)
    for name, tensor in tensors.items():
        for alias in aliases.get(name, [name]):
            param = _get_parameter(base, alias, path)
            with torch.no_grad():
                param.copy_(tensor.to(param.device, param.dtype))
            param.requires_grad_(trainable)
    return len(tensors)


def _damaged(path: Path, why: str) -> TeacherError:
    return TeacherError(
        f"{path}: {why}; re-run the training stage (dvc repro) or point "
        "--adapters at a folder it wrote"
    )


def _aliases(path: Path, aliases: Any) -> dict[str, list[str]]:
    """Parsed alias metadata of a trained-modules file, checked: {name: [names]}; damage is an
    error."""
    if not (
        isinstance(aliases, dict)
        and all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in aliases.values()
        )
    ):
        raise _damaged(path, "its 'aliases' metadata is not a mapping of names to name lists")
    return aliases


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, every one finite. A truncated or oversized header, a
    file that is not safetensors, or NaN / Inf weights (a diverged training) is a
    ``TeacherError`` naming the file: such an adapter would silently predict nothing."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors' own error types (SafetensorError, ...)
        raise _damaged(path, f"not a readable safetensors file ({e})") from None
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise _damaged(
            path,
            f"{len(bad)} tensor(s) hold NaN or Inf (e.g. {bad[0]}): the "
            "training diverged; lower train.lr, then retrain",
        )
    return tensors


def _get_parameter(base: nn.Module, name: str, path: Path) -> nn.Parameter:
    try:
        return base.get_parameter(name)
    except AttributeError as e:
        raise TeacherError(
            f"{path}: parameter {name!r} does not exist in {type(base).__name__}; the adapter was "
            "trained on a different model architecture. Re-train, or load it on the same model."
        ) from e


def check_adapter_scale(scale: float) -> float:
    """``scale`` as a float: a finite number >= 0, else a ``TeacherError`` saying what is allowed."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise TeacherError(
            f"adapter scale {scale!r}: must be a finite number >= 0 (0 = the base model, "
            "1 = the adapter as trained, between = a blend of the two, above 1 = extrapolated)"
        )
    return value


def load_adapter(
    base_model: nn.Module,
    adapter_dir: Path | str,
    *,
    trainable: bool = False,
    scale: float = 1.0,
) -> PeftModel:
    """Load a saved adapter (and its fully trained modules) onto ``base_model``.

    ``scale`` (>= 0; see the module docstring) multiplies the LoRA deltas and blends the fully
    trained parameters with the base model's: 0 gives the base model's outputs, 1 the adapter's.
    Only an adapter loaded for inference can be scaled.
    """
    scale = check_adapter_scale(scale)
    if trainable and scale != 1.0:
        raise TeacherError(f"adapter scale {scale:g}: an adapter is trained at scale 1 (internal)")
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise TeacherError(
            f"{adapter_dir}: no adapter_config.json; point to a folder written by save_adapter "
            "(run the training stage first)."
        )
    config = adapter_dir / "adapter_config.json"
    try:
        doc = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _damaged(config, "not JSON") from None
    if not isinstance(doc, dict) or "r" not in doc:
        raise _damaged(config, "not a peft LoRA adapter_config (no rank 'r')")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise _damaged(adapter_dir, "no adapter_model.safetensors")
    saved = read_weights(weights)
    base_values = (
        trained_base_values(base_model, adapter_dir, weights=saved) if scale != 1.0 else {}
    )
    try:
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise _damaged(
            adapter_dir,
            f"peft cannot load it onto {type(base_model).__name__} "
            f"({str(e).splitlines()[0][:300]}): a foreign or damaged adapter, or "
            "another base model",
        ) from None
    loaded = sum(1 for _ in lora_parameter_names(model))
    lora_saved = sum(1 for n in saved if LORA_TAG in n)  # the rest: trained modules (save_adapter)
    if loaded != lora_saved:
        raise _damaged(
            adapter_dir,
            f"it holds {lora_saved} LoRA tensors but the model has {loaded} "
            "LoRA weights for them: an adapter of another model",
        )
    load_trained_modules(model, adapter_dir, trainable=trainable, weights=saved)
    if scale != 1.0:
        scale_adapter(model, scale, base_values=base_values)
    return model


def trained_base_values(
    base_model: nn.Module,
    adapter_dir: Path | str,
    *,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Copies of ``base_model``'s own values of the parameters the adapter trained fully, by their
    names in the wrapped model (every alias), taken before loading the adapter overwrites them."""
    tensors, aliases, path = trained_tensors(adapter_dir, weights=weights)
    out = {}
    for name in tensors:
        for alias in aliases.get(name, [name]):
            # a LoRA target inside a fully trained module: peft moves its weight to base_layer
            plain = alias.replace(".base_layer.", ".")
            out[alias] = _get_parameter(base_model, plain, path).detach().clone()
    return out


@torch.no_grad()
def scale_adapter(
    model: PeftModel, scale: float, *, base_values: dict[str, torch.Tensor]
) -> PeftModel:
    """Scale a loaded adapter in place: every LoRA delta times ``scale`` (peft's
    ``LoraLayer.scale_layer``), every fully trained parameter ``(1 - scale) * base + scale *
    trained``, ``base_values`` being the base model's values (:func:`trained_base_values`).

    Exact at the ends: scale 0 restores the base values themselves, scale 1 changes nothing.
    """
    from peft.tuners.lora import LoraLayer

    scale = check_adapter_scale(scale)
    if scale == 1.0:
        return model
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scale_layer(scale)
    base = model.get_base_model()
    done: set[int] = set()
    for name, value in base_values.items():
        param = base.get_parameter(name)
        if id(param) in done:  # a tied parameter: blended once, under its first name
            continue
        done.add(id(param))
        value = value.to(param.device, param.dtype)
        param.copy_(value if scale == 0.0 else torch.lerp(value, param, scale))
    return model


def merge(model: PeftModel) -> nn.Module:
    """The base model with LoRA merged into its weights (trained modules are already in it)."""
    return model.merge_and_unload()


def lora_parameter_names(model: nn.Module) -> Iterable[str]:
    """Names of the LoRA parameters of a wrapped model."""
    return (n for n, _ in model.named_parameters() if LORA_TAG in n)

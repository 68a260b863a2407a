"""Grounding DINO (transformers): build or load the model and processor.

``dino.model`` names a hub id (pinned by ``dino.revision``), a local ``save_pretrained``
folder, or ``tiny-random``: the same architecture at toy size with a locally written
bert-base-uncased-compatible vocabulary, built in code with a fixed seed (no network, and the
same weights in every stage); ``tiny-random-mm`` is the same for MM-Grounding-DINO. A hub id or
folder is loaded as the family its ``config.json`` names (``model_type``, :data:`FAMILIES`):
Grounding DINO, or MM-Grounding-DINO (LLMDet's checkpoints are MM-Grounding-DINO ones), never
by its name. :func:`load_dino` installs :func:`teacher.dino.loss.grounded_loss`
as the model's ``loss_function`` and makes the model return its top-k encoder proposals
undetached (:func:`teacher.dino.loss.install_proposal_outputs`), which that loss reads.
"""

from __future__ import annotations

import math
import string
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import (  # type: ignore[attr-defined]  # BertTokenizerFast: a runtime alias the 5.x type hints lack
    BertConfig,
    BertTokenizerFast,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    PreTrainedConfig,
    SwinConfig,
)

from teacher.core.artifacts import LABELS_FILE
from teacher.core.errors import TeacherError
from teacher.core.hub import hub_reachable
from teacher.core.params import DinoParams
from teacher.dino.labels import LabelMap, load_labels
from teacher.dino.loss import grounded_loss, install_proposal_outputs

TINY_RANDOM = "tiny-random"
TINY_RANDOM_MM = "tiny-random-mm"  # tiny-random as MM-Grounding-DINO (same sizes, same seed)
TINY_SEED = 20240607  # fixed: train and evaluate build identical tiny-random base weights
# the tiny architecture pretrained on teacher.dataset.synth's pretraining domain by scripts/pretrain_tiny.py
TINY_PRETRAINED = "tiny-pretrained"
TINY_PRETRAINED_WEIGHTS = (
    Path(__file__).resolve().parent.parent / "weights" / "dino-tiny-pretrained.safetensors"
)
# whole-word tokens of tiny-pretrained's vocabulary (after the characters): the synthetic world's
# shape names, both domains. Fixed: the committed weights hold one embedding row per entry.
TINY_WORDS = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "diamond",
              "pentagon", "arrow", "ellipse", "heart", "moon", "shape", "object")  # fmt: skip
# bert-base-uncased ids that Grounding DINO's code hard-codes ([PAD] is 0)
BERT_SPECIAL_IDS = {
    "[PAD]": 0,
    "[UNK]": 100,
    "[CLS]": 101,
    "[SEP]": 102,
    "[MASK]": 103,
    ".": 1012,
    "?": 1029,
}
# fully trained heads (dino.train_heads): the box MLPs of the decoder layers and the two-stage
# proposal head (enc_output + enc_output_norm, which make the encoder's object queries, and
# encoder_output_bbox_embed), which the "_enc" loss terms reach now that they are computed from
# the undetached proposals (teacher.dino.loss); and the class heads' parameters. Grounding DINO:
# one box MLP tied across decoder layers, class heads parameter-free dot products with the text
# features (matched, nothing to train). MM-Grounding-DINO: one box MLP per decoder layer (its
# checkpoints set decoder_bbox_embed_share false), and each class head (per layer, and the
# proposal head's encoder_output_class_embed) scales the dot product by 1/sqrt(d_model) and adds
# a learned bias (one scalar, initialised to the 0.01 prior): those biases train too.
HEAD_MODULES = (
    r"(model\.decoder\.)?(bbox_embed|class_embed)\.\d+|"
    r"model\.(enc_output|enc_output_norm|encoder_output_bbox_embed|encoder_output_class_embed)"
)
TOWERS = ("model.backbone", "model.text_backbone")  # image and text encoders


# the detector classes dino.model loads (both share module names, forward and outputs)
DinoModel = GroundingDinoForObjectDetection | MMGroundingDinoForObjectDetection


@dataclass(frozen=True)
class Family:
    """A detector family ``dino.model`` can name: its transformers config and model classes."""

    name: str  # as messages and docs name it
    config_class: Callable[..., Any]  # GroundingDinoConfig or MMGroundingDinoConfig
    model_class: Any  # GroundingDinoForObjectDetection or MMGroundingDinoForObjectDetection
    tiny: dict[str, Any]  # its tiny config's keywords beyond tiny_config's own


# keyed by config.json's model_type: hub ids and folders load as the family their config names.
# MM-Grounding-DINO is Grounding DINO with other heads (HEAD_MODULES): the same encoder, decoder,
# fusion, text projection and module names, so dino.lora_targets, the loss, denoising and decoding
# apply unchanged. LLMDet publishes MM-Grounding-DINO checkpoints (its LLM is not in them).
FAMILIES: dict[str, Family] = {
    "grounding-dino": Family(
        "Grounding DINO", GroundingDinoConfig, GroundingDinoForObjectDetection, tiny={}
    ),
    "mm-grounding-dino": Family(
        "MM-Grounding-DINO / LLMDet",
        MMGroundingDinoConfig,
        MMGroundingDinoForObjectDetection,
        # as the hub checkpoints: a box and a class head per decoder layer, none shared
        tiny={"decoder_bbox_embed_share": False, "decoder_cls_embed_share": False},
    ),
}


@dataclass
class DinoBundle:
    """A loaded detector: model (adapter applied when one was given), processor, labels."""

    model: nn.Module  # a DinoModel, or a PeftModel around it
    processor: GroundingDinoProcessor
    label_map: LabelMap | None = None  # from the adapter folder's labels.json


# --- thin images ---------------------------------------------------------------------------------

FEATURE_STRIDES = (8, 16, 32, 64)  # the encoder's feature levels (Swin stages 2-4 + one extra)


def encoder_levels(height: int, width: int, *, shortest_edge: int, longest_edge: int) -> list[int]:
    """Positions per feature level (finest first) the encoder sees for an image of ``height x
    width`` after the processor's resize (shortest edge to ``shortest_edge``, longest at most
    ``longest_edge``)."""
    scale = min(shortest_edge / min(height, width), longest_edge / max(height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    return [math.ceil(h / s) * math.ceil(w / s) for s in FEATURE_STRIDES]


def encoder_tokens(height: int, width: int, *, shortest_edge: int, longest_edge: int) -> int:
    """Image tokens the encoder sees (all levels) for an image of ``height x width``."""
    return sum(
        encoder_levels(height, width, shortest_edge=shortest_edge, longest_edge=longest_edge)
    )


def pad_for_queries(image, *, num_queries: int, shortest_edge: int, longest_edge: int):
    """``image`` (HxWx3) padded with black at the bottom / right until the encoder has at least
    ``num_queries`` tokens to pick its queries from and its coarsest level more than one
    position (its GroupNorm needs two); images that already do come back as they are. A
    1-pixel-high image otherwise crashes the query selection (``topk``), a small one alone in
    its batch the GroupNorm. Boxes in absolute pixels are unchanged by the padding.

    While the longest-edge cap sets the resize (a thin image), the shorter side grows: the image
    gets squarer and the cap shrinks it less. Otherwise the shorter side is resized to
    ``shortest_edge`` whatever the padding, and only a longer longer side adds positions: it
    grows (growing the shorter one, as before, kept a near-square image near-square forever
    when both its resized sides were under 65 px)."""
    import numpy as np

    def levels(h: int, w: int) -> list[int]:
        return encoder_levels(h, w, shortest_edge=shortest_edge, longest_edge=longest_edge)

    h, w = image.shape[:2]
    ph, pw = h, w
    for _ in range(1000):
        found = levels(ph, pw)
        if sum(found) >= num_queries and found[-1] >= 2:
            break
        capped = longest_edge / max(ph, pw) < shortest_edge / min(ph, pw)
        grow_height = ph <= pw if capped else ph >= pw
        if grow_height:
            ph += max(1, ph // 4)
        else:
            pw += max(1, pw // 4)
    else:
        raise TeacherError(
            f"an image of {h}x{w} px cannot be padded to give {num_queries} queries and two "
            f"coarsest positions at shortest_edge {shortest_edge} / longest_edge {longest_edge}; "
            "raise dino.shortest_edge and dino.longest_edge (or dino.train_scale_min)"
        )
    if (ph, pw) == (h, w):
        return image
    return np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))


def padded_for(bundle: DinoBundle, image):
    """:func:`pad_for_queries` with the bundle's query count and resize."""
    size = bundle.processor.image_processor.size
    config: Any = getattr(bundle.model, "config")  # noqa: B009 (a PeftModel forwards it)
    return pad_for_queries(
        image,
        num_queries=int(config.num_queries),
        shortest_edge=size["shortest_edge"],
        longest_edge=size["longest_edge"],
    )


# --- building and loading ----------------------------------------------------------------------


def tiny_vocab(words: tuple[str, ...] = ()) -> list[str]:
    """A WordPiece vocabulary with the bert-base-uncased special ids, letters and digits, then
    ``words`` as whole tokens (WordPiece takes the longest match: a listed word is one token)."""
    slots: dict[int, str] = {i: tok for tok, i in BERT_SPECIAL_IDS.items()}
    chars = string.ascii_lowercase + string.digits
    pieces = [*chars, *(f"##{c}" for c in chars), "-", "_", "/", ",", "'", "(", ")", *words]
    size = max(slots) + 1 + len(pieces)
    free = (i for i in range(max(slots) + 1, size))
    slots.update({next(free): p for p in pieces})
    return [slots.get(i, f"[unused{i}]") for i in range(size)]


def tiny_tokenizer(words: tuple[str, ...] = ()) -> BertTokenizerFast:
    """The tiny-random tokenizer: the vocabulary above, lower-casing like bert-base-uncased."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.txt"
        path.write_text("\n".join(tiny_vocab(words)) + "\n")
        return BertTokenizerFast(
            vocab=str(path), do_lower_case=True
        )  # vocab_file= is ignored in 5.x


def tiny_config(
    *,
    vocab_size: int,
    embed_dim: int = 16,
    depths: tuple[int, ...] = (1, 1, 1, 1),
    swin_heads: tuple[int, ...] = (1, 1, 2, 2),
    window_size: int = 4,
    d_model: int = 32,
    ffn_dim: int = 64,
    n_points: int = 2,
    encoder_layers: int = 1,
    decoder_layers: int = 2,
    family: str = "grounding-dino",
) -> Any:
    """Grounding DINO (or another of :data:`FAMILIES`) at toy size; the defaults are
    tiny-random's: 4-stage Swin (``embed_dim`` 16), 1-layer BERT, d_model 32, 2 decoder layers,
    64 queries."""
    backbone = SwinConfig(
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(swin_heads),
        window_size=window_size,
        out_features=["stage2", "stage3", "stage4"],  # type: ignore[call-arg]  # a backbone-config kwarg the 5.x signature omits; honoured at runtime
        image_size=64,
    )
    text = BertConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * d_model,
        max_position_embeddings=256,
    )
    return FAMILIES[family].config_class(
        backbone_config=backbone,
        text_config=text,
        d_model=d_model,  # d_model: a multiple of 32
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,  # decoder_layers=1 fails to construct
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=n_points,
        decoder_n_points=n_points,
        num_queries=64,
        auxiliary_loss=True,
        **FAMILIES[family].tiny,
    )


# tiny-pretrained's architecture, as tiny_config keywords: tiny-random's. A wider Swin (embed_dim
# 32: 5.8 MB of weights) learned no faster from random init, and windows of 8 (with or without
# two blocks per stage) scored no higher held out. A wider detector (d_model 64, 2 + 3 layers,
# 4 points: 3.9 MB) scored 0.226 against 0.189 after both detector phases but gained less in
# `make demo` (+0.133 against +0.197); a third phase (0.229) or 6 decoder layers (0.183 after
# one phase, against 0.192) added nothing (scripts/pretrain_tiny.py --arch;
# docs/PROVING_GROUND.md). Three encoder layers (the proposals the boxes come from: the decoder
# refines none) scored 0.299 held out after four phases (mean of three 200-image sets; this
# preset 0.171) at 2.14 MB, but gained a median +0.086 box mAP@50 over three `make demo` seeds
# against this preset's +0.117 (scripts/demo.py --seeds), and its LoRA gain in bench_finetune
# was 68 % of full fine-tuning's (this preset: 173 %).
TINY_PRETRAINED_ARCH: dict[str, Any] = {}


def build_tiny_pretrained(
    dino: DinoParams, *, weights: bool = True, arch: dict[str, Any] | None = None
) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """The tiny-pretrained model (tiny-random's architecture, a vocabulary with :data:`TINY_WORDS`,
    the committed safetensors weights) and processor; ``weights=False`` gives it randomly
    initialised (what scripts/pretrain_tiny.py starts from)."""
    tokenizer = tiny_tokenizer(TINY_WORDS)
    arch = TINY_PRETRAINED_ARCH if arch is None else arch
    model = GroundingDinoForObjectDetection(tiny_config(vocab_size=len(tokenizer), **arch))
    if weights:
        from safetensors.torch import load_file

        if not TINY_PRETRAINED_WEIGHTS.is_file():
            raise TeacherError(
                f"dino.model={TINY_PRETRAINED}: {TINY_PRETRAINED_WEIGHTS} is missing; restore it "
                "from git or run `python scripts/pretrain_tiny.py dino`"
            )
        model.load_state_dict(load_file(str(TINY_PRETRAINED_WEIGHTS)))
    return model.eval(), build_processor(tokenizer, dino=dino)


def build_processor(tokenizer, *, dino: DinoParams) -> GroundingDinoProcessor:
    """Processor resizing to ``dino.shortest_edge`` / ``dino.longest_edge``."""
    size = {"shortest_edge": dino.shortest_edge, "longest_edge": dino.longest_edge}
    return GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size=size), tokenizer=tokenizer
    )


def build_tiny_random(
    dino: DinoParams, *, family: str = "grounding-dino"
) -> tuple[DinoModel, GroundingDinoProcessor]:
    """The tiny-random model of ``family`` (:data:`FAMILIES`) and processor; identical weights
    on every call (fixed seed)."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(vocab_size=len(tokenizer), family=family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = FAMILIES[family].model_class(config)
    return model, build_processor(tokenizer, dino=dino)


# dino.model names built in code (no hub, no files but the committed tiny-pretrained weights)
TINY_MODELS: dict[str, Callable[[DinoParams], tuple[DinoModel, GroundingDinoProcessor]]] = {
    TINY_RANDOM: build_tiny_random,
    TINY_RANDOM_MM: partial(build_tiny_random, family="mm-grounding-dino"),
    TINY_PRETRAINED: build_tiny_pretrained,
}


def _offline_error(dino: DinoParams, err: Exception) -> TeacherError:
    return TeacherError(
        f"dino.model {dino.model!r} (revision {dino.revision!r}) is not a local folder, not in "
        f"the Hugging Face cache, and the hub cannot be reached ({str(err).splitlines()[0]}). "
        f"Fix: download it once "
        f'where there is network (python -c "from transformers import AutoProcessor, '
        f"AutoModelForZeroShotObjectDetection as M; M.from_pretrained('{dino.model}'); "
        f"AutoProcessor.from_pretrained('{dino.model}')\"), or set dino.model in params.yaml "
        f"to a local folder written by save_pretrained, or use dino.model: {TINY_RANDOM}."
    )


def load_pretrained(dino: DinoParams) -> tuple[DinoModel, GroundingDinoProcessor]:
    """Model and processor from a local folder or the hub (cache first; fails fast offline), as
    the family its config names (:func:`checkpoint_family`)."""
    local = Path(dino.model).is_dir()
    kwargs = {} if local else {"revision": dino.revision}
    try:
        return _from_pretrained(dino, local_files_only=True, **kwargs)
    except OSError as err:
        if local:
            raise TeacherError(
                f"dino.model {dino.model!r}: not a Grounding DINO / MM-Grounding-DINO folder "
                f"written by save_pretrained ({err})"
            ) from err
        if not hub_reachable():
            raise _offline_error(dino, err) from err
    try:
        return _from_pretrained(dino, local_files_only=False, **kwargs)
    except OSError as err:
        raise _offline_error(dino, err) from err


def checkpoint_family(dino: DinoParams, **kwargs) -> Family:
    """The family of ``dino.model``'s ``config.json`` (its ``model_type``); TeacherError for a
    checkpoint of any other model. ``kwargs``: ``revision``, ``local_files_only``."""
    config, _ = PreTrainedConfig.get_config_dict(dino.model, **kwargs)
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        known = ", ".join(f"{f.name} ({t!r})" for t, f in FAMILIES.items())
        raise TeacherError(
            f"dino.model {dino.model!r}: its config.json has model_type {model_type!r}, which "
            f"is not a detector dino.model can load: {known}. Set dino.model in params.yaml to "
            f"such a checkpoint (hub id or save_pretrained folder) or to {TINY_RANDOM}."
        )
    return FAMILIES[model_type]


def _from_pretrained(dino: DinoParams, **kwargs):
    family = checkpoint_family(dino, **kwargs)
    model = family.model_class.from_pretrained(dino.model, **kwargs)
    processor = GroundingDinoProcessor.from_pretrained(dino.model, **kwargs)
    size = {"shortest_edge": dino.shortest_edge, "longest_edge": dino.longest_edge}
    processor.image_processor.size = size  # resize from params, not the hub default
    return model, processor


def _positions(side: int) -> int:
    """Encoder feature positions of a square ``side`` px image (strides 8, 16, 32, 64)."""
    return sum(math.ceil(side / s) ** 2 for s in (8, 16, 32, 64))


def check_image_size(model: DinoModel, dino: DinoParams) -> None:
    """Fail early when images resized to ``dino.shortest_edge`` give the encoder fewer feature
    positions than the model has queries (its top-k proposal selection would crash)."""
    queries, need = model.config.num_queries, dino.shortest_edge
    if _positions(need) >= queries:
        return
    while _positions(need) < queries:
        need += 8
    raise TeacherError(
        f"dino.shortest_edge {dino.shortest_edge} is too small for "
        f"{dino.model!r}: its {queries} queries need images of at least {need} px; "
        "raise dino.shortest_edge in params.yaml"
    )


def _text_input_embeddings(self) -> nn.Module:
    return self.model.text_backbone.get_input_embeddings()


def prepare_model(model: DinoModel) -> DinoModel:
    """Make a loaded model ready for peft and for our training.

    peft calls ``get_input_embeddings``, which transformers leaves unimplemented for this model:
    return the text encoder's. (Setting ``tie_word_embeddings=False`` instead would make
    reloaded models re-initialise the tied box heads.) Installs :func:`grounded_loss` and the
    undetached proposal outputs it reads.
    """
    model.get_input_embeddings = types.MethodType(_text_input_embeddings, model)
    model.loss_function = grounded_loss
    if model.config.two_stage:
        install_proposal_outputs(model)
    return model


def set_dropout(model: nn.Module, p: float) -> int:
    """Dropout ``p`` in every layer of the encoder (image, text enhancer, fusion) and decoder.

    Open-GroundingDino (``dropout = 0.0``, ``text_dropout``, ``fusion_dropout`` 0.0) and
    MM-Grounding-DINO (``dropout=0.0``, ``ffn_drop=0.0``) train with none; the hub config has
    0.1. Drop path (``fusion_droppath``), LoRA's own dropout and the frozen towers are left
    alone. Returns how many dropout settings were changed. Call before applying LoRA.
    """
    base: Any = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    changed = 0
    for part in (base.model.encoder, base.model.decoder):
        for module in part.modules():
            if isinstance(module, nn.Dropout):
                module.p, changed = p, changed + 1
            for attr in ("dropout", "activation_dropout", "attention_dropout"):
                if isinstance(getattr(module, attr, None), float):
                    setattr(module, attr, p)
                    changed += 1
    for key in (
        "dropout",
        "activation_dropout",
        "attention_dropout",
        "text_enhancer_dropout",
        "fusion_dropout",
    ):
        setattr(base.config, key, p)
    return changed


def load_dino(
    dino: DinoParams,
    *,
    adapter_dir: Path | None = None,
    trainable: bool = False,
    adapter_scale: float = 1.0,
) -> DinoBundle:
    """Load ``dino.model`` (hub id / folder / :data:`TINY_MODELS`) and, if given, an adapter
    folder.

    With ``adapter_dir`` the LoRA adapter and fully trained heads are applied (at
    ``adapter_scale``: :func:`teacher.train.lora.load_adapter`) and ``labels.json`` is read into
    ``bundle.label_map``.
    """
    build = TINY_MODELS.get(dino.model, load_pretrained)
    model, processor = build(dino)
    check_image_size(model, dino)
    model = prepare_model(model)
    if adapter_dir is None:
        return DinoBundle(model=model, processor=processor)
    from teacher.train.lora import load_adapter  # peft import only when an adapter is used

    label_map = load_labels(Path(adapter_dir) / LABELS_FILE)
    return DinoBundle(
        model=load_adapter(model, adapter_dir, trainable=trainable, scale=adapter_scale),
        processor=processor,
        label_map=label_map,
    )


def frozen_towers(model: nn.Module) -> list[str]:
    """The image/text encoders none of whose parameters train (no LoRA, not unfrozen).

    Their inputs (pixels, token ids) need no gradient and their weights are frozen, so autograd
    records nothing inside them: they run without saving activations for backward.
    """
    base: Any = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model
    return [
        name
        for name in TOWERS
        if not any(p.requires_grad for p in base.get_submodule(name).parameters())
    ]

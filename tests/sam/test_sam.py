"""SAM: loading, geometry and forward against segment-anything's own predictor, LoRA parity,
the training data (prompts, jitter, masks in the input frame), embedding cache, encoder LoRA
actually training under activation checkpointing."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from segment_anything import SamPredictor

from teacher.coco.io import mask_to_rle
from teacher.core.errors import TeacherError
from teacher.core.params import LoraParams, SamParams
from teacher.dataset.augment import sample_rng
from teacher.sam import build as B
from teacher.sam import model as M
from teacher.sam import predictor as P
from teacher.sam.data import (
    SamDataset,
    cache_sam_embeddings,
    choose_prompts,
    collate_sam,
    jitter_boxes_xyxy,
    masks_to_input,
    sam_instances,
)
from teacher.sam.geometry import SamGeometry
from teacher.sam.task import encoder_trains, training_step, wrap_for_training
from teacher.train.lora import apply_lora, save_adapter

ENCODER_QKV = "sam-encoder-qkv"  # teacher.core.params.LORA_PRESETS
DECODER_ATTN = "sam-decoder-attention"


def disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def circle_polygon(cy: float, cx: float, r: float, n: int = 24) -> list[float]:
    pts = []
    for k in range(n):
        a = 2 * math.pi * k / n
        pts += [cx + r * math.cos(a), cy + r * math.sin(a)]
    return pts


@pytest.fixture
def shapes(tmp_path: Path) -> tuple[dict, Path]:
    """Two 96x128 images: a polygon circle and an RLE square each, a crowd and a box-only one."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(2):
        h, w = 96, 128
        img = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        cy, cx, r = 40 + 8 * i, 36 + 10 * i, 16
        img[disk(h, w, cy, cx, r)] = (230, 40, 40)
        square = np.zeros((h, w), bool)
        square[20 + 5 * i : 60 + 5 * i, 76:116] = True
        img[square] = (40, 230, 40)
        Image.fromarray(img).save(tmp_path / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": h, "width": w})
        base = 10 * i
        anns += [
            {
                "id": base + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [cx - r, cy - r, 2 * r, 2 * r],
                "segmentation": [circle_polygon(cy, cx, r)],
            },
            {
                "id": base + 2,
                "image_id": i + 1,
                "category_id": 2,
                "iscrowd": 0,
                "bbox": [76, 20 + 5 * i, 40, 40],
                "segmentation": mask_to_rle(square),
            },
            {
                "id": base + 3,
                "image_id": i + 1,
                "category_id": 2,
                "iscrowd": 1,
                "bbox": [0, 0, 10, 10],
                "segmentation": mask_to_rle(np.ones((h, w), bool)),
            },
            {
                "id": base + 4,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [0, 0, 10, 10],
                "segmentation": [],
            },
        ]
    cats = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    return {"images": images, "annotations": anns, "categories": cats}, tmp_path


# --- loading -------------------------------------------------------------------------------


def test_tiny_random_is_deterministic_and_independent_of_global_seed():
    torch.manual_seed(123)
    a = B.build_tiny_random()
    torch.manual_seed(456)
    b = B.build_tiny_random()
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not a.training  # eval mode, as segment-anything's registry returns models
    assert M.input_size(a) == 128


def test_local_pth_loads_weights_only(tmp_path: Path):
    sam = B.build_tiny_random()
    with torch.no_grad():
        sam.mask_decoder.iou_token.weight.add_(1.0)  # differs from the preset
    torch.save(sam.state_dict(), tmp_path / "sam.pth")
    loaded = B.load_base_sam(str(tmp_path / "sam.pth"))
    assert torch.equal(loaded.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)
    torch.save({"not": "a state dict"}, tmp_path / "bad.pth")
    with pytest.raises(TeacherError, match="not a segment-anything SAM state dict"):
        B.load_base_sam(str(tmp_path / "bad.pth"))
    with pytest.raises(TeacherError, match="no such file"):
        B.load_base_sam(str(tmp_path / "missing.pth"))


def test_official_checkpoint_offline_names_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def offline(url, dst, **kwargs):
        raise URLError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(TeacherError) as err:
        B.load_base_sam("vit_b")
    message = str(err.value)
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in message
    assert str(tmp_path / "teacher" / "sam" / "sam_vit_b_01ec64.pth") in message
    assert B.TINY_RANDOM in message


def test_official_checkpoint_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tmp_path / "teacher" / "sam" / "sam_vit_l_0b3195.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated download")
    with pytest.raises(TeacherError, match="sha256 .* does not match"):
        B.load_base_sam("vit_l")


def test_architecture_inferred_from_state_dict_shapes():
    sd = {
        "image_encoder.patch_embed.proj.weight": torch.zeros(768, 3, 16, 16),
        "image_encoder.pos_embed": torch.zeros(1, 64, 64, 768),
        **{f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(12)},
    }
    assert B.infer_architecture(sd, "x.pth") == B.ARCHITECTURES["vit_b"]


# --- forward: parity with segment-anything's SamPredictor -----------------------------------


@pytest.mark.parametrize("multimask", [True, False])
def test_segment_matches_sam_predictor(shapes, multimask):
    coco, root = shapes
    image = np.asarray(Image.open(root / "im0.png").convert("RGB"))
    boxes_xywh = np.array([[20.0, 24, 32, 32], [76, 20, 40, 40], [5, 5, 100, 80]])
    sam = B.build_tiny_random()
    masks, scores = P.segment(sam, image, boxes_xywh, multimask=multimask)

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    xyxy = torch.as_tensor(boxes_xywh[:, :2].tolist(), dtype=torch.float32)
    xyxy = torch.cat([xyxy, xyxy + torch.as_tensor(boxes_xywh[:, 2:], dtype=torch.float32)], 1)
    ref_masks, ref_scores, _ = predictor.predict_torch(
        None,
        None,
        boxes=predictor.transform.apply_boxes_torch(xyxy, image.shape[:2]),
        multimask_output=multimask,
    )
    best = ref_scores.argmax(1)
    rows = torch.arange(len(best))
    assert masks.shape == (3, 96, 128) and masks.dtype == bool
    # another code path (chunked decoding, our own box transform): a tolerance, not bitwise
    assert (masks != ref_masks[rows, best].numpy()).mean() <= 1e-3
    np.testing.assert_allclose(scores, ref_scores[rows, best].numpy(), rtol=1e-5, atol=1e-6)


def test_box_prompts_default_to_the_single_mask_output(shapes):
    coco, root = shapes
    image = np.asarray(Image.open(root / "im0.png").convert("RGB"))
    boxes = np.array([[20.0, 24, 32, 32], [76, 20, 40, 40]])
    sam = B.build_tiny_random()
    assert SamParams().multimask is False
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    for box, mask in zip(boxes, P.segment(sam, image, boxes)[0], strict=True):
        ref, _, _ = predictor.predict(box=np.r_[box[:2], box[:2] + box[2:]], multimask_output=False)
        assert (mask != ref[0]).mean() <= 1e-3


def test_prepared_image_embeds_once_and_answers_prompts_in_chunks(shapes):
    coco, root = shapes
    image = np.asarray(Image.open(root / "im1.png").convert("RGB"))
    sam = B.build_tiny_random()
    calls = []
    sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    prepared = P.prepare_image(sam, image)
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 60, (7, 2)), rng.uniform(4, 60, (7, 2))], axis=1)
    whole, whole_scores = prepared.predict(boxes, chunk=16)
    sizes = [len(m) for m, _ in prepared.predict_chunks(boxes, chunk=3)]
    chunked, chunked_scores = prepared.predict(boxes, chunk=3)
    assert calls == [1] and sizes == [3, 3, 1]
    assert prepared.original_size == (96, 128) and prepared.input_size == (96, 128)
    assert chunked.shape == (7, 96, 128)
    assert (chunked != whole).mean() <= 1e-3  # batch of 3 vs 7: another code path, a tolerance
    np.testing.assert_allclose(chunked_scores, whole_scores, rtol=1e-5, atol=1e-6)
    again = P.prepare_image(sam, image, embedding=prepared.embedding)  # e.g. from the cache
    assert calls == [1] and again.input_size == prepared.input_size


def test_segment_of_no_boxes_is_empty():
    masks, scores = P.segment(
        B.build_tiny_random(), np.zeros((20, 30, 3), np.uint8), np.zeros((0, 4))
    )
    assert masks.shape == (0, 20, 30) and scores.shape == (0,)


# --- LoRA parity ----------------------------------------------------------------------------


def _logits(model: torch.nn.Module, image: np.ndarray, boxes: np.ndarray) -> torch.Tensor:
    sam = M.unwrap(model)
    with torch.no_grad():
        size = M.input_size(sam)
        resized = M.resize_image(image, size=size)
        xyxy = torch.as_tensor(
            M.boxes_xyxy_to_input(boxes, image.shape[:2], size=size), dtype=torch.float32
        )
        ((low_res, iou),) = model(boxes=[xyxy], multimask=True, images=[M.image_to_tensor(resized)])
    return torch.cat([low_res.flatten(), iou.flatten()])


def _perturb_lora(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "mask_decoder.output_upscaling" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_lora_parity_fresh_saved_merged(shapes, tmp_path):
    coco, root = shapes
    image = np.asarray(Image.open(root / "im1.png").convert("RGB"))
    boxes = np.array([[20.0, 30, 60, 70], [70, 20, 120, 70]])
    base = _logits(B.build_tiny_random(), image, boxes)
    params = SamParams(
        model=B.TINY_RANDOM, lora_targets=f"{ENCODER_QKV}+{DECODER_ATTN}", train_decoder=True
    )
    model = wrap_for_training(
        B.build_tiny_random(),
        sam_params=params,
        lora=LoraParams(dropout=0.0),
        activation_checkpointing=False,
    )
    model.eval()
    torch.testing.assert_close(
        _logits(model, image, boxes), base, rtol=1e-5, atol=1e-6
    )  # fresh adapter: B = 0; tolerance: another code path (x86 kernels differ in the last bits)

    _perturb_lora(model)  # as if trained: LoRA and the fully trained decoder differ from base
    trained = _logits(model, image, boxes)
    assert not torch.allclose(trained, base)
    save_adapter(model, tmp_path / "adapter")
    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.mask_decoder.") and "lora_" not in k for k in stored)

    from teacher.train.lora import load_adapter

    reloaded = load_adapter(B.build_tiny_random(), tmp_path / "adapter").eval()
    torch.testing.assert_close(
        _logits(reloaded, image, boxes), trained, rtol=1e-5, atol=1e-6
    )  # reload: another module tree
    merged = B.load_sam(params, adapter_dir=tmp_path / "adapter")
    assert isinstance(merged, M.BoxPromptSam)
    torch.testing.assert_close(_logits(merged, image, boxes), trained, rtol=1e-4, atol=1e-4)

    (tmp_path / "adapter" / "params.json").write_text('{"sam": {"model": "vit_l"}}')
    with pytest.raises(TeacherError, match="trained on sam.model=vit_l"):
        B.load_sam(params, adapter_dir=tmp_path / "adapter")


# --- training data --------------------------------------------------------------------------


def test_instances_keep_non_crowd_masks_only(shapes):
    coco, _ = shapes
    kept = sam_instances(coco)
    assert {i: [a["id"] for a in anns] for i, anns in kept.items()} == {1: [1, 2], 2: [11, 12]}


def test_choose_prompts_caps_and_is_seeded():
    a = choose_prompts(10, max_prompts=4, rng=sample_rng(0, 1, 2))
    b = choose_prompts(10, max_prompts=4, rng=sample_rng(0, 1, 2))
    assert len(a) == 4 and len(set(a)) == 4 and np.array_equal(a, b)
    draws = {tuple(choose_prompts(10, max_prompts=4, rng=sample_rng(0, e, 2))) for e in range(5)}
    assert len(draws) > 1  # other epochs draw other prompts
    assert np.array_equal(choose_prompts(3, max_prompts=4, rng=sample_rng(0, 0, 0)), [0, 1, 2])


def test_box_jitter_bounded_and_clipped():
    boxes = np.array([[10.0, 20, 50, 40], [0, 0, 5, 5]])
    out = jitter_boxes_xyxy(
        boxes, fraction=0.1, max_shift=20, rng=sample_rng(0, 0, 0), width=60, height=45
    )
    wh = np.array([[40, 20, 40, 20], [5, 5, 5, 5]])
    assert np.all(np.abs(out - boxes) <= 0.1 * wh + 1e-9) and not np.array_equal(out, boxes)
    assert out[:, 0::2].min() >= 0 and out[:, 0::2].max() <= 60 and out[:, 1::2].max() <= 45
    same = jitter_boxes_xyxy(
        boxes, fraction=0.0, max_shift=20, rng=sample_rng(0, 0, 0), width=60, height=45
    )
    assert np.array_equal(same, boxes)


def test_box_jitter_has_an_absolute_cap_and_stays_inside_the_image():
    big = np.array([[100.0, 100, 900, 700]])  # 800 x 600: 10 % would be 80 / 60 px
    shifts = np.concatenate(
        [
            jitter_boxes_xyxy(
                big, fraction=0.1, max_shift=20, rng=sample_rng(0, 0, i), width=1000, height=800
            )
            - big
            for i in range(50)
        ]
    )
    assert np.abs(shifts).max() <= 20 + 1e-9 and np.abs(shifts).max() > 15
    edge = np.array([[0.0, 0, 3, 3], [57, 42, 60, 45], [59.5, 44.5, 60, 45], [0, 0, 60, 45]])
    for i in range(50):  # boxes on every border, some thinner than a pixel
        out = jitter_boxes_xyxy(
            edge, fraction=0.5, max_shift=20, rng=sample_rng(1, 0, i), width=60, height=45
        )
        assert (out[:, :2] >= 0).all() and (out[:, 2] <= 60).all() and (out[:, 3] <= 45).all()
        assert (out[:, 2:] - out[:, :2] >= 1 - 1e-9).all()


def test_masks_follow_image_geometry():
    mask = np.zeros((1, 50, 100), bool)
    mask[0, 10:30, 20:60] = True  # longest side 100 -> 128: scale 1.28, resized 64 x 128
    out = masks_to_input(mask, size=128)
    assert out.shape == (1, 128, 128) and out.dtype == torch.bool
    rows, cols = torch.nonzero(out[0], as_tuple=True)
    assert abs(rows.min().item() - 12.8) <= 1 and abs(rows.max().item() + 1 - 38.4) <= 1
    assert abs(cols.min().item() - 25.6) <= 1 and abs(cols.max().item() + 1 - 76.8) <= 1
    assert not out[0, 64:].any()  # padding below the resized image stays background


def test_dataset_items_in_input_frame(shapes):
    coco, root = shapes
    ds = SamDataset(coco, root, geometry=SamGeometry(128), max_prompts=1, box_jitter=0.0, seed=0)
    item = ds[0]
    assert item["image"].shape == (3, 96, 128)  # longest side already 128
    assert item["boxes"].shape == (1, 4) and item["masks"].shape == (1, 128, 128)
    x0, y0, x1, y1 = item["boxes"][0].round().int().tolist()
    rows, cols = torch.nonzero(item["masks"][0], as_tuple=True)
    assert abs(cols.min().item() - x0) <= 1 and abs(rows.min().item() - y0) <= 1
    assert abs(cols.max().item() + 1 - x1) <= 1 and abs(rows.max().item() + 1 - y1) <= 1
    ds.set_epoch(0)
    assert torch.equal(ds[0]["boxes"], item["boxes"])  # same (seed, epoch, index): same sample
    batch = collate_sam([ds[0], ds[1]])
    assert len(batch["images"]) == 2 and batch["embeddings"] is None


def test_augmented_items_keep_boxes_and_masks_aligned(shapes):
    from teacher.dataset.augment import build_transform

    coco, root = shapes
    policy = {"hflip": 0.5, "scale_min": 0.7, "scale_max": 1.3, "crop": 1.0, "color_jitter": 0.2}
    ds = SamDataset(
        coco,
        root,
        geometry=SamGeometry(128),
        max_prompts=4,
        box_jitter=0.0,
        seed=0,
        transform=build_transform(policy, train=True),
    )
    sizes = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for index in range(len(ds)):
            item = ds[index]
            sizes.add(tuple(item["image"].shape))
            for box, mask in zip(item["boxes"], item["masks"], strict=True):
                rows, cols = torch.nonzero(mask, as_tuple=True)
                extent = torch.tensor(
                    [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                ).float()
                assert torch.allclose(box, extent, atol=2.5), (epoch, index, box, extent)
    assert len(sizes) > 1  # crops changed the image geometry, and boxes followed


def test_box_from_mask_when_annotation_has_none():
    from teacher.sam.data import instance_boxes_xywh

    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:9] = True
    boxes = instance_boxes_xywh([{"bbox": [1, 1, 4, 4]}, {}], [mask, mask])
    np.testing.assert_array_equal(boxes, [[1, 1, 4, 4], [3, 2, 6, 3]])


def test_embedding_cache_is_reused_and_matches_encoder(shapes, tmp_path):
    coco, root = shapes
    sam = B.build_tiny_random()
    cache = tmp_path / "cache"
    files = cache_sam_embeddings(sam, coco, root, cache)
    assert sorted(files) == [1, 2] and all(p.exists() for p in files.values())
    inodes = {p: p.stat().st_ino for p in files.values()}
    again = cache_sam_embeddings(sam, coco, root, cache)
    assert again == files and all(p.stat().st_ino == n for p, n in inodes.items())  # not rewritten
    ds = SamDataset(
        coco,
        root,
        geometry=SamGeometry(128),
        max_prompts=4,
        box_jitter=0.0,
        seed=0,
        embeddings=files,
    )
    cached = ds[0]["embedding"]
    image = np.asarray(Image.open(root / "im0.png").convert("RGB"))
    with torch.no_grad():
        live = M.embed_images(sam, [M.image_to_tensor(M.resize_image(image, size=128))])[0]
    torch.testing.assert_close(cached, live)
    other = _other_encoder(2)  # another encoder: other cache entries
    assert set(cache_sam_embeddings(other, coco, root, cache).values()).isdisjoint(files.values())


def _other_encoder(factor: float) -> M.BoxPromptSam:
    sam = B.build_tiny_random()
    with torch.no_grad():
        sam.image_encoder.neck[0].weight.mul_(factor)
    return sam


def test_embedding_cache_is_bounded_least_recently_used_first(shapes, tmp_path):
    import os

    from teacher.sam.data import cache_split_embeddings, prune_embedding_cache

    coco, root = shapes
    cache = tmp_path / "cache"
    old = cache_sam_embeddings(_other_encoder(2), coco, root, cache)  # an old encoder's entries
    entry = next(iter(old.values())).stat().st_size  # 64 KiB + header for tiny-random
    assert 64 * 1024 <= entry < 70 * 1024
    for i, p in enumerate(old.values()):
        os.utime(p, (1000 + i, 1000 + i))  # used long ago
    train = {**coco, "annotations": [a for a in coco["annotations"] if a["image_id"] == 1]}
    val = {**coco, "annotations": [a for a in coco["annotations"] if a["image_id"] == 2]}
    maps = cache_split_embeddings(
        B.build_tiny_random(), [train, val], root, cache, max_bytes=3 * entry
    )
    new = {**maps[0], **maps[1]}
    assert all(p.exists() for p in new.values())  # in use: never evicted
    assert [p.exists() for p in old.values()] == [False, True]  # least recently used went first
    left = prune_embedding_cache(
        cache, max_bytes=0, keep=new.values()
    )  # bound below the run's need
    assert left.kept == 2 and left.size == 2 * entry and not any(p.exists() for p in old.values())
    stale = prune_embedding_cache(
        cache, max_bytes=None, current=[new[1]]
    )  # e.g. image 2 was edited
    assert stale.removed == 1 and new[1].exists() and not new[2].exists()


def test_decoder_only_cache_checks_the_image_size_against_the_record(shapes, tmp_path):
    import copy

    coco, root = shapes
    wrong = copy.deepcopy(coco)
    wrong["images"][1]["height"] = 100  # the file is 96 px high
    with pytest.raises(
        TeacherError,
        match=r"image 2 \(im1.png\): the image is 128x96 px but its COCO record says 128x100",
    ):
        cache_sam_embeddings(B.build_tiny_random(), wrong, root, tmp_path / "c1")
    files = cache_sam_embeddings(B.build_tiny_random(), coco, root, tmp_path / "c2")
    with pytest.raises(TeacherError, match="record says 128x100 .cached in"):  # reused entries too
        cache_sam_embeddings(B.build_tiny_random(), wrong, root, tmp_path / "c2")
    from safetensors.torch import load_file, save_file

    from teacher.sam.data import cached_size

    save_file(load_file(files[2]), files[2])  # an entry of an older version: no size recorded
    assert cached_size(files[2]) == (-1, -1)
    cache_sam_embeddings(B.build_tiny_random(), coco, root, tmp_path / "c2")
    assert cached_size(files[2]) == (96, 128)  # embedded again, not trusted


def test_processes_share_the_embedding_cache_each_building_its_share(shapes, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    coco, root = shapes
    models = [B.build_tiny_random(), B.build_tiny_random()]
    calls: list[list[int]] = [[], []]
    for rank, model in enumerate(models):
        model.image_encoder.register_forward_hook(lambda m, i, o, r=rank: calls[r].append(1))
    with ThreadPoolExecutor(2) as pool:  # as two training processes: rank 0 and 1 of 2
        maps = list(
            pool.map(
                lambda r: cache_sam_embeddings(
                    models[r], coco, root, tmp_path / "c", rank=r, world=2, timeout_s=60
                ),
                [0, 1],
            )
        )
    assert calls == [[1], [1]]  # each embedded one of the two images
    assert maps[0] == maps[1] and all(p.exists() for p in maps[0].values())


def test_validation_miou_uses_the_test_rule_for_nothing_to_measure(shapes):
    from teacher.sam.task import validate_miou

    coco, root = shapes
    sam = B.build_tiny_random()
    none = {**coco, "annotations": [a for a in coco["annotations"] if a["iscrowd"]]}
    assert validate_miou(sam, none, root, multimask=False) == {
        "val_miou": -1.0,
        "val_instances": 0.0,
    }
    scored = validate_miou(sam, coco, root, multimask=False)
    assert scored["val_instances"] == 4 and 0 <= scored["val_miou"] <= 1


# --- training actually reaches the encoder's LoRA ---------------------------------------------


def test_encoder_lora_trains_with_activation_checkpointing(shapes):
    coco, root = shapes
    params = SamParams(model=B.TINY_RANDOM, lora_targets=ENCODER_QKV, max_prompts=2, multimask=True)
    model = wrap_for_training(
        B.build_tiny_random(),
        sam_params=params,
        lora=LoraParams(dropout=0.0),
        activation_checkpointing=True,
    )
    assert encoder_trains(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("image_encoder" in n and "lora_" in n for n in before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ds = SamDataset(coco, root, geometry=SamGeometry(128), max_prompts=2, box_jitter=0.1, seed=0)
    batch = collate_sam([ds[0], ds[1]])
    for _ in range(2):
        loss = training_step(model, batch, sam_params=params)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    lora_b = [n for n in before if "lora_B" in n]
    assert set(lora_b) <= set(changed)  # every encoder block's LoRA B moved (A alone is not enough)


def test_decoder_only_mode_runs_encoder_without_grad(shapes):
    coco, root = shapes
    params = SamParams(model=B.TINY_RANDOM, lora_targets=DECODER_ATTN, train_decoder=True)
    model = wrap_for_training(
        B.build_tiny_random(), sam_params=params, lora=LoraParams(), activation_checkpointing=True
    )
    assert not encoder_trains(model)
    ds = SamDataset(coco, root, geometry=SamGeometry(128), max_prompts=2, box_jitter=0.0, seed=0)
    model.train()
    seen = []
    M.unwrap(model).image_encoder.register_forward_hook(
        lambda m, i, o: seen.append(o.requires_grad)
    )
    loss = training_step(model, collate_sam([ds[0]]), sam_params=params)["loss"]
    assert seen == [False]  # frozen encoder ran under no_grad: no activations kept
    loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("mask_decoder" in n for n in grads)


def test_apply_lora_rejects_targets_matching_nothing():
    with pytest.raises(TeacherError, match="matches no module"):
        apply_lora(B.build_tiny_random(), lora=LoraParams(), targets=r"nothing\.here")


def test_cli_prune_cache_removes_stale_entries_then_bounds_size(shapes, tmp_path, capsys):
    import copy
    import json

    import yaml

    from teacher.cli import main as teacher_main

    coco, root = shapes
    cache = tmp_path / "cache"
    old = cache_sam_embeddings(_other_encoder(3), coco, root, cache)  # an old encoder
    current = cache_sam_embeddings(B.build_tiny_random(), coco, root, cache)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sam": {"model": B.TINY_RANDOM}}))
    one = copy.deepcopy(coco)
    one["annotations"] = [a for a in one["annotations"] if a["image_id"] == 1]  # image 2 removed
    (tmp_path / "now.json").write_text(json.dumps(one))
    rc = teacher_main(
        [
            "prune-cache",
            str(cache),
            "--annotations",
            str(tmp_path / "now.json"),
            "--images",
            str(root),
            "--params",
            str(params),
        ]
    )
    assert rc == 0 and "removed 3 files" in capsys.readouterr().out
    assert (
        current[1].exists()
        and not current[2].exists()
        and not any(p.exists() for p in old.values())
    )
    assert teacher_main(["prune-cache", str(cache), "--max-gib", "0", "--params", str(params)]) == 0
    assert not current[1].exists() and not any(cache.iterdir())  # empty encoder folders go too


def _cache_share(coco: dict, root: Path, cache: Path, out: Path) -> None:
    """One launched training process: embed this rank's share, record its encoder calls."""
    import json

    from teacher.train.distributed import process_rank_and_count

    rank, world = process_rank_and_count()
    sam, calls = B.build_tiny_random(), []
    sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(1))
    files = cache_sam_embeddings(sam, coco, root, cache, rank=rank, world=world, timeout_s=120)
    (out / f"rank{rank}.json").write_text(
        json.dumps({"calls": len(calls), "files": sorted(map(str, files.values()))})
    )


@pytest.mark.slow
def test_launched_processes_build_the_cache_once_and_share_it(shapes, tmp_path):
    import json

    from teacher.train.distributed import launch

    coco, root = shapes
    launch(
        _cache_share,
        processes=2,
        kwargs=dict(coco=coco, root=root, cache=tmp_path / "c", out=tmp_path),
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["calls"] for r in ranks] == [1, 1]  # two images, one each: built once
    assert ranks[0]["files"] == ranks[1]["files"] and len(ranks[0]["files"]) == 2


def test_damaged_embedding_cache_repairs_itself(shapes, tmp_path, caplog):
    """Issue 16: a truncated, foreign or NaN cache file is recomputed, not a traceback."""
    import logging

    from safetensors.torch import load_file, save_file

    caplog.set_level(logging.WARNING, logger="teacher.sam.data")
    coco, root = shapes
    sam = B.build_tiny_random()
    files = cache_sam_embeddings(sam, coco, root, tmp_path / "cache")
    good = {k: load_file(str(p))["embedding"].clone() for k, p in files.items()}
    first, second = files[1], files[2]
    first.write_bytes(first.read_bytes()[:100])  # truncated
    save_file({"embedding": torch.full((2, 3, 3), float("nan"))}, str(second))  # NaN
    again = cache_sam_embeddings(sam, coco, root, tmp_path / "cache")
    assert again == files
    for k in files:
        torch.testing.assert_close(load_file(str(again[k]))["embedding"], good[k])
    assert caplog.text.count("is damaged; recomputing it") == 2
    first.write_bytes(b"\xff" * 16)  # an oversized header length
    cache_sam_embeddings(sam, coco, root, tmp_path / "cache")
    torch.testing.assert_close(load_file(str(first))["embedding"], good[1])


def test_the_decoder_linear_preset_is_every_linear_layer_of_the_decoder():
    """sam-decoder-linear: attention (the final token-to-image one too), MLPs, mask hypernetworks
    and IoU head; nothing outside the decoder (decoder-only mode on its own)."""
    import re

    from teacher.core.params import lora_pattern

    pattern = lora_pattern("sam-decoder-linear")
    linear = {n for n, m in B.build_tiny_random().named_modules() if isinstance(m, torch.nn.Linear)}
    decoder = {n for n in linear if n.startswith("mask_decoder.")}
    assert len(decoder) > 40
    assert {n for n in linear if re.fullmatch(pattern, n)} == decoder

"""teacher.images: the decoder chain, the 8-bit RGB conversion, the pixel limits (issue 16.1)."""

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from teacher.checks import file_probe, validate_coco
from teacher.errors import TeacherError
from teacher.images import (
    MAX_DECODE_PIXELS,
    decoded_size,
    downscale_factor,
    load_image,
    load_image_and_size,
    read_image_size,
    to_rgb8,
)
from teacher.inspection import color_facts


def _jpeg(path: Path, h: int = 60, w: int = 80) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _truncated(path: Path) -> Path:
    data = _jpeg(path.with_suffix(".full.jpg")).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width x height`` and whose data is a few bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def test_to_rgb8_conversion_rule():
    g16 = np.array([[0, 1000, 4000]], np.uint16)  # max 4000 -> 255, linear
    assert to_rgb8(g16)[0, :, 0].tolist() == [0, 64, 255] and to_rgb8(g16).shape == (1, 3, 3)
    assert to_rgb8(np.array([[0, 200]], np.uint16))[0, :, 0].tolist() == [0, 200]  # fits: kept
    assert to_rgb8(np.array([[0.0, 0.5, 1.0]], np.float32))[0, :, 1].tolist() == [0, 128, 255]
    two = np.stack([np.full((2, 2), 7), np.full((2, 2), 255)], -1).astype(np.uint8)  # gray+alpha
    assert to_rgb8(two)[0, 0].tolist() == [7, 7, 7]
    five = np.arange(5, dtype=np.uint8).reshape(1, 1, 5)
    assert to_rgb8(five)[0, 0].tolist() == [0, 1, 2]


def test_sixteen_bit_single_band_tiff_decodes_to_rgb(tmp_path):
    band = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.tif"), band)
    rgb = load_image(tmp_path / "g16.tif")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 and rgb.max() == 255
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.flags.writeable


def test_a_tiff_pil_cannot_read_is_decoded_by_opencv(tmp_path):
    path = tmp_path / "f32x3.tif"  # float 3-band: what PIL cannot identify
    assert cv2.imwrite(str(path), np.random.default_rng(0).random((20, 30, 3)).astype(np.float32))
    with pytest.raises(Exception):
        Image.open(path).load()
    assert load_image(path).shape == (20, 30, 3)
    assert file_probe(tmp_path)("f32x3.tif") == (30, 20)


def test_truncated_jpeg_passes_the_header_but_not_validate(tmp_path):
    path = _truncated(tmp_path / "t.jpg")
    assert read_image_size(path) == (80, 60)  # the header alone says nothing is wrong
    with pytest.raises(TeacherError, match=r"t\.jpg: image file is truncated"):
        load_image(path)
    assert file_probe(tmp_path)("t.jpg") == "image_unreadable"
    assert file_probe(tmp_path, decode=False)("t.jpg") == (80, 60)  # validate.decode_images: false
    data = {"images": [{"id": 1, "file_name": "t.jpg", "width": 80, "height": 60}],
            "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    r = validate_coco(data, probe=file_probe(tmp_path), on_error="drop", max_drop_fraction=1)
    assert r.counts["image_unreadable"] == 1


def test_inspect_names_a_truncated_image_instead_of_crashing(tmp_path):
    _truncated(tmp_path / "t.jpg")
    facts = color_facts([{"id": 1, "file_name": "t.jpg"}], tmp_path)
    assert facts["color"]["unreadable"] == 1


def test_images_over_the_pixel_limit_are_downscaled_not_crashed_on(tmp_path):
    assert downscale_factor(100, 100, max_pixels=10_000) == 1
    assert downscale_factor(101, 100, max_pixels=10_000) == 2
    for path in (_jpeg(tmp_path / "a.jpg", 90, 121), tmp_path / "a.png"):
        if path.suffix == ".png":
            Image.open(tmp_path / "a.jpg").save(path)
        image, full = load_image_and_size(path, max_pixels=1000)
        assert full == (121, 90) and (image.shape[1], image.shape[0]) == decoded_size(121, 90, max_pixels=1000)
        assert image.shape[0] * image.shape[1] <= 1000


def test_a_header_over_pils_bomb_guard_is_read_and_the_file_named(tmp_path):
    path = _png_header(tmp_path / "big.png", 20_000, 10_000)  # 200 MP, over PIL's 178 MP guard
    assert read_image_size(path) == (20_000, 10_000)  # no DecompressionBombError
    with pytest.raises(TeacherError, match="big.png"):
        load_image(path)
    huge = _png_header(tmp_path / "huge.png", 60_000, 60_000)  # 3.6 GP
    assert 60_000 * 60_000 > MAX_DECODE_PIXELS
    with pytest.raises(TeacherError, match="huge.png: image too large"):
        load_image(huge)
    assert file_probe(tmp_path)("huge.png") == "image_unreadable"


def test_every_failure_names_the_file(tmp_path):
    (tmp_path / "junk.jpg").write_bytes(b"nope")
    with pytest.raises(TeacherError, match=r"junk\.jpg: cannot decode image .*PIL.*OpenCV"):
        load_image(tmp_path / "junk.jpg")
    with pytest.raises(TeacherError, match="gone.jpg: image file not found"):
        load_image(tmp_path / "gone.jpg")

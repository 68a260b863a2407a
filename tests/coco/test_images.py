"""teacher.coco.images: the decoder chain, the 8-bit RGB conversion, the pixel limits (issue 16.1)."""

import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from teacher.coco.images import (
    MAX_DECODE_PIXELS,
    decoded_size,
    display_path,
    downscale_factor,
    file_problem,
    load_image,
    load_image_and_size,
    read_image_size,
    resize_mask,
    to_rgb8,
    working_size,
)
from teacher.core.errors import TeacherError
from teacher.dataset.inspection import color_facts
from teacher.dataset.validation.images import file_probe
from teacher.dataset.validation.validator import validate_coco


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
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )
    return path


def _planar_tiff(path: Path, bands: np.ndarray) -> Path:
    """An uncompressed 16-bit TIFF with PlanarConfiguration 2 (bands stored one after another),
    as satellite tooling writes them. ``bands``: (B, H, W) uint16."""
    b, h, w = bands.shape
    strips = [np.ascontiguousarray(x, dtype="<u2").tobytes() for x in bands]
    n_tags = 10
    extra_at = 8 + 2 + 12 * n_tags + 4
    extra = b""

    def value(kind: int, values: list[int]) -> bytes:  # inline when it fits, else an offset
        nonlocal extra
        fmt = "<" + {3: "H", 4: "I"}[kind] * len(values)
        packed = struct.pack(fmt, *values)
        if len(packed) <= 4:
            return packed.ljust(4, b"\0")
        extra += packed
        return struct.pack("<I", extra_at + len(extra) - len(packed))

    bits, counts = value(3, [16] * b), value(4, [len(x) for x in strips])
    start = extra_at + len(extra) + (4 * b if b > 1 else 0)
    offsets = value(4, [start + sum(len(x) for x in strips[:i]) for i in range(b)])
    tags = [
        (256, 4, 1, struct.pack("<I", w)),
        (257, 4, 1, struct.pack("<I", h)),
        (258, 3, b, bits),
        (259, 3, 1, struct.pack("<HH", 1, 0)),
        (262, 3, 1, struct.pack("<HH", 2 if b == 3 else 1, 0)),
        (273, 4, b, offsets),
        (277, 3, 1, struct.pack("<HH", b, 0)),
        (278, 4, 1, struct.pack("<I", h)),
        (279, 4, b, counts),
        (284, 3, 1, struct.pack("<HH", 2, 0)),
    ]
    ifd = struct.pack("<H", n_tags) + b"".join(struct.pack("<HHI", *t[:3]) + t[3] for t in tags)
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 4 + extra + b"".join(strips))
    return path


def test_sixteen_bit_planar_geotiffs_decode_with_the_defined_conversion(tmp_path):
    """Issue 16: PIL cannot read a 16-bit single-band planar TIFF (it passed validate's header
    check, then training stopped on it); with several bands PIL keeps each sample's high byte."""
    band = (np.arange(20 * 30).reshape(1, 20, 30) * 5).astype(np.uint16)  # max 2995
    one = _planar_tiff(tmp_path / "one.tif", band)
    with pytest.raises((OSError, ValueError)):
        Image.open(one).load()
    rgb = load_image(one)
    assert (
        rgb.shape == (20, 30, 3)
        and rgb.max() == 255
        and (rgb[..., 0] == to_rgb8(band[0])[..., 0]).all()
    )
    assert file_probe(tmp_path)("one.tif") == (30, 20)
    bands = (np.random.default_rng(0).random((3, 20, 30)) * 4000).astype(np.uint16)
    three = _planar_tiff(tmp_path / "three.tif", bands)
    assert (load_image(three) == to_rgb8(np.moveaxis(bands, 0, -1))).all()
    chunky = tmp_path / "chunky.tif"  # 16-bit RGB, LZW, as OpenCV writes it
    assert cv2.imwrite(str(chunky), np.moveaxis(bands, 0, -1)[..., ::-1])
    assert np.asarray(Image.open(chunky)).max() < 20  # PIL: high bytes only, a black image
    assert (load_image(chunky) == to_rgb8(np.moveaxis(bands, 0, -1))).all()


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
    with pytest.raises((OSError, ValueError)):
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
    data = {
        "images": [{"id": 1, "file_name": "t.jpg", "width": 80, "height": 60}],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
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
        assert full == (121, 90) and (image.shape[1], image.shape[0]) == decoded_size(
            121, 90, max_pixels=1000
        )
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


# --- the working size (issue 34.1) and files that are no images (34.5, 34.7) ----------------


def _exif_jpeg(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())
    return path


def _images(folder: Path, w: int, h: int) -> list[Path]:
    """One image of each kind the reader treats apart (w x h as stored): 1-bit, palette, 16-bit
    gray, RGB PNG, EXIF-rotated JPEG; smooth content, so that resampling orders agree."""
    yy, xx = np.mgrid[:h, :w]
    ramp = (xx * 255 // max(1, w - 1)).astype(np.uint8)
    rgb = np.stack([ramp, (yy * 255 // max(1, h - 1)).astype(np.uint8), 255 - ramp], axis=2)
    block = (xx > w // 4) & (xx < w // 2) & (yy > h // 3)
    Image.fromarray(block).convert("1").save(folder / "bits.png")
    Image.fromarray(rgb).quantize(64).save(folder / "palette.png")
    Image.fromarray((xx * 60_000 // max(1, w - 1)).astype(np.uint16)).save(folder / "gray16.png")
    Image.fromarray(rgb).save(folder / "rgb.png")
    return [
        *(folder / n for n in ("bits.png", "palette.png", "gray16.png", "rgb.png")),
        _exif_jpeg(folder / "rotated.jpg", rgb, 6),
    ]


def test_images_within_the_working_size_decode_exactly_as_without_it(tmp_path):
    for path in _images(tmp_path, 300, 200):
        plain, full = load_image_and_size(path)
        at_edge, full_at_edge = load_image_and_size(path, max_edge=300)
        assert full_at_edge == full and np.array_equal(at_edge, plain), path.name


def test_larger_images_decode_straight_to_the_working_size(tmp_path):
    for path in _images(tmp_path, 1800, 1200):
        pixels, full = load_image_and_size(path, max_edge=300)
        assert full == ((1200, 1800) if path.suffix == ".jpg" else (1800, 1200)), path.name
        assert pixels.shape == (*working_size(*full, max_edge=300)[::-1], 3), path.name
        assert max(pixels.shape[:2]) == 300
        whole = load_image(path)  # decoded at full size, then brought to the same size
        reference = np.asarray(Image.fromarray(whole).resize(pixels.shape[1::-1], Image.BOX))
        diff = np.abs(pixels.astype(int) - reference.astype(int)).mean()
        assert diff < 3, (path.name, diff)


def test_the_working_size_keeps_the_aspect_and_never_grows():
    assert working_size(8900, 8900, max_edge=1333) == (1333, 1333)
    assert working_size(20_000, 30, max_edge=1333) == (1333, 2)
    assert working_size(30, 20_000, max_edge=1333) == (2, 1333)
    assert working_size(5, 20_000, max_edge=1333) == (1, 1333)  # never 0 wide
    assert working_size(1333, 800, max_edge=1333) == (1333, 800)
    assert decoded_size(8900, 8900, max_edge=1333) == (1333, 1333)


def test_a_mask_reaches_the_files_size_by_nearest_neighbour():
    small = np.zeros((4, 6), bool)
    small[1:3, 2:5] = True
    full = resize_mask(small, (12, 8))
    assert full.shape == (8, 12) and full.dtype == bool and full.sum() == small.sum() * 4
    assert resize_mask(small, (6, 4)) is small


def test_fifos_folders_and_names_that_are_not_utf8_are_named_without_opening(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "dir.png").mkdir()
    _jpeg(tmp_path / "ok.jpg")
    assert "a FIFO (named pipe), not a regular file" in file_problem(tmp_path / "pipe.png")
    assert "a folder, not a regular file" in file_problem(tmp_path / "dir.png")
    assert file_problem(tmp_path / "gone.png") == "image file not found"
    assert file_problem(tmp_path / "ok.jpg", name="ok.jpg") is None
    bad = os.fsdecode(b"bad\xff.jpg")  # a lone surrogate, as os.listdir gives it
    assert file_problem(tmp_path / "ok.jpg", name=bad).startswith("file name is not UTF-8")
    assert display_path(tmp_path / bad).endswith("bad\\xff.jpg")
    with pytest.raises(TeacherError, match=r"pipe\.png: a FIFO"):  # refused, not read (hang)
        load_image(tmp_path / "pipe.png")

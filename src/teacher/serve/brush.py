"""Label Studio's brush RLE: masks as the ``rle`` list of ``BrushLabels`` results.

Adapted from label_studio_sdk.converter.brush (``encode_rle`` / ``mask2rle`` / ``decode_rle``,
Apache-2.0), same bytes; the SDK is not a dependency because its pins (numpy < 2.3, opencv
4.12) clash with ours. ``tests/serve/test_serve_protocol.py`` pins this encoder against the SDK's
decoder, run in Label Studio's own virtual environment.

Format: the image as RGBA bytes (H*W*4, each mask pixel repeated over the 4 channels, 0 or
255), run-length coded into a bit stream: a 32-bit length, a 5-bit word size - 1 (7), four 4-bit
run-size classes - 1 (3, 4, 8, 16 bits), then per run ``1 cc nnn.. vvvvvvvv`` (a run of
``n + 1`` values ``v``, ``n`` coded in the class ``cc`` width) or ``0 00 000 vvvvvvvv`` (one
value); zero-padded to whole bytes, returned as a list of ints 0..255.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 8
RUN_CLASSES = (3, 4, 8, 16)  # bits of the run length in each class, as Label Studio's default


def runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and values of a 1-D array: ``[0,0,5] -> ([2, 1], [0, 5])``."""
    if len(values) == 0:
        return np.zeros(0, np.int64), values
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), len(values) - 1)
    return np.diff(np.append(-1, ends)), values[ends]


def run_bits(length: int, value: int) -> str:
    """The bits of one run (lengths over 2**16 are split as the SDK splits them)."""
    if length == 1:
        return f"000000{value:08b}"
    out = ""
    for cls, bits in enumerate(RUN_CLASSES):
        if cls < len(RUN_CLASSES) - 1 and length <= 2**bits:
            return f"1{cls:02b}{length - 1:0{bits}b}{value:08b}"
    while length > 2**16:
        out += f"111{2**16 - 1:016b}{value:08b}"
        length -= 2**16
    return out + f"111{length - 1:016b}{value:08b}"


def encode_rle(values: np.ndarray) -> list[int]:
    """Label Studio RLE bytes of a flat uint8 array (the RGBA bytes of the brush image)."""
    values = np.asarray(values).ravel()
    head = f"{len(values):032b}{WORD_BITS - 1:05b}" + "".join(f"{b - 1:04b}" for b in RUN_CLASSES)
    lengths, vals = runs(values)
    bits = head + "".join(run_bits(int(n), int(v)) for n, v in zip(lengths, vals, strict=True))
    bits += "0" * (8 - len(bits) % 8)  # as the SDK: always pads, a whole 0 byte when aligned
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """HxW bool mask -> Label Studio brush ``rle`` (RGBA, 255 where the mask is set)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    return encode_rle(np.repeat(mask.astype(bool).ravel().astype(np.uint8) * 255, 4))


def decode_rle(rle: list[int]) -> np.ndarray:
    """Inverse of ``encode_rle``: the flat uint8 array (H*W*4). For tests and round trips."""
    bits = "".join(f"{b:08b}" for b in rle)
    total = int(bits[:32], 2)
    word = int(bits[32:37], 2) + 1
    classes = [int(bits[37 + 4 * i : 41 + 4 * i], 2) + 1 for i in range(4)]
    out = np.zeros(total, np.uint8)
    pos, i = 0, 53
    while pos < total:
        series, cls = bits[i] == "1", int(bits[i + 1 : i + 3], 2)
        i += 3
        count = int(bits[i : i + classes[cls]], 2) + 1
        i += classes[cls]
        for _ in range(1 if series else count):  # a series: one value; else `count` literals
            value = int(bits[i : i + word], 2)
            i += word
            out[pos : pos + (count if series else 1)] = value
            pos += count if series else 1
    return out


def rle_to_mask(rle: list[int], *, height: int, width: int) -> np.ndarray:
    """Label Studio brush ``rle`` -> HxW bool (alpha channel > 0)."""
    return decode_rle(rle).reshape(height, width, 4)[..., 3] > 0

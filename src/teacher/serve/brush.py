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


def run_codes(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each run's bit field as an integer and its bit count, as the SDK codes it: a run of one
    value ``000000 v``; up to 256 values ``1 cc n v`` in the narrowest class; longer runs in
    class 3, split into pieces of 2**16 values and the rest."""
    n, v = np.asarray(lengths, np.int64), np.asarray(values, np.int64)
    split = 2 ** RUN_CLASSES[-1]
    long = n > 2 ** RUN_CLASSES[-2]
    pieces = np.where(long, -(-n // split), 1)
    run = np.repeat(np.arange(len(n)), pieces)
    k = np.arange(len(run)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece in its run
    n, v, long = n[run], v[run], long[run]
    piece = np.where(long, np.where(k == pieces[run] - 1, n - k * split, split), n)
    cls = np.where(long, 3, np.searchsorted(2 ** np.array(RUN_CLASSES[:-1]), n))
    width = np.array(RUN_CLASSES)[cls]
    coded = (1 << (width + 10)) | (cls << (width + 8)) | ((piece - 1) << 8) | v
    return np.where(n == 1, v, coded), np.where(n == 1, 14, width + 11)


def pack_bits(codes: np.ndarray, counts: np.ndarray) -> list[int]:
    """Bit fields (``codes``, ``counts`` bits each, most significant first) one after another,
    zero-padded as the SDK pads (always: a whole 0 byte when aligned), as bytes 0..255."""
    ends = np.cumsum(counts)
    bits = np.zeros(int(ends[-1]) // 8 * 8 + 8 if len(ends) else 8, np.uint8)
    for b in range(int(counts.max(initial=0))):  # bit b of each field that has one
        has = counts > b
        bits[ends[has] - 1 - b] = (codes[has] >> b) & 1
    return np.packbits(bits).tolist()


def encode_rle(values: np.ndarray) -> list[int]:
    """Label Studio RLE bytes of a flat uint8 array (the RGBA bytes of the brush image)."""
    values = np.asarray(values).ravel()
    return encode_runs(len(values), *runs(values))


def encode_runs(total: int, lengths: np.ndarray, values: np.ndarray) -> list[int]:
    """Label Studio RLE bytes of ``total`` values given as runs (lengths, values 0..255)."""
    head = [total, WORD_BITS - 1, *(b - 1 for b in RUN_CLASSES)]
    codes, counts = run_codes(lengths, values)
    return pack_bits(
        np.concatenate([np.array(head, np.int64), codes]),
        np.concatenate([np.array([32, 5, 4, 4, 4, 4], np.int64), counts]),
    )


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """HxW bool mask -> Label Studio brush ``rle`` (RGBA, 255 where the mask is set).

    Each pixel is 4 equal bytes, so the runs of the bytes are the mask's runs, 4 times as long:
    counted on the mask, they take a byte a pixel, not the 8 of the RGBA bytes and their diff.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    lengths, values = runs(mask.ravel())
    return encode_runs(4 * mask.size, 4 * lengths, values.astype(np.uint8) * 255)


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

"""run.py: run a GGUF language model (Llama, Mistral, Qwen, Phi-3, Gemma 2 and 3) with numpy alone, fast with numba.

This is the second of the two files: copy it next to a .gguf and run

    python run.py MODEL.gguf -p "Once upon a time" -n 64 --temperature 0.8 --seed 1
    python run.py MODEL.gguf --chat

or use it from Python:

    import run
    model = run.load("MODEL.gguf")                  # weights: read-only, shared by sessions
    session = model.session()                       # one conversation: its own KV cache
    gen = session.generate(model.tokenize("Once upon a time"), max_tokens=32, temperature=0)
    for text in gen:                                # whole characters, as they are generated
        print(text, end="", flush=True)
    print(gen.finish_reason)                        # 'eos', 'stop', 'length' or 'context'

The file reads top to bottom in the order data flows: GGUF reader, tensor types, config and
the forward pass, tokenizer, sampler, sessions with generation and chat, command line; then,
as an appendix, the compiled kernels. It needs only numpy and the standard library (it then
holds the matrices decoded to float32, when they fit); jinja2 renders chat templates when
present, and numba, when present, compiles the kernels that run on the quantized blocks:
about 4 times faster generation in a quarter of the memory (--threads N).
"""

from __future__ import annotations

import argparse
import codecs
import enum
import heapq
import json
import math
import mmap
import os
import re
import struct
import sys
import threading
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Iterable, Iterator, Sequence

import numpy as np


class GGUFError(ValueError):
    """A model file that is not a GGUF file run.py can run; the message names the problem."""


class ContextFull(ValueError):
    """The tokens do not fit in the model's context window."""


# ---------------------------------------------------------------------------
# GGUF reader
# ---------------------------------------------------------------------------
# Everything in the file is untrusted: each count, length, offset and size is checked
# against the bytes that are really there before anything is allocated or sliced.

GGUF_MAGIC = b"GGUF"
MAX_ARRAY_DEPTH = 8  # nested arrays deeper than this are refused (recursion bombs)

# metadata value type -> (struct format, size) for the fixed-size scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
                  7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
GGUF_STRING, GGUF_ARRAY = 8, 9

class GGMLType(enum.IntEnum):
    """ggml's tensor type ids (ggml.h's enum ggml_type; the gguf package uses the same numbers)."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# type -> (weights per block, bytes per block); the sizes are needed to bounds-check every
# tensor, even those of a type run.py cannot decode
GGML_TYPES = {t: size for t, size in zip(GGMLType, [
    (1, 4), (1, 2), (32, 18), (32, 20), (32, 22), (32, 24), (32, 34), (32, 40),  # F32 .. Q8_1
    (256, 84), (256, 110), (256, 144), (256, 176), (256, 210), (256, 292),        # Q2_K .. Q8_K
    (256, 66), (256, 74), (256, 98), (256, 50), (32, 18), (256, 110), (256, 82), (256, 136),  # IQ2_XXS .. IQ4_XS
    (1, 1), (1, 2), (1, 4), (1, 8), (1, 8), (256, 56), (1, 2),                    # I8 .. F64, IQ1_M, BF16
    (256, 54), (256, 66), (32, 17)])}                                            # TQ1_0, TQ2_0, MXFP4


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols) for a matrix; GGUF stores it reversed
    type: int
    offset: int             # absolute offset in the file
    nbytes: int
    data: np.ndarray = field(repr=False, default=None)  # uint8 view of the memory-mapped file

    @property
    def type_name(self) -> str:
        return GGMLType(self.type).name


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data: np.ndarray = field(repr=False, default=None)  # the whole file, memory-mapped, read-only


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt file: {what} at byte {self.pos} "
                            f"needs {n} bytes, only {self.size - self.pos} remain")

    def scalar(self, vtype: int, what: str):
        fmt, size = _SCALARS[vtype]
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what):
        return self.scalar(4, what)

    def u64(self, what):
        return self.scalar(10, what)

    def string(self, what: str) -> str:
        n = self.u64(what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} at byte {self.pos - n} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == GGUF_STRING:
            return self.string(what)
        if vtype == GGUF_ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(f"{self.path}: {what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
            etype = self.u32(what + " element type")
            count = self.u64(what + " element count")
            if etype in _SCALARS:  # numeric arrays: a view of the file after a size check, never
                size = _SCALARS[etype][1]  # a list (1 GB of int32 would be 28 GB of Python ints)
                self.need(count * size, f"{what} ({count} elements)")
                arr = np.frombuffer(self.buf, dtype=_SCALAR_DTYPES[etype], count=count, offset=self.pos)
                self.pos += count * size
                return arr != 0 if etype == 7 else arr
            if etype not in (GGUF_STRING, GGUF_ARRAY):
                raise GGUFError(f"{self.path}: {what}: unknown array element type {etype}")
            # every string or array element takes at least 8 bytes (its length or header)
            self.need(count * 8, f"{what} ({count} elements)")
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        raise GGUFError(f"{self.path}: {what}: unknown metadata value type {vtype}")


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor table; tensor data stays memory-mapped."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{path}: not a GGUF file ({size} bytes, too short for a header)")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    if buf[:4] != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.u32("version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # each metadata pair takes at least 12 bytes, each tensor info at least 28
    if n_kv * 12 + n_tensors * 28 > size:
        raise GGUFError(f"{path}: corrupt header: {n_kv} metadata pairs and {n_tensors} tensors "
                        f"cannot fit in {size} bytes")
    metadata = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.u32(f"type of metadata {key!r}")
        if key in metadata:
            raise GGUFError(f"{path}: metadata key {key!r} appears twice")
        metadata[key] = cur.value(vtype, f"metadata {key!r}")
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or not 0 < alignment <= 1 << 20:
        raise GGUFError(f"{path}: general.alignment = {alignment!r:.40} is not a usable alignment")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor #{i} name")
        n_dims = cur.u32(f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= 4:
            raise GGUFError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4 allowed)")
        dims = [cur.u64(f"tensor {name!r} dimension") for _ in range(n_dims)]
        ttype = cur.u32(f"tensor {name!r} type")
        offset = cur.u64(f"tensor {name!r} offset")
        if ttype not in GGML_TYPES:
            raise GGUFError(f"{path}: tensor {name!r} has unknown type id {ttype}")
        block, type_size = GGML_TYPES[ttype]
        if any(d == 0 for d in dims) or dims[0] % block:
            raise GGUFError(f"{path}: tensor {name!r} has shape {dims} that does not fit its type "
                            f"{GGMLType(ttype).name} (first dimension must be a positive multiple of {block})")
        n = 1
        for d in dims:
            n *= d  # Python ints: no overflow; the size check below bounds it
        if offset % alignment:
            raise GGUFError(f"{path}: tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}")
        infos.append(TensorInfo(name, tuple(reversed(dims)), ttype, offset, n // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    mapped = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for t in infos:
        t.offset += data_start
        if t.offset + t.nbytes > size:
            raise GGUFError(f"{path}: tensor {t.name!r} ({t.nbytes} bytes at offset {t.offset}) runs past "
                            f"the end of the file ({size} bytes): truncated or corrupt")
        if t.name in tensors:
            raise GGUFError(f"{path}: tensor {t.name!r} appears twice")
        t.data = mapped[t.offset:t.offset + t.nbytes]
        tensors[t.name] = t
    return GGUFFile(path, version, metadata, tensors, mapped)


# ---------------------------------------------------------------------------
# Tensor types: decoding quantized blocks to float32
# ---------------------------------------------------------------------------
# Each decoder takes blocks as a uint8 array (n_blocks, bytes_per_block) and returns
# float32 (n_blocks, weights_per_block), bit-exact with ggml's reference decoders.
# The weights stay quantized in memory; a matrix is decoded in bounded chunks of rows
# when it is used (see matmul), so a 7B Q4 model never becomes 28 GB of float32.

def _f16(blocks, start):
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)  # (n, 1)


def _nibbles(qs):
    # byte j of a 16-byte group holds weight j (low nibble) and weight j+16 (high nibble)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(packed):  # (n, k) uint8 -> (n, 8 * k) bits, least significant bit first
    return np.unpackbits(packed, axis=-1, bitorder="little")


def _dequant_q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:]).astype(np.int8) - 8).astype(np.float32)


def _dequant_q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b, 2)


def _dequant_q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.astype(np.int8) - 16).astype(np.float32)


def _dequant_q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.astype(np.float32) + _f16(b, 2)


def _dequant_q8_0(b):
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b, 0)


def _k_scales(s):
    """Unpack Q4_K/Q5_K's 12 bytes into 8 six-bit scales and 8 six-bit mins."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_chunks(qs, n):
    # 32 bytes per 64 weights: low nibbles are sub-block 2c, high nibbles 2c+1
    qs = qs.reshape(n, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, 8, 32)


def _dequant_q4_k(b):
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * scales)[:, :, None]
    dm = (_f16(b, 2) * mins)[:, :, None]
    return (d * _k_chunks(b[:, 16:], n).astype(np.float32) - dm).reshape(n, 256)


def _dequant_q5_k(b):
    n = b.shape[0]
    scales, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * scales)[:, :, None]
    dm = (_f16(b, 2) * mins)[:, :, None]
    # bit j of qh[i] is the fifth bit of weight i of sub-block j
    high = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = _k_chunks(b[:, 48:], n) | (high << 4)
    return (d * q.astype(np.float32) - dm).reshape(n, 256)


def _dequant_q6_k(b):
    n = b.shape[0]
    ql, qh = b[:, 0:128].reshape(n, 2, 1, 64), b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 8, 32)
    high = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16).astype(np.float32)
    return (d * q).reshape(n, 256)


def _crumbs(qs, n):
    """Q2_K/Q3_K's 2-bit weights: each 32 bytes hold 4 groups of 32 weights (bits 0-1, 2-3, 4-5,
    6-7 of each byte), as 16 groups of 16 (n, 16, 16)."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, -1, 1, 32) >> shifts) & 3).reshape(n, 16, 16)


def _dequant_q2_k(b):  # 16 scale bytes (low nibble scale, high nibble min), 64 bytes of weights, d, dmin
    n = b.shape[0]
    scales = b[:, :16]
    d = (_f16(b, 80) * (scales & 0x0F).astype(np.float32)).reshape(n, 16, 1)
    m = (_f16(b, 82) * (scales >> 4).astype(np.float32)).reshape(n, 16, 1)
    return (d * _crumbs(b[:, 16:80], n).astype(np.float32) - m).reshape(n, 256)


def _dequant_q3_k(b):  # 32 bytes of third bits (set: no -4), 64 of 2-bit weights, 12 of 6-bit scales, d
    n = b.shape[0]
    low = (b[:, 96:104].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (b[:, 104:108].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    scales = (((low & 0x0F) | ((high & 3) << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    d = (_f16(b, 108) * scales).reshape(n, 16, 1)
    third = (b[:, :32].reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & 1
    q = _crumbs(b[:, 32:96], n).astype(np.int8) - ((third.reshape(n, 16, 16) ^ 1) << 2).astype(np.int8)
    return (d * q.astype(np.float32)).reshape(n, 256)


IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _dequant_iq4_nl(b):  # d, then 16 bytes of 4-bit indices into IQ4_VALUES (as Q4_0's nibbles)
    return _f16(b, 0) * IQ4_VALUES[_nibbles(b[:, 2:])].astype(np.float32)


def _dequant_iq4_xs(b):  # d, 2 bytes of scales' high bits, 4 of their low nibbles, 8 x 16 bytes as IQ4_NL's
    n = b.shape[0]
    low = (b[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)).reshape(n, 8) & 0x0F
    high = (b[:, 2:4].copy().view(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))).astype(np.uint8) & 3
    scales = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    d = (_f16(b, 0) * scales).reshape(n, 8, 1)
    q = IQ4_VALUES[_nibbles(b[:, 8:].reshape(n, 8, 16))].astype(np.float32)
    return (d * q).reshape(n, 256)


DEQUANTIZE = {
    GGMLType.F32: lambda b: b.view(np.float32),
    GGMLType.F16: lambda b: b.view(np.float16).astype(np.float32),
    GGMLType.BF16: lambda b: (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32),
    GGMLType.Q4_0: _dequant_q4_0, GGMLType.Q4_1: _dequant_q4_1,
    GGMLType.Q5_0: _dequant_q5_0, GGMLType.Q5_1: _dequant_q5_1, GGMLType.Q8_0: _dequant_q8_0,
    GGMLType.Q4_K: _dequant_q4_k, GGMLType.Q5_K: _dequant_q5_k, GGMLType.Q6_K: _dequant_q6_k,
    GGMLType.Q2_K: _dequant_q2_k, GGMLType.Q3_K: _dequant_q3_k,
    GGMLType.IQ4_NL: _dequant_iq4_nl, GGMLType.IQ4_XS: _dequant_iq4_xs,
}
SUPPORTED_TYPES = ", ".join(t.name for t in DEQUANTIZE)


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Raw bytes (..., row_bytes) of one type -> float32 (..., row_weights)."""
    _, type_size = GGML_TYPES[ggml_type]
    lead = raw.shape[:-1]
    blocks = np.ascontiguousarray(raw).reshape(-1, type_size)
    out = DEQUANTIZE[ggml_type](blocks)
    return out.reshape(*lead, -1)


# One compiled call at a time: numba's thread pool may not be entered from two threads at once
# (its 'workqueue' layer aborts), and one call already uses every core.
_KERNEL_LOCK = threading.Lock()


def matmul(x: np.ndarray, w: TensorInfo, threads: int = 0) -> np.ndarray:
    """x (T, cols) @ w.T for a weight matrix w (rows, cols) kept in its file type (threads: see
    matmul_parts)."""
    parts = matmul_parts(x, w, threads)
    _, part = next(parts)
    if part.shape[1] == w.shape[0]:  # one slice: the whole product
        return part
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    out[:, :part.shape[1]] = part
    for first, part in parts:
        out[:, first:first + part.shape[1]] = part
    return out


def matmul_parts(x: np.ndarray, w: TensorInfo, threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """x @ w.T a slice of w's rows at a time (see decoded_parts): (the slice's first row,
    x @ slice.T)."""
    for first, part in decoded_parts(w, threads):
        yield first, x @ part.T


def decoded_parts(w: TensorInfo, threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """w's rows decoded to float32 a slice at a time (about 8 MB; valid until the next):
    (the slice's first row, the slice). threads > 0: by the compiled decoders on that many
    threads (the same numbers, ten times as fast), else by numpy's."""
    rows, cols = w.shape
    raw = w.data.reshape(rows, -1)
    if w.type == GGMLType.F32:
        yield 0, raw.view(np.float32)
        return
    step = max(1, (1 << 21) // cols)
    decoded = np.empty((min(step, rows), cols), np.float32) if threads else None
    for first in range(0, rows, step):
        if threads:
            n = min(step, rows - first)
            _decode_rows(raw[first:first + n], w.type, decoded[:n], threads)
            yield first, decoded[:n]
        else:
            yield first, dequantize(raw[first:first + step], w.type)


_POOL: list[ThreadPoolExecutor] = []  # _decode_rows' threads, made on first use


def _decode_rows(raw: np.ndarray, ggml_type: int, out: np.ndarray, threads: int) -> None:
    """out = raw's rows decoded by the compiled decoders, on `threads` Python threads: numba's
    own pool would keep its threads spinning after the call, and halve the speed of the BLAS
    product that follows on the same cores (measured)."""
    if not _POOL:
        _POOL.append(ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="run.py-decode"))
    cuts = [len(raw) * t // threads for t in range(threads + 1)]
    for done in [_POOL[0].submit(_unpack_rows, raw[a:b], int(ggml_type), out[a:b]) for a, b in zip(cuts, cuts[1:])]:
        done.result()


def row_slice(w: TensorInfo, first: int, n: int) -> TensorInfo:
    """Rows first..first+n of a matrix as a matrix of its own (the parts of a fused tensor:
    Phi-3's query/key/value and gate/up), the same bytes of the file."""
    row_bytes = w.nbytes // w.shape[0]
    return TensorInfo(f"{w.name}[{first}:{first + n}]", (n, *w.shape[1:]), w.type, w.offset + first * row_bytes,
                      n * row_bytes, w.data[first * row_bytes:(first + n) * row_bytes])


def get_rows(w: TensorInfo, ids) -> np.ndarray:
    """Rows `ids` of a matrix as float32 (the embedding lookup)."""
    return dequantize(w.data.reshape(w.shape[0], -1)[np.asarray(ids)], w.type)


# ---------------------------------------------------------------------------
# Config and the forward pass
# ---------------------------------------------------------------------------

@dataclass
class Config:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx: int            # the context length the model was trained for
    rope_theta: float
    rope_dims: int        # RoPE rotates the first rope_dims dimensions of each head
    rope_scale: float     # linear RoPE scaling: positions are divided by this
    norm_eps: float
    arch: str = "llama"
    rope_n_ctx_orig: int = 0         # LongRoPE (Phi-3 128k): the context its short factors are for
    rope_attn_factor: float = 1.0    # ... and its scale of cos and sin (of queries and keys)
    rope_neox: bool = False  # RoPE on pairs (i, i + rope_dims/2), not (2i, 2i+1): see Model._rope
    # Gemma 2 and 3
    embd_scale: float = 1.0          # the embeddings are multiplied by this (sqrt(n_embd))
    attn_scale: float = 0.0          # queries are multiplied by this (0: 1/sqrt(head_dim))
    gelu: bool = False               # the FFN's gate through tanh-GELU, not SiLU
    sliding_window: int = 0          # a layer in swa_layers sees only this many positions, its own included
    swa_layers: tuple = ()           # which layers have a sliding window (RoPE base rope_theta_swa, unscaled)
    rope_theta_swa: float = 10000.0
    attn_softcap: float = 0.0        # attention scores s become cap * tanh(s / cap) (0: not capped)
    final_softcap: float = 0.0       # the same for the logits


# general.architecture -> whether its RoPE pairs dimension i with i + rope_dims/2 (llama.cpp's
# NEOX type; its converters permute the query and key rows of `llama` files only). Qwen 2 adds
# biases to the query, key and value projections, Qwen 3 normalizes each query and key head
# (both are found by their tensors); Phi-3 fuses the query, key and value projections into
# one matrix and the gate and up projections into another; Mistral's files are `llama`. Gemma 3
# scales its embeddings, normalizes each attention's and FFN's output too (post-norms), runs
# its FFN through tanh-GELU, and gives five of every six layers a sliding window with a RoPE
# base of their own (llama.cpp's gemma3 graph). Gemma 2 does the same with every other layer
# windowed, one RoPE base, no query and key norms, and soft-capped attention scores and logits.
ARCHITECTURES = {"llama": False, "qwen2": True, "qwen3": True, "phi3": True, "gemma2": True, "gemma3": True}


def read_config(gguf: GGUFFile) -> Config:
    """The ARCH.* keys, checked."""
    meta, path = gguf.metadata, gguf.path
    # every value is checked for its type before use: a crafted file can put an array anywhere
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r:.40} is not supported (run.py runs "
                        f"{', '.join(ARCHITECTURES)})")
    experts = meta.get(f"{arch}.expert_count", 0)
    if not isinstance(experts, int) or experts != 0:
        raise GGUFError(f"{path}: {arch}.expert_count = {experts!r:.40}: mixture-of-experts models are not supported")

    def get(key, kind=int, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: metadata {arch}.{key} is missing")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 31):
            raise GGUFError(f"{path}: metadata {arch}.{key} = {value!r:.40} is not a positive integer")
        if kind is float and (not isinstance(value, (int, float)) or not 0 < value < 1e30):
            raise GGUFError(f"{path}: metadata {arch}.{key} = {value!r:.40} is not a positive number")
        return kind(value)

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    n_head_kv = get("attention.head_count_kv", default=n_head)
    head_dim = get("attention.key_length", default=n_embd // n_head if n_embd % n_head == 0 else None)
    if get("attention.value_length", default=head_dim) != head_dim:
        raise GGUFError(f"{path}: {arch}.attention.value_length differs from key_length (not supported)")
    if n_head % n_head_kv:
        raise GGUFError(f"{path}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    rope_dims = get("rope.dimension_count", default=head_dim)
    if rope_dims > head_dim or rope_dims % 2:
        raise GGUFError(f"{path}: {arch}.rope.dimension_count = {rope_dims} does not fit head size {head_dim}")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if not isinstance(scaling, str) or scaling not in ("none", "linear"):
        raise GGUFError(f"{path}: {arch}.rope.scaling.type = {scaling!r:.40} is not supported (none, linear)")
    rope_scale = get("rope.scaling.factor", float, 1.0) if scaling == "linear" else 1.0
    longrope = dict(rope_n_ctx_orig=get("rope.scaling.original_context_length", default=get("context_length")),
                    rope_attn_factor=get("rope.scaling.attn_factor", float, 1.0))
    tokens = meta.get("tokenizer.ggml.tokens")
    n_layer = get("block_count")
    gemma = {}
    if arch in ("gemma2", "gemma3"):  # llama.cpp's defaults where a key is missing
        window = meta.get(f"{arch}.attention.sliding_window", 4096 if arch == "gemma2" else 0)
        if not isinstance(window, int) or window < 0:
            raise GGUFError(f"{path}: metadata {arch}.attention.sliding_window = {window!r:.40} is not a count")
        pattern = meta.get(f"{arch}.attention.sliding_window_pattern", 2 if arch == "gemma2" else 6)
        if (isinstance(pattern, np.ndarray) and pattern.shape == (n_layer,) and pattern.dtype.kind in "bui"
                and set(pattern.tolist()) <= {0, 1}):  # GGUF booleans read as bytes
            swa = tuple(bool(b) for b in pattern)  # per layer, as llama.cpp's load_swa_pattern reads it
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
            swa = tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(n_layer))
        else:
            raise GGUFError(f"{path}: metadata {arch}.attention.sliding_window_pattern = {pattern!r:.40} is "
                            f"neither a count nor {n_layer} booleans")

        def cap(key, default):
            value = meta.get(f"{arch}.{key}", default)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e30:
                raise GGUFError(f"{path}: metadata {arch}.{key} = {value!r:.40} is not a soft-capping value")
            return float(value)

        # llama.cpp's query scale: 1/sqrt(head size), but 1/sqrt(width / heads) for the 27B models
        scale = 1.0 / np.sqrt(n_embd / n_head if n_layer == {"gemma2": 46, "gemma3": 62}[arch] else head_dim)
        gemma = dict(embd_scale=float(np.sqrt(np.float32(n_embd))), attn_scale=scale, gelu=True,
                     sliding_window=window, swa_layers=swa if window else (),
                     rope_theta_swa=get("rope.freq_base_swa", float, 10000.0 if arch == "gemma3" else
                                        get("rope.freq_base", float, 10000.0)),
                     attn_softcap=cap("attn_logit_softcapping", 50.0) if arch == "gemma2" else 0.0,
                     final_softcap=cap("final_logit_softcapping", 30.0 if arch == "gemma2" else 0.0))
    return Config(
        n_vocab=get("vocab_size", default=len(tokens) if isinstance(tokens, list) else None), n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=get("feed_forward_length"), n_ctx=get("context_length"),
        rope_theta=get("rope.freq_base", float, 10000.0), rope_dims=rope_dims,
        rope_scale=rope_scale or 1.0, norm_eps=get("attention.layer_norm_rms_epsilon", float, 1e-5),
        arch=arch, rope_neox=ARCHITECTURES[arch], **longrope, **gemma)


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    with np.errstate(over="ignore"):  # exp overflow for very negative x gives the right limit, 0
        d = np.exp(-x)
        d += 1.0
        return np.divide(x, d, out=d)


def gelu_tanh(x):
    """GELU's tanh approximation (Gemma's gelu_pytorch_tanh, ggml's gelu)."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (x + np.float32(0.044715) * x * x * x)))


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float32 logits (last axis)."""
    x = x.astype(np.float64)
    top = x.max(axis=-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: TensorInfo
    wk: TensorInfo
    wv: TensorInfo
    wo: TensorInfo
    ffn_norm: np.ndarray
    w_gate: TensorInfo
    w_up: TensorInfo
    w_down: TensorInfo
    qkv_bias: np.ndarray | None = None  # Qwen 2: the q, k and v projections' biases, one vector
    q_norm: np.ndarray | None = None    # Qwen 3, Gemma 3: RMSNorm weights of each query head and key head
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None  # Gemma: the attention's and the FFN's outputs normalized
    ffn_post_norm: np.ndarray | None = None
    swa: bool = False                   # Gemma: a sliding-window layer (Config.sliding_window)


PROMPT_BATCH = 512  # prompt tokens per matrix-matrix pass (bounds the attention scores' memory)
SHORT_PROMPT = 64   # with numba, fewer new tokens than this go through the kernels (measured crossover)
KERNEL_BATCH = 64   # tokens per pass of the kernels over the weights
ATTEND_BLOCK = 128  # queries per block of a prompt's attention (numpy)
SCORE_BATCH = 2048  # tokens per pass when scoring: the weights' unpacking shared by more (measured)


class Model:
    """A GGUF model (see ARCHITECTURES): its weights (memory-mapped, in their file types), tokenizer and
    config. Read-only once loaded: one Model serves any number of Sessions, from any threads."""

    def __init__(self, gguf: GGUFFile, n_ctx: int | None = None, threads: int | None = None, activations: int = 16,
                 decode: bool | None = None):
        self.gguf, self.metadata, self.path = gguf, gguf.metadata, gguf.path
        self.config = c = read_config(gguf)
        self.tokenizer = Tokenizer(gguf.metadata, gguf.path)
        if len(self.tokenizer.tokens) != c.n_vocab:  # every id the model emits must be a token
            raise GGUFError(f"{self.path}: {c.arch}.vocab_size is {c.n_vocab} but tokenizer.ggml.tokens has "
                            f"{len(self.tokenizer.tokens)} tokens")
        self.n_ctx = min(n_ctx or c.n_ctx, c.n_ctx)
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim

        def tensor(name, shape, matrix=True):
            t = gguf.tensors.get(name)
            if t is None:
                raise GGUFError(f"{self.path}: tensor {name!r} is missing")
            if t.shape != shape:
                raise GGUFError(f"{self.path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
            if t.type not in DEQUANTIZE:
                raise GGUFError(f"{self.path}: tensor {name!r} has type {t.type_name}, which run.py does not "
                                f"decode (supported: {SUPPORTED_TYPES})")
            if matrix:
                return t
            return dequantize(t.data.reshape(1, -1), t.type).reshape(shape)  # small vectors as float32

        self.token_embd = tensor("token_embd.weight", (c.n_vocab, c.n_embd))
        # tied embeddings: no output.weight, the output projection reuses the embedding
        self.output = (tensor("output.weight", (c.n_vocab, c.n_embd))
                       if "output.weight" in gguf.tensors else self.token_embd)
        self.output_norm = tensor("output_norm.weight", (c.n_embd,), matrix=False)
        self.layers = []
        qk_norm = "blk.0.attn_q_norm.weight" in gguf.tensors
        gemma = c.arch in ("gemma2", "gemma3")
        for i in range(c.n_layer):
            p = f"blk.{i}."
            if c.arch == "phi3":  # fused: rows [q; k; v] and [gate; up]
                qkv = tensor(p + "attn_qkv.weight", (q_dim + 2 * kv_dim, c.n_embd))
                wq, wk, wv = row_slice(qkv, 0, q_dim), row_slice(qkv, q_dim, kv_dim), row_slice(qkv, q_dim + kv_dim, kv_dim)
                gate_up = tensor(p + "ffn_up.weight", (2 * c.n_ff, c.n_embd))
                w_gate, w_up = row_slice(gate_up, 0, c.n_ff), row_slice(gate_up, c.n_ff, c.n_ff)
            else:
                wq, wk, wv = (tensor(p + "attn_q.weight", (q_dim, c.n_embd)), tensor(p + "attn_k.weight", (kv_dim, c.n_embd)),
                              tensor(p + "attn_v.weight", (kv_dim, c.n_embd)))
                w_gate, w_up = tensor(p + "ffn_gate.weight", (c.n_ff, c.n_embd)), tensor(p + "ffn_up.weight", (c.n_ff, c.n_embd))
            self.layers.append(Layer(
                attn_norm=tensor(p + "attn_norm.weight", (c.n_embd,), False), wq=wq, wk=wk, wv=wv,
                wo=tensor(p + "attn_output.weight", (c.n_embd, q_dim)),
                ffn_norm=tensor(p + "ffn_norm.weight", (c.n_embd,), False), w_gate=w_gate, w_up=w_up,
                w_down=tensor(p + "ffn_down.weight", (c.n_embd, c.n_ff)),
                qkv_bias=(np.concatenate([tensor(p + f"attn_{x}.bias", (n,), False)
                                          for x, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))])
                          if p + "attn_q.bias" in gguf.tensors else None),
                q_norm=tensor(p + "attn_q_norm.weight", (c.head_dim,), False) if qk_norm else None,
                k_norm=tensor(p + "attn_k_norm.weight", (c.head_dim,), False) if qk_norm else None,
                attn_post_norm=tensor(p + "post_attention_norm.weight", (c.n_embd,), False) if gemma else None,
                ffn_post_norm=tensor(p + "post_ffw_norm.weight", (c.n_embd,), False) if gemma else None,
                swa=bool(c.swa_layers) and c.swa_layers[i]))
        inv_freq = c.rope_theta ** (-np.arange(0, c.rope_dims, 2, dtype=np.float64) / c.rope_dims)
        if "rope_factors_long.weight" in gguf.tensors:  # LongRoPE: as llama.cpp, the long factors
            # for a context longer than the one the model was first trained for, else the short
            which = "long" if self.n_ctx > c.rope_n_ctx_orig else "short"
            inv_freq = inv_freq / tensor(f"rope_factors_{which}.weight", (c.rope_dims // 2,), False)
        if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1+ long-context frequency factors
            inv_freq = inv_freq / tensor("rope_freqs.weight", (c.rope_dims // 2,), False)
        self.inv_freq = inv_freq / c.rope_scale
        # sliding-window layers: their own base, no scaling (llama.cpp's rope_freq_base_swa)
        self.inv_freq_swa = c.rope_theta_swa ** (-np.arange(0, c.rope_dims, 2, dtype=np.float64) / c.rope_dims)
        threads = default_threads() if threads is None else threads
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"activations must be 16 or 8 bits, not {activations!r}")
        # the compiled kernels, when numba is there and has one for every matrix's type (tests set False)
        matrices = [t for L in self.layers for t in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)]
        kernels = (numba is not None and all(t.type in KERNEL_TYPES for t in matrices + [self.output])
                   and _compile_kernels(activations))
        if decode is None:  # numpy decodes a matrix 10 to 50 times slower than BLAS multiplies it
            decode = not kernels and 4 * sum(t.shape[0] * t.shape[1] for t in matrices + [self.output]) <= \
                available_memory() // 2
        if decode:
            self._decode_matrices(threads if kernels else 0)
        self.use_numba = kernels and not decode
        self.activation_bits = activations
        self.threads = min(threads, numba.config.NUMBA_NUM_THREADS) if self.use_numba else threads
        if self.use_numba:
            self._table = np.array([(t.offset, t.nbytes, t.shape[0], t.type) for t in matrices + [self.output]])
            self._norms = np.stack([np.stack([L.attn_norm, L.ffn_norm]) for L in self.layers]
                                   + [np.stack([self.output_norm, self.output_norm])]).astype(np.float32)
            biases = [L.qkv_bias for L in self.layers if L.qkv_bias is not None]
            self._qkv_bias = np.array(biases, np.float32).reshape(len(biases), q_dim + 2 * kv_dim)
            norms = [(L.q_norm, L.k_norm) for L in self.layers if L.q_norm is not None]
            self._qk_norms = np.array(norms, np.float32).reshape(len(norms), 2, c.head_dim)
            posts = [(L.attn_post_norm, L.ffn_post_norm) for L in self.layers if L.attn_post_norm is not None]
            self._post_norms = np.array(posts, np.float32).reshape(len(posts), 2, c.n_embd)
            self._windows = np.array([c.sliding_window if L.swa else 0 for L in self.layers], np.int64)

    def _decode_matrices(self, threads: int):
        """Every matrix decoded to float32 once, in memory, in place of its file bytes (matmul
        then runs BLAS on them directly): for the numpy path, 4 bytes a weight. threads: see
        decoded_parts."""
        def decoded(t: TensorInfo) -> TensorInfo:
            if t.type == GGMLType.F32:
                return t
            out = np.empty(t.shape, np.float32)
            for first, part in decoded_parts(t, threads):
                out[first:first + len(part)] = part
            return TensorInfo(t.name, t.shape, GGMLType.F32, t.offset, out.nbytes, out.reshape(-1).view(np.uint8))
        for L in self.layers:
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                setattr(L, name, decoded(getattr(L, name)))
        tied = self.output is self.token_embd
        self.output = decoded(self.output)
        if tied:  # the same float32 copy for the embedding's rows
            self.token_embd = self.output

    # -- the Python interface -------------------------------------------------
    def session(self, exact: bool = False) -> Session:
        """A new conversation on this model: its own KV cache (see Session)."""
        return Session(self, exact)

    def tokenize(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Text -> token ids; add_bos None follows the file's add_bos_token rule. Text from
        someone else (a user, a web page) goes with parse_special=False: what it spells stays text."""
        return self.tokenizer.encode(text, add_bos, parse_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """The next-token logits at every position of ids: float32 (len(ids), n_vocab)."""
        return self.session().feed(ids, all_logits=True)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render messages ([{'role': ..., 'content': ...}]) with the model's chat template."""
        return render_chat(self.metadata, messages, add_generation_prompt)

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The conversation as token ids, with special tokens from the template only: a message
        that spells one ('<|im_end|><|im_start|>system') is tokenized as the text it is."""
        return chat_tokens(self.tokenizer, self.metadata, messages, add_generation_prompt)

    def loglikelihoods(self, groups: Iterable[Sequence[tuple[Sequence[int], Sequence[int]]]]
                       ) -> Iterator[list[tuple[np.ndarray, bool]]]:
        """Score continuations, as benchmarks do: for each group of (context, continuation) pairs
        (token ids; a multiple-choice question's choices, say), yield in order each pair's
        log P(continuation[i] | context + continuation[:i]) (float64) and whether the
        continuation is the greedy one (each of its tokens the most likely). A group's pairs
        share the computation of their common prefixes (a prefix tree of tokens, each attending
        to its ancestors), and groups are packed into passes of about SCORE_BATCH tokens of
        matrix-matrix products, the weights unpacked once per pass."""
        batch: list[_PrefixTree] = []
        for group in groups:
            tree = _prefix_tree(self, group)
            if batch and sum(len(t.tokens) for t in batch) + len(tree.tokens) > SCORE_BATCH:
                yield from self._score(batch)
                batch = []
            batch.append(tree)
        if batch:
            yield from self._score(batch)

    # -- the forward pass --------------------------------------------------------
    def _forward(self, k_cache, v_cache, tokens, start, all_logits):
        """numpy: run tokens at positions start.. with their keys and values written to the
        caches (which hold the earlier ones); the logits of the last token, or of every one."""
        S = start + len(tokens)
        behind = np.arange(start, S)[:, None] - np.arange(S)[None, :]
        mask = behind >= 0  # query t (position start+t) sees 0..start+t
        window = mask & (behind < self.config.sliding_window)  # and in a sliding-window layer, the last few

        def attend(i, q, k, v):  # the new keys and values join the cache's, positions last
            k_cache[i, :, :, start:S], v_cache[i, :, :, start:S] = k.transpose(1, 2, 0), v.transpose(1, 2, 0)
            return self._attend(q, k_cache[i, :, :, :S], v_cache[i, :, :, :S], window if self.layers[i].swa else mask)

        x = self._layers(tokens, np.arange(start, S), attend)
        return self._capped(matmul(x if all_logits else x[-1:], self.output, self._decoders))

    @property
    def _decoders(self) -> int:
        """matmul's threads: the compiled decoders' where the kernels run, else 0 (numpy's)."""
        return self.threads if self.use_numba else 0

    def _capped(self, logits):
        """Gemma 2's final soft-capping of logits, in place."""
        cap = np.float32(self.config.final_softcap)
        if cap:
            np.multiply(np.tanh(np.divide(logits, cap, out=logits), out=logits), cap, out=logits)
        return logits

    def _layers(self, tokens, positions, attend):
        """numpy: the tokens at their positions through every layer, attention by attend(layer,
        q, k, v) -> (T, n_head * head_dim); the final normalized hidden states (T, n_embd)."""
        c = self.config
        T = len(tokens)
        cos, sin = self._rotations(positions)
        cos_sin = [(cos[r][:, None, :], sin[r][:, None, :]) for r in (0, 1)]  # (T, 1, rope_dims/2)
        x = get_rows(self.token_embd, tokens)  # (T, n_embd)
        if c.embd_scale != 1.0:
            x *= np.float32(c.embd_scale)
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        threads = self._decoders
        for i, L in enumerate(self.layers):
            cos, sin = cos_sin[L.swa]
            h = rms_norm(x, L.attn_norm, c.norm_eps)
            q, k, v = matmul(h, L.wq, threads), matmul(h, L.wk, threads), matmul(h, L.wv, threads)
            if L.qkv_bias is not None:
                q, k, v = q + L.qkv_bias[:q_dim], k + L.qkv_bias[q_dim:q_dim + kv_dim], v + L.qkv_bias[q_dim + kv_dim:]
            q, k = q.reshape(T, c.n_head, c.head_dim), k.reshape(T, c.n_head_kv, c.head_dim)
            if L.q_norm is not None:
                q, k = rms_norm(q, L.q_norm, c.norm_eps), rms_norm(k, L.k_norm, c.norm_eps)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            v = v.reshape(T, c.n_head_kv, c.head_dim)
            out = matmul(attend(i, q, k, v), L.wo, threads)
            x = x + (out if L.attn_post_norm is None else rms_norm(out, L.attn_post_norm, c.norm_eps))
            h = rms_norm(x, L.ffn_norm, c.norm_eps)
            gate = (gelu_tanh if c.gelu else silu)(matmul(h, L.w_gate, threads))
            gate *= matmul(h, L.w_up, threads)
            out = matmul(gate, L.w_down, threads)
            x = x + (out if L.ffn_post_norm is None else rms_norm(out, L.ffn_post_norm, c.norm_eps))
        return rms_norm(x, self.output_norm, c.norm_eps)

    def _attend(self, q, keys, values, mask):
        """Queries q (T, n_head, head_dim) over keys and values (n_head_kv, head_dim, S), query t
        seeing the keys where mask[t] (T, S) is True: (T, n_head * head_dim). ATTEND_BLOCK
        queries at a time, each block against the keys up to the last one it sees (a prompt's
        causal mask: half the products of all queries against all keys), scores in place."""
        c = self.config
        T = len(q)
        # grouped-query attention: query head j uses key/value head j // group
        group, scale = c.n_head // c.n_head_kv, np.float32(c.attn_scale or 1.0 / c.head_dim ** 0.5)
        q = (q * scale).reshape(T, c.n_head_kv, group, c.head_dim).transpose(1, 2, 0, 3)  # (kv, group, T, hd)
        values = values.transpose(0, 2, 1)  # (kv, S, hd)
        out = np.empty((T, c.n_head_kv, group, c.head_dim), np.float32)
        for a in range(0, T, ATTEND_BLOCK):
            b = min(a + ATTEND_BLOCK, T)
            S = np.flatnonzero(mask[a:b].any(axis=0))[-1] + 1  # the keys [0, S) are the block's
            scores = np.matmul(q[:, :, a:b], keys[:, None, :, :S])  # (kv, group, b - a, S)
            if c.attn_softcap:
                cap = np.float32(c.attn_softcap)
                np.multiply(np.tanh(np.divide(scores, cap, out=scores), out=scores), cap, out=scores)
            seen = mask[a:b, :S].all(axis=0)
            hidden = S if seen.all() else int(np.argmin(seen))  # keys before it: seen by all the block
            np.copyto(scores[..., hidden:], -np.inf, where=~mask[a:b, hidden:S])
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            total = scores.sum(axis=-1, keepdims=True)  # normalized after the product: (b - a) x hd, not x S
            out[a:b] = (np.matmul(scores, values[:, None, :S]) / total).transpose(2, 0, 1, 3)
        return out.reshape(T, -1)

    def _score(self, trees: list[_PrefixTree]) -> Iterator[list[tuple[np.ndarray, bool]]]:
        """One pass for the prefix trees' tokens; each tree's pairs' log-probabilities."""
        offsets = np.cumsum([0] + [len(t.tokens) for t in trees])

        W = self.config.sliding_window
        windows = [t.mask & (t.positions[:, None] - t.positions[None, :] < W) for t in trees] if W else None

        def attend(i, q, k, v):  # each tree on its own: its tokens see their ancestors only
            out = np.empty((len(q), q.shape[1] * q.shape[2]), np.float32)
            for n, (t, a, b) in enumerate(zip(trees, offsets, offsets[1:])):
                mask = windows[n] if self.layers[i].swa else t.mask
                out[a:b] = self._attend(q[a:b], k[a:b].transpose(1, 2, 0), v[a:b].transpose(1, 2, 0), mask)
            return out

        x = self._layers([i for t in trees for i in t.tokens], np.concatenate([t.positions for t in trees]), attend)
        # log P(target) and greedy for each scored token, from the rows of the tokens that
        # predict one, a slice of the vocabulary at a time: a running log-sum-exp and argmax,
        # so no (rows, n_vocab) logits are held and the output matrix is unpacked once per pass
        rows = np.concatenate([t.rows + a for t, a in zip(trees, offsets)])
        targets = np.concatenate([t.targets for t in trees])
        needed, where = np.unique(rows, return_inverse=True)
        top = np.full(len(needed), -np.inf, np.float32)
        total, best = np.zeros(len(needed)), np.zeros(len(needed), np.int64)
        picked = np.empty(len(rows), np.float32)
        for first, logits in matmul_parts(x[needed], self.output, self._decoders):
            logits = self._capped(logits)
            inside = (targets >= first) & (targets < first + logits.shape[1])
            picked[inside] = logits[where[inside], targets[inside] - first]
            slice_top = logits.max(axis=-1)
            new_top = np.maximum(top, slice_top)
            best = np.where(slice_top > top, logits.argmax(axis=-1) + first, best)  # the first of equal maxima
            np.exp(np.subtract(logits, new_top[:, None], out=logits), out=logits)
            total = total * np.exp(top - new_top) + logits.sum(axis=-1, dtype=np.float64)
            top = new_top
        logprob = picked - top[where] - np.log(total[where])
        greedy = best[where] == targets
        start = 0
        for t in trees:
            pairs = []
            for n in t.lengths:
                pairs.append((logprob[start:start + n], bool(greedy[start:start + n].all())))
                start += n
            yield pairs

    def _rotations(self, positions):
        """RoPE's cos and sin at these positions, (2, T, rope_dims/2) float32: [0] for the global
        layers, [1] for the sliding-window ones; times LongRoPE's attention factor."""
        inv_freq = np.stack([self.inv_freq, self.inv_freq_swa if self.config.swa_layers else self.inv_freq])
        angles = np.asarray(positions, np.float64)[None, :, None] * inv_freq[:, None, :]
        factor = self.config.rope_attn_factor
        return (np.cos(angles) * factor).astype(np.float32), (np.sin(angles) * factor).astype(np.float32)

    def _rope(self, x, cos, sin):
        """Rotate pairs of the first rope_dims of each head: adjacent ones (2i, 2i+1) in GGUF's
        llama layout (its converters permute Wq and Wk rows to match), (i, i + rope_dims/2)
        where the architecture says so (rope_neox: Hugging Face's own layout)."""
        d = self.config.rope_dims
        if self.config.rope_neox:
            x0, x1 = x[..., :d // 2], x[..., d // 2:d]
            rotated = np.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
        else:
            pairs = x[..., :d].reshape(*x.shape[:-1], d // 2, 2)
            x0, x1 = pairs[..., 0], pairs[..., 1]
            rotated = np.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(*x.shape[:-1], d)
        return np.concatenate([rotated, x[..., d:]], axis=-1) if d < x.shape[-1] else rotated

    def _decode(self, caches, seqs, tokens, positions, wanted):
        """Tokens through the compiled kernels, token t at position positions[t] of sequence
        seqs[t], whose keys and values are caches[0][seqs[t]], caches[1][seqs[t]] (typed lists,
        see Session._kernel_caches), all in one pass over the weights: the next-token logits
        of tokens `wanted` (len(wanted), n_vocab)."""
        c = self.config
        positions, wanted = np.asarray(positions, np.int64), np.asarray(wanted, np.int64)
        cos, sin = self._rotations(positions)
        x = get_rows(self.token_embd, tokens)
        if c.embd_scale != 1.0:
            x *= np.float32(c.embd_scale)
        logits = np.empty((len(wanted), self.config.n_vocab), np.float32)
        with _KERNEL_LOCK:
            numba.set_num_threads(self.threads)  # per calling thread in numba
            _decode_tokens(x, positions, np.asarray(seqs, np.int64), self.gguf.data, self._table, self._norms,
                           self._qkv_bias, self._qk_norms, self._post_norms, *caches, cos, sin, c.n_head, c.norm_eps, c.rope_neox,
                           self._windows, c.attn_scale or 1.0 / np.sqrt(c.head_dim), c.attn_softcap, c.gelu, wanted,
                           logits, self.threads, ACTIVATIONS[self.activation_bits])
        return self._capped(logits)


@dataclass
class _PrefixTree:
    """A group's token sequences (each context + continuation) as a tree: one node per distinct
    prefix, so a context shared by four choices is computed once."""
    tokens: list[int]       # each node's token
    positions: np.ndarray   # its position (depth)
    mask: np.ndarray        # (nodes, nodes): mask[a, b] when b is a or an ancestor of a
    rows: np.ndarray        # for every scored token, in pair order, the node whose logits predict it
    targets: np.ndarray     # ... and the token
    lengths: list[int]      # each pair's number of scored tokens


def _prefix_tree(model: Model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> _PrefixTree:
    tokens, parents, positions, rows, targets, lengths = [], [], [], [], [], []
    child: dict[tuple[int, int], int] = {}
    for context, continuation in pairs:
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError("scoring needs a context and a continuation of at least one token each")
        sequence = _checked(model, context + continuation, 0)
        path, parent = [], -1
        for position, token in enumerate(sequence[:-1]):  # the last token predicts nothing scored
            node = child.get((parent, token))
            if node is None:
                node = child[parent, token] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                positions.append(position)
            path.append(node)
            parent = node
        rows += path[len(context) - 1:]
        targets += continuation
        lengths.append(len(continuation))
    mask = np.zeros((len(tokens), len(tokens)), bool)
    for node, parent in enumerate(parents):  # parents come before their children
        if parent >= 0:
            mask[node] = mask[parent]
        mask[node, node] = True
    return _PrefixTree(tokens, np.array(positions), mask, np.array(rows, np.int64), np.array(targets, np.int64),
                       lengths)


def load(path: str, n_ctx: int | None = None, threads: int | None = None, activations: int = 16,
         decode: bool | None = None) -> Model:
    """Load a GGUF model: the tensors stay memory-mapped in their file types. activations:
    the compiled kernels' rounding of each matrix's input, 16 or 8 bits (ACTIVATIONS).
    decode: hold every matrix decoded to float32 and run on numpy's BLAS; by default when
    the kernels cannot run (no numba) and the copies take at most half the available memory."""
    return Model(read_gguf(path), n_ctx, threads, activations, decode)


def available_memory() -> int:
    """Bytes of memory free for new use (Linux's MemAvailable, else the free pages), 0 if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def default_threads() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------
# Two kinds, both read from the file's metadata: `gpt2` (byte-level BPE with merges and a
# pre-tokenizer split regex named by tokenizer.ggml.pre) and `llama` (SentencePiece with
# scores and <0xNN> byte fallback).

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Unicode White_Space, as the `regex` and Oniguruma engines define \s (Python's re also
# counts U+001C..U+001F, which would split text differently from the reference tokenizers).
_WS = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def _category_class(major: str) -> str:
    """A regex character class body for one Unicode major category (L letters, M marks, N
    numbers, P punctuation); Python's re has no \\p{L}, so the class is built from unicodedata
    once per process. Its Unicode version is Python's (14.0 in 3.11, 15.1 in 3.13); llama.cpp's
    tables are Unicode 15.1, so characters assigned in between can split differently."""
    parts, start = [], None
    top = 0xE01F0 if major == "M" else 0x32400  # past these, only variation selectors (marks)
    for c in range(top + 1):
        inside = c < top and unicodedata.category(chr(c))[0] == major
        if inside and start is None:
            start = c
        elif not inside and start is not None:
            parts.append(f"\\U{start:08x}-\\U{c - 1:08x}")
            start = None
    return "".join(parts)


_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}"
                 r"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]"
                r"| ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
_DIGIT = r"[{N}]"
# llama.cpp's own default, for "default" and for a file without tokenizer.ggml.pre: runs of
# punctuation are split off first (so no contraction ever forms), then the GPT-2 split, runs
# of numbers, and runs of three ASCII digits
_DEFAULT_SPLITS = [r"[{P}$+<=>^~|]+", _GPT2_SPLIT, r"[{N}]+", r"[0-9][0-9][0-9]"]
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}{M}]+|[{N}]"
                 r"| ?[^{S}{L}{M}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # Han, the blocks from Samaritan up to Han, Hangul
# DeepSeek LLM's letters: the cased letters of Latin, Greek, Cyrillic, Armenian, Georgian,
# Cherokee, Glagolitic, Coptic, Deseret, Osage, Old Hungarian, Warang Citi, Adlam and fullwidth
# Latin, as its tokenizer.json lists them
_DEEPSEEK_LETTERS = ("A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
                     "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a"
                     "\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
                     "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
                     "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
                     "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
                     "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
                     "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
                     "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
                     "\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
                     "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
                     "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
                     "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
                     "\U0001e900-\U0001e943")
# tokenizer.ggml.pre -> the regexes applied in turn (each splits the pieces of the last),
# as llama.cpp's llama-vocab.cpp and the models' own tokenizer.json define them.
PRE_TOKENIZERS = {
    "default": _DEFAULT_SPLITS, "gpt-2": [_GPT2_SPLIT], "gpt2": [_GPT2_SPLIT], "mpt": [_GPT2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT], "llama3": [_LLAMA3_SPLIT],
    "smollm": [_DIGIT, _GPT2_SPLIT], "starcoder": [_DIGIT, _GPT2_SPLIT], "refact": [_DIGIT, _GPT2_SPLIT],
    "command-r": [_DIGIT, _GPT2_SPLIT],
    "qwen2": [_QWEN2_SPLIT], "qwen35": [_QWEN35_SPLIT],
    "falcon": [r"[{P}$+<=>^~|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"],
    "deepseek-llm": ["[\r\n]", "[{S}]?[" + _DEEPSEEK_LETTERS + "]+",
                     "[{S}]?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     r"[{S}]+\Z", _CJK, r"[{N}]+"],
    "deepseek-coder": ["[\r\n]", r"[{S}]?[{L}]+", r"[{S}]?[{P}]+", _CJK, _DIGIT],
}
# Llama 3's pre-tokenizers (llama.cpp's LLAMA3 type): a word that is itself a token is emitted
# whole, without BPE (its tokenizer.json's "ignore_merges": its merges alone may split such a
# word), and BOS is added unless the file says otherwise
LLAMA3_PRES = ("llama-bpe", "llama3")
_compiled_splits: dict[str, list[re.Pattern]] = {}


def _split_patterns(pre: str) -> list[re.Pattern]:
    if pre not in _compiled_splits:
        used = {c for p in PRE_TOKENIZERS[pre] for c in "LMNP" if "{" + c + "}" in p}
        classes = {c: _category_class(c) if c in used else "" for c in "LMNP"} | {"S": _WS}
        _compiled_splits[pre] = [re.compile(p.format(**classes)) for p in PRE_TOKENIZERS[pre]]
    return _compiled_splits[pre]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (token strings use it)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    def __init__(self, meta: dict, path: str = "model"):
        def get(key, default=None, kind=None):
            value = meta.get("tokenizer.ggml." + key, default)
            if kind is not None and value is not None and not isinstance(value, kind):
                raise GGUFError(f"{path}: tokenizer.ggml.{key} = {value!r:.40} is not a {kind.__name__}")
            return value

        self.model = get("model", kind=str)
        if self.model not in ("gpt2", "llama"):
            raise GGUFError(f"{path}: tokenizer.ggml.model = {self.model!r} is not supported (gpt2 and llama are)")
        self.tokens: list[str] = get("tokens")
        if not isinstance(self.tokens, list) or not self.tokens or not all(isinstance(t, str) for t in self.tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
        n = len(self.tokens)

        def array(key, kinds, default, label):  # a numeric array of one entry per token, as a list
            value = get(key, default)
            if not isinstance(value, np.ndarray) or value.shape != (n,) or value.dtype.kind not in kinds:
                raise GGUFError(f"{path}: tokenizer.ggml.{key} is not an array of {n} {label}")
            return value.tolist()

        self.types = array("token_type", "iu", np.full(n, TOKEN_NORMAL), "integers")
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}

        def special(key):
            value = get(key + "_token_id")
            if value is not None and not (isinstance(value, int) and 0 <= value < n):
                raise GGUFError(f"{path}: tokenizer.ggml.{key}_token_id = {value!r} is not a token id (0..{n - 1})")
            return value

        self.bos_id, self.eos_id = special("bos"), special("eos")
        pre = get("pre", "default", str) if self.model == "gpt2" else None
        self.add_bos = get("add_bos_token", self.model == "llama" or pre in LLAMA3_PRES, bool)
        if self.add_bos and self.bos_id is None:
            raise GGUFError(f"{path}: add_bos_token is set but tokenizer.ggml.bos_token_id is missing")
        # generation ends on any end-of-generation token: EOS, end-of-turn, and the usual
        # end-of-turn markers of chat templates, as llama.cpp does
        eog_texts = {"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"}
        self.eog_ids = {i for i in (self.eos_id, special("eot"), special("eom")) if i is not None}
        self.eog_ids |= {i for i, t in enumerate(self.tokens)
                         if t in eog_texts and self.types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)}
        # control, user-defined and unknown tokens written in the text map to their ids: as
        # llama.cpp does, (text, id) pairs are looked for one by one, the longest (in bytes) first
        self.specials = sorted(((t, i) for i, (t, ty) in enumerate(zip(self.tokens, self.types))
                                if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN) and t),
                               key=lambda s: -len(s[0].encode("utf-8")))
        # user-defined tokens are split out of all text, also text whose special tokens stay
        # text (parse_special=False), as llama.cpp and Hugging Face tokenizers do
        self.user_defined = [(t, i) for t, i in self.specials if self.types[i] == TOKEN_USER_DEFINED]
        self.special_re = re.compile("|".join(re.escape(t) for t, _ in self.specials)) if self.specials else None
        # the whitespace after these tokens is dropped: llama.cpp does so for Phi-3's (known by
        # the model's name; the file does not say), as Phi-3's tokenizer.json marks them rstrip
        name = meta.get("general.name")
        phi3 = isinstance(name, str) and ("phi-3" in name.lower() or "phi3" in name.lower())
        self.rstrip_ids = {i for t, i in self.specials if phi3 and t not in ("<unk>", "<s>", "<|endoftext|>")}
        self.cache: dict[str, list[int]] = {}

        if self.model == "gpt2":
            if pre not in PRE_TOKENIZERS:
                raise GGUFError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported "
                                f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
            self.splits = _split_patterns(pre)
            self.ignore_merges = pre in LLAMA3_PRES
            merges = get("merges")
            if not isinstance(merges, list) or not merges or not all(isinstance(m, str) for m in merges):
                raise GGUFError(f"{path}: tokenizer.ggml.merges is missing or not a list of strings "
                                f"(required for a gpt2 tokenizer)")
            self.merge_rank = {}
            for rank, m in enumerate(merges):
                left, _, right = m.partition(" ")
                self.merge_rank.setdefault((left, right), rank)
            self.byte_char = _byte_to_unicode()
            self.char_byte = {c: b for b, c in self.byte_char.items()}
        else:
            self.scores = array("scores", "iuf", np.zeros(n), "numbers")
            self.add_space_prefix = get("add_space_prefix", True, bool)
            self.byte_ids = {}
            for i, t in enumerate(self.tokens):
                if self.types[i] == TOKEN_BYTE and len(t) == 6 and t.startswith("<0x"):
                    self.byte_ids[int(t[3:5], 16)] = i
            self.unk_id = special("unknown")

    # -- encoding -----------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Text -> ids. add_bos None follows the file's add_bos_token rule. parse_special: special
        tokens written in the text (<|im_end|>) become their ids; False for text from someone
        else, whose control tokens must stay text (user-defined tokens, ordinary words of the
        vocabulary, are found either way, as llama.cpp and Hugging Face tokenizers find them)."""
        return self.encode_fragments(self.fragments(text) if parse_special else [text], add_bos)

    def fragments(self, text: str) -> list[str | int]:
        """Text split at the special tokens written in it: plain text pieces and special token ids."""
        return self._split_at(self.specials, [text])

    def _split_at(self, specials: list[tuple[str, int]], pieces: list[str | int]) -> list[str | int]:
        """Split the text pieces at the (text, id) tokens as llama.cpp does: one token after
        the other through all the pieces, each occurrence left to right; no empty text is left."""
        pieces = [p for p in pieces if p != ""]
        for token, token_id in specials:
            if not any(isinstance(p, str) and token in p for p in pieces):
                continue
            out = []
            for p in pieces:
                if isinstance(p, str):
                    at = p.find(token)
                    while at >= 0:
                        if at > 0:
                            out.append(p[:at])
                        out.append(token_id)
                        p = p[at + len(token):]
                        if token_id in self.rstrip_ids:
                            p = p.lstrip(" \t\n\v\f\r")  # C's isspace, as llama.cpp
                        at = p.find(token)
                    if p:
                        out.append(p)
                else:
                    out.append(p)
            pieces = out
        return pieces

    def encode_fragments(self, fragments: Sequence[str | int], add_bos: bool | None = None) -> list[int]:
        """Plain text pieces (tokenized each on its own, after user-defined tokens are split
        out of them) and special token ids -> ids."""
        ids = []
        if self.add_bos if add_bos is None else add_bos:
            ids.append(self.bos_id)
        prev_special = True  # SentencePiece adds its space prefix after a special token
        for n, chunk in enumerate(fragments):
            if isinstance(chunk, int):
                if not (n == 0 and ids and chunk == ids[0]):  # a BOS written in the text: never doubled
                    ids.append(chunk)
                prev_special = True
                continue
            for piece in self._split_at(self.user_defined, [chunk]):
                if isinstance(piece, int):
                    ids.append(piece)
                elif self.model == "gpt2":
                    for regex_piece in self._pre_split(piece):
                        ids.extend(self._bpe_piece(regex_piece))
                else:
                    ids.extend(self._spm_fragment((" " if self.add_space_prefix and prev_special else "") + piece))
                prev_special = isinstance(piece, int)
        return ids

    def _pre_split(self, text):
        pieces = [text]
        for regex in self.splits:
            out = []
            for piece in pieces:  # text between matches is kept as a piece of its own
                pos = 0
                for m in regex.finditer(piece):
                    if m.start() > pos:
                        out.append(piece[pos:m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    pos = m.end()
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces

    def _bpe_piece(self, piece: str) -> list[int]:
        cached = self.cache.get(piece)
        if cached is not None:
            return cached
        word = [self.byte_char[b] for b in piece.encode("utf-8")]
        if self.ignore_merges and "".join(word) in self.token_to_id:
            return [self.token_to_id["".join(word)]]
        rank = self.merge_rank
        while len(word) > 1:
            best, best_rank = None, None
            for i in range(len(word) - 1):
                r = rank.get((word[i], word[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            pair, merged, i = (word[best], word[best + 1]), word[best] + word[best + 1], 0
            out = []
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        ids = []
        for w in word:
            if w in self.token_to_id:
                ids.append(self.token_to_id[w])
            else:  # a vocabulary without some byte: emit the bytes it does have
                ids.extend(self.token_to_id[c] for c in w if c in self.token_to_id)
        if len(self.cache) < 100_000:
            self.cache[piece] = ids
        return ids

    def _spm_fragment(self, text: str) -> list[int]:
        """SentencePiece BPE: repeatedly merge the adjacent pair whose merged token scores
        highest (leftmost on ties), then fall back to <0xNN> byte tokens for unknown pieces."""
        text = text.replace(" ", "\u2581")
        if not text:
            return []
        syms = list(text)
        prev, nxt = list(range(-1, len(syms) - 1)), list(range(1, len(syms) + 1))
        heap = []

        def push(left):
            right = nxt[left]
            if right < len(syms):
                merged = syms[left] + syms[right]
                i = self.token_to_id.get(merged)
                if i is not None:
                    heapq.heappush(heap, (-self.scores[i], left, merged))

        for i in range(len(syms) - 1):
            push(i)
        while heap:
            _, left, merged = heapq.heappop(heap)
            right = nxt[left]
            if right >= len(syms) or not syms[left] or syms[left] + syms[right] != merged:
                continue  # stale: one side has merged since this pair was pushed
            syms[left], syms[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[left] < len(syms):
                prev[nxt[left]] = left
            if prev[left] >= 0:
                push(prev[left])
            push(left)
        ids = []
        for s in syms:
            if not s:
                continue
            i = self.token_to_id.get(s)
            if i is not None and self.types[i] != TOKEN_BYTE:
                ids.append(i)
            else:
                for b in s.encode("utf-8"):
                    ids.append(self.byte_ids.get(b, self.unk_id if self.unk_id is not None else 0))
        return ids

    # -- decoding -----------------------------------------------------------
    def token_bytes(self, i: int) -> bytes:
        """The bytes one token stands for (control tokens give their written form)."""
        t = self.tokens[i]
        if self.types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            return t.encode("utf-8")
        if self.model == "gpt2":
            return bytes(self.char_byte.get(c, 0x3F) for c in t)
        if self.types[i] == TOKEN_BYTE:
            return bytes([int(t[3:5], 16)])
        return t.replace("\u2581", " ").encode("utf-8")

    def decode(self, ids: Sequence[int]) -> str:
        text = b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        if self.model == "llama" and self.add_space_prefix and text.startswith(" ") \
                and ids and self.types[ids[0]] == TOKEN_NORMAL:
            text = text[1:]  # the space prefix added when encoding
        return text


class StreamDecoder:
    """Turns token ids into text as they arrive: whole UTF-8 characters only (a character can
    span tokens), and with stop strings, never a stop string or a tail that may begin one.
    Stop strings are matched on bytes, so one whose characters are split across tokens still
    matches; the text ends exactly where it starts (OpenAI's rule) and `stopped` turns True."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s.encode("utf-8") for s in stop if s]
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.out = bytearray()  # the bytes of every token
        self.sent = 0           # how many of them have been returned as text
        self.stopped = False

    def __call__(self, token: int) -> str:
        out, stops, before = self.out, self.stops, len(self.out)
        out += self.tokenizer.token_bytes(token)
        if not stops:
            self.sent = len(out)
            return self.utf8.decode(out[before:])
        # a stop string that ends in this token's bytes: the text ends where it begins
        found = [i for i in (out.find(s, max(before - len(s) + 1, 0)) for s in stops) if i >= 0]
        if found:
            self.stopped = True
            piece, self.sent = self.utf8.decode(bytes(out[self.sent:min(found)]), final=True), len(out)
            return piece
        # hold back a tail that may be the start of a stop string
        held = next((k for k in range(min(max(map(len, stops)) - 1, len(out) - self.sent), 0, -1)
                     if any(s.startswith(out[len(out) - k:]) for s in stops)), 0)
        piece, self.sent = self.utf8.decode(bytes(out[self.sent:len(out) - held])), len(out) - held
        return piece

    def flush(self) -> str:
        """The held-back rest, at the end of the text."""
        piece, self.sent = self.utf8.decode(bytes(self.out[self.sent:]), final=True), len(self.out)
        return piece


# ---------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------

def top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits (0 < k < len), in no particular order. Cheaper than a
    partial selection over the whole vocabulary: the smallest of the maxima of k chunks is a
    cut with at least k logits at or above it (the maxima themselves), usually few more, and
    only those are selected among."""
    chunk = len(logits) // k
    cut = logits[:chunk * k].reshape(k, chunk).max(axis=1).min()
    above = np.flatnonzero(logits >= cut)
    return above[np.argpartition(logits[above], len(above) - k)[len(above) - k:]]


def sampling_distribution(logits: np.ndarray, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
                          min_p: float = 0.05, repeat_penalty: float = 1.0,
                          recent: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """The tokens the sampler may pick and their probabilities (float64, summing to 1), in no
    particular order. Order as in Hugging Face's generate: repetition penalty, then
    temperature, then top-k, top-p and min-p filters on the resulting distribution.
    temperature <= 0 is greedy (argmax); top_k 0, top_p 1 and min_p 0 disable their filters.
    The vocabulary is never sorted (7 ms at 49k tokens): top-k is a partial selection (see
    top_k_ids), min-p a threshold on the logits, and only the few tokens that can survive are
    sorted for top-p."""
    if repeat_penalty != 1.0 and len(recent):
        seen = np.unique(np.asarray(recent))
        logits = logits.copy()
        # as in CTRL and llama.cpp: divide positive logits, multiply negative ones
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / repeat_penalty, logits[seen] * repeat_penalty)
    if temperature <= 0:
        return np.array([np.argmax(logits)]), np.ones(1)
    n, top = len(logits), float(logits.max())

    def weights(ids):  # probabilities up to a common factor
        return np.exp((logits[ids].astype(np.float64) - top) / temperature)

    pool = top_k_ids(logits, top_k) if 0 < top_k < n else None  # None: all
    keep = pool
    if min_p > 0:  # p_i >= min_p * p_max  <=>  logit_i >= max + temperature * ln(min_p)
        threshold = top + temperature * math.log(min_p)
        keep = np.flatnonzero(logits >= threshold) if keep is None else keep[logits[keep] >= threshold]
    if top_p < 1:
        # the nucleus: the most likely tokens whose mass (in the top-k distribution, or the
        # whole one) reaches top_p. min-p keeps a prefix of the same order, so the result is
        # the shorter of the two; without either filter, look at ever more candidates
        total = weights(pool).sum() if pool is not None else \
            np.exp((logits - top) / temperature, dtype=np.float32).sum(dtype=np.float64)
        k = 64
        while True:
            candidates = keep if keep is not None else top_k_ids(logits, k) if k < n else np.arange(n)
            order = candidates[np.argsort(-logits[candidates], kind="stable")]
            mass = np.cumsum(weights(order)) / total
            if keep is not None or mass[-1] >= top_p or k >= n:
                break
            k *= 8
        keep = order[:int(np.searchsorted(mass, top_p)) + 1]
    if keep is None:
        keep = np.arange(n)
    p = weights(keep)
    return keep, p / p.sum()


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.8, top_k: int = 40,
           top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
           recent: Sequence[int] = ()) -> int:
    """Pick the next token from sampling_distribution (same arguments)."""
    ids, p = sampling_distribution(logits, temperature, top_k, top_p, min_p, repeat_penalty, recent)
    if len(ids) == 1:
        return int(ids[0])
    cumulative = np.cumsum(p)
    return int(ids[min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(ids) - 1)])


# ---------------------------------------------------------------------------
# Sessions, generation and chat
# ---------------------------------------------------------------------------


class Session:
    """One conversation (or scoring job) on a shared Model: its KV cache and the tokens in it.

        s = model.session()
        s.feed(ids)                 # logits after the last of ids; s.tokens grows by ids
        s.step(token)               # the same for one token
        s.rewind(n)                 # forget all but the first n tokens (their cache is kept)
        s.prefill(ids)              # hold exactly ids, reusing the longest prefix already held
        s.logprobs(context, cont)   # log P(cont[i] | context + cont[:i]), context's cache reused
        s.generate(ids, ...)        # a Generation: iterate for the text

    A session is for one thread at a time; threads share the model, each with its own session;
    feed_many() feeds several sessions in one pass over the weights.
    exact=True runs every token through the compiled kernels (or, without numba, one at a
    time), so a token's logits are bit-identical however the tokens before it were fed (one by
    one, in batches, beside other sessions' tokens) and whatever the thread count: what an
    encoder and a decoder that must agree to the bit need. By default, SHORT_PROMPT or more
    new tokens with numba (2 or more without) run as matrix-matrix products (BLAS), faster for
    long prompts, equal within float32 rounding (1e-3)."""

    def __init__(self, model: Model, exact: bool = False):
        self.model, self.exact = model, exact
        self.tokens: list[int] = []  # the tokens whose keys and values are in the cache, in order
        self.k_cache = self.v_cache = None  # (layers, kv heads, head_dim, positions): positions last
        self._typed = None  # the caches as the kernels take them (_kernel_caches)

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def feed(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens after those in the cache; return the next-token logits after the
        last one (float32 [n_vocab]) or after each one (float32 [len(ids), n_vocab])."""
        ids = self._check(ids)
        model = self.model
        self._reserve(len(self.tokens) + len(ids))
        rows = []
        if model.use_numba and (self.exact or len(ids) < SHORT_PROMPT):  # KERNEL_BATCH tokens per pass
            for i in range(0, len(ids), KERNEL_BATCH):
                batch, start = ids[i:i + KERNEL_BATCH], len(self.tokens)
                wanted = range(len(batch)) if all_logits else [len(batch) - 1] if i + len(batch) == len(ids) else []
                rows.extend(model._decode(self._kernel_caches(), [0] * len(batch), batch,
                                          range(start, start + len(batch)), list(wanted)))
                self.tokens.extend(batch)
        elif self.exact or len(ids) == 1:  # numpy, one token at a time: as exact as the kernels
            for i, token in enumerate(ids):
                logits = model._forward(self.k_cache, self.v_cache, [token], len(self.tokens), False)[0]
                self.tokens.append(token)
                if all_logits or i == len(ids) - 1:
                    rows.append(logits)
        else:  # matrix-matrix products (BLAS): the fastest way through a long prompt
            for i in range(0, len(ids), PROMPT_BATCH):
                batch = ids[i:i + PROMPT_BATCH]
                rows.extend(model._forward(self.k_cache, self.v_cache, batch, len(self.tokens), all_logits))
                self.tokens.extend(batch)
        return np.stack(rows) if all_logits else rows[-1]

    def step(self, token: int) -> np.ndarray:
        """Feed one token; the next-token logits after it."""
        return self.feed([token])

    def rewind(self, n: int) -> None:
        """Forget every token after the first n (a chat's edited turn, another choice to score)."""
        if not 0 <= n <= len(self.tokens):
            raise ValueError(f"cannot rewind to {n}: the session holds {len(self.tokens)} tokens")
        del self.tokens[n:]

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly ids, reusing the longest prefix it already holds (a chat's
        earlier turns are not recomputed); return the next-token logits after the last."""
        ids = self._check(ids, start=0)
        common = 0
        for a, b in zip(self.tokens, ids[:-1]):  # the last token always runs: its logits are needed
            if a != b:
                break
            common += 1
        self.rewind(common)
        return self.feed(ids[common:])

    def logprobs(self, context: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """log P(continuation[i] | context + continuation[:i]) for each i (float64), as
        multiple-choice scoring needs: the context's cache is reused across calls, so scoring
        several continuations of one context computes the context once."""
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError("logprobs needs a context and a continuation of at least one token each")
        self._check(context + continuation, start=0)
        self.prefill(context[:-1]) if len(context) > 1 else self.rewind(0)
        logits = self.feed(context[-1:] + continuation[:-1], all_logits=True)
        return log_softmax(logits)[np.arange(len(continuation)), continuation]

    def generate(self, prompt: Sequence[int], max_tokens: int = 256, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), ignore_eos: bool = False) -> Generation:
        """Continue prompt (token ids): a Generation to iterate over for the text. It ends at an
        end-of-generation token (not part of the text; ignore_eos=True never samples one), after
        max_tokens, when the context is full, or at a stop string (the text ends before it)."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens {max_tokens} is negative")
        return Generation(self, self._check(prompt, start=0), max_tokens,
                          dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repeat_penalty=repeat_penalty), seed, stop, ignore_eos)

    def _check(self, ids, start=None) -> list[int]:
        return _checked(self.model, ids, len(self.tokens) if start is None else start)

    def _kernel_caches(self):
        """([keys], [values]) as numba typed lists: made once per cache (each costs about 0.2 ms,
        a few percent of a token's time)."""
        if self._typed is None:
            self._typed = numba.typed.List([self.k_cache]), numba.typed.List([self.v_cache])
        return self._typed

    def _reserve(self, n):
        c = self.model.config
        have = 0 if self.k_cache is None else self.k_cache.shape[-1]
        if n <= have:
            return
        size = min(self.n_ctx, max(n, 2 * have, 256))  # grow by doubling up to the context
        # positions last: attention's inner loops (and matrix products) run along positions
        shape = (c.n_layer, c.n_head_kv, c.head_dim, size)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        if have:
            k[..., :have], v[..., :have] = self.k_cache, self.v_cache
        self.k_cache, self.v_cache, self._typed = k, v, None


def _checked(model: Model, ids, start: int) -> list[int]:
    """ids as ints, refused if empty, out of the vocabulary or past the context from start."""
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("no tokens to run: the prompt is empty")
    n_vocab = model.config.n_vocab
    bad = [i for i in ids if not 0 <= i < n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range (vocabulary has {n_vocab})")
    if start + len(ids) > model.n_ctx:
        raise ContextFull(f"{start + len(ids)} tokens do not fit in the context of {model.n_ctx} tokens")
    return ids


def feed_many(sessions: Sequence[Session], token_lists: Sequence[Sequence[int]],
              all_logits: bool = False) -> list[np.ndarray]:
    """Feed token_lists[i] to sessions[i] (distinct sessions of one model): the next-token
    logits after each list. With numba, all of the tokens go through the kernels in one pass
    over the weights: what a server needs, decoding many conversations (one token each) and
    reading a new prompt (a chunk of it) at once, the weights read once per step rather than
    once per conversation. Each session's logits are bit-identical to its own feed's; with
    all_logits, each session gets the logits after each of its tokens ([len(list), n_vocab])."""
    if len(sessions) != len(token_lists) or not sessions:
        raise ValueError(f"feed_many needs one list of tokens per session, not {len(token_lists)} for "
                         f"{len(sessions)}")
    model = sessions[0].model
    if any(s.model is not model for s in sessions) or len({id(s) for s in sessions}) != len(sessions):
        raise ValueError("feed_many needs distinct sessions of one model")
    token_lists = [s._check(ids) for s, ids in zip(sessions, token_lists)]
    if not model.use_numba:
        return [s.feed(ids, all_logits) for s, ids in zip(sessions, token_lists)]
    seqs, tokens, positions, wanted = [], [], [], []
    for n, (s, ids) in enumerate(zip(sessions, token_lists)):
        s._reserve(len(s.tokens) + len(ids))
        seqs += [n] * len(ids)
        positions += range(len(s.tokens), len(s.tokens) + len(ids))
        wanted += range(len(tokens), len(tokens) + len(ids)) if all_logits else [len(tokens) + len(ids) - 1]
        tokens += ids
    caches = numba.typed.List([s.k_cache for s in sessions]), numba.typed.List([s.v_cache for s in sessions])
    logits = model._decode(caches, seqs, tokens, positions, wanted)
    for s, ids in zip(sessions, token_lists):
        s.tokens.extend(ids)
    if not all_logits:
        return list(logits)
    ends = np.cumsum([len(ids) for ids in token_lists])
    return np.split(logits, ends[:-1])

class Generation:
    """One call of Session.generate. Iterating yields the new text in pieces (whole UTF-8
    characters, never a stop string or a piece that may start one); afterwards

        tokens          the sampled token ids (without the end-of-generation token)
        text            all the text yielded
        finish_reason   'eos', 'stop' (a stop string), 'length' (max_tokens) or 'context' (full)

    Stop strings are matched on bytes, so one whose characters are split across tokens still
    matches; the text is cut exactly where it starts (OpenAI's rule)."""

    def __init__(self, session, prompt, max_tokens, sampling, seed, stop, ignore_eos):
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._steps = self._run(session, prompt, max_tokens, sampling, seed, stop, ignore_eos)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        piece = next(self._steps)
        self.text += piece
        return piece

    def _run(self, session, prompt, max_tokens, sampling, seed, stop, ignore_eos):
        tokenizer = session.model.tokenizer
        eog = np.array(sorted(tokenizer.eog_ids), dtype=np.int64)
        rng = np.random.default_rng(seed)
        text = StreamDecoder(tokenizer, stop)
        history = list(prompt)
        logits = session.prefill(prompt)
        self.finish_reason = "length"
        while len(self.tokens) < max_tokens:
            if ignore_eos and len(eog):
                logits = logits.copy()
                logits[eog] = -np.inf
            token = sample(logits, rng, **sampling, recent=history[-64:])
            if token in tokenizer.eog_ids:
                self.finish_reason = "eos"
                break
            self.tokens.append(token)
            history.append(token)
            piece = text(token)
            if piece:
                yield piece
            if text.stopped:
                self.finish_reason = "stop"
                return
            if len(self.tokens) == max_tokens:  # the last token's logits are never needed
                break
            if len(session.tokens) >= session.n_ctx:
                self.finish_reason = "context"
                break
            logits = session.step(token)
        piece = text.flush()
        if piece:
            yield piece


# Placeholders for the text of special tokens inside chat messages, from Unicode's
# Supplementary Private Use Area-B (no text means anything by them).
_PLACEHOLDERS = 0x100000
_PLACEHOLDER_RE = re.compile("[\U00100000-\U0010FFFD]")


def chat_tokens(tokenizer: Tokenizer, metadata: dict, messages: list[dict],
                add_generation_prompt: bool = True) -> list[int]:
    """Render messages with the file's chat template and tokenize the result so that special
    tokens come only from the template: before rendering, every special token spelled in a
    message (and any placeholder character) is replaced by a placeholder; after splitting the
    rendered text at the template's special tokens, the placeholders become text again."""
    originals: list[str] = []

    def hide(match):
        if len(originals) == 0xFFFE:
            raise ValueError("the messages spell too many special tokens (65,534 at most)")
        originals.append(match.group())
        return chr(_PLACEHOLDERS + len(originals) - 1)

    pattern = _PLACEHOLDER_RE if tokenizer.special_re is None else \
        re.compile(f"{tokenizer.special_re.pattern}|{_PLACEHOLDER_RE.pattern}")
    hidden = [{**m, "content": pattern.sub(hide, m["content"])} if isinstance(m.get("content"), str) else m
              for m in messages]
    text = render_chat(metadata, hidden, add_generation_prompt)

    def show(match):
        i = ord(match.group()) - _PLACEHOLDERS
        return originals[i] if i < len(originals) else match.group()

    fragments = [_PLACEHOLDER_RE.sub(show, f) if isinstance(f, str) else f for f in tokenizer.fragments(text)]
    return tokenizer.encode_fragments(fragments)


def render_chat(metadata: dict, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render the file's tokenizer.chat_template with jinja2 as Hugging Face transformers
    does; without jinja2, a ChatML-shaped template is rendered as plain ChatML."""
    template = metadata.get("tokenizer.chat_template")
    tokens = metadata.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else []

    def token_text(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""

    if not template or not isinstance(template, str):
        raise ValueError("this model file has no tokenizer.chat_template: use a plain prompt instead of chat")
    try:
        import jinja2
        import jinja2.sandbox
    except ImportError:
        if "<|im_start|>" in template and "<|im_end|>" in template:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        raise ValueError("this model's chat template needs jinja2 (pip install jinja2); "
                         "only ChatML templates are rendered without it") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=token_text("bos"), eos_token=token_text("eos"))
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template error: {e}") from None


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def add_generation_args(p: argparse.ArgumentParser):
    p.add_argument("-p", "--prompt", default="Once upon a time",
                   help="text to continue; special tokens written in it count (default: %(default)r)")
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default: %(default)s)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default: %(default)s)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop before this text; repeatable (default: none)")
    p.add_argument("--ctx-size", type=int, default=None, help="context window (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="threads for generation (default: the cores available)")
    p.add_argument("--activations", type=int, choices=sorted(ACTIVATIONS), default=16,
                   help="bits the compiled kernels round matrix inputs to: 16 is exact to 1e-3; 8 is "
                        "llama.cpp's rounding, faster, 0.15%% higher perplexity (default: %(default)s)")
    p.add_argument("--system", default=None, help="chat: a system message (default: none)")


def _check_args(args):
    for name, ok in (("max_tokens", args.max_tokens >= 0), ("temperature", args.temperature >= 0),
                     ("top_k", args.top_k >= 0), ("top_p", 0 < args.top_p <= 1),
                     ("min_p", 0 <= args.min_p < 1), ("repeat_penalty", args.repeat_penalty > 0),
                     ("ctx_size", args.ctx_size is None or args.ctx_size > 0),
                     ("threads", args.threads is None or args.threads > 0)):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range")


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)


def _stream(gen: Generation, out=sys.stdout) -> tuple[float, float]:
    """Print a generation's text as it comes; return the seconds until its first text (the
    prompt, mostly) and the tokens per second after it."""
    t0, t_first, first_tokens = time.perf_counter(), None, 0
    for piece in gen:
        if t_first is None:
            t_first, first_tokens = time.perf_counter(), len(gen.tokens)
        out.write(piece)
        out.flush()
    t_end = time.perf_counter()
    t_first = t_first or t_end
    return t_first - t0, (len(gen.tokens) - first_tokens) / max(t_end - t_first, 1e-9)


def run_prompt(path: str, args) -> None:
    """`run`: continue a prompt, streaming the text to stdout and timings to stderr."""
    _check_args(args)
    t0 = time.perf_counter()
    model = load(path, args.ctx_size, args.threads, args.activations)
    t_load = time.perf_counter() - t0
    ids = model.tokenize(args.prompt)
    gen = model.session().generate(ids, args.max_tokens, **_sampling(args))
    t_prompt, rate = _stream(gen)
    print(file=sys.stderr)
    kernels = f"numba, {model.threads} threads" if model.use_numba else "numpy"
    print(f"load {t_load:.2f} s ({kernels}) | prompt {len(ids)} tokens, {len(ids) / max(t_prompt, 1e-9):.1f} tok/s | "
          f"generation {len(gen.tokens)} tokens, {rate:.1f} tok/s | stop: {gen.finish_reason}", file=sys.stderr)


def run_chat(path: str, args) -> None:
    """`chat`: an interactive conversation with the model's chat template. One session holds
    the conversation, so each turn computes only its new tokens."""
    _check_args(args)
    model = load(path, args.ctx_size, args.threads, args.activations)
    render_chat(model.metadata, [{"role": "user", "content": "hi"}])  # fail early on a bad template
    session = model.session()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {model.metadata.get('general.name', path)} "
              f"(/reset to start over, Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            gen = session.generate(model.chat_tokens(messages), args.max_tokens, **_sampling(args))
        except ContextFull as e:
            messages.pop()
            print(f"[{e}: /reset to start a new conversation]", file=sys.stderr)
            continue
        try:
            _stream(gen)
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the conversation
            pass
        print()
        if gen.finish_reason == "context":
            print("[the context is full: /reset to start a new conversation]", file=sys.stderr)
        messages.append({"role": "assistant", "content": gen.text.strip()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="run.py", description="Run a GGUF Llama model with numpy.")
    p.add_argument("model", help="path to a .gguf file")
    p.add_argument("--chat", action="store_true", help="interactive chat with the model's template (default: off)")
    add_generation_args(p)
    args = p.parse_args(argv)
    return guarded(run_chat if args.chat else run_prompt, args.model, args)


def guarded(fn, *args) -> int:
    """Run a command; bad input ends in one clear line on stderr and a non-zero exit."""
    try:
        fn(*args)
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except (OSError, ValueError, MemoryError) as e:
        message = str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}"
        print(f"error: {message}", file=sys.stderr)
        return 1


# ===========================================================================
# Appendix: compiled kernels (optional numba)
# ===========================================================================
# Everything above runs with numpy alone. Generating a token reads every weight once, so its
# speed is set by how fast the weights are read and unpacked. With numba installed, the
# functions below are compiled on first use and cached on disk, and a whole step runs in one
# call (_decode_tokens), for one token or many (a prompt's, or several sessions' at once: the
# weights are then read once for all): each row's blocks are unpacked and multiplied in vector
# registers, rows shared among the threads, nothing decoded to memory. Without numba, or with
# RUN_PY_NUMBA=0, Model._forward (numpy) runs instead.
#
# As in llama.cpp, the activations x are rounded to integers per block of 32, so a block's
# dot product is integer multiply-adds (16 products per instruction); by default we round to
# 16 bits where llama.cpp rounds to 8: the error is at most 1/65534 of the block's largest |x|,
# and logits match the float32 numpy path to 1e-3 of their scale or better (tested on every
# tensor type). run.load(activations=8) rounds some to 8 bits, as llama.cpp (see ACTIVATIONS).
# F32, F16 and BF16 matrices are multiplied in float32.
#
# Determinism: every output (a row's dot product, a head's attention) is computed by one thread
# in a fixed order, so the logits are bit-identical whatever the thread count; a token's logits
# depend only on the tokens before it, not on how they were fed.
#
# numba has no vector type, so the few vector operations are written as LLVM IR (intrinsics):
# `Lanes` is 16 float32 accumulators kept in a register through a row; the weights of one
# block are unpacked to signed bytes, multiplied with 32 activations, summed in pairs (16-bit
# x) or fours (8-bit x) into int32 lanes, scaled and added to the lanes. Portable IR where it
# can be (LLVM picks the instructions: AVX-512, AVX2 or NEON); x86 intrinsics where LLVM would
# not find them (byte shuffles, 8-bit products), with portable IR on other CPUs.

def _import_numba():
    if os.environ.get("RUN_PY_NUMBA", "1") == "0":
        return None
    try:
        import numba
        return numba
    except ImportError:
        return None


numba = _import_numba()

try:  # all of numba's and llvmlite's API in one place: a version they do not fit means numpy, not a crash
    if numba is not None:
        from llvmlite import ir as _ir
        from numba.extending import intrinsic as _intrinsic, models as _models, register_model as _register_model

        class _LanesType(numba.types.Type):
            def __init__(self):
                super().__init__(name="Lanes")

        _lanes = _LanesType()

        @_register_model(_LanesType)
        class _LanesModel(_models.PrimitiveModel):
            def __init__(self, dmm, fe_type):
                super().__init__(dmm, fe_type, _ir.VectorType(_ir.FloatType(), 16))

        class _QuantsType(numba.types.Type):
            def __init__(self):
                super().__init__(name="Quants")

        _quants = _QuantsType()

        @_register_model(_QuantsType)
        class _QuantsModel(_models.PrimitiveModel):  # one block's 32 weights as signed bytes
            def __init__(self, dmm, fe_type):
                super().__init__(dmm, fe_type, _ir.VectorType(_ir.IntType(8), 32))

        _I8, _I16, _I32, _F32 = _ir.IntType(8), _ir.IntType(16), _ir.IntType(32), _ir.FloatType()

        def _vec(element, n):
            return _ir.VectorType(element, n)

        def _load(context, builder, array_type, array, index, element, n=None):
            """Load one element (or a vector of n) of `array` at `index`; no alignment assumed."""
            data = context.make_array(array_type)(context, builder, array).data
            kind = element if n is None else _vec(element, n)
            return builder.load(builder.bitcast(builder.gep(data, [index]), kind.as_pointer()), align=1)

        def _load_half(context, builder, array_type, array, index):
            """The IEEE half at byte index of array, as float32: one conversion instruction where
            the CPU has one (F16C), else integer arithmetic (LLVM would call a runtime function
            that numba does not link, and abort)."""
            if "+f16c" in getattr(context.codegen(), "_tm_features", "").split(","):
                return builder.fpext(_load(context, builder, array_type, array, index, _ir.HalfType()), _F32)
            bits = builder.zext(_load(context, builder, array_type, array, index, _I16), _I32)

            def const(v):
                return _ir.Constant(_I32, v)

            # exponent and mantissa moved to float32's places, then scaled by 2^112 (the exponent
            # biases' difference): exact for normal and subnormal halves; inf and nan keep their
            # all-ones exponent
            magnitude = builder.shl(builder.and_(bits, const(0x7FFF)), const(13))
            value = builder.bitcast(builder.fmul(builder.bitcast(magnitude, _F32),
                                                 builder.bitcast(const(0x77800000), _F32)), _I32)
            special = builder.icmp_unsigned(">=", builder.and_(bits, const(0x7FFF)), const(0x7C00))
            value = builder.select(special, builder.or_(magnitude, const(0x7F800000)), value)
            return builder.bitcast(builder.or_(value, builder.shl(builder.and_(bits, const(0x8000)), const(16))), _F32)

        def _splat(builder, value, n, mask=None):
            """n copies of a scalar (or, with mask, of the elements of a vector that mask picks)."""
            if mask is None:
                value = builder.insert_element(_ir.Constant(_vec(value.type, 1), None), value, _ir.Constant(_I32, 0))
                mask = [0] * n
            return builder.shuffle_vector(value, _ir.Constant(value.type, None), _ir.Constant(_vec(_I32, n), mask))

        def _centered(builder, q, offset):
            """32 bytes of weights minus offset, as signed bytes: every type's weights fit
            (Q8_0's and IQ4's are signed already, offset 0; the others are at most 63 - 32)."""
            return builder.sub(q, _splat(builder, builder.trunc(offset, _I8), 32))

        def _multiply_add(context, builder, acc, q, xq_type, xq, xo, scales, unsigned=None):
            """acc + scales * (sums of q * xq[xo:xo+32]), q 32 signed bytes. With 16-bit x: sums
            of pairs, one per lane (LLVM turns the multiply and pairwise add into vpmaddwd).
            With 8-bit x (llama.cpp's rounding): sums of four, in lanes 0-7 (weights 0-15 in
            lanes 0-3), lanes 8-15 untouched, scales taken from the even lanes: half the
            conversions and multiply-adds; on AVX2, vpmaddubsw on |q| and x with q's sign, then
            vpmaddwd (exact: |x| <= 127, so no pair sum reaches 2^15); where `unsigned` (an i1)
            is true, q's bytes are known to be 0 to 63 and go to vpmaddubsw as they are."""
            i16x16, i32x8, i32x32, f32x8, f32x16 = (_vec(_I16, 16), _vec(_I32, 8), _vec(_I32, 32), _vec(_F32, 8),
                                                    _vec(_F32, 16))
            if xq_type.dtype.bitwidth == 16:
                x16 = _load(context, builder, xq_type, xq, xo, _I16, 32)
                products = builder.mul(builder.sext(q, i32x32), builder.sext(x16, i32x32))
                pairs = builder.add(_splat(builder, products, 16, list(range(0, 32, 2))),
                                    _splat(builder, products, 16, list(range(1, 32, 2))))
                fmuladd = builder.module.declare_intrinsic("llvm.fmuladd.v16f32",
                                                           fnty=_ir.FunctionType(f32x16, [f32x16] * 3))
                return builder.call(fmuladd, [builder.sitofp(pairs, f32x16), scales, acc])
            x8 = _load(context, builder, xq_type, xq, xo, _I8, 32)
            if "+avx2" in getattr(context.codegen(), "_tm_features", "").split(","):
                i8x32 = _vec(_I8, 32)
                magnitude = builder.call(builder.module.declare_intrinsic(
                    "llvm.abs.v32i8", fnty=_ir.FunctionType(i8x32, [i8x32, _ir.IntType(1)])), [q, _ir.Constant(_ir.IntType(1), 0)])
                signed_x = builder.call(builder.module.declare_intrinsic(
                    "llvm.x86.avx2.psign.b", fnty=_ir.FunctionType(i8x32, [i8x32, i8x32])), [x8, q])
                if unsigned is not None:  # a constant after inlining: LLVM keeps one side
                    magnitude, signed_x = builder.select(unsigned, q, magnitude), builder.select(unsigned, x8, signed_x)
                pairs = builder.call(builder.module.declare_intrinsic(
                    "llvm.x86.avx2.pmadd.ub.sw", fnty=_ir.FunctionType(i16x16, [i8x32, i8x32])), [magnitude, signed_x])
                quads = builder.call(builder.module.declare_intrinsic(
                    "llvm.x86.avx2.pmadd.wd", fnty=_ir.FunctionType(i32x8, [i16x16, i16x16])),
                    [pairs, _ir.Constant(i16x16, [1] * 16)])
            else:  # the same integers, portably
                products = builder.mul(builder.sext(q, i32x32), builder.sext(x8, i32x32))
                quads = _splat(builder, products, 8, list(range(0, 32, 4)))
                for k in (1, 2, 3):
                    quads = builder.add(quads, _splat(builder, products, 8, list(range(k, 32, 4))))
            low = _splat(builder, acc, 8, list(range(8)))
            fmuladd = builder.module.declare_intrinsic("llvm.fmuladd.v8f32", fnty=_ir.FunctionType(f32x8, [f32x8] * 3))
            low = builder.call(fmuladd, [builder.sitofp(quads, f32x8), _splat(builder, scales, 8, list(range(0, 16, 2))), low])
            widened = builder.shuffle_vector(low, low, _ir.Constant(_vec(_I32, 16), list(range(8)) + [0] * 8))
            return builder.shuffle_vector(widened, acc, _ir.Constant(_vec(_I32, 16), list(range(8)) + list(range(24, 32))))

        def _accumulate(context, builder, acc, q, signed, offset, xq_type, xq, xo, scales):
            """acc + scales * (sums of (q - offset) * xq[xo:xo+32]), q 32 bytes (see _multiply_add;
            unsigned bytes and offset 0: no signs to move)."""
            unsigned = (_ir.Constant(_ir.IntType(1), 0) if signed else
                        builder.icmp_signed("==", offset, _ir.Constant(offset.type, 0)))
            return _multiply_add(context, builder, acc, _centered(builder, q, offset), xq_type, xq, xo, scales, unsigned)

        def _two_scales(builder, low, high):
            """16 lanes: `low` in lanes 0-7 (weights 0-15 of a block), `high` in 8-15 (16-31)."""
            pair = builder.insert_element(builder.insert_element(
                _ir.Constant(_vec(_F32, 2), None), low, _ir.Constant(_I32, 0)), high, _ir.Constant(_I32, 1))
            return _splat(builder, pair, 16, [0] * 8 + [1] * 8)

        @_intrinsic
        def _zeros(typingctx):
            def codegen(context, builder, signature, args):
                return _ir.Constant(_vec(_F32, 16), [0.0] * 16)
            return _lanes(), codegen

        @_intrinsic
        def _total(typingctx, acc):
            """The sum of the 16 lanes."""
            def codegen(context, builder, signature, args):
                reduce = builder.module.declare_intrinsic("llvm.vector.reduce.fadd.v16f32",
                                                          fnty=_ir.FunctionType(_F32, [_F32, _vec(_F32, 16)]))
                return builder.call(reduce, [_ir.Constant(_F32, 0.0), args[0]], fastmath=("reassoc",))
            return numba.types.float32(acc), codegen

        @_intrinsic
        def _prefetch(typingctx, w, o):
            """Ask for the cache line at byte o of w ahead of its use (never faults, even past the end)."""
            def codegen(context, builder, signature, args):
                data = context.make_array(signature.args[0])(context, builder, args[0]).data
                prefetch = builder.module.declare_intrinsic(  # named .p0 or .p0i8 by the LLVM version
                    "llvm.prefetch", [data.type], _ir.FunctionType(_ir.VoidType(), [data.type, _I32, _I32, _I32]))
                builder.call(prefetch, [builder.gep(data, [args[1]]), _ir.Constant(_I32, 0), _ir.Constant(_I32, 3),
                                        _ir.Constant(_I32, 1)])
                return context.get_dummy_value()
            return numba.types.none(w, o), codegen

        @_intrinsic
        def _half(typingctx, w, o):
            """The IEEE half at bytes o, o+1 of w, as float32."""
            def codegen(context, builder, signature, args):
                return _load_half(context, builder, signature.args[0], *args)
            return numba.types.float32(w, o), codegen

        @_intrinsic
        def _float(typingctx, w, o):
            """The float32 at bytes o..o+3 of w."""
            def codegen(context, builder, signature, args):
                return _load(context, builder, signature.args[0], *args, _F32)
            return numba.types.float32(w, o), codegen

        @_intrinsic
        def _bf16(typingctx, w, o):
            """The bfloat16 at bytes o, o+1 of w, as float32 (its top 16 bits)."""
            def codegen(context, builder, signature, args):
                bits = builder.zext(_load(context, builder, signature.args[0], *args, _I16), _I32)
                return builder.bitcast(builder.shl(bits, _ir.Constant(_I32, 16)), _F32)
            return numba.types.float32(w, o), codegen

        def _nibble_bytes(context, builder, wt, w_, o_, high_):
            """A Q4/Q5 block's 32 weights as bytes: 16 bytes at o hold weights j (low nibble) and
            j+16 (high nibble); for Q5 (high >= 0) bit j of the 4 bytes at `high` is weight j's
            fifth bit."""
            packed = _load(context, builder, wt, w_, o_, _I8, 16)
            low = builder.and_(packed, _ir.Constant(_vec(_I8, 16), [15] * 16))
            top = builder.lshr(packed, _ir.Constant(_vec(_I8, 16), [4] * 16))
            q = builder.shuffle_vector(low, top, _ir.Constant(_vec(_I32, 32), list(range(32))))
            # branch-free: for Q4 (high < 0) the word is read at o and masked to nothing
            is_q5 = builder.icmp_signed(">=", high_, _ir.Constant(high_.type, 0))
            word = _load(context, builder, wt, w_, builder.select(is_q5, high_, o_), _I32)
            bits = builder.lshr(_splat(builder, word, 32), _ir.Constant(_vec(_I32, 32), list(range(32))))
            bits = builder.and_(bits, _splat(builder, builder.zext(is_q5, _I32), 32))
            return builder.or_(q, builder.shl(builder.trunc(bits, _vec(_I8, 32)), _ir.Constant(_vec(_I8, 32), [4] * 32)))

        @_intrinsic
        def _add_nibbles(typingctx, acc, w, o, high, xq, xo, scale, offset):
            """Lanes += scale * block . xq[xo:xo+32] for a Q4/Q5 block at o (see _nibble_bytes);
            weights are the unsigned values minus `offset`."""
            def codegen(context, builder, signature, args):
                acc_, w_, o_, high_, xq_, xo_, scale_, offset_ = args
                q = _nibble_bytes(context, builder, signature.args[1], w_, o_, high_)
                scales = _splat(builder, scale_, 16)
                return _accumulate(context, builder, acc_, q, False, offset_, signature.args[4], xq_, xo_, scales)
            return _lanes(acc, w, o, high, xq, xo, scale, offset), codegen

        @_intrinsic
        def _unpack_nibbles(typingctx, w, o, high, offset):
            """A Q4/Q5 block's weights (see _nibble_bytes) minus offset, for several _multiply_adds."""
            def codegen(context, builder, signature, args):
                w_, o_, high_, offset_ = args
                q = _nibble_bytes(context, builder, signature.args[0], w_, o_, high_)
                return _centered(builder, q, offset_)
            return _quants(w, o, high, offset), codegen

        @_intrinsic
        def _unpack_int8(typingctx, w, o):
            """A Q8_0 block's 32 signed bytes at o, for several _multiply_adds."""
            def codegen(context, builder, signature, args):
                q = _load(context, builder, signature.args[0], args[0], args[1], _I8, 32)
                return _centered(builder, q, _ir.Constant(_ir.IntType(64), 0))
            return _quants(w, o), codegen

        @_intrinsic
        def _madd(typingctx, acc, q, xq, xo, scale):
            """Lanes += scale * q . xq[xo:xo+32]: the arithmetic of _add_nibbles and _add_int8 to the
            bit, on weights unpacked once."""
            def codegen(context, builder, signature, args):
                acc_, q_, xq_, xo_, scale_ = args
                return _multiply_add(context, builder, acc_, q_, signature.args[2], xq_, xo_,
                                     _splat(builder, scale_, 16))
            return _lanes(acc, q, xq, xo, scale), codegen

        def _float_vector(context, builder, array_type, array, index, n):
            return _load(context, builder, array_type, array, index, _F32, n)

        def _element(builder, vector, i):
            return builder.extract_element(vector, _ir.Constant(_I32, i))

        @_intrinsic
        def _add_k_block(typingctx, acc, w, o, qs, fifth, xq, xd, xsum, s):
            """Lanes += one 256-weight Q4_K or Q5_K block at byte o times x[32s:32s+256]: d, dmin,
            then 8 six-bit scales and mins packed in 12 bytes, then 32 bytes at qs + 32c holding
            sub-blocks 2c (low nibbles) and 2c+1 (high); for Q5_K (fifth >= 0) bit j of byte l of
            the 32 bytes at `fifth` is the fifth bit of weight l of sub-block j.
            weight = d * scale * q - dmin * min; the min terms are added to lanes 0-7."""
            def codegen(context, builder, signature, args):
                acc_, w_, o_, qs_, fifth_, xq_, xd_, xsum_, s_ = args
                wt, xt, ft = signature.args[1], signature.args[5], signature.args[6]
                i64 = _ir.IntType(64)
                i8x8, i8x32 = _vec(_I8, 8), _vec(_I8, 32)

                def at(offset, delta):
                    return builder.add(offset, _ir.Constant(offset.type, delta))

                def shuffle(v, picks):
                    return builder.shuffle_vector(v, v, _ir.Constant(_vec(_I32, 8), picks))

                def const8(v):
                    return _ir.Constant(i8x8, [v] * 8)

                d, dmin = _load_half(context, builder, wt, w_, o_), _load_half(context, builder, wt, w_, at(o_, 2))
                packed = _load(context, builder, wt, w_, at(o_, 4), _I8, 16)  # 12 scale bytes (+4 unused)
                # sub-block j < 4: scale = b[j] & 63, min = b[j+4] & 63; j >= 4: the low (scale) or
                # high (min) nibble of b[j+4], plus the top two bits of b[j-4] (scale) or b[j] (min)
                first_four = _ir.Constant(_vec(_ir.IntType(1), 8), [j < 4 for j in range(8)])
                scale_bits = shuffle(packed, [0, 1, 2, 3, 8, 9, 10, 11])  # b[j], then b[j+4]
                min_bits = shuffle(packed, [4, 5, 6, 7, 8, 9, 10, 11])  # b[j+4]
                scale_top = builder.shl(builder.lshr(shuffle(packed, [0, 1, 2, 3, 0, 1, 2, 3]), const8(6)), const8(4))
                min_top = builder.shl(builder.lshr(shuffle(packed, [4, 5, 6, 7, 4, 5, 6, 7]), const8(6)), const8(4))
                scales = builder.select(first_four, builder.and_(scale_bits, const8(63)),
                                        builder.or_(builder.and_(scale_bits, const8(15)), scale_top))
                mins = builder.select(first_four, builder.and_(min_bits, const8(63)),
                                      builder.or_(builder.lshr(min_bits, const8(4)), min_top))
                f32x8 = _vec(_F32, 8)
                xd8 = _float_vector(context, builder, ft, xd_, s_, 8)
                scales = builder.fmul(builder.fmul(builder.uitofp(scales, f32x8), _splat(builder, d, 8)), xd8)
                mins = builder.fmul(builder.uitofp(mins, f32x8), _splat(builder, dmin, 8))
                mins = builder.fmul(mins, _float_vector(context, builder, ft, xsum_, s_, 8))
                is_q5 = builder.icmp_signed(">=", fifth_, _ir.Constant(fifth_.type, 0))
                high = _load(context, builder, wt, w_, builder.select(is_q5, fifth_, qs_), _I8, 32)
                one = _splat(builder, builder.zext(is_q5, _I8), 32)  # 1 for Q5_K, 0 for Q4_K
                xo = builder.mul(s_, _ir.Constant(s_.type, 32))
                zero = _ir.Constant(i64, 0)
                for pair in range(4):
                    nibbles = _load(context, builder, wt, w_, at(qs_, 32 * pair), _I8, 32)
                    for half in range(2):
                        j = 2 * pair + half
                        q = builder.and_(builder.lshr(nibbles, _ir.Constant(i8x32, [4 * half] * 32)),
                                         _ir.Constant(i8x32, [15] * 32))
                        bit = builder.and_(builder.lshr(high, _ir.Constant(i8x32, [j] * 32)), one)
                        q = builder.or_(q, builder.shl(bit, _ir.Constant(i8x32, [4] * 32)))
                        acc_ = _accumulate(context, builder, acc_, q, False, zero, xt, xq_, at(xo, 32 * j),
                                           _splat(builder, _element(builder, scales, j), 16))
                widened = builder.shuffle_vector(mins, _ir.Constant(f32x8, [0.0] * 8),
                                                 _ir.Constant(_vec(_I32, 16), list(range(16))))  # 8 mins, 8 zeros
                return builder.fsub(acc_, widened)
            return _lanes(acc, w, o, qs, fifth, xq, xd, xsum, s), codegen

        @_intrinsic
        def _add_q6_k_block(typingctx, acc, w, o, xq, xd, s):
            """Lanes += one 256-weight Q6_K block at byte o times x[32s:32s+256]: 128 bytes of low
            nibbles, 64 of two high bits, 16 int8 scales (one per 16 weights), d. In each half of
            128 weights, weight 32k+l (k < 4, l < 32) is (nibble k >> 1 of ql byte 32*(k&1)+l) |
            (bits 2k, 2k+1 of qh byte l) << 4, minus 32."""
            def codegen(context, builder, signature, args):
                acc_, w_, o_, xq_, xd_, s_ = args
                wt, xt, ft = signature.args[1], signature.args[3], signature.args[4]
                i8x32 = _vec(_I8, 32)

                def at(offset, delta):
                    return builder.add(offset, _ir.Constant(offset.type, delta))

                def const(v):
                    return _ir.Constant(i8x32, [v] * 32)

                d = _load_half(context, builder, wt, w_, at(o_, 208))
                f32x16 = _vec(_F32, 16)
                scales = builder.sitofp(_load(context, builder, wt, w_, at(o_, 192), _I8, 16), f32x16)
                xd8 = _float_vector(context, builder, ft, xd_, s_, 8)  # one per 32 weights: two scales each
                xd16 = builder.shuffle_vector(xd8, xd8, _ir.Constant(_vec(_I32, 16), [i // 2 for i in range(16)]))
                scales = builder.fmul(builder.fmul(scales, _splat(builder, d, 16)), xd16)
                thirty_two = _ir.Constant(_ir.IntType(64), 32)
                xo = builder.mul(s_, _ir.Constant(s_.type, 32))
                for n in range(2):
                    a = _load(context, builder, wt, w_, at(o_, 64 * n), _I8, 32)
                    c = _load(context, builder, wt, w_, at(o_, 64 * n + 32), _I8, 32)
                    h = _load(context, builder, wt, w_, at(o_, 128 + 32 * n), _I8, 32)
                    for k, low in enumerate((a, c, a, c)):
                        nibble = builder.and_(builder.lshr(low, const(4 * (k >> 1))), const(15))
                        two = builder.shl(builder.and_(builder.lshr(h, const(2 * k)), const(3)), const(4))
                        sub = 8 * n + 2 * k
                        pair = _two_scales(builder, _element(builder, scales, sub), _element(builder, scales, sub + 1))
                        acc_ = _accumulate(context, builder, acc_, builder.or_(nibble, two), False, thirty_two,
                                           xt, xq_, at(xo, 128 * n + 32 * k), pair)
                return acc_
            return _lanes(acc, w, o, xq, xd, s), codegen

        @_intrinsic
        def _add_int8(typingctx, acc, w, o, xq, xo, scale):
            """Lanes += scale * block . xq[xo:xo+32] for a Q8_0 block: 32 signed bytes at o."""
            def codegen(context, builder, signature, args):
                acc_, w_, o_, xq_, xo_, scale_ = args
                q = _load(context, builder, signature.args[1], w_, o_, _I8, 32)
                zero = _ir.Constant(_ir.IntType(64), 0)
                return _accumulate(context, builder, acc_, q, True, zero, signature.args[3], xq_, xo_,
                                   _splat(builder, scale_, 16))
            return _lanes(acc, w, o, xq, xo, scale), codegen

        def _lookup16(context, builder, table, index):
            """table[index] for 32 byte indices (0-15) into 16 byte values: one byte shuffle
            (pshufb) where the CPU has one, else a tree of selects on the index's bits."""
            i8x16, i8x32 = _vec(_I8, 16), _vec(_I8, 32)
            features = getattr(context.codegen(), "_tm_features", "").split(",")
            if "+avx2" in features:  # shuffles each 16-byte half by itself: the table in both
                shuffle = builder.module.declare_intrinsic("llvm.x86.avx2.pshuf.b",
                                                           fnty=_ir.FunctionType(i8x32, [i8x32, i8x32]))
                return builder.call(shuffle, [_ir.Constant(i8x32, table * 2), index])
            if "+ssse3" in features:
                shuffle = builder.module.declare_intrinsic("llvm.x86.ssse3.pshuf.b.128",
                                                           fnty=_ir.FunctionType(i8x16, [i8x16, i8x16]))
                halves = [builder.call(shuffle, [_ir.Constant(i8x16, table), builder.shuffle_vector(
                    index, index, _ir.Constant(_vec(_I32, 16), list(range(h, h + 16))))]) for h in (0, 16)]
                return builder.shuffle_vector(*halves, _ir.Constant(_vec(_I32, 32), list(range(32))))
            values = [_ir.Constant(i8x32, [v] * 32) for v in table]
            for bit in range(4):  # halve the candidates on each bit, lowest first
                is_set = builder.icmp_unsigned("!=", builder.and_(index, _ir.Constant(i8x32, [1 << bit] * 32)),
                                               _ir.Constant(i8x32, [0] * 32))
                values = [builder.select(is_set, values[i + 1], values[i]) for i in range(0, len(values), 2)]
            return values[0]

        def _iq4_values(context, builder, packed):
            """An IQ4 block's 32 weights as signed bytes: its 16 bytes `packed` hold the indices
            into IQ4_VALUES of weights j (low nibble) and j+16 (high nibble)."""
            i8x16 = _vec(_I8, 16)
            index = builder.shuffle_vector(builder.and_(packed, _ir.Constant(i8x16, [15] * 16)),
                                           builder.lshr(packed, _ir.Constant(i8x16, [4] * 16)),
                                           _ir.Constant(_vec(_I32, 32), list(range(32))))
            return _lookup16(context, builder, [int(v) for v in IQ4_VALUES], index)

        def _iq4_bytes(context, builder, wt, w_, o_):
            """The IQ4 block at byte o of w (see _iq4_values)."""
            return _iq4_values(context, builder, _load(context, builder, wt, w_, o_, _I8, 16))

        @_intrinsic
        def _add_iq4(typingctx, acc, w, o, xq, xo, scale):
            """Lanes += scale * block . xq[xo:xo+32] for 32 IQ4 weights at o (see _iq4_bytes)."""
            def codegen(context, builder, signature, args):
                acc_, w_, o_, xq_, xo_, scale_ = args
                q = _iq4_bytes(context, builder, signature.args[1], w_, o_)
                zero = _ir.Constant(_ir.IntType(64), 0)
                return _accumulate(context, builder, acc_, q, True, zero, signature.args[3], xq_, xo_,
                                   _splat(builder, scale_, 16))
            return _lanes(acc, w, o, xq, xo, scale), codegen

        @_intrinsic
        def _unpack_iq4(typingctx, w, o):
            """32 IQ4 weights at o (see _iq4_bytes), for several _multiply_adds."""
            def codegen(context, builder, signature, args):
                q = _iq4_bytes(context, builder, signature.args[0], args[0], args[1])
                return _centered(builder, q, _ir.Constant(_ir.IntType(64), 0))
            return _quants(w, o), codegen

        def _bytes_at(builder, v, picks, shifts, mask):
            """(v[picks[i]] >> shifts[i]) & mask: bytes of v rearranged into len(picks) lanes."""
            n = len(picks)
            v = builder.shuffle_vector(v, v, _ir.Constant(_vec(_I32, n), picks))
            return builder.and_(builder.lshr(v, _ir.Constant(_vec(_I8, n), shifts)), _ir.Constant(_vec(_I8, n), [mask] * n))

        def _block_codegen(body):
            """codegen for a 256-weight block at byte o, times x[32s:32s+256]: body(k, acc) -> lanes,
            with k's helpers: k.load(delta, n), n bytes at o + delta; k.half(delta), the f16 there;
            k.accumulate(acc, q, signed, offset, g, lanes), acc + lanes * the pairwise sums of
            (q - offset) * x's group g (q: 32 weights as bytes; group g: x[32(s+g):32(s+g+1)]);
            k.madd(acc, q, g, lanes), the same for weights already centered; k.scales16(v, d,
            signed), 16 integer scales (one per 16 weights) times d and x's block scales;
            k.group(scales, g), the two of group g in the 16 lanes."""
            def codegen(context, builder, signature, args):
                acc_, w_, o_, xq_, xd_, s_ = args
                wt, xt, ft = signature.args[1], signature.args[3], signature.args[4]
                xo = builder.mul(s_, _ir.Constant(s_.type, 32))
                xd8 = _float_vector(context, builder, ft, xd_, s_, 8)

                def at(delta):
                    return builder.add(o_, _ir.Constant(o_.type, delta))

                def x_at(g):
                    return builder.add(xo, _ir.Constant(xo.type, 32 * g))

                def scales16(v, d, signed=False):
                    xd16 = builder.shuffle_vector(xd8, xd8, _ir.Constant(_vec(_I32, 16), [i // 2 for i in range(16)]))
                    f = (builder.sitofp if signed else builder.uitofp)(v, _vec(_F32, 16))
                    return builder.fmul(builder.fmul(f, _splat(builder, d, 16)), xd16)

                k = SimpleNamespace(
                    context=context, builder=builder,
                    load=lambda delta, n: _load(context, builder, wt, w_, at(delta), _I8, n),
                    half=lambda delta: _load_half(context, builder, wt, w_, at(delta)),
                    accumulate=lambda acc, q, signed, offset, g, lanes: _accumulate(
                        context, builder, acc, q, signed, _ir.Constant(_ir.IntType(64), offset), xt, xq_, x_at(g), lanes),
                    madd=lambda acc, q, g, lanes: _multiply_add(context, builder, acc, q, xt, xq_, x_at(g), lanes),
                    scales16=scales16,
                    group=lambda scales, g: builder.shuffle_vector(
                        scales, scales, _ir.Constant(_vec(_I32, 16), [2 * g] * 8 + [2 * g + 1] * 8)))
                return body(k, acc_)
            return codegen

        @_intrinsic
        def _bits32(typingctx, w, o, shift, mask):
            """The 32 bytes at o of w, each shifted right and masked: one field of 32 packed weights."""
            def codegen(context, builder, signature, args):
                w_, o_, shift_, mask_ = args
                packed = _load(context, builder, signature.args[0], w_, o_, _I8, 32)
                return builder.and_(builder.lshr(packed, _splat(builder, builder.trunc(shift_, _I8), 32)),
                                    _splat(builder, builder.trunc(mask_, _I8), 32))
            return _quants(w, o, shift, mask), codegen

        @_intrinsic
        def _joined(typingctx, low, high, shift, offset):
            """(low | high << shift) - offset, per byte: a weight from two fields."""
            def codegen(context, builder, signature, args):
                low_, high_, shift_, offset_ = args
                joined = builder.or_(low_, builder.shl(high_, _splat(builder, builder.trunc(shift_, _I8), 32)))
                return _centered(builder, joined, offset_)
            return _quants(low, high, shift, offset), codegen

        @_intrinsic
        def _put32(typingctx, out, index, q, scale0, scale1, minus0, minus1):
            """out[index + i] = scale * q[i] - minus for 32 signed bytes q, (scale0, minus0) for the
            first 16 and (scale1, minus1) for the rest: float32 products and differences, rounded
            as numpy's (no fused multiply-add)."""
            def codegen(context, builder, signature, args):
                out_, index_, q_, s0, s1, m0, m1 = args
                f32x32 = _vec(_F32, 32)

                def halves(a, b):
                    return _splat(builder, _splat(builder, builder.insert_element(
                        _splat(builder, a, 2), b, _ir.Constant(_I32, 1)), 2, [0, 1]), 32, [0] * 16 + [1] * 16)
                values = builder.fsub(builder.fmul(builder.sitofp(q_, f32x32), halves(s0, s1)), halves(m0, m1))
                data = context.make_array(signature.args[0])(context, builder, out_).data
                builder.store(values, builder.bitcast(builder.gep(data, [index_]), f32x32.as_pointer()), align=4)
                return context.get_dummy_value()
            return numba.types.none(out, index, q, scale0, scale1, minus0, minus1), codegen

        def _crumbs_of(builder, packed, j):
            """Bits 2j, 2j+1 of 32 bytes: 32 two-bit weights of Q2_K or Q3_K."""
            i8x32 = _vec(_I8, 32)
            return builder.and_(builder.lshr(packed, _ir.Constant(i8x32, [2 * j] * 32)), _ir.Constant(i8x32, [3] * 32))

        @_intrinsic
        def _add_q2_k_block(typingctx, acc, w, o, xq, xd, s):
            """Lanes += one 256-weight Q2_K block at byte o: 16 scale bytes (low nibble: scale,
            high: min, one per 16 weights), 64 bytes of 2-bit weights, d, dmin. Group g = 4n + j
            (32 weights) is bits 2j, 2j+1 of the 32 bytes at 16 + 32n; weight = d*scale*q - dmin*min."""
            def body(k, acc):
                b = k.builder
                packed = k.load(0, 16)
                scales = k.scales16(b.and_(packed, _ir.Constant(_vec(_I8, 16), [15] * 16)), k.half(80))
                mins = k.scales16(b.lshr(packed, _ir.Constant(_vec(_I8, 16), [4] * 16)), b.fneg(k.half(82)))
                ones = _ir.Constant(_vec(_I8, 32), [1] * 32)
                for n in range(2):
                    weights = k.load(16 + 32 * n, 32)
                    for j in range(4):
                        g = 4 * n + j
                        acc = k.accumulate(acc, _crumbs_of(b, weights, j), False, 0, g, k.group(scales, g))
                        # the mins: x's sums per 16 weights times -dmin * min (faster, measured, than
                        # the mins as 16-bit weights of a second multiply-add)
                        acc = k.madd(acc, ones, g, k.group(mins, g))
                return acc
            return _lanes(acc, w, o, xq, xd, s), _block_codegen(body)

        @_intrinsic
        def _add_q3_k_block(typingctx, acc, w, o, xq, xd, s):
            """Lanes += one 256-weight Q3_K block at byte o: 32 bytes of third bits (bit g of byte l:
            weight l of group g), 64 bytes of 2-bit weights as Q2_K's, 12 bytes of 16 six-bit
            scales (low nibbles from bytes 96 + i % 8, high bits from 104 + i % 4), minus 32, d.
            weight = d * scale * (q - 4), q with its third bit."""
            def body(k, acc):
                b, i8x16, i8x32 = k.builder, _vec(_I8, 16), _vec(_I8, 32)
                low = _bytes_at(b, k.load(96, 8), [i % 8 for i in range(16)], [4 * (i // 8) for i in range(16)], 15)
                high = _bytes_at(b, k.load(104, 4), [i % 4 for i in range(16)], [2 * (i // 4) for i in range(16)], 3)
                six = b.or_(low, b.shl(high, _ir.Constant(i8x16, [4] * 16)))
                scales = k.scales16(b.sub(six, _ir.Constant(i8x16, [32] * 16)), k.half(108), signed=True)
                thirds = k.load(0, 32)
                for n in range(2):
                    weights = k.load(32 + 32 * n, 32)
                    for j in range(4):
                        g = 4 * n + j
                        third = b.and_(b.lshr(thirds, _ir.Constant(i8x32, [g] * 32)), _ir.Constant(i8x32, [1] * 32))
                        q = b.or_(_crumbs_of(b, weights, j), b.shl(third, _ir.Constant(i8x32, [2] * 32)))
                        acc = k.accumulate(acc, q, False, 4, g, k.group(scales, g))
                return acc
            return _lanes(acc, w, o, xq, xd, s), _block_codegen(body)

        @_intrinsic
        def _add_iq4_xs_block(typingctx, acc, w, o, xq, xd, s):
            """Lanes += one 256-weight IQ4_XS block at byte o: d, 2 bytes of the 8 scales' high
            bits (2 each), 4 bytes of their low nibbles, then 8 groups of 16 bytes as IQ4_NL's;
            weight = d * (scale - 32) * IQ4_VALUES[index]."""
            def body(k, acc):
                b, i8x16 = k.builder, _vec(_I8, 16)
                # each scale twice (k.scales16 takes one per 16 weights)
                low = _bytes_at(b, k.load(4, 4), [i // 4 for i in range(16)], [4 * ((i // 2) % 2) for i in range(16)], 15)
                high = _bytes_at(b, k.load(2, 2), [i // 8 for i in range(16)], [2 * ((i // 2) % 4) for i in range(16)], 3)
                six = b.or_(low, b.shl(high, _ir.Constant(i8x16, [4] * 16)))
                scales = k.scales16(b.sub(six, _ir.Constant(i8x16, [32] * 16)), k.half(0), signed=True)
                for g in range(8):
                    acc = k.accumulate(acc, _iq4_values(k.context, b, k.load(8 + 16 * g, 16)), True, 0, g,
                                       k.group(scales, g))
                return acc
            return _lanes(acc, w, o, xq, xd, s), _block_codegen(body)

        # reassociation lets float sums use vector lanes; no 'no-inf/no-nan' assumptions (exp overflows)
        _FAST = {"reassoc", "contract", "nsz", "arcp"}
        _jit = numba.njit(fastmath=_FAST, cache=True, nogil=True)
        _kernel = numba.njit(fastmath=_FAST, cache=True, parallel=True, nogil=True)
        _exact = numba.njit(cache=True, nogil=True)  # no fast-math: float32 rounding as numpy's
        _prange = numba.prange
except Exception as e:  # numba and llvmlite report API mismatches with many exception types
    print(f"run.py: numba {numba.__version__} does not fit run.py's kernels ({type(e).__name__}: "
          f"{(str(e).strip().splitlines() or [''])[0]}); using numpy", file=sys.stderr)
    numba = None
if numba is None:  # nothing below is called without numba; the definitions still read as Python
    def _jit(fn):
        return fn
    _kernel, _exact, _prange = _jit, _jit, range


# One function per tensor type: the dot product of one row (its bytes w) with x, where xq holds
# x as 16-bit integers, xd the scale of each 32-block of them and xsum the blocks' sums (xd * sum).
# Each asks for the bytes PREFETCH ahead (the rows of a thread's share are contiguous, so
# that is this row or the next): the hardware prefetchers alone left ~40% of the time waiting.
PREFETCH = 2048

@_jit
def _prefetch_row(w, o, size):
    for line in range(0, size, 64):
        _prefetch(w, o + line + PREFETCH)


@_jit
def _row_f32(w, o, x):  # float rows: prefetch first, then one plain loop the compiler vectorizes
    _prefetch_row(w, o, 4 * x.shape[0])
    total = np.float32(0)
    for i in range(x.shape[0]):
        total += _float(w, o + 4 * i) * x[i]
    return total


@_jit
def _row_f16(w, o, x):
    _prefetch_row(w, o, 2 * x.shape[0])
    total = np.float32(0)
    for i in range(x.shape[0]):
        total += _half(w, o + 2 * i) * x[i]
    return total


@_jit
def _row_bf16(w, o, x):
    _prefetch_row(w, o, 2 * x.shape[0])
    total = np.float32(0)
    for i in range(x.shape[0]):
        total += _bf16(w, o + 2 * i) * x[i]
    return total


@_jit
def _row_q8_0(w, o, xq, xd, xsum):  # 34 bytes: d, 32 int8
    acc = _zeros()
    for b in range(xq.shape[0] // 32):
        _prefetch(w, o + 34 * b + PREFETCH)
        acc = _add_int8(acc, w, o + 34 * b + 2, xq, 32 * b, _half(w, o + 34 * b) * xd[b])
    return _total(acc)


@_jit
def _row_q4_0(w, o, xq, xd, xsum):  # 18 bytes: d, 16 bytes of nibbles; weight = d * (q - 8)
    acc = _zeros()
    for b in range(xq.shape[0] // 32):
        _prefetch(w, o + 18 * b + PREFETCH)
        acc = _add_nibbles(acc, w, o + 18 * b + 2, -1, xq, 32 * b, _half(w, o + 18 * b) * xd[b], 8)
    return _total(acc)


@_jit
def _row_q4_1(w, o, xq, xd, xsum):  # 20 bytes: d, m, nibbles; weight = d * q + m
    acc, offsets = _zeros(), np.float32(0)
    for b in range(xq.shape[0] // 32):
        _prefetch(w, o + 20 * b + PREFETCH)
        acc = _add_nibbles(acc, w, o + 20 * b + 4, -1, xq, 32 * b, _half(w, o + 20 * b) * xd[b], 0)
        offsets += _half(w, o + 20 * b + 2) * xsum[b]
    return _total(acc) + offsets


@_jit
def _row_q5_0(w, o, xq, xd, xsum):  # 22 bytes: d, fifth bits, nibbles; weight = d * (q - 16)
    acc = _zeros()
    for b in range(xq.shape[0] // 32):
        _prefetch(w, o + 22 * b + PREFETCH)
        acc = _add_nibbles(acc, w, o + 22 * b + 6, o + 22 * b + 2, xq, 32 * b, _half(w, o + 22 * b) * xd[b], 16)
    return _total(acc)


@_jit
def _row_q5_1(w, o, xq, xd, xsum):  # 24 bytes: d, m, fifth bits, nibbles; weight = d * q + m
    acc, offsets = _zeros(), np.float32(0)
    for b in range(xq.shape[0] // 32):
        _prefetch(w, o + 24 * b + PREFETCH)
        acc = _add_nibbles(acc, w, o + 24 * b + 8, o + 24 * b + 4, xq, 32 * b, _half(w, o + 24 * b) * xd[b], 0)
        offsets += _half(w, o + 24 * b + 2) * xsum[b]
    return _total(acc) + offsets


@_jit
def _row_q4_k(w, o, xq, xd, xsum):  # 144 bytes per 256 weights (see _add_k_block)
    acc = _zeros()
    for b in range(xq.shape[0] // 256):
        for line in range(0, 144, 64):
            _prefetch(w, o + 144 * b + line + PREFETCH)
        acc = _add_k_block(acc, w, o + 144 * b, o + 144 * b + 16, -1, xq, xd, xsum, 8 * b)
    return _total(acc)


@_jit
def _row_q5_k(w, o, xq, xd, xsum):  # 176 bytes: as Q4_K, with 32 bytes of fifth bits before the nibbles
    acc = _zeros()
    for b in range(xq.shape[0] // 256):
        for line in range(0, 176, 64):
            _prefetch(w, o + 176 * b + line + PREFETCH)
        acc = _add_k_block(acc, w, o + 176 * b, o + 176 * b + 48, o + 176 * b + 16, xq, xd, xsum, 8 * b)
    return _total(acc)


@_jit
def _row_q6_k(w, o, xq, xd, xsum):  # 210 bytes per 256 weights (see _add_q6_k_block)
    acc = _zeros()
    for b in range(xq.shape[0] // 256):
        for line in range(0, 210, 64):
            _prefetch(w, o + 210 * b + line + PREFETCH)
        acc = _add_q6_k_block(acc, w, o + 210 * b, xq, xd, 8 * b)
    return _total(acc)


@_jit
def _row_q2_k(w, o, xq, xd, xsum):  # 84 bytes per 256 weights (see _add_q2_k_block)
    acc = _zeros()
    for b in range(xq.shape[0] // 256):
        _prefetch(w, o + 84 * b + PREFETCH)
        _prefetch(w, o + 84 * b + 64 + PREFETCH)
        acc = _add_q2_k_block(acc, w, o + 84 * b, xq, xd, 8 * b)
    return _total(acc)


@_jit
def _row_q3_k(w, o, xq, xd, xsum):  # 110 bytes per 256 weights (see _add_q3_k_block)
    acc = _zeros()
    for b in range(xq.shape[0] // 256):
        _prefetch(w, o + 110 * b + PREFETCH)
        _prefetch(w, o + 110 * b + 64 + PREFETCH)
        acc = _add_q3_k_block(acc, w, o + 110 * b, xq, xd, 8 * b)
    return _total(acc)


@_jit
def _row_iq4_nl(w, o, xq, xd, xsum):  # 18 bytes: d, 16 bytes of indices into IQ4_VALUES
    acc = _zeros()
    for b in range(xq.shape[0] // 32):
        _prefetch(w, o + 18 * b + PREFETCH)
        acc = _add_iq4(acc, w, o + 18 * b + 2, xq, 32 * b, _half(w, o + 18 * b) * xd[b])
    return _total(acc)


@_jit
def _row_iq4_xs(w, o, xq, xd, xsum):  # 136 bytes per 256 weights (see _add_iq4_xs_block)
    acc = _zeros()
    for b in range(xq.shape[0] // 256):
        for line in range(0, 136, 64):
            _prefetch(w, o + 136 * b + line + PREFETCH)
        acc = _add_iq4_xs_block(acc, w, o + 136 * b, xq, xd, 8 * b)
    return _total(acc)


@_jit
def _rows(w, ggml_type, x, xq, xd, xsum, out, first, last):
    """out[r] = row r of w . x for first <= r < last; one type test per call, not per row. Rows
    are addressed flat from their first byte (a slice w[r] per row would update the array's
    reference count: an atomic operation on a cache line that every thread writes)."""
    if ggml_type == GGMLType.F32:
        for r in range(first, last):
            out[r] = _row_f32(w, r * w.shape[1], x)
    elif ggml_type == GGMLType.F16:
        for r in range(first, last):
            out[r] = _row_f16(w, r * w.shape[1], x)
    elif ggml_type == GGMLType.BF16:
        for r in range(first, last):
            out[r] = _row_bf16(w, r * w.shape[1], x)
    elif ggml_type == GGMLType.Q8_0:
        for r in range(first, last):
            out[r] = _row_q8_0(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q4_0:
        for r in range(first, last):
            out[r] = _row_q4_0(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q4_1:
        for r in range(first, last):
            out[r] = _row_q4_1(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q5_0:
        for r in range(first, last):
            out[r] = _row_q5_0(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q5_1:
        for r in range(first, last):
            out[r] = _row_q5_1(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q4_K:
        for r in range(first, last):
            out[r] = _row_q4_k(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q5_K:
        for r in range(first, last):
            out[r] = _row_q5_k(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q6_K:
        for r in range(first, last):
            out[r] = _row_q6_k(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q2_K:
        for r in range(first, last):
            out[r] = _row_q2_k(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.Q3_K:
        for r in range(first, last):
            out[r] = _row_q3_k(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.IQ4_NL:
        for r in range(first, last):
            out[r] = _row_iq4_nl(w, r * w.shape[1], xq, xd, xsum)
    elif ggml_type == GGMLType.IQ4_XS:
        for r in range(first, last):
            out[r] = _row_iq4_xs(w, r * w.shape[1], xq, xd, xsum)
    else:  # Model refuses such files at load; never read bytes as a type they are not
        raise ValueError("no kernel for this tensor type")


# Several vectors (sequences) at once: a row's block is unpacked once and multiplied with four
# vectors, each in its own accumulators (which also run in parallel, where one vector's wait
# on each other). Same arithmetic as the one-vector functions above, in the same order, so a
# vector's result does not depend on its company. For the five 32-weight block types; for the
# others, and the vectors left over from fours, the rows go one vector at a time while in cache.
GROUPED = (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.IQ4_NL)
# the types with a kernel (_rows): all that run.py reads (a file with another would run on numpy)
KERNEL_TYPES = GROUPED + (GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
                          GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.IQ4_XS)


@_jit
def _madd4(a0, a1, a2, a3, q, d, xq, xd, s, b):
    """Four vectors' lanes += block b's integers q (scale d) . vectors s..s+3 of xq (addressed
    flat: no slices in the inner loop)."""
    n, o = xq.shape[1], 32 * b
    return (_madd(a0, q, xq, s * n + o, d * xd[s, b]), _madd(a1, q, xq, (s + 1) * n + o, d * xd[s + 1, b]),
            _madd(a2, q, xq, (s + 2) * n + o, d * xd[s + 2, b]), _madd(a3, q, xq, (s + 3) * n + o, d * xd[s + 3, b]))


@_jit
def _min4(m0, m1, m2, m3, m, xsum, s, b):
    return m0 + m * xsum[s, b], m1 + m * xsum[s + 1, b], m2 + m * xsum[s + 2, b], m3 + m * xsum[s + 3, b]


@_jit
def _row4(w, ggml_type, xq, xd, xsum, out, r, s):
    """out[s:s+4, r] = row r of w . x[s:s+4], a GROUPED type: one loop per type, so that
    nothing but arithmetic is inside it. w is addressed flat from the row's first byte o (a
    slice w[r] per row would update the array's reference count: an atomic operation on a
    cache line that every thread writes)."""
    blocks, o = xq.shape[1] // 32, r * w.shape[1]
    a0, a1, a2, a3 = _zeros(), _zeros(), _zeros(), _zeros()
    m0 = m1 = m2 = m3 = np.float32(0)
    if ggml_type == GGMLType.Q8_0:
        for b in range(blocks):
            _prefetch(w, o + 34 * b + PREFETCH)
            a0, a1, a2, a3 = _madd4(a0, a1, a2, a3, _unpack_int8(w, o + 34 * b + 2), _half(w, o + 34 * b), xq, xd, s, b)
    elif ggml_type == GGMLType.Q4_0:
        for b in range(blocks):
            _prefetch(w, o + 18 * b + PREFETCH)
            a0, a1, a2, a3 = _madd4(a0, a1, a2, a3, _unpack_nibbles(w, o + 18 * b + 2, -1, 8), _half(w, o + 18 * b),
                                    xq, xd, s, b)
    elif ggml_type == GGMLType.Q4_1:
        for b in range(blocks):
            _prefetch(w, o + 20 * b + PREFETCH)
            a0, a1, a2, a3 = _madd4(a0, a1, a2, a3, _unpack_nibbles(w, o + 20 * b + 4, -1, 0), _half(w, o + 20 * b),
                                    xq, xd, s, b)
            m0, m1, m2, m3 = _min4(m0, m1, m2, m3, _half(w, o + 20 * b + 2), xsum, s, b)
    elif ggml_type == GGMLType.Q5_0:
        for b in range(blocks):
            _prefetch(w, o + 22 * b + PREFETCH)
            a0, a1, a2, a3 = _madd4(a0, a1, a2, a3, _unpack_nibbles(w, o + 22 * b + 6, o + 22 * b + 2, 16),
                                    _half(w, o + 22 * b), xq, xd, s, b)
    elif ggml_type == GGMLType.IQ4_NL:
        for b in range(blocks):
            _prefetch(w, o + 18 * b + PREFETCH)
            a0, a1, a2, a3 = _madd4(a0, a1, a2, a3, _unpack_iq4(w, o + 18 * b + 2), _half(w, o + 18 * b), xq, xd, s, b)
    else:
        for b in range(blocks):
            _prefetch(w, o + 24 * b + PREFETCH)
            a0, a1, a2, a3 = _madd4(a0, a1, a2, a3, _unpack_nibbles(w, o + 24 * b + 8, o + 24 * b + 4, 0),
                                    _half(w, o + 24 * b), xq, xd, s, b)
            m0, m1, m2, m3 = _min4(m0, m1, m2, m3, _half(w, o + 24 * b + 2), xsum, s, b)
    if ggml_type == GGMLType.Q4_1 or ggml_type == GGMLType.Q5_1:
        out[s, r], out[s + 1, r] = _total(a0) + m0, _total(a1) + m1
        out[s + 2, r], out[s + 3, r] = _total(a2) + m2, _total(a3) + m3
    else:
        out[s, r], out[s + 1, r], out[s + 2, r], out[s + 3, r] = _total(a0), _total(a1), _total(a2), _total(a3)


@_jit
def _rows_many(w, ggml_type, x, xq, xd, xsum, out, first, last):
    """out[:, first:last] for all the vectors of x (B, n)."""
    B = x.shape[0]
    fours = B // 4 * 4 if ggml_type in GROUPED else 0
    for tile in range(first, last, TILE_ROWS):
        end = min(tile + TILE_ROWS, last)
        for r in range(tile, end):
            for s in range(0, fours, 4):
                _row4(w, ggml_type, xq, xd, xsum, out, r, s)
        for s in range(fours, B):
            _rows(w, ggml_type, x[s], xq[s], xd[s], xsum[s], out[s], tile, end)


# How the kernels round a matrix's input (run.load's `activations`; a kernel argument: an empty
# array of the integer type). 16 bits (the default): logits within 1e-3 of the float
# computation's scale, and greedy text as transformers'. 8 bits, as llama.cpp rounds them,
# for the inputs of the query/key/value and gate/up projections (normalized hidden states);
# the attention output, FFN down and output projections keep 16: 1.1 to 2.6 times the
# multiply-adds per instruction on those matrices, for a perplexity 0.15% higher on Henry VI
# part 2 (8 bits everywhere: 0.41%, past the 0.2% we allow) and greedy text that parts from
# transformers' at near ties.
ACTIVATIONS = {16: np.zeros(0, np.int16), 8: np.zeros(0, np.int8)}


@_jit
def _quantize(x, kind):
    """Each row of x (B, n) as integers of kind's type (int16 or int8) per block of 32: (the
    integers, each block's scale, each block's sum of its rounded values: scale * sum of its
    integers)."""
    B, n = x.shape
    blocks = max(n // 32, 1)
    top_int = np.float32(32767) if kind.itemsize == 2 else np.float32(127)
    xq = np.zeros((B, n), kind.dtype)
    xd, xsum = np.zeros((B, blocks), np.float32), np.zeros((B, blocks), np.float32)
    for s in range(B):
        for b in range(n // 32):
            top = np.float32(0)
            for j in range(32):
                top = max(top, abs(x[s, 32 * b + j]))
            xd[s, b] = top / top_int
            inverse = top_int / top if top > 0 else np.float32(0)
            for j in range(32):
                q = np.floor(x[s, 32 * b + j] * inverse + np.float32(0.5))
                xq[s, 32 * b + j] = q
                xsum[s, b] += q
            xsum[s, b] *= xd[s, b]
    return xq, xd, xsum


TILE_ROWS = 8  # rows multiplied with every vector while they are in the L1 cache (types not GROUPED)


@_jit
def _row_range(w, ggml_type, x, xq, xd, xsum, out, first, last):
    """out[:, first:last] = rows first..last-1 of w (rows, row_bytes), a matrix in its file type,
    times every vector of x (B, n), x also given as _quantize(x, kind)."""
    if x.shape[0] == 1:
        _rows(w, ggml_type, x[0], xq[0], xd[0], xsum[0], out[0], first, last)
    else:
        _rows_many(w, ggml_type, x, xq, xd, xsum, out, first, last)


@_jit
def _rms_norm(x, weight, eps):
    """Each row of x (B, n) normalized."""
    out = np.empty_like(x)
    for s in range(x.shape[0]):
        out[s] = x[s] * (np.float32(1) / np.sqrt(np.mean(x[s] * x[s]) + np.float32(eps))) * weight
    return out


@_jit
def _rope(x, n_head, head_dim, cos, sin, neox):
    """In place: rotate pairs (2i, 2i+1) of the first 2*len(cos) dimensions of each head, or
    with neox pairs (i, i + len(cos)) (see Model._rope)."""
    half = cos.shape[0]
    for h in range(n_head):
        for i in range(half):
            j, k = (h * head_dim + i, h * head_dim + i + half) if neox else (h * head_dim + 2 * i, h * head_dim + 2 * i + 1)
            a, b = x[j], x[k]
            x[j] = a * cos[i] - b * sin[i]
            x[k] = a * sin[i] + b * cos[i]


@_jit
def _head_norm(x, n_head, head_dim, weight, eps):
    """In place: RMS-normalize each head of x (Qwen 3's query and key norms)."""
    for h in range(n_head):
        head = x[h * head_dim:(h + 1) * head_dim]
        head[:] = head * (np.float32(1) / np.sqrt(np.mean(head * head) + np.float32(eps))) * weight


@_jit
def _attend(q, s, keys, values, layer, first, S, head, group, scale, softcap, out):
    """Query head `head` of sequence s (q[s]), times scale, against positions first..S-1 of
    its key/value head (head // group) in the layer's cache (scores soft-capped if softcap >
    0, see Config): out[s]'s part for that head. The
    caches hold (layers, n_head_kv, head_dim, positions): every inner loop runs along
    positions. Arrays are indexed, never sliced (see _rows)."""
    head_dim, kv = keys.shape[2], head // group
    scale, q0 = np.float32(scale), head * head_dim
    scores = np.zeros(S - first, np.float32)
    for d in range(head_dim):
        qd = q[s, q0 + d] * scale
        for p in range(first, S):
            scores[p - first] += qd * keys[layer, kv, d, p]
    if softcap > 0:
        for p in range(S - first):
            scores[p] = np.tanh(scores[p] / np.float32(softcap)) * np.float32(softcap)
    top = scores[0]
    for p in range(S - first):
        top = max(top, scores[p])
    total = np.float32(0)
    for p in range(S - first):
        scores[p] = np.exp(scores[p] - top)
        total += scores[p]
    for d in range(head_dim):
        weighted = np.float32(0)
        for p in range(first, S):
            weighted += scores[p - first] * values[layer, kv, d, p]
        out[s, q0 + d] = weighted / total


@_kernel
def _attention(q, k_caches, v_caches, layer, positions, seqs, n_head, window, scale, softcap, out, threads):
    """Every query head of every token s (q[s]) against the first positions[s] + 1 positions
    of its sequence's cache's layer (k_caches[seqs[s]]; the last `window` of them, if window >
    0); the (token, head) pairs are split among the threads."""
    group = n_head // k_caches[0].shape[1]
    pairs = q.shape[0] * n_head
    for t in _prange(threads):
        for pair in range(t * pairs // threads, (t + 1) * pairs // threads):
            s, head = pair // n_head, pair % n_head
            first = max(0, positions[s] + 1 - window) if window > 0 else 0
            _attend(q, s, k_caches[seqs[s]], v_caches[seqs[s]], layer, first, positions[s] + 1, head, group, scale,
                    softcap, out)


@_kernel
def _matmuls_at(data, table, first, count, x, xq, xd, xsum, out, chunks):
    """out[s] = W @ x[s] for each row s of x (B, n), W the matrices first..first+count-1 of the
    table (each row: a matrix's byte offset, bytes, rows and type in the file's bytes) one
    above the other, all on the same input (a layer's query, key and value matrices, or its
    gate and up): their outputs side by side in out's columns. Their rows together are split
    in `chunks` parts shared among the threads (one fork and join, the shares even where
    three small matrices would each split unevenly); the weights are read from memory once
    per call, however many vectors (sequences) there are. (No array expressions here: in a
    parallel function each would be a parallel region of its own.)"""
    total = 0
    for m in range(first, first + count):
        total += table[m, 2]
    chunks = min(total, chunks)
    for c in _prange(chunks):
        low, high, base = c * total // chunks, (c + 1) * total // chunks, 0
        for m in range(first, first + count):
            offset, size, rows = table[m, 0], table[m, 1], table[m, 2]
            if low < base + rows and high > base:
                _row_range(data[offset:offset + size].reshape(rows, size // rows), table[m, 3], x, xq, xd, xsum,
                           out[:, base:], max(low - base, 0), min(high - base, rows))
            base += rows


@_jit
def _decode_tokens(x, positions, seqs, data, table, norms, qkv_bias, qk_norms, post_norms, k_caches, v_caches, cos, sin,
                   n_head, eps, neox, windows, scale, softcap, gelu, wanted, logits, threads, kind):
    """Run tokens (their embeddings x, (T, n_embd)) through every layer, token t at position
    positions[t] of the sequence whose caches are k_caches[seqs[t]], v_caches[seqs[t]] ((layers,
    kv heads, head_dim, positions)); write their keys and values there, and the next-token logits of
    tokens `wanted` to logits (len(wanted), n_vocab). Tokens of several sequences (a server's
    conversations) and several tokens of one sequence (a prompt: the same caches, consecutive
    positions) mix freely: each layer writes every token's keys and values before any token
    attends, and a token attends to the positions up to its own. data is the file's bytes;
    table rows 7i..7i+6 place layer i's q, k, v, output, gate, up and down matrices in it (see
    _matmuls_at), the last row the output projection. qkv_bias (layers, q + k + v dims),
    qk_norms (layers, 2, head_dim) and post_norms (layers, 2, n_embd: Gemma's norms of the
    attention's and the FFN's outputs) have no rows for a model without them; neox:
    Model._rope; windows[i] > 0: layer i's sliding window, its RoPE from cos[1], sin[1] (the
    others' from cos[0], sin[0]); scale: the queries'; softcap: the attention scores' (Config);
    gelu: tanh-GELU, not SiLU; kind: the integer type of the q/k/v and gate/up projections'
    inputs (ACTIVATIONS; the others' is 16 bits). A token's
    numbers depend only on it and the cache before it, never on the others in the call: its
    logits are those it gets alone."""
    n_layer, n_head_kv, head_dim, _ = k_caches[0].shape
    T = x.shape[0]
    chunks = 4 * threads  # smaller pieces than threads, so that a slow thread delays less
    wide = np.zeros(0, np.int16)
    q_dim, kv_dim, n_ff = n_head * head_dim, n_head_kv * head_dim, table[4, 2]
    qkv, gate_up = np.empty((T, q_dim + 2 * kv_dim), np.float32), np.empty((T, 2 * n_ff), np.float32)
    att, proj = np.empty((T, q_dim), np.float32), np.empty(x.shape, np.float32)
    for i in range(n_layer):
        m = 7 * i
        h = _rms_norm(x, norms[i, 0], eps)
        hq, hd, hs = _quantize(h, kind)
        _matmuls_at(data, table, m, 3, h, hq, hd, hs, qkv, chunks)
        q, k, v = qkv[:, :q_dim].copy(), qkv[:, q_dim:q_dim + kv_dim].copy(), qkv[:, q_dim + kv_dim:].copy()
        for t in range(T):
            if qkv_bias.shape[0]:
                q[t] += qkv_bias[i, :q.shape[1]]
                k[t] += qkv_bias[i, q.shape[1]:q.shape[1] + k.shape[1]]
                v[t] += qkv_bias[i, q.shape[1] + k.shape[1]:]
            if qk_norms.shape[0]:
                _head_norm(q[t], n_head, head_dim, qk_norms[i, 0], eps)
                _head_norm(k[t], n_head_kv, head_dim, qk_norms[i, 1], eps)
            r = 1 if windows[i] > 0 else 0
            _rope(q[t], n_head, head_dim, cos[r, t], sin[r, t], neox)
            _rope(k[t], n_head_kv, head_dim, cos[r, t], sin[r, t], neox)
            k_caches[seqs[t]][i, :, :, positions[t]] = k[t].reshape(n_head_kv, head_dim)
            v_caches[seqs[t]][i, :, :, positions[t]] = v[t].reshape(n_head_kv, head_dim)
        _attention(q, k_caches, v_caches, i, positions, seqs, n_head, windows[i], scale, softcap, att, threads)
        aq, ad, as_ = _quantize(att, wide)
        _matmuls_at(data, table, m + 3, 1, att, aq, ad, as_, proj, chunks)
        x = x + (_rms_norm(proj, post_norms[i, 0], eps) if post_norms.shape[0] else proj)
        h = _rms_norm(x, norms[i, 1], eps)
        hq, hd, hs = _quantize(h, kind)
        _matmuls_at(data, table, m + 4, 2, h, hq, hd, hs, gate_up, chunks)
        g, up = gate_up[:, :n_ff], gate_up[:, n_ff:]
        if gelu:
            gate = np.float32(0.5) * g * (np.float32(1) + np.tanh(np.float32(np.sqrt(2 / np.pi)) * (
                g + np.float32(0.044715) * g * g * g))) * up
        else:
            gate = g / (np.float32(1) + np.exp(-g)) * up
        gq, gd, gs = _quantize(gate, wide)
        _matmuls_at(data, table, m + 6, 1, gate, gq, gd, gs, proj, chunks)
        x = x + (_rms_norm(proj, post_norms[i, 1], eps) if post_norms.shape[0] else proj)
    h = _rms_norm(x[wanted], norms[n_layer, 0], eps)
    hq, hd, hs = _quantize(h, wide)
    _matmuls_at(data, table, table.shape[0] - 1, 1, h, hq, hd, hs, logits, chunks)


# The decoders of prompts' matrix-matrix products: whole rows to float32 (then one BLAS product
# for many tokens), the numpy decoders' arithmetic in the same order, so bit for bit their
# output, at about ten times their speed (2 G weights/s a core on Q4_K).
@_exact
def _f32(v):
    return np.float32(v)


@_exact
def _q3_k_scale(row, o, g):
    """Q3_K's six-bit scale of weights 16g..16g+15 (see _add_q3_k_block), minus 32."""
    return _f32((row[o + 96 + g % 8] >> (4 * (g // 8)) & 15 | (row[o + 104 + g % 4] >> (2 * (g // 4)) & 3) << 4) - 32)


@_exact
def _unpack_row(w, r, ggml_type, out):
    """out[r] = row r of w (rows, row_bytes), decoded: 32 weights at a time as bytes (the
    kernels' unpacking), then scale * q - minus (_put32). Byte offsets o count from the row's
    start; out is written flat, at r * cols."""
    row, cols, zero = w[r], out.shape[1], np.float32(0)
    flat, at = out.reshape(-1), r * out.shape[1]
    if ggml_type == GGMLType.F16:
        for i in range(cols):
            out[r, i] = _half(row, 2 * i)
    elif ggml_type == GGMLType.BF16:
        for i in range(cols):
            out[r, i] = _bf16(row, 2 * i)
    elif ggml_type == GGMLType.F32:
        for i in range(cols):
            out[r, i] = _float(row, 4 * i)
    elif ggml_type == GGMLType.Q8_0:  # d, 32 int8
        for b in range(cols // 32):
            d = _half(row, 34 * b)
            _put32(flat, at + 32 * b, _unpack_int8(row, 34 * b + 2), d, d, zero, zero)
    elif ggml_type == GGMLType.Q4_0:  # d, 16 bytes of nibbles; weight d * (q - 8)
        for b in range(cols // 32):
            d = _half(row, 18 * b)
            _put32(flat, at + 32 * b, _unpack_nibbles(row, 18 * b + 2, -1, 8), d, d, zero, zero)
    elif ggml_type == GGMLType.IQ4_NL:  # d, 16 bytes of indices into IQ4_VALUES
        for b in range(cols // 32):
            d = _half(row, 18 * b)
            _put32(flat, at + 32 * b, _unpack_iq4(row, 18 * b + 2), d, d, zero, zero)
    elif ggml_type == GGMLType.Q4_1:  # d, m, nibbles; weight d * q + m
        for b in range(cols // 32):
            d, m = _half(row, 20 * b), -_half(row, 20 * b + 2)
            _put32(flat, at + 32 * b, _unpack_nibbles(row, 20 * b + 4, -1, 0), d, d, m, m)
    elif ggml_type == GGMLType.Q5_0:  # d, fifth bits, nibbles; weight d * (q - 16)
        for b in range(cols // 32):
            d = _half(row, 22 * b)
            _put32(flat, at + 32 * b, _unpack_nibbles(row, 22 * b + 6, 22 * b + 2, 16), d, d, zero, zero)
    elif ggml_type == GGMLType.Q5_1:  # d, m, fifth bits, nibbles; weight d * q + m
        for b in range(cols // 32):
            d, m = _half(row, 24 * b), -_half(row, 24 * b + 2)
            _put32(flat, at + 32 * b, _unpack_nibbles(row, 24 * b + 8, 24 * b + 4, 0), d, d, m, m)
    elif ggml_type == GGMLType.Q4_K or ggml_type == GGMLType.Q5_K:  # see _add_k_block
        size, qs = (144, 16) if ggml_type == GGMLType.Q4_K else (176, 48)
        for b in range(cols // 256):
            o = size * b
            d, dmin = _half(row, o), _half(row, o + 2)
            for j in range(8):
                if j < 4:
                    scale, low = row[o + 4 + j] & 63, row[o + 8 + j] & 63
                else:
                    scale = row[o + 8 + j] & 15 | (row[o + j] >> 6) << 4
                    low = row[o + 8 + j] >> 4 | (row[o + 4 + j] >> 6) << 4
                ds, dm = d * _f32(scale), dmin * _f32(low)
                q = _bits32(row, o + qs + 32 * (j // 2), 4 * (j % 2), 15)
                if size == 176:
                    q = _joined(q, _bits32(row, o + 16, j, 1), 4, 0)
                _put32(flat, at + 256 * b + 32 * j, q, ds, ds, dm, dm)
    elif ggml_type == GGMLType.Q6_K:  # see _add_q6_k_block; a scale per 16 weights
        for b in range(cols // 256):
            o = 210 * b
            d = _half(row, o + 208)
            for n in range(2):
                for k in range(4):
                    g = 8 * n + 2 * k
                    q = _joined(_bits32(row, o + 64 * n + 32 * (k % 2), 4 * (k // 2), 15),
                                _bits32(row, o + 128 + 32 * n, 2 * k, 3), 4, 32)
                    _put32(flat, at + 256 * b + 128 * n + 32 * k, q, d * _f32(np.int8(row[o + 192 + g])),
                           d * _f32(np.int8(row[o + 193 + g])), zero, zero)
    elif ggml_type == GGMLType.Q2_K:  # see _add_q2_k_block; a scale and a min per 16 weights
        for b in range(cols // 256):
            o = 84 * b
            d, dmin = _half(row, o + 80), _half(row, o + 82)
            for n in range(2):
                for j in range(4):
                    g = 8 * n + 2 * j
                    _put32(flat, at + 256 * b + 128 * n + 32 * j, _bits32(row, o + 16 + 32 * n, 2 * j, 3),
                           d * _f32(row[o + g] & 15), d * _f32(row[o + g + 1] & 15),
                           dmin * _f32(row[o + g] >> 4), dmin * _f32(row[o + g + 1] >> 4))
    elif ggml_type == GGMLType.Q3_K:  # see _add_q3_k_block; weight d * scale * (q - 4), q with its third bit
        for b in range(cols // 256):
            o = 110 * b
            d = _half(row, o + 108)
            for n in range(2):
                for j in range(4):
                    g = 8 * n + 2 * j
                    q = _joined(_bits32(row, o + 32 + 32 * n, 2 * j, 3), _bits32(row, o, 4 * n + j, 1), 2, 4)
                    _put32(flat, at + 256 * b + 128 * n + 32 * j, q, d * _q3_k_scale(row, o, g),
                           d * _q3_k_scale(row, o, g + 1), zero, zero)
    elif ggml_type == GGMLType.IQ4_XS:  # see _add_iq4_xs_block
        for b in range(cols // 256):
            o = 136 * b
            d, high_bits = _half(row, o), row[o + 2] | np.uint16(row[o + 3]) << 8
            for g in range(8):
                dg = d * _f32((row[o + 4 + g // 2] >> (4 * (g % 2)) & 15 | (high_bits >> (2 * g) & 3) << 4) - 32)
                _put32(flat, at + 256 * b + 32 * g, _unpack_iq4(row, o + 8 + 16 * g), dg, dg, zero, zero)
    else:  # Model refuses such files at load
        raise ValueError("no decoder for this tensor type")


@_exact
def _unpack_rows(w, ggml_type, out):
    """out = every row of w (rows, row_bytes) decoded to float32 (see _decode_rows)."""
    for r in range(w.shape[0]):
        _unpack_row(w, r, ggml_type, out)


_compiled: dict[int, bool] = {}  # activation bits -> whether the kernels compiled (once tried)


def _compile_kernels(bits: int = 16) -> bool:
    """Compile the kernels (or load them from numba's disk cache) once per process, on a
    one-layer toy model with the argument types a model passes, so that load() pays for it
    rather than the first token. Tensor data are read-only views of the memory-mapped file.
    If they cannot be compiled (a numba too old or too new for this file), say so once and
    let the numpy path run: a slower run.py beats one that does not start."""
    if bits not in _compiled:
        data = np.zeros(64, np.uint8)
        data.setflags(write=False)
        table = np.array([[0, 64, 1, 0]] * 8)  # eight 1 x 16 F32 matrices, all the same bytes
        cache = np.zeros((1, 1, 2, 1), np.float32)  # (layers, kv heads, head_dim, positions)
        try:
            _decode_tokens(np.zeros((1, 16), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64), data, table,
                           np.ones((2, 2, 16), np.float32), np.zeros((1, 5), np.float32), np.ones((1, 2, 2), np.float32),
                           np.ones((1, 2, 16), np.float32), numba.typed.List([cache]), numba.typed.List([cache.copy()]),
                           np.ones((2, 1, 1), np.float32), np.zeros((2, 1, 1), np.float32), 1, 1e-5, False,
                           np.zeros(1, np.int64), 0.5, 0.0, False, np.zeros(1, np.int64), np.zeros((1, 1), np.float32), 1,
                           ACTIVATIONS[bits])
            _unpack_rows(data.reshape(1, 64), int(GGMLType.F32), np.empty((1, 16), np.float32))
            _compiled[bits] = True
        except Exception as e:  # numba reports compile failures with many exception types
            first_line = (str(e).strip().splitlines() or [""])[0]
            print(f"run.py: numba {numba.__version__} could not compile the kernels "
                  f"({type(e).__name__}: {first_line}); using numpy", file=sys.stderr)
            _compiled[bits] = False
    return _compiled[bits]


if __name__ == "__main__":
    sys.exit(main())

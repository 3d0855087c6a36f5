"""run.py's tensor decoders (numpy's, and the compiled ones of prompts' matrix products),
bit-exact against the gguf package's numpy reference (`gguf.quants`), on random blocks of
every supported type."""

import numpy as np
import pytest

from conftest import gguf, random_blocks
from twofile import run

Q = gguf.GGMLQuantizationType
QUANTIZED = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS]


def assert_bit_exact(ours, ref):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


def test_type_table_matches_gguf():
    assert len(run.GGML_TYPES) == len(run.GGMLType)
    for type_id, (block, size) in run.GGML_TYPES.items():
        assert Q(type_id).name == run.GGMLType(type_id).name
        assert gguf.GGML_QUANT_SIZES[Q(type_id)] == (block, size)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_random_blocks_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = random_blocks(qtype, 512, rng).reshape(64, -1)  # 64 rows of 8 blocks
    assert_bit_exact(run.dequantize(raw, qtype), gguf.quants.dequantize(raw, qtype))


needs_numba = pytest.mark.skipif(run.numba is None, reason="numba is not installed")


@needs_numba
@pytest.mark.parametrize("qtype", QUANTIZED + [Q.F16, Q.BF16, Q.F32], ids=lambda q: q.name)
def test_compiled_decoders_bit_exact(qtype):
    """The decoders of prompts' matrix products, on rows split among 1 to 3 threads (an odd
    row count: the threads' shares differ), every bit pattern of the packed weights."""
    assert run._compile_kernels()
    rng = np.random.default_rng(100 + int(qtype))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 67, 512
    if block == 1:  # float rows: any bits but f16's inf/nan patterns
        bits = rng.integers(0, 1 << 8 * size, (rows, cols), dtype=np.uint16 if size == 2 else np.uint32)
        if qtype == Q.F16:
            bits[bits & 0x7C00 == 0x7C00] = 0
        raw = bits.view(np.uint8)
    else:
        raw = random_blocks(qtype, rows * cols // block, rng).reshape(rows, -1)
    expected = gguf.quants.dequantize(raw, qtype)
    for threads in (1, 2, 3):
        out = np.full((rows, cols), np.nan, np.float32)
        run._decode_rows(raw, int(qtype), out, threads)
        assert_bit_exact(out, expected)


@needs_numba
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0], ids=lambda q: q.name)
def test_matmul_with_compiled_decoders_is_numpys(qtype):
    """matmul with threads decodes by the compiled decoders: the same product, bit for bit."""
    rng = np.random.default_rng(9)
    rows, cols = 4099, 512
    raw = random_blocks(qtype, rows * cols // gguf.GGML_QUANT_SIZES[qtype][0], rng).reshape(rows, -1)
    info = run.TensorInfo("w", (rows, cols), int(qtype), 0, raw.nbytes, raw.reshape(-1))
    x = rng.standard_normal((5, cols)).astype(np.float32)
    assert_bit_exact(run.matmul(x, info, threads=2), run.matmul(x, info))


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda q: q.name)
def test_reference_quantized_weights_bit_exact(qtype):
    """Blocks made by the reference quantizer from real-looking weights (incl. zeros, outliers)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((32, 256)).astype(np.float32) * rng.uniform(0.001, 3, (32, 1)).astype(np.float32)
    w[0] = 0.0
    w[1, ::17] = 1e4
    raw = gguf.quants.quantize(w, qtype)
    assert_bit_exact(run.dequantize(raw, qtype), gguf.quants.dequantize(raw, qtype))


def test_float_types_bit_exact():
    rng = np.random.default_rng(3)
    bits16 = rng.integers(0, 1 << 16, (8, 64), dtype=np.uint16)
    bits16[bits16 & 0x7C00 == 0x7C00] = 0  # leave out f16 inf/nan patterns
    raw = bits16.view(np.uint8)
    assert_bit_exact(run.dequantize(raw, Q.F16), gguf.quants.dequantize(raw, Q.F16))
    assert_bit_exact(run.dequantize(raw, Q.BF16), gguf.quants.dequantize(raw, Q.BF16))
    f32 = rng.standard_normal((4, 16)).astype(np.float32)
    assert_bit_exact(run.dequantize(f32.view(np.uint8), Q.F32), f32)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0, Q.Q4_1, Q.Q6_K], ids=lambda q: q.name)
def test_matmul_and_rows_on_odd_shapes(qtype):
    """matmul decodes in chunks of rows; a row count that is no multiple of the chunk works."""
    rng = np.random.default_rng(5)
    rows, cols = 4099, 256
    raw = (random_blocks(qtype, rows * cols // gguf.GGML_QUANT_SIZES[qtype][0], rng)
           if qtype != Q.F16 else rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8))
    raw = raw.reshape(rows, -1)
    info = run.TensorInfo("w", (rows, cols), int(qtype), 0, raw.nbytes, raw.reshape(-1))
    w = gguf.quants.dequantize(raw, qtype)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    np.testing.assert_allclose(run.matmul(x, info), x @ w.T, rtol=1e-5, atol=1e-5)
    assert_bit_exact(run.get_rows(info, [0, 4098, 7]), w[[0, 4098, 7]])

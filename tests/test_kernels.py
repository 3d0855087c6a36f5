"""The compiled kernels (numba) against the numpy path and transformers: every tensor type,
odd shapes, threads, one-token prompts and a full context. The numpy path itself is checked
against transformers in test_model.py; here both paths must agree."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import bpe_metadata, gguf, random_blocks, tiny_llama, write_llama_gguf
from twofile import run

Q = gguf.GGMLQuantizationType
FLOATS = [Q.F32, Q.F16, Q.BF16]
QUANTIZED = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS]

pytestmark = pytest.mark.skipif(run.numba is None, reason="numba is not installed")


def raw_matrix(qtype, rows, cols, rng):
    """(file bytes (rows, row_bytes), the float32 weights they hold per gguf.quants)."""
    if qtype == Q.F32:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        return w.view(np.uint8), w
    if qtype in (Q.F16, Q.BF16):
        raw = gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    else:
        raw = random_blocks(qtype, rows * cols // gguf.GGML_QUANT_SIZES[qtype][0], rng).reshape(rows, -1)
    return raw, gguf.quants.dequantize(raw, qtype)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("qtype", FLOATS + QUANTIZED, ids=lambda q: q.name)
@pytest.mark.parametrize("rows", [1, 3, 67, 1029])
def test_matmul_every_type_and_odd_row_counts(qtype, rows, bits):
    """Rows that are no multiple of the chunks or threads, down to a single row; x with
    outliers and a block of zeros; x rounded to 16 or 8 bits. Oracle: gguf.quants' decoder
    and a float64 product."""
    rng = np.random.default_rng(rows + int(qtype))
    cols = 512
    raw, w = raw_matrix(qtype, rows, cols, rng)
    x = rng.standard_normal((6, cols)).astype(np.float32)  # six vectors: a group of four, two alone
    x[0, 5] = 40.0
    x[1, 64:96] = 0.0
    expected = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T  # size of the terms
    # the matrix twice in one call (a layer's q/k/v go so), its chunks crossing from one to the other
    table = np.array([[0, raw.nbytes, rows, int(qtype)]] * 2)
    for threads in (1, 2, 3):
        run.numba.set_num_threads(threads)  # the pool (NUMBA_NUM_THREADS, set in conftest) has 4
        both = np.full((6, 2 * rows), np.nan, np.float32)
        run._matmuls_at(raw.reshape(-1), table, 0, 2, x, *run._quantize(x, run.ACTIVATIONS[bits]), both, 4 * threads)
        out = both[:, :rows]
        assert np.array_equal(both[:, rows:], out)
        if bits == 16:  # floats: float32 rounding; quantized: x rounded to 16 bits (1/65534 of a block's max)
            tolerance = 1e-6 if qtype in FLOATS else 5e-5
            assert np.all(np.abs(out - expected) <= tolerance * scale.max())
        else:  # each x off by at most half a step, 1/254 of its block's largest, and float32 rounding
            step = np.abs(x).reshape(6, -1, 32).max(axis=-1) / 127
            bound = 0.5 * np.repeat(step, 32, axis=1).astype(np.float64) @ np.abs(w).astype(np.float64).T
            assert np.all(np.abs(out - expected) <= bound * (1 + 1e-3) + 1e-5 * scale.max())


def test_half_conversion_every_bit_pattern():
    """The kernels' IEEE half decoding equals numpy's on all 65,536 patterns (subnormals, inf, nan)."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = np.empty(1 << 16, np.float32)
    raw = bits.view(np.uint8)

    @run.numba.njit
    def decode(raw, out):
        for i in range(out.shape[0]):
            out[i] = run._half(raw, 2 * i)

    decode(raw, ours)
    theirs = bits.view(np.float16).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32)[~np.isnan(theirs)], theirs.view(np.uint32)[~np.isnan(theirs)])
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))


def decode_logits(m, ids, use_numba):
    """Logits after each token, fed one at a time through the KV cache."""
    m.use_numba = use_numba
    s = m.session()
    return np.stack([s.step(token) for token in ids])


@pytest.mark.parametrize("qtype", FLOATS + QUANTIZED, ids=lambda q: q.name)
def test_both_paths_same_logits_every_type(tmp_path, bpe_tokenizer, qtype):
    """A model whose every matrix has this type: numba and numpy decode agree, and both match
    transformers (running the weights gguf.quants decodes from the file)."""
    model = tiny_llama(tie=False, hidden=256, ff=512, n_head=4, n_head_kv=1)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype=qtype)
    m = run.load(path, threads=2)
    assert m.layers[0].w_down.type == qtype and m.output.type == qtype
    ids = list(np.random.default_rng(3).integers(0, 320, 12))
    fast, slow = decode_logits(m, ids, True), decode_logits(m, ids, False)
    with torch.no_grad():
        oracle = model(torch.tensor([ids])).logits[0].numpy()
    scale = max(1.0, np.abs(oracle).max())
    assert np.abs(slow - oracle).max() <= 1e-4 * scale
    # float types: float32 rounding only; quantized: the 16-bit activations (see run.py)
    assert np.abs(fast - slow).max() <= (1e-5 if qtype in FLOATS else 1e-3) * scale
    assert np.abs(fast - oracle).max() <= (1e-4 if qtype in FLOATS else 1e-3) * scale


@pytest.mark.parametrize("qtype", FLOATS + QUANTIZED, ids=lambda q: q.name)
def test_logits_bit_identical_across_threads_and_batches(tmp_path, bpe_tokenizer, qtype):
    """The determinism a lossless compressor relies on: the same tokens through the same file
    give bit-identical logits with 1, 2 and 3 threads, fed one by one, in one batch, in uneven
    pieces (one over KERNEL_BATCH), or through feed_many beside another session's tokens."""
    model = tiny_llama(tie=False, hidden=256, ff=512, n_head=8, n_head_kv=2, layers=2)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype=qtype)
    ids = list(np.random.default_rng(5).integers(0, 320, 70))
    reference = None
    for threads in (1, 2, 3):
        m = run.load(path, threads=threads)
        assert m.use_numba and m.threads == threads
        s = m.session(exact=True)
        one_by_one = np.stack([s.step(t) for t in ids])
        batch = m.session(exact=True).feed(ids, all_logits=True)
        s = m.session(exact=True)
        pieces = np.concatenate([s.feed(ids[a:b], all_logits=True) for a, b in ((0, 1), (1, 40), (40, 70))])
        default = m.session()  # exact or not, the kernels' path is the same
        default_pieces = np.concatenate([default.feed(ids[a:a + 10], all_logits=True) for a in range(0, 70, 10)])
        mine, other = m.session(), m.session()
        other.feed(ids[:9])
        mixed = []  # mine one token at a time, beside other's pieces of 3 tokens, in one pass
        for t in range(70):
            mixed.append(run.feed_many([other, mine], [ids[9 + t % 50:12 + t % 50], [ids[t]]])[1])
            if len(other.tokens) > 60:
                other.rewind(9)
        if reference is None:
            reference = one_by_one
        for other in (one_by_one, batch, pieces, default_pieces, np.stack(mixed)):
            assert np.array_equal(other.view(np.uint32), reference.view(np.uint32))


def test_one_token_prompt_and_full_context(tmp_path, bpe_tokenizer):
    """A prompt of one token, generation up to the last position of the context, with odd
    head counts (GQA group 3) and threads that do not divide the heads; every greedy token is
    transformers' argmax and the last logits match."""
    model = tiny_llama(tie=True, n_head=6, n_head_kv=2, hidden=96, ff=160, ctx=40)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"))
    m = run.load(path, threads=3)
    assert m.use_numba and m.threads == 3
    prompt = [7]
    s = m.session()
    gen = s.generate(prompt, max_tokens=100, temperature=0, ignore_eos=True)
    list(gen)
    assert gen.finish_reason == "context" and len(gen.tokens) == 40 and len(s.tokens) == 40
    ids = prompt + gen.tokens
    with torch.no_grad():
        oracle = model(torch.tensor([ids])).logits[0].numpy()
    eog = sorted(m.tokenizer.eog_ids)
    for step, token in enumerate(gen.tokens):  # transformers' argmax among the tokens not masked
        row = oracle[step].copy()
        row[eog] = -np.inf
        assert row[token] >= row.max() - 1e-4
    last = s.prefill(ids[:40])  # the cache holds these 40: only the last one runs, at position 39
    assert np.abs(last - oracle[39]).max() <= 1e-4 * max(1.0, np.abs(oracle).max())
    with pytest.raises(run.ContextFull):  # a position past the cache is refused, never written
        s.step(ids[40])


def test_feed_many_is_each_sessions_own_feed(tmp_path, bpe_tokenizer):
    """feed_many over sessions at different positions (new prompts, single tokens, a rewound
    session) gives each the logits its own exact feed gives, to the bit, and the same cache;
    transformers is the oracle for the values. Bad calls are refused before anything runs."""
    model = tiny_llama(tie=False, hidden=64, ff=96, n_head=4, n_head_kv=2)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"))
    m = run.load(path, threads=2)
    rng = np.random.default_rng(6)
    histories = [list(rng.integers(0, 320, n)) for n in (0, 5, 30)]
    news = [list(rng.integers(0, 320, n)) for n in (12, 1, 3)]
    together = [m.session(exact=True) for _ in histories]
    for s, h in zip(together, histories):
        if h:
            s.feed(h + [1, 2])
            s.rewind(len(h))  # cached keys past the rewind point must not be seen
    got = run.feed_many(together, news)
    for s, h, new, logits in zip(together, histories, news, got):
        alone = m.session(exact=True)  # exact: every token through the kernels, as in feed_many
        expected = alone.feed(h + new)
        assert np.array_equal(logits, expected) and s.tokens == alone.tokens
        assert np.array_equal(s.step(3), alone.step(3))
        with torch.no_grad():
            oracle = model(torch.tensor([h + new])).logits[0, -1].numpy()
        assert np.abs(logits - oracle).max() <= 1e-3 * max(1.0, np.abs(oracle).max())
    with pytest.raises(ValueError, match="distinct sessions"):
        run.feed_many([together[0], together[0]], [[1], [2]])
    with pytest.raises(ValueError, match="one list of tokens per session"):
        run.feed_many(together, [[1]])
    before = [list(s.tokens) for s in together]
    with pytest.raises(ValueError, match="out of range"):
        run.feed_many(together, [[1], [2], [10**6]])
    assert [s.tokens for s in together] == before


def test_short_and_long_prompts_leave_the_same_cache(tmp_path, bpe_tokenizer, monkeypatch):
    """In a default session, prompts under SHORT_PROMPT go through the kernels, longer ones
    through numpy's matrix products; the logits and the cache they leave behind agree."""
    model = tiny_llama(tie=False, hidden=64, ff=96)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"))
    ids = list(np.random.default_rng(4).integers(0, 320, 20))
    results = []
    for short in (100, 1):
        monkeypatch.setattr(run, "SHORT_PROMPT", short)
        s = run.load(path).session()
        results.append((s.prefill(ids), s.step(9)))
    assert np.abs(results[0][0] - results[1][0]).max() <= 1e-4
    assert np.abs(results[0][1] - results[1][1]).max() <= 1e-4


def test_threads_argument(tmp_path, tiny_gguf):
    path, _ = tiny_gguf
    with pytest.raises(ValueError, match="threads must be at least 1"):
        run.load(path, threads=0)
    with pytest.raises(ValueError, match="activations must be 16 or 8 bits, not 4"):
        run.load(path, activations=4)
    a, b = run.load(path, threads=1), run.load(path, threads=64)  # more than numba's pool: capped
    assert b.threads == run.numba.config.NUMBA_NUM_THREADS
    ids = a.tokenize("The quick brown fox")
    texts, tokens = [], []
    for m in (a, b):
        gen = m.session().generate(ids, 8, temperature=0, ignore_eos=True)
        texts.append("".join(gen))
        tokens.append(gen.tokens)
    assert len(tokens[0]) == 8 and tokens[0] == tokens[1] and texts[0] == texts[1]


def test_kernels_that_fail_to_compile_fall_back_to_numpy(tiny_gguf, monkeypatch, capsys):
    """A numba that cannot compile the kernels: one message on stderr, and the numpy path runs."""
    path, _ = tiny_gguf

    def broken(*args):
        raise run.numba.core.errors.TypingError("no such intrinsic")

    monkeypatch.setattr(run, "_decode_tokens", broken)
    monkeypatch.setattr(run, "_compiled", {})
    m = run.load(path)
    assert not m.use_numba
    assert "could not compile the kernels (TypingError: no such intrinsic); using numpy" in capsys.readouterr().err
    gen = m.session().generate(m.tokenize("The quick"), 4, temperature=0, ignore_eos=True)
    list(gen)
    assert len(gen.tokens) == 4


def test_numba_of_another_api_falls_back_at_import(tmp_path, tiny_gguf):
    """A numba whose API run.py's definitions do not fit (here a stub module with none of it):
    importing run.py prints one line and generation runs on numpy, never an import error."""
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("__version__ = '0.0-stub'\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import run; m = run.load(sys.argv[2]); "
            "g = m.session().generate(m.tokenize('The quick'), 3, temperature=0, ignore_eos=True); "
            "print(len(list(g)) >= 0, len(g.tokens), m.use_numba)")
    folder = Path(run.__file__).parent
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(tiny_gguf[0])], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "3", "False"]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.py: numba 0.0-stub does not fit run.py's kernels")


def test_kernels_on_a_cpu_without_f16c_or_pshufb(tmp_path):
    """On a plain x86-64 (numba told the target is generic, SSE2 only) the kernels convert
    halves with integer arithmetic and look IQ4 values up with selects: every half bit pattern
    converts as numpy's, and the products of the types that use them match gguf.quants'."""
    code = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from conftest import gguf, random_blocks
from twofile import run
bits = np.arange(1 << 16, dtype=np.uint16)
ours = np.empty(1 << 16, np.float32)

@run.numba.njit
def decode(raw, out):
    for i in range(out.shape[0]):
        out[i] = run._half(raw, 2 * i)

decode(bits.view(np.uint8), ours)
theirs = bits.view(np.float16).astype(np.float32)
same = np.array_equal(ours.view(np.uint32)[~np.isnan(theirs)], theirs.view(np.uint32)[~np.isnan(theirs)])
print("halves", 0.0 if same and np.array_equal(np.isnan(ours), np.isnan(theirs)) else 1.0)
rng = np.random.default_rng(9)
Q = gguf.GGMLQuantizationType
for qtype in (Q.IQ4_NL, Q.IQ4_XS, Q.Q4_K, Q.Q2_K):
    raw = random_blocks(qtype, 37 * 512 // gguf.GGML_QUANT_SIZES[qtype][0], rng).reshape(37, -1)
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    out = np.full((5, 37), np.nan, np.float32)
    run._matmuls_at(raw.reshape(-1), np.array([[0, raw.nbytes, 37, int(qtype)]]), 0, 1, x,
                    *run._quantize(x, run.ACTIVATIONS[16]), out, 3)
    scale = (np.abs(x).astype(np.float64) @ np.abs(w).T).max()
    print(qtype.name, float(np.abs(out - x.astype(np.float64) @ w.T).max() / scale))
"""
    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CPU_FEATURES": "+64bit,+sse,+sse2",
           "NUMBA_CACHE_DIR": str(tmp_path)}  # a cache of its own: kernels compiled for this target
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    errors = {name: float(e) for name, e in (line.split() for line in r.stdout.splitlines())}
    assert set(errors) == {"halves", "IQ4_NL", "IQ4_XS", "Q4_K", "Q2_K"}, r.stdout
    assert errors.pop("halves") == 0.0 and all(e <= 5e-5 for e in errors.values()), errors


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.IQ4_NL], ids=lambda q: q.name)
def test_8_bit_activations_bit_identical_across_threads_and_batches(tmp_path, bpe_tokenizer, qtype):
    """run.load(activations=8): the same logits, to the bit, fed one by one, in one batch (the
    four-sequence kernels) and with 1 or 3 threads, and not those of 16 bits. (Their accuracy
    is measured on real models, test_smollm2 and test_gemma3: a random tiny model's attention
    turns the rounding into errors of several percent either way.)"""
    model = tiny_llama(tie=False, hidden=256, ff=512, n_head=8, n_head_kv=2, layers=2)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype=qtype)
    ids = list(np.random.default_rng(5).integers(0, 320, 20))
    results = []
    for threads in (1, 3):
        m = run.load(path, threads=threads, activations=8)
        s = m.session(exact=True)
        results += [np.stack([s.step(t) for t in ids]), m.session(exact=True).feed(ids, all_logits=True)]
    for other in results[1:]:
        assert np.array_equal(other.view(np.uint32), results[0].view(np.uint32))
    wide = run.load(path, activations=16).session(exact=True).feed(ids, all_logits=True)
    assert np.abs(results[0] - wide).max() > 1e-4 * np.abs(wide).max()

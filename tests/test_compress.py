"""`twofile compress`: the exact bytes back for every kind of input, on both paths and across
thread counts; the archive's size against the model's cross-entropy computed by transformers
(the oracle); tokens that always spell the input, on real vocabularies; clear errors for a wrong
model, a corrupted or truncated archive, and what is not an archive."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twofile import assets, compress, run

INPUTS = {
    "empty": b"",
    "english": b"It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 3,
    "unicode": "Grüße, 東京 🚀 naïve café — ﬁ ① x\u0301 \U0001F600\u200d\n".encode() * 2,
    "source": b"def f(x):\r\n\treturn {'a': [1, 2.5e-3, None]}  # <|im_end|> stays text\n",
    "invalid utf-8": b"caf\xe9 \xff\xfe ok \xc3\x28 \xed\xa0\x80 end\xf0\x9f",
    "binary": bytes(np.random.default_rng(0).integers(0, 256, 700, dtype=np.uint8)),
}


@pytest.fixture(params=["numba", "numpy"])
def tiny(request, tiny_gguf):
    if request.param == "numba" and run.numba is None:
        pytest.skip("numba is not installed")
    m = run.load(tiny_gguf[0])
    m.use_numba = request.param == "numba"
    return m


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_round_trip_of_every_kind_of_input(tiny, name):
    data = INPUTS[name]
    archive = compress.compress(data, tiny, chunk=48)  # several chunks side by side
    assert compress.decompress(archive, tiny) == data


def test_any_thread_count_decompresses(tiny_gguf):
    """Compressed with 2 threads, decompressed with 1 (the kernels' outputs do not depend on it)."""
    if run.numba is None:
        pytest.skip("numba is not installed")
    data = INPUTS["english"] + INPUTS["unicode"]
    archive = compress.compress(data, run.load(tiny_gguf[0], threads=2), chunk=40)
    assert compress.decompress(archive, run.load(tiny_gguf[0], threads=1)) == data


def test_chunks_grouped_differently_decompress(tiny, monkeypatch):
    """More chunks than STREAMS: they run a few at a time, finished ones replaced by the next;
    compressing 3 at a time and decompressing 2 at a time (other company in every pass) gives
    the bytes back, the same archive as all of them at once."""
    data = INPUTS["english"] + INPUTS["unicode"]
    whole = compress.compress(data, tiny, chunk=9)
    assert len(compress.read_header(whole)[0]["codes"]) > 5
    monkeypatch.setattr(compress, "STREAMS", 3)
    archive = compress.compress(data, tiny, chunk=9)
    assert archive == whole
    monkeypatch.setattr(compress, "STREAMS", 2)
    assert compress.decompress(archive, tiny) == data


@pytest.mark.parametrize("kind", ["normal", "peaked", "flat", "tiny vocab", "not finite"])
def test_frequencies_sum_to_the_total_and_none_is_zero(kind):
    """Integer counts: each at least 1, summing exactly to TOTAL; each is 1 plus its share of
    the rest (TOTAL minus one per token) to within a count; the likeliest takes the remainder."""
    rng = np.random.default_rng(1)
    logits = {"normal": rng.normal(0, 3, 49152), "peaked": np.r_[60.0, rng.normal(-20, 1, 5000)],
              "flat": np.zeros(49152), "tiny vocab": np.array([0.5, -1.0]),
              "not finite": np.r_[np.nan, np.inf, 1.0, 2.0]}[kind].astype(np.float32)
    counts = compress.frequencies(logits)
    assert counts.sum() == compress.TOTAL and counts.min() >= 1
    finite = np.isfinite(logits).all()
    x = logits.astype(np.float64) if finite else np.zeros(len(logits))
    share = np.exp(x - x.max()) / np.exp(x - x.max()).sum() * (compress.TOTAL - len(x)) + 1
    top = int(np.argmax(x))
    others = np.delete(np.arange(len(x)), top)
    assert np.all(np.abs(counts[others] - share[others]) <= 1.0 + 1e-6 * share[others])
    assert abs(counts[top] - share[top]) <= len(x) + 1e-5 * compress.TOTAL
    assert np.array_equal(compress.frequencies(logits.copy()), counts)


def test_the_archive_is_the_models_cross_entropy(tiny_gguf):
    """The codes' bits within 0.5% of the cross-entropy transformers computes for the same
    tokens (each chunk after the start token), plus at most 2 bytes per chunk to end a code."""
    path, hf = tiny_gguf
    m = run.load(path)
    data = INPUTS["english"] * 4 + INPUTS["source"]
    chunk = 64
    archive = compress.compress(data, m, chunk=chunk)
    header, begin = compress.read_header(archive)
    tokens = compress.tokenize(m.tokenizer, data)
    start = m.tokenizer.bos_id if m.tokenizer.bos_id is not None else m.tokenizer.eos_id
    bits = 0.0
    for i in range(0, len(tokens), chunk):
        ids = [start] + tokens[i:i + chunk]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1)
        bits -= float(logp[range(len(ids) - 1), ids[1:]].sum()) / np.log(2)
    coded = 8 * (len(archive) - begin)
    assert header["tokens"] == len(tokens)
    assert compress.chunk_lengths(len(tokens), chunk) == [len(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)]
    assert bits * 0.995 <= coded <= bits * 1.005 + 16 * len(header["codes"]), (coded, bits)


@pytest.mark.parametrize("vocab", ["gpt-2", "llama-spm", "llama-bpe", "qwen2", "gpt-neox"])  # neox: 13 bytes escaped
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=60), st.text(max_size=60).map(str.encode)))
def test_tokens_always_spell_the_input(vocab, data):
    tok = _vocab(vocab)
    ids = compress.tokenize(tok, data)
    assert b"".join(compress.spell(tok, ids)) == data


@pytest.mark.slow
def test_the_default_model_round_trip_with_escaped_bytes(smollm2_path):
    """SmolLM2's vocabulary has no token for 21 byte values (0xFF among them): escaped, and
    back; text around them coded with the model's own tokens."""
    m = run.load(str(smollm2_path))
    data = b"Bytes \x04\xff\xc0 inside: " + INPUTS["english"] + INPUTS["unicode"]
    archive = compress.compress(data, m, chunk=40)
    assert compress.decompress(archive, m) == data
    _, begin = compress.read_header(archive)
    assert len(archive) - begin < len(data) / 2  # the codes; the header is about 300 bytes


def test_text_is_tokenized_as_usual_not_byte_by_byte():
    """Compression needs real tokens: English in SentencePiece and GPT-2 vocabularies comes out
    as the tokenizer's own tokens (SentencePiece's space prefix aside), not bytes."""
    text = "The quick brown fox jumps over the lazy dog."
    for vocab in ("gpt-2", "llama-spm"):
        tok = _vocab(vocab)
        ids = compress.tokenize(tok, text.encode())
        assert len(ids) <= len(tok.encode(text, add_bos=False, parse_special=False)) + 1
    gpt2 = _vocab("gpt-2")
    assert compress.tokenize(gpt2, text.encode()) == gpt2.encode(text, add_bos=False, parse_special=False)


_VOCABS = {}


def _vocab(name):
    if name not in _VOCABS:
        path = assets.fetch(assets.LLAMA_CPP_VOCABS) / f"ggml-vocab-{name}.gguf"
        _VOCABS[name] = run.Tokenizer(run.read_gguf(str(path)).metadata, str(path))
    return _VOCABS[name]


def test_wrong_model_corruption_and_truncation_are_errors(tiny_gguf, tmp_path, bpe_tokenizer):
    from conftest import bpe_metadata, tiny_llama, write_llama_gguf

    m = run.load(tiny_gguf[0])
    data = INPUTS["english"]
    archive = compress.compress(data, m, chunk=32)
    other = run.load(write_llama_gguf(tmp_path / "other.gguf", tiny_llama(tie=False, seed=7),
                                      bpe_metadata(bpe_tokenizer, "gpt-2")))
    with pytest.raises(ValueError, match="was made with the model tiny.gguf"):
        compress.decompress(archive, other)
    with pytest.raises(ValueError, match="truncated"):
        compress.decompress(archive[:-3], m)
    with pytest.raises(ValueError, match="not a twofile archive"):
        compress.decompress(b"PK\x03\x04 a zip file", m)
    broken = bytearray(archive)
    broken[len(compress.MAGIC) + 6] ^= 0x55  # inside the header
    with pytest.raises(ValueError, match="corrupted"):
        compress.decompress(bytes(broken), m)
    _, begin = compress.read_header(archive)
    raised = 0
    for where in range(begin, len(archive)):  # in the codes: an error, never the wrong bytes
        broken = bytearray(archive)
        broken[where] ^= 0x10
        try:
            assert compress.decompress(bytes(broken), m) == data  # a bit the code never reads
        except ValueError as e:
            assert "corrupted" in str(e)
            raised += 1
    assert raised >= (len(archive) - begin) // 2


def test_command_line_files_and_pipes(tmp_path, tiny_gguf):
    model = str(tiny_gguf[0])
    original = tmp_path / "notes.txt"
    original.write_bytes(INPUTS["unicode"] + INPUTS["invalid utf-8"])
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}

    def twofile(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "twofile", *args], input=stdin, capture_output=True,
                              timeout=300, env=env)

    r = twofile("compress", str(original), "-m", model)
    assert r.returncode == 0, r.stderr
    assert b"bits per byte" in r.stderr and (tmp_path / "notes.txt.tfz").exists()
    original.rename(tmp_path / "kept.txt")
    r = twofile("decompress", str(tmp_path / "notes.txt.tfz"), "-m", model)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "notes.txt").read_bytes() == (tmp_path / "kept.txt").read_bytes()
    piped = twofile("compress", "-", "-m", model, stdin=INPUTS["source"])
    assert piped.returncode == 0 and piped.stdout.startswith(compress.MAGIC)
    back = twofile("decompress", "-", "-m", model, stdin=piped.stdout)
    assert back.returncode == 0 and back.stdout == INPUTS["source"]
    bad = twofile("decompress", "-", "-m", model, stdin=piped.stdout[:-2])
    assert bad.returncode == 1 and bad.stderr.count(b"\n") == 1 and b"truncated" in bad.stderr
    assert hashlib.sha256(back.stdout).digest() == hashlib.sha256(INPUTS["source"]).digest()

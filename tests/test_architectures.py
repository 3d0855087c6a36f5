"""The model families beyond Llama, each against transformers (the oracle) on tiny random
models written to GGUF as llama.cpp's converter writes them (tests/conftest.py): Mistral (its
files are `llama`), Qwen 2 (biases on the query, key and value projections, RoPE on halves)
Qwen 3 (a norm on each query and key head, a head size that is not width / heads), Phi-3
(one matrix for the query, key and value projections, one for gate and up) and Gemma 3
(scaled embeddings, post-norms, GELU, sliding windows of 8 positions tested over 40), Gemma 2
(the same with soft-capped attention scores and logits) and Phi-3 with LongRoPE. Both
paths: numpy (1e-4 of the logits' scale) and the compiled kernels (1e-3: activations rounded
to 16 bits), F32 and a quantized file, prompt and token-by-token decoding."""

import gguf
import numpy as np
import pytest
import torch

from conftest import bpe_metadata, tiny_llama, write_llama_gguf
from twofile import run

def longrope(pairs: int) -> dict:
    """Phi-3 config values for LongRoPE with an original context of 32 and factors for heads of
    2 * pairs rotated dimensions."""
    return dict(original_max_position_embeddings=32, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=32,
        short_factor=[1.0 + 0.1 * i for i in range(pairs)], long_factor=[1.5 + 0.7 * i for i in range(pairs)]))


FAMILIES = {
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),  # 4 heads of 32 on a width of 96
    "phi3": dict(arch="phi3"),
    "gemma3": dict(arch="gemma3", head_dim=32, layers=3),  # windows of 8 (the second layer global)
    # windows of 8 on layers 0 and 2; caps low enough to bend these random models' scores and logits
    "gemma2": dict(arch="gemma2", head_dim=32, layers=3,
                   config=dict(attn_logit_softcapping=3.0, final_logit_softcapping=8.0)),
    # LongRoPE: the long factors for a context over 32 (run.py's n_ctx here, 128), as llama.cpp
    "phi3-longrope": dict(arch="phi3", config=longrope(12)),
}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, bpe_tokenizer):
    """(family, {qtype name: (path, the transformers model holding what that file holds)})."""
    files = {}
    for name, qtype in (("F32", None), ("Q8_0", gguf.GGMLQuantizationType.Q8_0)):
        model = tiny_llama(tie=name == "Q8_0", hidden=96, ff=128, n_head=4, n_head_kv=2, **FAMILIES[request.param])
        path = tmp_path_factory.mktemp(request.param) / f"{request.param}.{name}.gguf"
        files[name] = write_llama_gguf(path, model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype), model
    return request.param, files


def test_the_file_says_what_it_is(family):
    name, files = family
    m = run.load(str(files["F32"][0]))
    assert m.config.arch == {"mistral": "llama", "phi3-longrope": "phi3"}.get(name, name)
    assert m.config.rope_neox == (name != "mistral")
    assert (m.layers[0].qkv_bias is not None) == (name == "qwen2")
    assert (m.layers[0].q_norm is not None) == (name in ("qwen3", "gemma3"))
    assert [L.swa for L in m.layers] == ([True, False, True] if name.startswith("gemma") else [False] * len(m.layers))
    assert (m.config.attn_softcap, m.config.final_softcap) == ((3.0, 8.0) if name == "gemma2" else (0.0, 0.0))
    assert m.config.head_dim == FAMILIES[name].get("head_dim", 96 // 4)
    if name == "phi3":  # views of the fused matrices' rows, in the file's bytes
        layer, t = m.layers[0], m.gguf.tensors["blk.0.attn_qkv.weight"]
        assert (layer.wq.offset, layer.wk.offset - layer.wq.offset) == (t.offset, layer.wq.nbytes)
        assert layer.wv.offset + layer.wv.nbytes == t.offset + t.nbytes


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("path_kind", ["numpy", "numba"])
def test_logits_match_transformers(family, qtype, path_kind, monkeypatch):
    if path_kind == "numba" and run.numba is None:
        pytest.skip("numba is not installed")
    # a 40-token prompt in a default session: the BLAS path (with numba, its compiled
    # decoders), attention in three blocks of queries (sliding windows, soft caps)
    monkeypatch.setattr(run, "SHORT_PROMPT", 32)
    monkeypatch.setattr(run, "ATTEND_BLOCK", 16)
    path, hf = family[1][qtype]
    m = run.load(str(path))
    m.use_numba = path_kind == "numba"
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 320, 40)]
    oracle = hf_logits(hf, ids)
    scale = max(1.0, np.abs(oracle).max())
    tol = (1e-3 if path_kind == "numba" else 1e-4) * scale
    s = m.session(exact=path_kind == "numba")
    assert np.abs(s.feed(ids[:30], all_logits=True) - oracle[:30]).max() <= tol  # a prompt
    for t in range(30, 40):  # then token by token from the cache
        assert np.abs(s.step(ids[t]) - oracle[t]).max() <= tol
    assert np.abs(m.logits(ids) - oracle).max() <= tol  # a default session: the long-prompt (BLAS) path


def test_greedy_decoding_picks_transformers_argmax(family):
    path, hf = family[1]["F32"]
    # LongRoPE: within its original 32 positions transformers uses the short factors, and so
    # does run.py with a context of 32
    m = run.load(str(path), n_ctx=32 if family[0] == "phi3-longrope" else None)
    ids = [5, 17, 42]
    s = m.session()
    logits = s.feed(ids)
    for _ in range(16):
        token = int(np.argmax(logits))
        expected = hf_logits(hf, ids)[-1]
        assert expected[token] >= expected.max() - 1e-4
        ids.append(token)
        logits = s.step(token)


def test_longrope_factors_follow_the_context(tmp_path, bpe_tokenizer):
    """A LongRoPE file (llama.cpp's rule): with a context over the original 32 positions the
    long factors, else the short ones; each matches transformers on a sequence that makes it
    choose the same, and the two differ."""
    model = tiny_llama(tie=False, hidden=96, ff=128, n_head=4, n_head_kv=2, **FAMILIES["phi3-longrope"])
    path = str(write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2")))
    ids = [int(i) for i in np.random.default_rng(4).integers(0, 320, 40)]
    short, long = run.load(path, n_ctx=32).logits(ids[:32]), run.load(path).logits(ids)
    oracle_short, oracle_long = hf_logits(model, ids[:32]), hf_logits(model, ids)
    scale = max(1.0, np.abs(oracle_long).max())
    assert np.abs(short - oracle_short).max() <= 1e-4 * scale
    assert np.abs(long - oracle_long).max() <= 1e-4 * scale
    assert np.abs(long[:32] - short).max() > 100 * 1e-4 * scale


QUANTIZED = [Q for Q in gguf.GGMLQuantizationType if Q.name in (
    "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_tensor_type_in_every_family(tmp_path, bpe_tokenizer, name):
    """Each family with all its matrices in each tensor type (a width of 256, so that the
    256-weight types fit; Phi-3's fused matrices sliced in whole blocks): numpy within 1e-4 and
    the kernels within 1e-3 of transformers running what the file holds."""
    options = {**FAMILIES[name], "head_dim": 64}
    if name == "phi3-longrope":  # 12 tokens: within the original context, so the short factors
        options["config"] = longrope(32)
    ids = [int(i) for i in np.random.default_rng(8).integers(0, 320, 12)]
    for qtype in QUANTIZED:
        model = tiny_llama(tie=False, hidden=256, ff=512, n_head=4, n_head_kv=2, **options)
        path = write_llama_gguf(tmp_path / f"{qtype.name}.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype)
        oracle = hf_logits(model, ids)
        scale = max(1.0, np.abs(oracle).max())
        m = run.load(str(path), n_ctx=32 if name == "phi3-longrope" else None)
        assert m.layers[0].w_down.type == qtype and m.use_numba == (run.numba is not None)
        assert np.abs(m.session(exact=True).feed(ids, all_logits=True) - oracle).max() <= 1e-3 * scale, qtype.name
        m.use_numba = False
        assert np.abs(m.logits(ids) - oracle).max() <= 1e-4 * scale, qtype.name

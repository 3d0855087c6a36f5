"""The model families beyond Llama, each against transformers (the oracle) on tiny random
models written to GGUF as llama.cpp's converter writes them (tests/conftest.py): Mistral (its
files are `llama`), Qwen 2 (biases on the query, key and value projections, RoPE on halves)
Qwen 3 (a norm on each query and key head, a head size that is not width / heads), Phi-3
(one matrix for the query, key and value projections, one for gate and up) and Gemma 3
(scaled embeddings, post-norms, GELU, sliding windows of 8 positions tested over 40). Both
paths: numpy (1e-4 of the logits' scale) and the compiled kernels (1e-3: activations rounded
to 16 bits), F32 and a quantized file, prompt and token-by-token decoding."""

import gguf
import numpy as np
import pytest
import torch

from conftest import bpe_metadata, tiny_llama, write_llama_gguf
from twofile import run

FAMILIES = {
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32),  # 4 heads of 32 on a width of 96
    "phi3": dict(arch="phi3"),
    "gemma3": dict(arch="gemma3", head_dim=32, layers=3),  # windows of 8 (the second layer global)
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
    assert m.config.arch == {"mistral": "llama"}.get(name, name)
    assert m.config.rope_neox == (name != "mistral")
    assert (m.layers[0].qkv_bias is not None) == (name == "qwen2")
    assert (m.layers[0].q_norm is not None) == (name in ("qwen3", "gemma3"))
    assert [L.swa for L in m.layers] == ([True, False, True] if name == "gemma3" else [False] * len(m.layers))
    assert m.config.head_dim == FAMILIES[name].get("head_dim", 96 // 4)
    if name == "phi3":  # views of the fused matrices' rows, in the file's bytes
        layer, t = m.layers[0], m.gguf.tensors["blk.0.attn_qkv.weight"]
        assert (layer.wq.offset, layer.wk.offset - layer.wq.offset) == (t.offset, layer.wq.nbytes)
        assert layer.wv.offset + layer.wv.nbytes == t.offset + t.nbytes


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("path_kind", ["numpy", "numba"])
def test_logits_match_transformers(family, qtype, path_kind):
    if path_kind == "numba" and run.numba is None:
        pytest.skip("numba is not installed")
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
    m = run.load(str(path))
    ids = [5, 17, 42]
    s = m.session()
    logits = s.feed(ids)
    for _ in range(16):
        token = int(np.argmax(logits))
        expected = hf_logits(hf, ids)[-1]
        assert expected[token] >= expected.max() - 1e-4
        ids.append(token)
        logits = s.step(token)

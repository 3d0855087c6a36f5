"""run.py's numpy forward pass (the reference path) against Hugging Face transformers (the
oracle) on tiny random Llama models written to GGUF by the gguf package. test_kernels.py
holds numba's kernels to this path and to transformers."""

import numpy as np
import pytest
import torch

from conftest import bpe_metadata, gguf, tiny_llama, write_llama_gguf
from twofile import run

Q = gguf.GGMLQuantizationType


def load_numpy(path, **kw):
    m = run.load(path, **kw)
    m.use_numba = False
    return m


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_f32_logits_match_transformers(tmp_path, bpe_tokenizer, tie):
    model = tiny_llama(tie=tie)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"))
    m = load_numpy(path)
    assert ("output.weight" in m.gguf.tensors) == (not tie)
    ids = list(np.random.default_rng(0).integers(0, 320, 40))
    ours, theirs = m.logits(ids), hf_logits(model, ids)
    assert ours.dtype == np.float32 and ours.shape == (40, 320)
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K,
                                   Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS], ids=lambda q: q.name)
def test_quantized_logits_match_transformers(tmp_path, bpe_tokenizer, qtype):
    # hidden and FFN sizes are multiples of 256 so that K-quants fit; transformers runs the
    # weights as gguf.quants decodes them, so only run.py's decoding and forward are tested
    model = tiny_llama(tie=False, hidden=256, ff=512, n_head=4, n_head_kv=1)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype=qtype)
    m = load_numpy(path)
    assert m.layers[0].wq.type == qtype and m.token_embd.type == qtype
    ids = list(np.random.default_rng(1).integers(0, 320, 24))
    ours, theirs = m.logits(ids), hf_logits(model, ids)
    assert np.abs(ours - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
    # the kernels where they have the type; numpy for the types they lack, whatever is installed
    default = run.load(path)
    assert default.use_numba == (run.numba is not None and qtype in run.KERNEL_TYPES)
    assert np.abs(default.logits(ids) - theirs).max() <= 1e-3 * max(1.0, np.abs(theirs).max())
    # every matrix decoded once at load: numpy's BLAS on float32 copies, prompt and steps
    decoded = run.load(path, decode=True)
    assert not decoded.use_numba and decoded.layers[0].w_down.type == decoded.output.type == Q.F32
    s = decoded.session()
    rows = np.concatenate([s.feed(ids[:20], all_logits=True)] + [s.step(i)[None] for i in ids[20:]])
    assert np.abs(rows - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_matrices_decoded_at_load_without_kernels_when_they_fit(tmp_path, bpe_tokenizer, monkeypatch, tie):
    """Without the kernels (numba = None), load decodes every matrix to float32 when the
    copies take at most half the available memory, and not otherwise; tied embeddings share
    one copy."""
    model = tiny_llama(tie=tie, hidden=256, ff=512, n_head=4, n_head_kv=1)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"), qtype=Q.Q4_K)
    monkeypatch.setattr(run, "numba", None)
    weights = sum(t.shape[0] * t.shape[1] for name, t in run.read_gguf(str(path)).tensors.items()
                  if len(t.shape) == 2 and (name != "token_embd.weight" or tie))
    monkeypatch.setattr(run, "available_memory", lambda: 8 * weights)
    m = run.load(str(path))
    assert not m.use_numba and m.layers[1].wq.type == m.output.type == Q.F32
    assert (m.token_embd is m.output) == tie and m.token_embd.type == (Q.F32 if tie else Q.Q4_K)
    ids = list(np.random.default_rng(2).integers(0, 320, 12))
    theirs = hf_logits(model, ids)
    assert np.abs(m.logits(ids) - theirs).max() <= 1e-4 * max(1.0, np.abs(theirs).max())
    monkeypatch.setattr(run, "available_memory", lambda: 8 * weights - 1)
    m = run.load(str(path))
    assert m.layers[1].wq.type == m.output.type == Q.Q4_K


def test_kv_cache_decode_matches_full_pass(tiny_gguf):
    """Token-by-token decoding with the KV cache gives the logits of one full pass."""
    path, model = tiny_gguf
    m = load_numpy(path)
    prompt = m.tokenize("The quick brown fox")
    gen = m.session().generate(prompt, max_tokens=20, temperature=0, ignore_eos=True)
    list(gen)
    assert len(gen.tokens) == 20 and gen.finish_reason == "length"
    full = hf_logits(model, prompt + gen.tokens)
    for step, token in enumerate(gen.tokens):  # each greedy pick is transformers' argmax
        row = full[len(prompt) - 1 + step]
        assert row[token] >= row.max() - 1e-4


def test_prompt_longer_than_one_batch(tmp_path, bpe_tokenizer, monkeypatch):
    model = tiny_llama(tie=True, ctx=256)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"))
    monkeypatch.setattr(run, "PROMPT_BATCH", 7)  # the prompt is run in several chunks
    m = load_numpy(path)
    ids = list(np.random.default_rng(2).integers(0, 320, 50))
    assert np.abs(m.logits(ids) - hf_logits(model, ids)).max() <= 1e-4
    # a second prompt sharing a prefix reuses the cache; its last logits are still exact
    s = m.session()
    s.prefill(ids)
    more = ids[:30] + [5, 6, 7]
    assert np.abs(s.prefill(more) - hf_logits(model, more)[-1]).max() <= 1e-4
    assert s.tokens == more


def test_context_limit(tmp_path, bpe_tokenizer):
    model = tiny_llama(tie=True, ctx=16)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"))
    m = load_numpy(path)
    with pytest.raises(run.ContextFull, match="17 tokens do not fit in the context of 16"):
        m.logits(list(range(17)))
    # generation stops cleanly when the context fills, and says so: the 16th position's
    # logits give a 7th token that no position is left to run
    gen = m.session().generate([5] * 10, max_tokens=100, temperature=1.0, top_k=0, top_p=1.0, min_p=0, seed=0,
                               ignore_eos=True)
    list(gen)
    assert gen.finish_reason == "context" and len(gen.tokens) == 16 - 10 + 1
    # --ctx-size makes the window smaller than the model's
    assert run.load(path, n_ctx=8).n_ctx == 8


def test_refuses_other_architectures(tmp_path, bpe_tokenizer):
    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(run.GGUFError, match="architecture 'gemma' is not supported"):
        run.load(tmp_path / "g.gguf")


def test_refuses_unsupported_tensor_type(tmp_path, bpe_tokenizer):
    model = tiny_llama(tie=True, hidden=256, ff=256)
    path = write_llama_gguf(tmp_path / "m.gguf", model, bpe_metadata(bpe_tokenizer, "gpt-2"))
    data = bytearray(path.read_bytes())
    info = run.read_gguf(path).tensors["blk.0.attn_q.weight"]
    assert info.type == Q.F32
    # rewrite the tensor's type id in the header (F32 -> IQ2_XXS keeps the data size valid)
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name) + 4 + 8 * 2  # n_dims u32, two u64 dims
    assert data[at:at + 4] == (0).to_bytes(4, "little")
    data[at:at + 4] = int(Q.IQ2_XXS).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(run.GGUFError, match="blk.0.attn_q.weight.*type IQ2_XXS"):
        run.load(path)

"""Shared test helpers: tiny Llama models written to GGUF by the `gguf` package (the
independent writer), tokenizers trained by Hugging Face `tokenizers`, varied test strings."""

from __future__ import annotations

import contextlib
import math
import os
import random

# numba's pool is sized once, at import, to the machine's cores; the kernel tests run 1, 2
# and 3 threads (results must not depend on the count), so ask for enough before run.py loads
os.environ.setdefault("NUMBA_NUM_THREADS", "4")

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SAMPLE_TEXT = """The quick brown fox jumps over the lazy dog. It's 2024, and we'll see 1,234.56 apples!
def main(argv):
    return {"key": [1, 2, 3]}  # a comment
Café naïve façade — “quotes” and ‘single’ ones… Привет мир, 你好世界, مرحبا, नमस्ते 🙂👍🏽
""" * 3


def varied_strings(n: int, seed: int = 0, specials=()) -> list[str]:
    """n strings mixing words, unicode scripts, emoji, code, digits, whitespace runs and
    special tokens: the inputs where tokenizers usually disagree."""
    rng = random.Random(seed)
    pools = [
        "the of and to in is you that it he was for on are as with his they I at be this have from".split(),
        ["Hello", "WORLD", "don't", "I'LL", "she's", "we'Ve", "they'd", "O'Neil", "rock'n'roll", "'s", "''"],
        ["café", "naïve", "Ünïcödé", "straße", "ﬁ", "Ωmega", "Привет", "мир", "你好", "世界", "こんにちは",
         "안녕하세요", "مرحبا", "שָׁלוֹם", "नमस्ते", "ภาษาไทย", "Ελληνικά", "ǅ", "ʰ", "ſ", "Ⅻ", "½", "²", "١٢٣"],
        ["🙂", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "🤖", "∑", "∞", "→", "©", "\u200b", "\u200d", "\ufeff", "\ufffd"],
        ["def f(x):", "return x**2", "{\"a\": [1, 2]}", "if (a && b) {", "#include <stdio.h>", "x += 1;",
         "</div>", "$HOME/.cache", "C:\\Users", "a_b-c.d", "https://example.com/?q=1&r=2", "@user", "#tag"],
        ["0", "7", "42", "123", "2024", "1234567", "3.14159", "1,000,000", "-5", "1e-9", "0x1F", "٣"],
        [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t", "\u00a0", "\u3000", "\x0b", "\x0c",
         "\x1c", "\x85", "    \n", "\n   "],
        ["!", "?", "...", "—", "–", "(", ")", "[", "]", "\"", "'", "`", "~", ";", ":", "%", "&", "*", "|", "<", ">"],
        list(specials) or [""],
    ]
    weights = [5, 3, 3, 2, 2, 3, 4, 3, 1 if specials else 0]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            pool = rng.choices(pools, weights)[0]
            parts.append(rng.choice(pool))
            if rng.random() < 0.5:
                parts.append(rng.choice([" ", "", "", "\n", "  "]))
        out.append("".join(parts))
    return out


def train_bpe(vocab_size: int, split_regex: str | None = None):
    """A byte-level BPE trained by Hugging Face `tokenizers` on SAMPLE_TEXT. With
    split_regex, the pre-tokenizer is that split then ByteLevel (as Llama 3 does); without
    it, ByteLevel's own GPT-2 split. Returns the `tokenizers.Tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT] * 4 + varied_strings(200, seed=1), trainer)
    return tok


def bpe_metadata(tok, pre: str) -> dict:
    """GGUF tokenizer keys for a `tokenizers` byte-level BPE (what llama.cpp's converter writes)."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"], "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML,
    }


def add_metadata(writer, metadata: dict):
    """Write a metadata dict with types chosen as llama.cpp's converters choose them."""
    for key, value in metadata.items():
        if isinstance(value, np.ndarray):  # run.py reads numeric arrays as numpy arrays
            value = value.tolist()
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            (writer.add_int32 if value < 0 else writer.add_uint32 if value < 2**32 else writer.add_uint64)(key, value)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            writer.add_array(key, [float(v) for v in value])
        elif isinstance(value, list) and value and isinstance(value[0], int) and key.endswith("token_type"):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            writer.add_array(key, value)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face rotate-half rows -> GGUF adjacent-pair rows (llama.cpp's converter)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def random_blocks(qtype, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for n_blocks of a quantized type, with finite, modest f16 scales, so
    that every bit pattern of the packed weights is exercised."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    Q = gguf.GGMLQuantizationType
    f16_fields = {Q.Q4_0: [0], Q.Q5_0: [0], Q.Q8_0: [0], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2],
                  Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [size - 2], Q.Q2_K: [size - 4, size - 2],
                  Q.Q3_K: [size - 2], Q.IQ4_NL: [0], Q.IQ4_XS: [0]}[qtype]
    # the integers times their sub-block scales reach 8 in Q4_0, but 127 in IQ4_NL, 4000 in
    # Q6_K: smaller block scales keep a random model's weights near Q4_0's (std 0.05) and its
    # activations tame (random bytes otherwise give weights of std up to 16)
    bound = 0.02 / {Q.IQ4_NL: 16, Q.IQ4_XS: 256, Q.Q2_K: 4, Q.Q3_K: 8, Q.Q4_K: 64, Q.Q5_K: 128,
                    Q.Q6_K: 256}.get(qtype, 1)
    for off in f16_fields:
        raw[:, off:off + 2] = (rng.uniform(-bound, bound, n_blocks).astype(np.float16).view(np.uint8)
                               .reshape(n_blocks, 2))
    return raw


def encode_tensor(w: np.ndarray, qtype, rng) -> tuple[np.ndarray, np.ndarray]:
    """(bytes or array to write, the float32 weights the file really holds per gguf.quants)."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return w.astype(np.float32), w.astype(np.float32)
    if qtype in (Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        data = gguf.quants.quantize(w.astype(np.float32), qtype)
    else:  # K-quants: the gguf package has no reference quantizer, so the bytes are random
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = random_blocks(qtype, w.size // block, rng).reshape(w.shape[0], -1)
    return data, gguf.quants.dequantize(data, qtype).reshape(w.shape)


def tiny_llama(tie: bool, n_head=4, n_head_kv=2, hidden=64, ff=96, layers=2, vocab=320, seed=0, ctx=128,
               arch="llama", head_dim=None, config=None):
    """A tiny random transformers model of a family run.py runs: llama, mistral (its files are
    `llama`), qwen2 (q, k, v biases), qwen3 (query and key norms; head_dim may differ from
    hidden / n_head), phi3 (fused q/k/v and gate/up), gemma2 or gemma3 (its text model);
    config: more of the family's config values."""
    import torch
    import transformers

    torch.manual_seed(seed)
    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi3",
            "gemma2": "Gemma2", "gemma3": "Gemma3"}[arch]
    extra = {"head_dim": head_dim} if head_dim else {}
    if arch not in ("phi3", "gemma3"):  # Gemma 3 keeps its two bases: 1e6 for global layers, 1e4 for the others
        extra["rope_theta"] = 10000.0
    if arch == "phi3":
        extra["pad_token_id"] = 0  # its default, 32000, is past a tiny vocabulary
    if arch == "phi3":
        extra["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    if arch == "gemma3":  # sliding windows of 8 positions on all layers but the second
        extra.update(layer_types=["full_attention" if i == 1 else "sliding_attention" for i in range(layers)])
    if arch in ("gemma2", "gemma3"):  # (Gemma 2's windows: every other layer, the first included)
        extra.update(query_pre_attn_scalar=head_dim, sliding_window=8, pad_token_id=0)
    config = getattr(transformers, name + ("TextConfig" if arch == "gemma3" else "Config"))(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=n_head, num_key_value_heads=n_head_kv, max_position_embeddings=ctx,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, attn_implementation="eager",  # Gemma 2 soft-caps there
        **{**extra, **(config or {})})
    model = getattr(transformers, name + "ForCausalLM")(config).float().eval()
    with torch.no_grad():  # larger than the default init, so that mistakes show in the logits
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
            if p.dim() == 1:
                p.abs_()
    return model


# transformers' model_type -> general.architecture, as llama.cpp's converter writes it
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
             "gemma2": "gemma2", "gemma3_text": "gemma3"}


def write_llama_gguf(path, model, tokenizer_metadata: dict, qtype=None, extra: dict | None = None):
    """Write a transformers model of a GGUF_ARCH family as a GGUF file with the gguf package,
    as llama.cpp's converter does (Q/K permutation for `llama`, tied embeddings, F32 norms and
    biases). Weights are stored as qtype (default F32); the model's own weights are then
    replaced by what the file really holds (dequantized by gguf.quants), so it is the exact
    oracle for the file."""
    import torch

    Q = gguf.GGMLQuantizationType
    qtype = Q.F32 if qtype is None else qtype
    c = model.config
    arch = GGUF_ARCH[c.model_type]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny test {c.model_type}")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    if head_dim != c.hidden_size // c.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":  # rope.freq_base below is the global layers'; the others' is 10000
        writer.add_sliding_window(c.sliding_window)
        writer.add_array("gemma3.attention.sliding_window_pattern", [t == "sliding_attention" for t in c.layer_types])
    if arch == "gemma2":  # no pattern: llama.cpp's is every other layer, as transformers'
        writer.add_sliding_window(c.sliding_window)
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)
    rope = getattr(c, "rope_parameters", None) or {}
    if arch == "phi3":  # as llama.cpp's Phi-3 converter: LongRoPE's factors and attention factor
        writer.add_rope_scaling_orig_ctx_len(c.original_max_position_embeddings)
        if rope.get("rope_type") == "longrope":
            scale = c.max_position_embeddings / c.original_max_position_embeddings
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(c.original_max_position_embeddings)))
            writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
            writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    writer.add_rope_freq_base(float(getattr(c, "rope_theta", None) or rope.get("full_attention", rope).get("rope_theta")))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if qtype not in (Q.F32, Q.F16, Q.BF16):
        writer.add_quantization_version(2)
    add_metadata(writer, {**tokenizer_metadata, **(extra or {})})

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                 "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}  # Phi-3's fused ones
    if arch in ("gemma2", "gemma3"):  # Gemma's post_attention_layernorm is after attention, not before the FFN
        per_layer.update({"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                          "post_feedforward_layernorm": "post_ffw_norm"})
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if name == "lm_head.weight" and c.tie_word_embeddings:
                continue
            if name.startswith("model.layers."):
                i, rest = name[len("model.layers."):].split(".", 1)
                module, kind = rest.rsplit(".", 1)
                out = f"blk.{i}.{per_layer[module]}.{kind}"
            else:
                out = names[name]
            w = tensor.numpy().astype(np.float32)
            n_perm = (None if arch != "llama" or w.ndim == 1 else c.num_attention_heads if "q_proj" in name
                      else c.num_key_value_heads if "k_proj" in name else None)
            if n_perm:
                w = permute_qk(w, n_perm)
            if arch in ("gemma2", "gemma3") and "norm" in name:  # Gemma's norms scale by 1 + w: the converter adds the 1
                w = w + 1
            if w.ndim == 1:  # norms and biases stay F32, as in llama.cpp
                writer.add_tensor(out, w)
                continue
            data, real = encode_tensor(w, qtype, rng)
            writer.add_tensor(out, data, raw_dtype=None if qtype == Q.F32 else qtype)
            if n_perm:
                real = unpermute_qk(real, n_perm)
            tensor.copy_(torch.from_numpy(real.astype(np.float32)))
        if c.tie_word_embeddings:
            model.tie_weights()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return train_bpe(320)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, bpe_tokenizer):
    """A tiny untied F32 Llama (GQA) with a ChatML template: (path, transformers model)."""
    model = tiny_llama(tie=False)
    path = write_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", model,
                            bpe_metadata(bpe_tokenizer, "gpt-2"))
    return path, model


@pytest.fixture(scope="session")
def smollm2_path():
    from twofile import assets

    return assets.fetch(assets.DEFAULT_MODEL)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(*args: str):
    """A Server for a with-block, stopped at its end (SIGTERM), where it must exit 0."""
    s = Server(*args)
    try:
        yield s
    finally:
        code = s.stop()
    assert code == 0, f"twofile serve exited {code}"


class Server:
    """`twofile serve` in a subprocess on a free port, ready (GET /health is 200) on return."""

    def __init__(self, *args: str):
        import subprocess
        import sys
        import time
        import urllib.request

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "twofile", "serve", *args, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twofile serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("twofile serve did not become ready in 120 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except Exception:
                self.proc.kill()
        return self.proc.wait()


def hf_gguf(path):
    """(tokenizer, float32 model) of transformers loading a real GGUF file: the oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    return (AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name),
            AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval())


def check_real_model_logits(path, hf_model, ids):
    """A real GGUF model's logits for ids against transformers' loading the same file, both
    paths: numpy's float32 (within 5e-4: the two sum in different orders over the layers) and
    the kernels' (16-bit activations: 1e-3 of the logits' scale); the same argmax everywhere."""
    import torch

    from twofile import run

    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
    numpy_path, kernels = run.load(str(path)), run.load(str(path))
    numpy_path.use_numba = False
    mine = numpy_path.logits(ids)
    assert np.abs(mine - theirs).max() <= 5e-4
    assert (mine.argmax(-1) == theirs.argmax(-1)).all()
    if kernels.use_numba:
        fast = kernels.session(exact=True).feed(ids, all_logits=True)
        assert np.abs(fast - theirs).max() <= 1e-3 * np.abs(theirs).max()
        assert (fast.argmax(-1) == theirs.argmax(-1)).all()


def check_greedy_tokens(ours, hf_model, hf_tokenizer, prompt, pad_token_id, n=32):
    """n greedy tokens of ours equal transformers' (up to ours stopping at end-of-turn, which
    transformers is told not to), and so does the text."""
    import torch

    ids = hf_tokenizer(prompt)["input_ids"]
    assert ours.tokenize(prompt) == ids
    with torch.no_grad():
        # an explicit mask: otherwise transformers masks prompt tokens equal to the pad id
        x = torch.tensor([ids])
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=pad_token_id)[0, len(ids):].tolist()
    gen = ours.session().generate(ids, max_tokens=n, temperature=0)
    text = "".join(gen)
    mine = gen.tokens
    assert mine == out[:len(mine)] and text == hf_tokenizer.decode(mine)
    assert len(mine) == n or out[len(mine)] in ours.tokenizer.eog_ids


def check_near_greedy_tokens(ours, hf_model, hf_tokenizer, prompt, n=32, margin=0.25):
    """n greedy tokens of ours (the kernels with 8-bit activations, which may part from
    transformers' exact argmax where two tokens are nearly tied): each is, in transformers'
    logits after the same sequence, within `margin` of the best."""
    import torch

    ids = hf_tokenizer(prompt)["input_ids"]
    gen = ours.session().generate(ids, max_tokens=n, temperature=0, ignore_eos=True)
    list(gen)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids + gen.tokens])).logits[0, len(ids) - 1:-1].float().numpy()
    logits[:, sorted(ours.tokenizer.eog_ids)] = -np.inf  # ignore_eos: never picked
    gaps = logits.max(axis=-1) - logits[np.arange(len(gen.tokens)), gen.tokens]
    assert len(gen.tokens) == n and gaps.max() <= margin, gaps.max()

"""The transformer in PyTorch: the Llama architecture we pretrain, and every family run.py runs,
loaded from its GGUF file for finetuning.

    from twofile.model import ModelConfig, Transformer
    model = Transformer(ModelConfig.from_depth(6, vocab_size=4096, context=256))
    model, metadata = load_gguf("SmolLM2-135M-Instruct.Q8_0.gguf", n_ctx=1024)

Our own models: RMSNorm, rotary position embeddings, grouped-query attention
(scaled_dot_product_attention), SwiGLU MLP, tied or untied embeddings, no biases. The other
families add what run.py's Config says (see run.ARCHITECTURES): Qwen 2's query/key/value
biases, Qwen 3's per-head query and key norms, Phi-3's fused matrices and LongRoPE, Gemma's
scaled embeddings, post-norms, tanh-GELU, sliding windows with their own RoPE base and soft caps.
Module names follow GGUF's tensor names (`blocks.3.attn.attn_q` is `blk.3.attn_q`), so loading
and export are a name map plus the Q/K permutation of `llama` files: RoPE here rotates the two
halves of each head (as Hugging Face does), GGUF's llama rotates adjacent pairs, and its
converters permute Wq/Wk rows to match (load_gguf undoes it, export redoes it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    context: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # the families run.py runs (load_gguf); the defaults are our own Llama's
    arch: str = "llama"
    head_size: int = 0               # 0: n_embd / n_head
    rope_dims: int = 0               # RoPE rotates the first rope_dims of each head (0: all)
    rope_scale: float = 1.0          # linear scaling: positions divided by this
    rope_factors: list = field(default_factory=list)  # per rotated pair, dividing its frequency (Llama 3.1, LongRoPE)
    rope_attn_factor: float = 1.0    # LongRoPE: cos and sin scaled by this
    qkv_bias: bool = False           # Qwen 2
    qk_norm: bool = False            # Qwen 3, Gemma 3
    fused: bool = False              # Phi-3: attn_qkv = [q; k; v] rows, ffn_up = [gate; up] rows
    post_norms: bool = False         # Gemma: attention and FFN outputs normalized before the residual
    gelu: bool = False               # Gemma: tanh-GELU gate, not SiLU
    embd_scale: float = 1.0          # Gemma: embeddings times sqrt(n_embd)
    attn_scale: float = 0.0          # queries times this (0: 1/sqrt(head_dim))
    sliding_window: int = 0          # layers in swa_layers see this many positions, their own included
    swa_layers: list = field(default_factory=list)
    rope_theta_swa: float = 10000.0  # ... with this RoPE base, unscaled
    attn_softcap: float = 0.0        # Gemma 2: scores s -> cap * tanh(s / cap)
    final_softcap: float = 0.0       # ... and the logits
    dropout: float = 0.0             # training only (model.train()): embeddings and each residual branch

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, context: int, aspect: int = 48, head_dim: int = 64,
                   kv_ratio: int = 2, tie_embeddings: bool = True, dropout: float = 0.0) -> "ModelConfig":
        """One knob: width = depth * aspect rounded to whole heads; FFN = 8/3 width
        (SwiGLU's usual size) rounded to 32 so every quantized type fits its rows."""
        n_head = max(1, round(depth * aspect / head_dim))
        n_embd = n_head * head_dim
        n_head_kv = n_head // kv_ratio if n_head % kv_ratio == 0 else n_head
        n_ff = 32 * math.ceil(8 * n_embd / 3 / 32)
        return cls(vocab_size, depth, n_embd, n_head, n_head_kv, n_ff, context, tie_embeddings=tie_embeddings,
                   dropout=dropout)

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        q_dim, kv_dim = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        if c.fused:
            self.attn_qkv = nn.Linear(c.n_embd, q_dim + 2 * kv_dim, bias=False)
        else:
            self.attn_q = nn.Linear(c.n_embd, q_dim, bias=c.qkv_bias)
            self.attn_k = nn.Linear(c.n_embd, kv_dim, bias=c.qkv_bias)
            self.attn_v = nn.Linear(c.n_embd, kv_dim, bias=c.qkv_bias)
        if c.qk_norm:
            self.attn_q_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps)
            self.attn_k_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps)
        self.attn_output = nn.Linear(q_dim, c.n_embd, bias=False)

    def forward(self, x, cos, sin, mask):
        """mask (None: causal): which keys each query sees (see Transformer.attention_inputs)."""
        B, T, _ = x.shape
        c = self.c
        if c.fused:
            q, k, v = self.attn_qkv(x).split([c.n_head * c.head_dim] + [c.n_head_kv * c.head_dim] * 2, dim=-1)
        else:
            q, k, v = self.attn_q(x), self.attn_k(x), self.attn_v(x)
        q = q.view(B, T, c.n_head, c.head_dim)
        k = k.view(B, T, c.n_head_kv, c.head_dim)
        if c.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        v = v.view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        if c.n_head_kv != c.n_head:  # grouped-query attention: head h reads kv head h // group
            k = k.repeat_interleave(c.n_head // c.n_head_kv, dim=1)
            v = v.repeat_interleave(c.n_head // c.n_head_kv, dim=1)
        scale = c.attn_scale or 1.0 / math.sqrt(c.head_dim)
        if c.attn_softcap:  # no fused kernel caps scores: written out
            scores = (q @ k.transpose(-1, -2)) * scale
            scores = c.attn_softcap * torch.tanh(scores / c.attn_softcap)
            y = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        return self.attn_output(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, swa: bool = False):
        super().__init__()
        self.c, self.swa = c, swa
        self.attn_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.attn = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        if c.fused:
            self.ffn_up = nn.Linear(c.n_embd, 2 * c.n_ff, bias=False)
        else:
            self.ffn_gate = nn.Linear(c.n_embd, c.n_ff, bias=False)
            self.ffn_up = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.ffn_down = nn.Linear(c.n_ff, c.n_embd, bias=False)
        if c.post_norms:
            self.post_attention_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
            self.post_ffw_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)

    def forward(self, x, cos, sin, mask):
        c = self.c
        out = self.attn(self.attn_norm(x), cos, sin, mask)
        x = x + F.dropout(self.post_attention_norm(out) if c.post_norms else out, c.dropout, self.training)
        h = self.ffn_norm(x)
        gate, up = self.ffn_up(h).chunk(2, dim=-1) if c.fused else (self.ffn_gate(h), self.ffn_up(h))
        gate = F.gelu(gate, approximate="tanh") if c.gelu else F.silu(gate)
        out = self.ffn_down(gate * up)
        return x + F.dropout(self.post_ffw_norm(out) if c.post_norms else out, c.dropout, self.training)


def rope_tables(c: ModelConfig, T: int, swa: bool = False, device=None):
    """cos and sin (T, rope_dims/2) at positions 0..T-1, computed in float64 as run.py does."""
    d = c.rope_dims or c.head_dim
    inv_freq = (c.rope_theta_swa if swa else c.rope_theta) ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    if not swa:  # sliding-window layers: their own base, unscaled (llama.cpp's rope_freq_base_swa)
        inv_freq = inv_freq / (np.asarray(c.rope_factors, np.float64) if c.rope_factors else 1.0) / c.rope_scale
    angles = np.outer(np.arange(T, dtype=np.float64), inv_freq)
    return (torch.tensor(np.cos(angles) * c.rope_attn_factor, dtype=torch.float32, device=device),
            torch.tensor(np.sin(angles) * c.rope_attn_factor, dtype=torch.float32, device=device))


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + d/2) of the first d = 2 * cos.shape[-1] dimensions of each head by
    the tokens' angles (cos, sin: (T, d/2), or (B, 1, T, d/2) for positions of their own)."""
    d = 2 * cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., :d // 2], x[..., d // 2:d], x[..., d:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Transformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.token_embd = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c, bool(c.swa_layers) and c.swa_layers[i]) for i in range(c.n_layer))
        self.output_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.output = None if c.tie_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False)
        for name, swa in (("", False), ("_swa", True)):
            cos, sin = rope_tables(c, c.context, swa)
            self.register_buffer("rope_cos" + name, cos, persistent=False)
            self.register_buffer("rope_sin" + name, sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # residual projections shrink with depth (GPT-2)
            if name.endswith(("attn_output.weight", "ffn_down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def attention_inputs(self, T: int, positions, swa: bool):
        """cos, sin and the mask (None: causal) of one kind of layer, global or sliding-window:
        a token sees the tokens before it (within the window) in its own sequence."""
        c = self.config
        cos, sin = (self.rope_cos_swa, self.rope_sin_swa) if swa else (self.rope_cos, self.rope_sin)
        window = c.sliding_window if swa else 0
        if positions is None:
            if not window and not c.attn_softcap:
                return cos[:T], sin[:T], None
            pos, same = torch.arange(T, device=cos.device), None
            cos, sin = cos[:T], sin[:T]
        else:
            pos, cos, sin = positions, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
            sequence = (positions == 0).cumsum(1)  # a position of 0 starts a sequence
            same = sequence[:, :, None] == sequence[:, None, :]
        behind = pos[..., :, None] - pos[..., None, :]
        seen = (behind >= 0) & (behind < window) if window else behind >= 0
        return cos, sin, seen if same is None else (seen & same).unsqueeze(1)  # (T, T) or (B, 1, T, T)

    def forward(self, idx, targets=None, reduction="mean", rows=None, positions=None):
        """Logits (B, T, V); with targets (B, T) also the cross-entropy (targets of -100 are
        left out). rows: only these flat positions (B * T numbering) go through the output
        matrix, and targets holds theirs alone (finetuning: the assistant's tokens, often
        fewer than half; with a vocabulary of 262,144 that matrix is most of the work).
        positions (B, T): each token's position in its own sequence, for rows that pack several
        (finetuning's conversations): RoPE takes them, a 0 starts a sequence, and attention
        stays within each."""
        B, T = idx.shape
        c = self.config
        if T > c.context:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({c.context})")
        x = self.token_embd(idx)                                    # (B, T, C)
        if c.embd_scale != 1.0:
            x = x * c.embd_scale
        x = F.dropout(x, c.dropout, self.training)
        kinds = {swa: self.attention_inputs(T, positions, swa) for swa in {block.swa for block in self.blocks}}
        for block in self.blocks:
            x = block(x, *kinds[block.swa])
        x = self.output_norm(x)
        if rows is not None:
            x = x.reshape(B * T, -1).index_select(0, rows)
        logits = F.linear(x, self.token_embd.weight if self.output is None else self.output.weight)  # (B, T, V)
        if c.final_softcap:
            logits = c.final_softcap * torch.tanh(logits / c.final_softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention's
        12 * layers * width * context (nanoGPT's estimate, from the PaLM paper)."""
        c = self.config
        n = self.num_params() - self.token_embd.weight.numel() * (0 if c.tie_embeddings else 1)
        return 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.context

    @torch.no_grad()
    def generate(self, idx, max_tokens: int, temperature: float = 0.8, top_k: int = 40):
        """A quick sampler for training-time samples (run.py is the real runner)."""
        for _ in range(max_tokens):
            logits = self(idx[:, -self.config.context:])[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


# ---------------------------------------------------------------------------
# GGUF -> PyTorch: any file run.py runs, weights decoded to float32
# ---------------------------------------------------------------------------

def gguf_name(name: str) -> str:
    """PyTorch parameter name -> GGUF tensor name (the model's names mirror GGUF's)."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return ".".join(["blk", parts[1], *[p for p in parts[2:] if p != "attn"]])
    return name


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rows -> adjacent-pair rows (GGUF llama's RoPE), per head."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Adjacent-pair rows (GGUF llama) -> rotate-half rows: permute_qk undone."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def config_from_gguf(path: str, n_ctx: int | None = None) -> tuple[ModelConfig, "object"]:
    """The ModelConfig of a GGUF file run.py runs, with a context of n_ctx (default: the
    model's); LongRoPE's factors are picked for that context as run.py and llama.cpp pick
    them. Also returns the file (run.GGUFFile: metadata, tensors)."""
    from twofile import run

    gguf = run.read_gguf(path)
    rc = run.read_config(gguf)
    n_ctx = min(n_ctx or rc.n_ctx, rc.n_ctx)
    if not rc.rope_neox and rc.rope_dims != rc.head_dim:
        raise ValueError(f"{path}: a llama file rotating {rc.rope_dims} of {rc.head_dim} dimensions per head "
                         f"is not supported")
    factors = None
    if "rope_factors_long.weight" in gguf.tensors:  # as run.Model: long factors past the original context
        factors = gguf.tensors[f"rope_factors_{'long' if n_ctx > rc.rope_n_ctx_orig else 'short'}.weight"]
    elif "rope_freqs.weight" in gguf.tensors:
        factors = gguf.tensors["rope_freqs.weight"]
    c = ModelConfig(
        vocab_size=rc.n_vocab, n_layer=rc.n_layer, n_embd=rc.n_embd, n_head=rc.n_head, n_head_kv=rc.n_head_kv,
        n_ff=rc.n_ff, context=n_ctx, rope_theta=rc.rope_theta, norm_eps=rc.norm_eps,
        tie_embeddings="output.weight" not in gguf.tensors, arch=rc.arch, head_size=rc.head_dim,
        rope_dims=rc.rope_dims, rope_scale=rc.rope_scale,
        rope_factors=[] if factors is None else run.dequantize(factors.data.reshape(1, -1), factors.type)[0].tolist(),
        rope_attn_factor=rc.rope_attn_factor, qkv_bias="blk.0.attn_q.bias" in gguf.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in gguf.tensors, fused=rc.arch == "phi3",
        post_norms=rc.arch in ("gemma2", "gemma3"), gelu=rc.gelu, embd_scale=rc.embd_scale,
        attn_scale=rc.attn_scale, sliding_window=rc.sliding_window, swa_layers=list(rc.swa_layers),
        rope_theta_swa=rc.rope_theta_swa, attn_softcap=rc.attn_softcap, final_softcap=rc.final_softcap)
    return c, gguf


def load_gguf(path: str, n_ctx: int | None = None) -> tuple[Transformer, dict]:
    """A GGUF file's model in PyTorch, weights decoded to float32 (see config_from_gguf), and
    the file's metadata (tokenizer, chat template, ...)."""
    from twofile import run

    c, gguf = config_from_gguf(path, n_ctx)
    model = Transformer(c)
    state = {}
    for name, p in model.state_dict().items():
        t = gguf.tensors.get(gguf_name(name))
        if t is None:
            raise ValueError(f"{path}: tensor {gguf_name(name)!r} is missing")
        w = run.dequantize(t.data.reshape(t.shape[0] if len(t.shape) > 1 else 1, -1), t.type).reshape(t.shape)
        if c.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, c.n_head if name.endswith("attn_q.weight") else c.n_head_kv)
        if w.shape != tuple(p.shape):
            raise ValueError(f"{path}: tensor {t.name!r} has shape {list(w.shape)}, expected {list(p.shape)}")
        state[name] = torch.from_numpy(np.array(w, np.float32))  # a copy: F32 tensors are views of the read-only map
    model.load_state_dict(state)
    return model, gguf.metadata

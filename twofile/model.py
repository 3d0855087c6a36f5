"""The Llama architecture in PyTorch, exactly what GGUF `llama` can express.

    from twofile.model import ModelConfig, Llama
    model = Llama(ModelConfig.from_depth(6, vocab_size=4096, context=256))

RMSNorm, rotary position embeddings, grouped-query attention (scaled_dot_product_attention),
SwiGLU MLP, tied or untied embeddings; no biases. Module names follow GGUF's tensor names
(`blocks.3.attn_q` is `blk.3.attn_q`), so export is a name map plus the Q/K permutation:
RoPE here rotates the two halves of each head (as Hugging Face Llama does), GGUF's llama
rotates adjacent pairs, and export permutes Wq/Wk rows to match (as llama.cpp's converter).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, context: int, aspect: int = 48, head_dim: int = 64,
                   kv_ratio: int = 2, tie_embeddings: bool = True) -> "ModelConfig":
        """One knob: width = depth * aspect rounded to whole heads; FFN = 8/3 width
        (SwiGLU's usual size) rounded to 32 so every quantized type fits its rows."""
        n_head = max(1, round(depth * aspect / head_dim))
        n_embd = n_head * head_dim
        n_head_kv = n_head // kv_ratio if n_head % kv_ratio == 0 else n_head
        n_ff = 32 * math.ceil(8 * n_embd / 3 / 32)
        return cls(vocab_size, depth, n_embd, n_head, n_head_kv, n_ff, context, tie_embeddings=tie_embeddings)

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.attn_q = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=False)
        self.attn_k = nn.Linear(c.n_embd, c.n_head_kv * c.head_dim, bias=False)
        self.attn_v = nn.Linear(c.n_embd, c.n_head_kv * c.head_dim, bias=False)
        self.attn_output = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.c
        q = self.attn_q(x).view(B, T, c.n_head, c.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.attn_k(x).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        v = self.attn_v(x).view(B, T, c.n_head_kv, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if c.n_head_kv != c.n_head:  # grouped-query attention: head h reads kv head h // group
            k = k.repeat_interleave(c.n_head // c.n_head_kv, dim=1)
            v = v.repeat_interleave(c.n_head // c.n_head_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_output(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.attn = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.ffn_gate = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.ffn_up = nn.Linear(c.n_embd, c.n_ff, bias=False)
        self.ffn_down = nn.Linear(c.n_ff, c.n_embd, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = self.ffn_norm(x)
        return x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))


def rope_tables(c: ModelConfig, T: int, device=None):
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=device) / c.head_dim))
    angles = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + hd/2) of each head by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Llama(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.config = c
        self.token_embd = nn.Embedding(c.vocab_size, c.n_embd)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.output_norm = nn.RMSNorm(c.n_embd, eps=c.norm_eps)
        self.output = None if c.tie_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False)
        cos, sin = rope_tables(c, c.context)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # residual projections shrink with depth (GPT-2)
            if name.endswith(("attn_output.weight", "ffn_down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        if T > self.config.context:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.context})")
        x = self.token_embd(idx)                                    # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.output_norm(x)
        logits = F.linear(x, self.token_embd.weight if self.output is None else self.output.weight)  # (B, T, V)
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
        return 6 * n + 12 * c.n_layer * c.n_embd * c.context

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

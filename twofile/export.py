"""Checkpoint -> one GGUF file (weights + tokenizer + chat template) for run.py, llama.cpp
and transformers, and the evaluation of such a file on held-out text.

    twofile export runs/d8 -o d8.q8_0.gguf --type q8_0
    twofile eval d8.q8_0.gguf --text held_out.txt     # loss, perplexity, bits per byte
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from twofile import __version__, run
from twofile.model import gguf_name, permute_qk
from twofile import tokenizer as tokenizers_

TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K"}
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k": 14, "bf16": 32}  # llama.cpp's LLAMA_FTYPE


def chosen_checkpoint(folder: str | Path) -> Path:
    """What a run exports: its weights of the best validation (train.best_checkpoint), else
    its latest checkpoint."""
    from twofile import train

    folder = Path(folder)
    found = train.checkpoints(folder) if folder.is_dir() else []
    best = train.best_checkpoint(folder) if folder.is_dir() else None
    if best is None and not found:
        raise ValueError(f"{folder}: no checkpoint (ckpt_*/state.json) to export")
    return best or found[-1]


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 (rows, cols) -> Q4_K bytes (rows, cols / 256 * 144). Per 32-weight sub-block:
    x ~ d * sc * q - dmin * m with q in 0..15 and six-bit sc, m; the gguf package has no Q4_K
    quantizer, so the tests check this one through gguf.quants' reference decoder."""
    rows, cols = w.shape
    x = w.reshape(-1, 8, 32).astype(np.float32)                 # (blocks, sub-blocks, 32)
    lo = np.minimum(x.min(-1), 0.0)                             # sub-block offsets (<= 0)
    scale = (x.max(-1) - lo) / 15.0
    d = np.maximum(scale.max(-1), 1e-30) / 63.0                 # block scale of the six-bit scales
    dmin = np.maximum((-lo).max(-1), 1e-30) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d, dmin = np.maximum(d16.astype(np.float32), 1e-30), np.maximum(dmin16.astype(np.float32), 1e-30)
    sc = np.clip(np.rint(scale / d[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(-lo / dmin[:, None]), 0, 63).astype(np.uint8)
    eff_scale = d[:, None] * sc.astype(np.float32)
    eff_min = dmin[:, None] * m.astype(np.float32)
    q = np.rint((x + eff_min[..., None]) / np.where(eff_scale > 0, eff_scale, 1)[..., None])
    q = np.clip(q, 0, 15).astype(np.uint8)
    # scales: bytes 0-3 low 6 bits of sc[0:4] (top 2 bits carry sc[4:8] >> 4), 4-7 the same
    # for m, 8-11 low nibbles of sc[4:8] and m[4:8]
    packed = np.zeros((x.shape[0], 12), np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (m[:, 0:4] & 0x3F) | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((m[:, 4:8] & 0x0F) << 4)
    qs = q.reshape(-1, 4, 2, 32)
    nibbles = (qs[:, :, 0] | (qs[:, :, 1] << 4)).reshape(-1, 128)  # chunk c: low = sub-block 2c
    blocks = np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2),
                             packed, nibbles], axis=1)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, ftype: str) -> tuple[np.ndarray, str]:
    """Weights in the requested type, or Q8_0 where a K-quant does not fit the row length."""
    import gguf

    name = TYPES[ftype]
    if w.ndim == 1:
        return w.astype(np.float32), "F32"  # norms stay float32, as in llama.cpp
    if name == "F32":
        return w.astype(np.float32), "F32"
    if name == "Q4_K" and w.shape[1] % 256:
        name = "Q8_0"
    if name == "Q4_K":
        return quantize_q4_k(w), name
    return gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType[name]), name


def export(run_folder: str | Path, path: str | Path, ftype: str = "f32") -> Path:
    """Write a training run (its best validation's weights, else its latest checkpoint) as a
    GGUF `llama` file."""
    import gguf
    from safetensors.numpy import load_file

    if ftype not in TYPES:
        raise ValueError(f"--type {ftype!r} is not one of {', '.join(TYPES)}")
    ckpt = chosen_checkpoint(run_folder)
    state = json.loads((ckpt / "state.json").read_text())
    if "finetune_config" in state:
        return export_finetuned(run_folder, path, ftype)
    c = state["model_config"]
    tok = tokenizers_.load(Path(run_folder) / "tokenizer.json")
    if tokenizers_.fingerprint(tok) != state["tokenizer"]:
        raise ValueError(f"{run_folder}/tokenizer.json is not the tokenizer the checkpoint was trained with")
    weights = load_file(str(ckpt / "model.safetensors"))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(f"twofile d{c['n_layer']} {Path(run_folder).resolve().name}")
    writer.add_description(f"trained by twofile {__version__} on {state['tokens']:,} tokens ({state['step']} steps)")
    writer.add_uint64("twofile.training_tokens", state["tokens"])
    writer.add_string("twofile.version", __version__)
    writer.add_context_length(c["context"])
    writer.add_embedding_length(c["n_embd"])
    writer.add_block_count(c["n_layer"])
    writer.add_feed_forward_length(c["n_ff"])
    writer.add_head_count(c["n_head"])
    writer.add_head_count_kv(c["n_head_kv"])
    writer.add_rope_dimension_count(c["n_embd"] // c["n_head"])
    writer.add_rope_freq_base(float(c["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(c["norm_eps"]))
    writer.add_vocab_size(c["vocab_size"])
    writer.add_file_type(FILE_TYPES[ftype])
    if ftype.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in tokenizers_.gguf_metadata(tok).items():
        if key == "tokenizer.ggml.token_type":
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    fallback = []
    for name, tensor in weights.items():
        w = tensor.astype(np.float32)
        if name.endswith("attn_q.weight"):
            w = permute_qk(w, c["n_head"])
        elif name.endswith("attn_k.weight"):
            w = permute_qk(w, c["n_head_kv"])
        data, qtype = encode(w, ftype)
        if qtype != TYPES[ftype] and w.ndim == 2:
            fallback.append(gguf_name(name))
        writer.add_tensor(gguf_name(name), data, raw_dtype=None if qtype == "F32" else gguf.GGMLQuantizationType[qtype])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)  # atomic: a half-written file never has the final name
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fallback:
        print(f"{path}: {len(fallback)} tensors whose rows are not a multiple of 256 are Q8_0 "
              f"({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''})", file=sys.stderr)
    return path


def export_finetuned(run_folder: str | Path, path: str | Path, ftype: str) -> Path:
    """A finetuning run as a GGUF file of its source's architecture: the source's metadata
    (tokenizer, chat template, ...) and RoPE factors, the trained weights under the source's
    tensor names (LoRA merged)."""
    import gguf
    import torch

    from twofile import finetune

    source = Path(run_folder) / "source.gguf"
    if not source.is_file():
        raise ValueError(f"{run_folder}: source.gguf (the source model's metadata) is missing")
    model, state = finetune.trained_model(run_folder)
    c = model.config
    reader = gguf.GGUFReader(str(source))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), c.arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.quantization_version"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    writer.add_string("twofile.finetuned", f"{state['step']} steps on {state['tokens']:,} tokens by twofile {__version__}")
    writer.add_file_type(FILE_TYPES[ftype])
    if ftype.startswith("q"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data, np.float32))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            w = tensor.float().numpy()
            if c.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                w = permute_qk(w, c.n_head if name.endswith("attn_q.weight") else c.n_head_kv)
            data, qtype = encode(w, ftype)
            writer.add_tensor(gguf_name(name), data,
                              raw_dtype=None if qtype == "F32" else gguf.GGMLQuantizationType[qtype])
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def evaluate_text(model: run.Model, text: str) -> dict:
    """Loss, perplexity and bits per byte of a GGUF model on a text, in windows of its
    context (each token after the first is predicted exactly once). The text is data: what it
    spells stays text, even the name of a special token."""
    ids = model.tokenize(text, parse_special=False)
    if len(ids) < 2:
        raise ValueError("the text is too short to evaluate (fewer than 2 tokens)")
    nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, model.n_ctx):
        window = ids[start:start + model.n_ctx + 1]
        logits = model.logits(window[:-1])
        for r in range(0, len(logits), 256):  # float64 a few rows at a time, not (n_ctx, vocab) at once
            rows = run.log_softmax(logits[r:r + 256])
            nats -= float(rows[np.arange(len(rows)), window[r + 1:r + 1 + len(rows)]].sum())
        count += len(window) - 1
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": count, "bytes": n_bytes, "loss": nats / count, "perplexity": math.exp(nats / count),
            "bits_per_byte": nats / n_bytes / math.log(2)}

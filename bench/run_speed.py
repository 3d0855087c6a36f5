"""Speed and memory of run.py on GGUF files, against this machine's memory bandwidth.

    python bench/run_speed.py                      # the default set below, with a chart
    python bench/run_speed.py a.gguf b.gguf --runs 5 --gen-tokens 128

The default set: the default model (SmolLM2-135M-Instruct, Q4_1) and the same weights
re-encoded as Q8_0, F16 and F32; then files with the shapes of Llama-3.2-1B (the tensor types
of llama.cpp's presets Q4_K_M, Q8_0, Q3_K_M, Q2_K and IQ4_XS) and Llama-2-7B (Q4_K) with random
weights and a real-looking tokenizer section, built with the gguf package into
~/.cache/twofile/bench (about 8 GB, once);
then other families: Gemma 3 270M (the real file, Q4_K_M) and random files with the shapes of
Qwen2.5-0.5B and Qwen3-1.7B (Q4_K_M).

For each file: load time (fresh process, kernels from numba's disk cache), prompt processing
(512 tokens; 128 for files over 1 GB), generation (--gen-tokens; 16 for files over 1 GB),
greedy and with the CLI's default sampling (temperature 0.8, top-k 40, top-p 0.95, min-p
0.05), medians over --runs; the time of one sample() call on the model's logits and its share
of a sampled token's time; peak RSS of a fresh process that loads the model and generates;
and generation speed as a fraction of the bandwidth roofline: bandwidth measured in the same
run / bytes of weights read per generated token. The chart (tok/s against weights read per token,
with the roofline) goes to bench/run_speed.png.

    python bench/run_speed.py FILES --llama-cpp --activations 8

--llama-cpp runs llama.cpp's llama-bench (bench/llama_cpp.py builds it once from the
llama-cpp-python sdist) on each file in the same run, with the same threads, prompt and
generation lengths, one repetition after each of run.py's rounds (interleaved, so that the
machine's drift hits both alike), and prints the medians beside each other with the median
of the rounds' ratios. --activations
picks run.load's rounding of the kernels' inputs (16 bits by default, 8 as llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twofile import assets, run  # noqa: E402

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
          "combined movable metal type, oil-based ink and a wooden press. ")
BIG = 1e9  # bytes: files over this get shorter prompt and generation runs


def memory_bandwidth(runs: int) -> float:
    """GB/s moved by numpy copying a 1 GiB array (bytes read + bytes written)."""
    src = np.ones(1 << 28, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(runs + 1):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times[1:]) / 1e9


def bytes_per_token(model: run.Model) -> int:
    """Weights read to generate one token: every layer matrix, the output projection and the
    norms; the embedding contributes one row (unless tied, when it is the output matrix)."""
    total = sum(t.nbytes for name, t in model.gguf.tensors.items() if name != "token_embd.weight")
    if model.output is model.token_embd:
        total += model.token_embd.nbytes
    return total


# -- the files ---------------------------------------------------------------------------------

def reencode(source: Path, qtype, out: Path) -> Path:
    """The default model with every matrix decoded and written again as qtype (gguf.quants)."""
    import gguf

    if out.exists():
        return out
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue
        value = field.contents()
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(field.name, value, field.types[0])
    model = run.load(str(source))
    for name, info in model.gguf.tensors.items():
        w = run.dequantize(info.data.reshape(info.shape[0], -1) if len(info.shape) == 2 else info.data.reshape(1, -1),
                           info.type).reshape(info.shape)
        if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w.astype(np.float32))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    _finish(writer, out)
    return out


def _finish(writer, out: Path):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(out) + ".tmp", out)


def _random_quantized(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random blocks of qtype with small, finite f16 scales (speed does not depend on values)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.frombuffer(rng.bytes(rows * cols // block * size), np.uint8).reshape(-1, size).copy()
    Q = gguf.GGMLQuantizationType
    scales = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.IQ4_NL: [0], Q.IQ4_XS: [0], Q.Q2_K: [80, 82],
              Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    for at in scales[qtype]:
        raw[:, at:at + 2] = np.array([0.002 if qtype != Q.Q8_0 else 0.0004], np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def _tokenizer(vocab: int, kind: str) -> dict:
    """A tokenizer section with `vocab` tokens built from SmolLM2's: Llama 3's byte-level BPE
    layout (padded with reserved special tokens), or Llama 2's SentencePiece layout (byte
    tokens, '▁' for spaces, scores)."""
    meta = run.read_gguf(str(assets.fetch(assets.DEFAULT_MODEL))).metadata
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    if kind == "gpt2":  # as Llama 3: 256 reserved special tokens at the end
        extra = vocab - len(tokens)
        pad = [f"\u0120pad{i}" for i in range(extra - 256)] + [f"<|reserved_special_token_{i}|>" for i in range(256)]
        return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                "tokenizer.ggml.tokens": tokens + pad,
                "tokenizer.ggml.token_type": meta["tokenizer.ggml.token_type"].tolist() + [1] * (extra - 256) + [3] * 256,
                "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    decode = {c: b for b, c in run._byte_to_unicode().items()}
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    seen = set(pieces)
    for t in tokens[256:]:
        try:
            text = bytes(decode[c] for c in t).decode("utf-8").replace(" ", "\u2581")
        except (KeyError, UnicodeDecodeError):
            continue
        if text and text not in seen:
            seen.add(text)
            pieces.append(text)
        if len(pieces) == vocab:
            break
    types = [2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)],
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def _add_tokenizer(writer, keys: dict):
    import gguf

    for key, value in keys.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif key.endswith("token_type"):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            writer.add_array(key, value)


SHAPES = {  # name: (layers, embd, heads, kv heads, ffn, vocab, tied, tokenizer, architecture, head size)
    "llama-3.2-1b": (16, 2048, 32, 8, 8192, 128256, True, "gpt2", "llama", 64),
    "llama-2-7b": (32, 4096, 32, 32, 11008, 32000, False, "llama", "llama", 128),
    "qwen2.5-0.5b": (24, 896, 14, 2, 4864, 151936, True, "gpt2", "qwen2", 64),     # q/k/v biases
    "qwen3-1.7b": (28, 2048, 16, 8, 6144, 151936, True, "gpt2", "qwen3", 128),     # q/k norms
}


MIXES = ("q8_0", "q4_k", "q4_k_m", "q3_k_m", "q2_k", "iq4_xs")


def preset_type(mix: str, name: str, layer: int | None, n_layer: int, n_gqa: int, tied: bool, cols: int):
    """The tensor type llama.cpp's quantizer (llama_tensor_get_type, no imatrix) gives a
    matrix of a llama-like model under preset `mix`; 'q4_k' is plain Q4_K with a Q6_K output."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if mix == "q8_0":
        return Q.Q8_0

    def more_bits(i):  # llama.cpp's use_more_bits(): first and last eighth, every third between
        return i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2

    base = {"q4_k": Q.Q4_K, "q4_k_m": Q.Q4_K, "q3_k_m": Q.Q3_K, "q2_k": Q.Q2_K, "iq4_xs": Q.IQ4_XS}[mix]
    if name == ("token_embd" if tied else "output"):
        qtype = Q.Q6_K if cols % 256 == 0 else Q.Q8_0
        return qtype
    qtype = base
    if name == "attn_v":
        qtype = {"q2_k": Q.Q4_K if n_gqa >= 4 else Q.Q3_K, "q3_k_m": Q.Q5_K if layer < 2 else Q.Q4_K,
                 "iq4_xs": Q.Q5_K if n_gqa >= 4 else base,
                 "q4_k_m": Q.Q6_K if more_bits(layer) else base}.get(mix, base)
    elif name == "ffn_down":
        qtype = {"q2_k": Q.Q3_K, "q3_k_m": Q.Q5_K if layer < n_layer // 16 else Q.Q4_K,
                 "iq4_xs": Q.Q5_K if layer < n_layer // 8 else base,
                 "q4_k_m": Q.Q6_K if more_bits(layer) else base}.get(mix, base)
    elif name == "attn_output":
        qtype = {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K}.get(mix, base)
    if cols % 256:  # rows that 256-weight blocks do not fit: llama.cpp's fallbacks
        qtype = {Q.IQ4_XS: Q.IQ4_NL, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1,
                 Q.Q6_K: Q.Q8_0}.get(qtype, qtype)
    return qtype


def synthetic(shape: str, mix: str, out: Path) -> Path:
    """A GGUF file with a real model's shapes and random weights, its types as llama.cpp's
    preset `mix` (one of MIXES) picks them (see preset_type)."""
    import gguf

    if out.exists():
        return out
    n_layer, n_embd, n_head, n_head_kv, n_ff, n_vocab, tied, kind, arch, head_dim = SHAPES[shape]
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(out) + ".tmp", arch)
    writer.add_name(f"random {shape} {mix}")
    for key, value in (("context_length", 4096), ("embedding_length", n_embd), ("block_count", n_layer),
                       ("feed_forward_length", n_ff), ("attention.head_count", n_head),
                       ("attention.head_count_kv", n_head_kv), ("attention.key_length", head_dim),
                       ("attention.value_length", head_dim), ("rope.dimension_count", head_dim),
                       ("vocab_size", n_vocab)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0 if kind == "gpt2" else 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    _add_tokenizer(writer, _tokenizer(n_vocab, kind))

    def matrix(name, rows, cols, layer=None):
        qtype = preset_type(mix, name, layer, n_layer, n_head // n_head_kv, tied, cols)
        full = f"blk.{layer}.{name}.weight" if layer is not None else f"{name}.weight"
        writer.add_tensor(full, _random_quantized(qtype, rows, cols, rng), raw_dtype=qtype)

    matrix("token_embd", n_vocab, n_embd)
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    if not tied:
        matrix("output", n_vocab, n_embd)
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        if arch == "qwen2":
            for name, n in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                writer.add_tensor(f"blk.{i}.{name}.bias", np.zeros(n, np.float32))
        if arch == "qwen3":
            for name in ("attn_q_norm", "attn_k_norm"):
                writer.add_tensor(f"blk.{i}.{name}.weight", np.ones(head_dim, np.float32))
        for name, rows, cols in (("attn_q", q_dim, n_embd), ("attn_k", kv_dim, n_embd),
                                 ("attn_v", kv_dim, n_embd), ("attn_output", n_embd, q_dim),
                                 ("ffn_gate", n_ff, n_embd), ("ffn_up", n_ff, n_embd), ("ffn_down", n_embd, n_ff)):
            matrix(name, rows, cols, i)
    _finish(writer, out)
    return out


def default_files() -> list[Path]:
    import gguf

    Q = gguf.GGMLQuantizationType
    folder = assets.cache_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    source = assets.fetch(assets.DEFAULT_MODEL)
    files = [source] + [reencode(source, q, folder / f"SmolLM2-135M-Instruct.{q.name}.gguf")
                        for q in (Q.Q8_0, Q.F16, Q.F32)]
    files += [synthetic("llama-3.2-1b", mix, folder / f"random-llama-3.2-1b.{mix.upper()}.gguf")
              for mix in ("q4_k_m", "q8_0")]
    files += [synthetic("llama-3.2-1b", mix, folder / f"random-llama-3.2-1b.{mix.upper()}.gguf")
              for mix in ("q3_k_m", "q2_k", "iq4_xs")]
    files.append(synthetic("llama-2-7b", "q4_k", folder / "random-llama-2-7b.Q4_K.gguf"))
    files.append(assets.fetch(assets.GEMMA3))
    files += [synthetic(shape, "q4_k_m", folder / f"random-{shape}.Q4_K_M.gguf") for shape in ("qwen2.5-0.5b", "qwen3-1.7b")]
    return files


# -- the measurements ---------------------------------------------------------------------------

CHILD = """
import json, sys, time
t = time.perf_counter()
sys.path.insert(0, {root!r})
from twofile import run
m = run.load({path!r})
load = time.perf_counter() - t
s = m.session()
gen = s.generate(m.tokenize("Hello"), max_tokens={n}, temperature=0, ignore_eos=True)
next(gen)
t, first = time.perf_counter(), len(gen.tokens)
for _ in gen:
    pass
tg = (len(gen.tokens) - first) / (time.perf_counter() - t)
# VmHWM, not ru_maxrss: the latter can carry the parent's peak across vfork + exec
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({{"load": load, "rss": int(hwm.split()[1]) * 1024, "kv": s.k_cache.nbytes * 2, "tg": tg}}))
"""
# the CLI's default sampling (twofile run / run.py without flags)
CLI_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)


def generation_speed(model: run.Model, gen_tokens: int, runs: int, **sampling) -> float:
    """Median tokens/s of Session.generate after its first token (the prompt is not counted)."""
    speeds = []
    for seed in range(runs):
        gen = model.session().generate(model.tokenize("Once upon a time"), max_tokens=gen_tokens + 1, seed=seed,
                                       ignore_eos=True, **sampling)
        next(gen)
        t, first = time.perf_counter(), len(gen.tokens)
        for _ in gen:
            pass
        speeds.append((len(gen.tokens) - first) / (time.perf_counter() - t))
    return statistics.median(speeds)


def sampling_ms(model: run.Model, calls: int = 200) -> float:
    """Median milliseconds of one sample() with the CLI's defaults, on this model's real logits."""
    logits = model.session().feed(model.tokenize(PROMPT))
    rng, times = np.random.default_rng(0), []
    for _ in range(calls):
        t = time.perf_counter()
        run.sample(logits, rng, **CLI_SAMPLING)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def child_load_and_rss(path: Path, gen_tokens: int, numpy_only: bool = False) -> dict:
    """A fresh process loads the model and generates: its load time, peak RSS, KV cache bytes
    and generation speed."""
    code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), path=str(path), n=gen_tokens)
    env = {**os.environ, "RUN_PY_NUMBA": "0"} if numpy_only else None
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_cpp_speed(path: Path, runs: int, prompt_tokens: int, gen_tokens: int) -> tuple[float, float]:
    """llama.cpp's llama-bench on the file with as many threads as run.py uses (built by
    bench/llama_cpp.py on first use): (prompt tok/s, generation tok/s), each the mean of runs."""
    from bench import llama_cpp

    out = subprocess.run([str(llama_cpp.binary("llama-bench")), "-m", str(path), "-t", str(run.default_threads()),
                          "-p", str(prompt_tokens), "-n", str(gen_tokens), "-r", str(runs), "-o", "json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return (next(r["avg_ts"] for r in rows if r["n_prompt"] > 0), next(r["avg_ts"] for r in rows if r["n_gen"] > 0))


def bench_file(path: Path, runs: int, gen_tokens: int, bandwidth: float, activations: int, llama_cpp: bool,
               prompt_tokens: int | None) -> dict:
    big = path.stat().st_size > BIG
    prompt_tokens, gen_tokens = prompt_tokens or (128 if big else 512), 16 if big else gen_tokens
    child_load_and_rss(path, 1)  # compiles the kernels if run.py changed since they were cached
    children = [child_load_and_rss(path, 16) for _ in range(runs)]
    model = run.load(str(path), activations=activations)
    prompt = model.tokenize(PROMPT * 40)[:prompt_tokens]
    model.session().prefill(prompt)  # warm-up, as llama-bench's
    # rounds of run.py's prompt and generation, then llama.cpp's, interleaved: this shared
    # machine's speed drifts by 20% within minutes, and a ratio of neighbours drifts less
    pp, tg, reference = [], [], []
    for _ in range(runs):
        session = model.session()  # a new session: no prefix reuse, the whole prompt runs
        t = time.perf_counter()
        session.prefill(prompt)
        pp.append(len(prompt) / (time.perf_counter() - t))
        tg.append(generation_speed(model, gen_tokens, 1, temperature=0))
        if llama_cpp:
            reference.append(llama_cpp_speed(path, 1, len(prompt), gen_tokens))
    tg_sampled = generation_speed(model, gen_tokens, runs, **CLI_SAMPLING)
    sample_ms = sampling_ms(model)
    per_token = bytes_per_token(model)
    roofline = bandwidth * 1e9 / per_token
    types = sorted({t.type_name for t in model.gguf.tensors.values() if len(t.shape) == 2})
    nan = float("nan")
    return {"llama_cpp_prompt_tok_s": statistics.median(r[0] for r in reference) if llama_cpp else nan,
            "llama_cpp_gen_tok_s": statistics.median(r[1] for r in reference) if llama_cpp else nan,
            "prompt_ratio": statistics.median(a / r[0] for a, r in zip(pp, reference)) if llama_cpp else nan,
            "gen_ratio": statistics.median(a / r[1] for a, r in zip(tg, reference)) if llama_cpp else nan,
            "file": path.name, "types": "/".join(types), "size_mb": path.stat().st_size / 1e6,
            "load_s": statistics.median(c["load"] for c in children),
            "prompt_tokens": len(prompt), "prompt_tok_s": statistics.median(pp),
            "gen_tokens": gen_tokens, "gen_tok_s": statistics.median(tg), "gen_sampled_tok_s": tg_sampled,
            "vocab": model.config.n_vocab, "sample_ms": sample_ms, "sample_share": sample_ms * 1e-3 * tg_sampled,
            "weights_mb_per_token": per_token / 1e6, "roofline_tok_s": roofline,
            "roofline_fraction": statistics.median(tg) / roofline,
            "peak_rss_mb": max(c["rss"] for c in children) / 1e6, "kv_mb": children[0]["kv"] / 1e6}


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernels = f"numba {run.numba.__version__}" if run.numba else "numpy only"
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {kernels}, numpy {np.__version__}, "
            f"Python {platform.python_version()}")


def chart(results: list[dict], bandwidth: float, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = np.geomspace(50, 10000, 100)
    ax.plot(sizes, bandwidth * 1e3 / sizes, "k--", lw=1, label=f"roofline ({bandwidth:.0f} GB/s)")
    for r in results:
        ax.plot(r["weights_mb_per_token"], r["gen_tok_s"], "o", label=f"{r['file']} ({r['roofline_fraction']:.0%})")
    ax.set(xscale="log", yscale="log", xlabel="weights read per token (MB)", ylabel="generation (tok/s)",
           title=f"run.py generation speed, {len(os.sched_getaffinity(0))} threads, {machine().split(',')[0]}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", help="GGUF files (default: the set described above)")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement; medians reported (default: %(default)s)")
    p.add_argument("--gen-tokens", type=int, default=128,
                   help="tokens generated per run; 16 for files over 1 GB (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="prompt length (default: 512; 128 for files over 1 GB)")
    p.add_argument("--activations", type=int, choices=sorted(run.ACTIVATIONS), default=16,
                   help="run.load's rounding of the kernels' inputs, in bits (default: %(default)s)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also run llama.cpp's llama-bench on each file (built once, about 15 minutes) and "
                        "print the ratios (default: off)")
    args = p.parse_args()
    files = [Path(m) for m in args.models] if args.models else default_files()
    print(f"machine: {machine()}")
    bandwidth = memory_bandwidth(5)
    print(f"memory bandwidth (numpy copy of 1 GiB, read + write, median of 5): {bandwidth:.1f} GB/s")
    print(f"run.py: activations rounded to {args.activations} bits")
    results = [bench_file(path, args.runs, args.gen_tokens, bandwidth, args.activations, args.llama_cpp,
                          args.prompt_tokens) for path in files]
    # this machine's bandwidth drifts (19 to 25 GB/s seen): measure again after the models and
    # take the higher figure, so that no roofline fraction is flattered by a slow moment
    again = memory_bandwidth(5)
    if again > bandwidth:
        for r in results:
            r["roofline_tok_s"] *= again / bandwidth
            r["roofline_fraction"] *= bandwidth / again
        bandwidth = again
    print(f"memory bandwidth again after the models: {again:.1f} GB/s; rooflines use {bandwidth:.1f} GB/s")
    print("file | types | MB | load s | prompt tok/s | generation tok/s | MB/token | roofline tok/s | "
          "of roofline | peak RSS MB (file + KV + other)")
    for r in results:
        print(f"{r['file']} | {r['types']} | {r['size_mb']:.0f} | {r['load_s']:.2f} | "
              f"{r['prompt_tok_s']:.1f} (pp{r['prompt_tokens']}) | {r['gen_tok_s']:.2f} (tg{r['gen_tokens']}) | "
              f"{r['weights_mb_per_token']:.0f} | {r['roofline_tok_s']:.1f} | {r['roofline_fraction']:.1%} | "
              f"{r['peak_rss_mb']:.0f} ({r['size_mb']:.0f} + {r['kv_mb']:.0f} + "
              f"{r['peak_rss_mb'] - r['size_mb'] - r['kv_mb']:.0f})", flush=True)
    print("file | vocabulary | generation, greedy | generation, CLI default sampling | sample() ms | "
          "share of a sampled token's time")
    for r in results:
        print(f"{r['file']} | {r['vocab']:,} | {r['gen_tok_s']:.2f} tok/s | {r['gen_sampled_tok_s']:.2f} tok/s | "
              f"{r['sample_ms']:.3f} | {r['sample_share']:.1%}", flush=True)
    if args.llama_cpp:
        print(f"side by side with llama.cpp (llama-bench -t {run.default_threads()} -r 1, same files, rounds "
              "interleaved with run.py's; medians, and the median of the rounds' ratios): "
              "file | generation run.py / llama.cpp tok/s | ratio | prompt run.py / llama.cpp tok/s | ratio")
        for r in results:
            print(f"{r['file']} | {r['gen_tok_s']:.1f} / {r['llama_cpp_gen_tok_s']:.1f} | {r['gen_ratio']:.2f} | "
                  f"{r['prompt_tok_s']:.1f} / {r['llama_cpp_prompt_tok_s']:.1f} (pp{r['prompt_tokens']}) | "
                  f"{r['prompt_ratio']:.2f}", flush=True)
    # what run.py does with numpy alone: every matrix decoded to float32 at load (when the
    # copies fit in half the available memory), so a token reads 4 bytes a weight
    r = child_load_and_rss(files[0], 33, numpy_only=True)
    model = run.load(str(files[0]))
    decoded = 4 * sum(t.shape[0] * t.shape[1] for t in [model.output] + [
        m for L in model.layers for m in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)])
    print(f"numpy only (RUN_PY_NUMBA=0), {files[0].name}: load {r['load']:.2f} s, generation {r['tg']:.2f} tok/s "
          f"(tg32): {r['tg'] * bytes_per_token(model) / (bandwidth * 1e9):.1%} of the file's roofline, "
          f"{r['tg'] * decoded / (bandwidth * 1e9):.1%} of the float32 copies' ({decoded / 1e6:.0f} MB a token); "
          f"peak RSS {r['rss'] / 1e6:.0f} MB")
    if not args.models:
        out = Path(__file__).with_suffix(".png")
        chart(results, bandwidth, out)
        print(f"chart: {out}")


if __name__ == "__main__":
    main()

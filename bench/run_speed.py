"""Speed and memory of run.py on GGUF files, against this machine's memory bandwidth.

    python bench/run_speed.py                      # the default model (SmolLM2-135M Q4_1)
    python bench/run_speed.py a.gguf b.gguf --runs 5 --gen-tokens 128

For each file: load time (fresh process), prompt processing of a 512-token prompt,
generation of 128 tokens (medians over --runs), peak RSS of a process that loads the
model and generates, and decode speed as a fraction of the bandwidth roofline: bandwidth
measured in the same run / bytes of weights read per generated token.
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


CHILD = """
import json, sys, time
t = time.perf_counter()
sys.path.insert(0, {root!r})
from twofile import run
m = run.load({path!r})
load = time.perf_counter() - t
m.tokenizer.eog_ids = set()
list(m.generate(m.tokenize("Hello"), max_tokens={n}, temperature=0))
# VmHWM, not ru_maxrss: the latter can carry the parent's peak across vfork + exec
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print(json.dumps({{"load": load, "rss": int(hwm.split()[1]) * 1024}}))
"""


def child_load_and_rss(path: str, gen_tokens: int) -> dict:
    code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), path=path, n=gen_tokens)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_file(path: str, runs: int, gen_tokens: int, bandwidth: float) -> dict:
    children = [child_load_and_rss(path, 16) for _ in range(runs)]
    model = run.load(path)
    prompt = model.tokenize(PROMPT * 40)[:512]
    pp = []
    for _ in range(runs):
        model.cache_ids = []  # no prefix reuse: the whole prompt runs each time
        t = time.perf_counter()
        model._prefill(prompt)
        pp.append(len(prompt) / (time.perf_counter() - t))
    model.tokenizer.eog_ids = set()  # generate exactly gen_tokens
    tg = []
    for _ in range(runs):
        gen = model.generate(model.tokenize("Once upon a time"), max_tokens=gen_tokens, temperature=0)
        next(gen)  # the prompt and the first token are not generation speed
        t = time.perf_counter()
        n = sum(1 for _ in gen)
        tg.append(n / (time.perf_counter() - t))
    per_token = bytes_per_token(model)
    roofline = bandwidth * 1e9 / per_token
    return {"file": Path(path).name, "size_mb": os.path.getsize(path) / 1e6,
            "load_s": statistics.median(c["load"] for c in children),
            "prompt_tok_s": statistics.median(pp), "gen_tok_s": statistics.median(tg),
            "weights_mb_per_token": per_token / 1e6, "roofline_tok_s": roofline,
            "roofline_fraction": statistics.median(tg) / roofline,
            "peak_rss_mb": max(c["rss"] for c in children) / 1e6}


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, numpy {np.__version__}, Python {platform.python_version()}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", help="GGUF files (default: the default model)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--gen-tokens", type=int, default=128)
    args = p.parse_args()
    models = args.models or [str(assets.fetch(assets.DEFAULT_MODEL))]
    print(f"machine: {machine()}")
    bandwidth = memory_bandwidth(5)
    print(f"memory bandwidth (numpy copy of 1 GiB, read + write): {bandwidth:.1f} GB/s")
    header = ("file", "MB", "load s", "pp512 tok/s", f"tg{args.gen_tokens} tok/s", "MB/token", "roofline tok/s",
              "of roofline", "peak RSS MB")
    print(" | ".join(header))
    for path in models:
        r = bench_file(path, args.runs, args.gen_tokens, bandwidth)
        print(f"{r['file']} | {r['size_mb']:.0f} | {r['load_s']:.2f} | {r['prompt_tok_s']:.1f} | "
              f"{r['gen_tok_s']:.2f} | {r['weights_mb_per_token']:.0f} | {r['roofline_tok_s']:.0f} | "
              f"{r['roofline_fraction']:.1%} | {r['peak_rss_mb']:.0f}", flush=True)


if __name__ == "__main__":
    main()

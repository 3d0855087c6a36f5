"""`twofile serve` under load: time to first token and tokens/s at 1, 4, 8 and 16 clients.

    python bench/serve_load.py                       # the default model, --parallel 16
    python bench/serve_load.py MODEL.gguf --clients 1 8 --requests 4 --max-tokens 64

Each client sends streamed completions one after another (a short prompt, --max-tokens new
tokens at temperature 0.8 with a fixed seed per request) and times the first
token and the last. Reported per level: p50/p95 time to first token, the median per-stream
speed (tokens after the first / time after the first), and the aggregate speed (all tokens /
the level's wall time). The target (issue 10): 8 clients' aggregate at least 3x one client's,
and p50 time to first token under 0.5 s at 8 clients. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import Server

from bench.run_speed import machine
from twofile import assets


def one_request(url: str, seed: int, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, seconds from the first token to the last, completion tokens)."""
    body = {"prompt": "Once upon a time, in a small village by the sea,", "max_tokens": max_tokens,
            "temperature": 0.8, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
    return first - start, last - first, tokens


def level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    def client(c):
        return [one_request(url, 1000 * c + i, max_tokens) for i in range(requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {"clients": clients, "ttft_p50": statistics.median(ttft), "ttft_p95": ttft[int(0.95 * (len(ttft) - 1))],
            "stream_tok_s": statistics.median((r[2] - 1) / r[1] for r in results if r[1] > 0),
            "aggregate_tok_s": sum(r[2] for r in results) / wall}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16],
                   help="concurrent clients, one level each (default: 1 4 8 16)")
    p.add_argument("--requests", type=int, default=3, help="requests per client per level (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: %(default)s)")
    p.add_argument("--parallel", type=int, default=16, help="the server's --parallel (default: %(default)s)")
    args = p.parse_args()
    model = args.model or str(assets.fetch(assets.DEFAULT_MODEL))
    server = Server(model, "--parallel", str(args.parallel))
    try:
        one_request(server.url, 0, 8)  # warm: kernels compiled, caches allocated
        rows = [level(server.url, c, args.requests, args.max_tokens) for c in args.clients]
    finally:
        server.stop()
    print(f"twofile serve, {Path(model).name}, --parallel {args.parallel}, {args.max_tokens} tokens per request, "
          f"{machine()}")
    print("| clients | TTFT p50 | TTFT p95 | per stream tok/s | aggregate tok/s | vs 1 client |")
    print("|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["aggregate_tok_s"] if rows[0]["clients"] == 1 else None
    for r in rows:
        ratio = f"{r['aggregate_tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['clients']} | {r['ttft_p50']:.3f} s | {r['ttft_p95']:.3f} s | {r['stream_tok_s']:.1f} | "
              f"{r['aggregate_tok_s']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()

"""`twofile serve` under load: time to first token and tokens/s at 1, 4, 8 and 16 clients,
then a mixed load that checks the server holds up.

    python bench/serve_load.py                       # the default model, --parallel 16
    python bench/serve_load.py MODEL.gguf --clients 1 8 --requests 4 --max-tokens 64

Each client sends streamed completions one after another (a short prompt, --max-tokens new
tokens at temperature 0.8 with a fixed seed per request) and times the first
token and the last. Reported per level: p50/p95 time to first token, the median per-stream
speed (tokens after the first / time after the first), and the aggregate speed (all tokens /
the level's wall time). The target (issue 10): 8 clients' aggregate at least 3x one client's,
and p50 time to first token under 0.5 s at 8 clients. Nothing else should run meanwhile.

The mixed load (tests/test_serve.py runs a smaller one): --mixed-requests chat requests from 16
clients, 40% streamed, 40% whole, 10% streamed and dropped after 3 events, 10% malformed. It
reports any 5xx, any valid answer that is incomplete or malformed, and the server's resident
memory before and after (a first round of 16 requests warms it up).
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
import numpy as np
import psutil

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


def mixed_load(url: str, pid: int, requests: int, clients: int = 16) -> dict:
    """The mixed load; returns the kinds of the requests that failed, the server's 5xx
    counts from its metrics and its resident memory (MB) before and after."""
    rng = np.random.default_rng(0)
    kinds = rng.choice(["stream", "whole", "cancel", "bad"], size=requests, p=[0.4, 0.4, 0.1, 0.1])
    lengths = rng.integers(4, 24, size=requests)

    def one(i, kind) -> bool:
        body = {"messages": [{"role": "user", "content": f"Say hello to person {i}."}],
                "max_tokens": int(lengths[i % requests]), "temperature": 0.7, "seed": i}
        with httpx.Client(base_url=url, timeout=600) as h:
            if kind == "bad":
                r = h.post("/v1/chat/completions", json={**body, "temperature": "hot"})
                return r.status_code == 400 and r.json()["error"]["param"] == "temperature"
            if kind == "whole":
                r = h.post("/v1/chat/completions", json=body)
                choice = r.json()["choices"][0] if r.status_code == 200 else {}
                return choice.get("finish_reason") in ("stop", "length") and isinstance(choice["message"]["content"], str)
            with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                if r.status_code != 200:
                    return False
                events = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if kind == "cancel" and len(events) == 3:
                            return True  # the client goes away mid-stream
                return events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] is not None

    server = psutil.Process(pid)
    with ThreadPoolExecutor(clients) as pool:  # warm-up: slots' caches and the pools reach their size
        list(pool.map(one, range(clients), kinds[:clients]))
    before = server.memory_info().rss / 2**20
    with ThreadPoolExecutor(clients) as pool:
        ok = list(pool.map(one, range(requests), kinds))
    after = server.memory_info().rss / 2**20
    errors = [line for line in httpx.get(url + "/metrics").text.splitlines()
              if line.startswith("twofile_requests_total") and 'status="5' in line and "/health" not in line]
    return {"failed": [str(k) for k, good in zip(kinds, ok) if not good], "5xx": errors,
            "rss_before": before, "rss_after": after}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16],
                   help="concurrent clients, one level each (default: 1 4 8 16)")
    p.add_argument("--requests", type=int, default=3, help="requests per client per level (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: %(default)s)")
    p.add_argument("--parallel", type=int, default=16, help="the server's --parallel (default: %(default)s)")
    p.add_argument("--mixed-requests", type=int, default=300,
                   help="requests of the mixed load; 0 skips it (default: %(default)s)")
    args = p.parse_args()
    model = args.model or str(assets.fetch(assets.DEFAULT_MODEL))
    server = Server(model, "--parallel", str(args.parallel))
    try:
        one_request(server.url, 0, 8)  # warm: kernels compiled, caches allocated
        rows = [level(server.url, c, args.requests, args.max_tokens) for c in args.clients]
        mixed = mixed_load(server.url, server.proc.pid, args.mixed_requests) if args.mixed_requests else None
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
    if mixed:
        print(f"mixed load, {args.mixed_requests} requests from 16 clients: {len(mixed['failed'])} failed "
              f"{mixed['failed']}, 5xx: {mixed['5xx'] or 'none'}, server RSS {mixed['rss_before']:.0f} MB before, "
              f"{mixed['rss_after']:.0f} MB after")


if __name__ == "__main__":
    main()

"""Speed of tokenizer training and of `prepare` on the default corpus, and the compression
(UTF-8 bytes per token of validation text) of tokenizers of several sizes.

    python bench/data_speed.py                # medians of 3 runs
    python bench/data_speed.py --runs 5 --vocab-sizes 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twofile import assets, data, tokenizer  # noqa: E402
from bench.run_speed import machine  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    args = p.parse_args()
    corpus = str(assets.fetch(assets.DEFAULT_CORPUS))
    sources = data.expand([corpus])
    val = data.validation_files(sources, 0.01)
    megabytes = sum(s.size for s in sources) / 1e6
    train_texts = [t for name, t, _ in data.read_documents(sources) if name not in val]
    val_text = "".join(t for name, t, _ in data.read_documents(sources) if name in val)
    print(f"machine: {machine()}")
    print(f"corpus: {len(sources)} files, {megabytes:.2f} MB; validation: {', '.join(sorted(val))} "
          f"({len(val_text.encode()) / 1e6:.2f} MB)")
    print("vocab | train s (median) | train MB/s | prepare s (median) | prepare MB/s | val bytes/token")
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocab_sizes:
            train_times, prepare_times = [], []
            for _ in range(args.runs):
                t = time.perf_counter()
                tok = tokenizer.train(iter(train_texts), vocab, show_progress=False)
                train_times.append(time.perf_counter() - t)
            path = os.path.join(tmp, f"tok{vocab}.json")
            tokenizer.save(tok, path)
            for run in range(args.runs):
                t = time.perf_counter()
                data.prepare([corpus], path, os.path.join(tmp, f"d{vocab}-{run}"), progress=False)
                prepare_times.append(time.perf_counter() - t)
            n_tokens = len(tok.encode(val_text, add_special_tokens=False).ids)
            train_s, prepare_s = statistics.median(train_times), statistics.median(prepare_times)
            print(f"{vocab} | {train_s:.2f} | {megabytes / train_s:.2f} | {prepare_s:.2f} | "
                  f"{megabytes / prepare_s:.2f} | {len(val_text.encode()) / n_tokens:.3f}", flush=True)


if __name__ == "__main__":
    main()

"""Training quality: validation bits per byte (the held-out play of the default corpus) after
a training budget on this machine, for several seeds and budgets, with `twofile train`'s
configuration or overrides of it.

    python bench/train_quality.py                              # 3 seeds x 5 minutes, the defaults
    python bench/train_quality.py --time 5 15 30 60 --plot curve.png
    python bench/train_quality.py --seeds 0 --set depth=6 dropout=0.1 --train-tokens 200000
    python bench/train_quality.py --set precision=float32 compile=false depth=4   # the old defaults

--time is in minutes. --train-tokens keeps only the first N training tokens (a smaller corpus:
what many passes over the data do, in a short run). --data takes a folder from `twofile data
prepare` instead of the default corpus (its tokenizer must be the default's for the figures to
compare; see bench/milton.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run_speed import machine  # noqa: E402
from twofile import data, train  # noqa: E402
from twofile.cli import DEFAULT_VOCAB  # noqa: E402


def parse_overrides(items: list[str]) -> dict:
    types = {f.name: f.type for f in fields(train.TrainConfig)}
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types:
            raise SystemExit(f"--set {item}: TrainConfig has no field {key!r}")
        kind = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true"), "str": str}[types[key]]
        overrides[key] = kind(value)
    return overrides


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
    p.add_argument("--time", type=float, nargs="+", default=[5.0], help="minutes of training per run (default: 5)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="(default: %(default)s)")
    p.add_argument("--data", default=None, help="a prepared folder (default: the default corpus)")
    p.add_argument("--train-tokens", type=int, default=0, help="use only the first N training tokens (default: all)")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override TrainConfig fields, e.g. depth=4 lr=0.002 (default: none)")
    p.add_argument("--plot", default=None, help="write the curve of bits per byte against minutes here (default: none)")
    p.add_argument("--json", default=None, help="append each run's result here as a JSON line (default: none)")
    args = p.parse_args()
    folder = args.data or train.default_data(args.vocab_size)
    overrides = parse_overrides(args.set)
    if args.train_tokens:
        whole = data.open_split

        def open_split(path, split):  # the first N tokens of the training split, the validation whole
            shards = whole(path, split)
            if split != "train":
                return shards
            kept, left = [], args.train_tokens
            for s in shards:
                kept.append(s[:left])
                left -= len(kept[-1])
            return [s for s in kept if len(s)]

        data.open_split = open_split
    print(f"machine: {machine()}; data {folder}" + (f", first {args.train_tokens:,} training tokens" if args.train_tokens
                                                    else ""))
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.time:
            results = []
            for seed in args.seeds:
                cfg = train.TrainConfig(data=folder, out=f"{tmp}/{minutes}-{seed}", **{
                    "seed": seed, "max_steps": 0, "time_budget": minutes * 60, **overrides})
                r = train.train(cfg, progress=False)
                stored = json.loads((train.best_checkpoint(cfg.out) / "state.json").read_text())
                results.append({**r, "best_val_bpb": stored["best"]["val_bpb"], "best_step": stored["step"],
                                "config": stored["train_config"]})
                print(f"{minutes:g} min, seed {seed}: best validation bits per byte {results[-1]['best_val_bpb']:.4f} "
                      f"(step {stored['step']} of {r['step']}; last {r['val_bpb']:.4f}) after {r['tokens']:,} tokens, "
                      f"{r['tok_s']:,.0f} tok/s; time shares {r.get('shares')}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"minutes": minutes, "seed": seed, "set": args.set,
                                            "train_tokens": args.train_tokens, **results[-1]}) + "\n")
            config = {k: v for k, v in results[-1]["config"].items() if k not in ("data", "out", "seed")}
            print(f"configuration: vocab {args.vocab_size}, {config}")
            bpbs = [r["best_val_bpb"] for r in results]
            medians[minutes] = statistics.median(bpbs)
            print(f"{minutes:g} min: median best validation bits per byte over {len(bpbs)} seeds: "
                  f"{medians[minutes]:.4f} (min {min(bpbs):.4f}, max {max(bpbs):.4f})", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(list(medians), list(medians.values()), "o-", label=f"twofile train --time (median of {len(args.seeds)})")
        ax.set_xscale("log")
        ax.set_xticks(list(medians), [f"{m:g}" for m in medians])
        ax.set_xlabel(f"training minutes ({machine()})")
        ax.set_ylabel("validation bits per byte (held-out play)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"curve: {args.plot}")


if __name__ == "__main__":
    main()

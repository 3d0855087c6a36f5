"""The default run's quality: validation bits per byte after a 5-minute training budget on
this machine, for several seeds, with the configuration used (the `twofile train` defaults).

    python bench/train_quality.py                   # 3 seeds x 5 minutes
    python bench/train_quality.py --seeds 0 --time 60 --depth 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run_speed import machine  # noqa: E402
from twofile import train  # noqa: E402
from twofile.cli import DEFAULT_VOCAB  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--time", type=float, default=300.0, help="training seconds per run")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override TrainConfig fields, e.g. depth=4 lr=0.002")
    args = p.parse_args()
    folder = train.default_data(args.vocab_size)
    overrides = {}
    types = {f.name: f.type for f in fields(train.TrainConfig)}
    for item in args.set:
        key, _, value = item.partition("=")
        kind = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true"), "str": str}[types[key]]
        overrides[key] = kind(value)
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = train.TrainConfig(data=folder, out=f"{tmp}/seed{seed}", seed=seed, max_steps=0,
                                    time_budget=args.time, **overrides)
            r = train.train(cfg, progress=False)
            results.append(r)
            print(f"seed {seed}: validation bits per byte {r['val_bpb']:.4f} (loss {r['val_loss']:.4f}) after "
                  f"{r['tokens']:,} tokens, {r['step']} steps, {r['tok_s']:,.0f} tok/s", flush=True)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "seed")}
    print(f"configuration: vocab {args.vocab_size}, {config}")
    bpbs = [r["val_bpb"] for r in results]
    print(f"median validation bits per byte over {len(bpbs)} seeds: {statistics.median(bpbs):.4f} "
          f"(min {min(bpbs):.4f}, max {max(bpbs):.4f})")


if __name__ == "__main__":
    main()

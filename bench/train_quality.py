"""Training quality: validation bits per byte (the held-out play of the default corpus) after
a training budget on this machine, for several seeds and budgets, with `twofile train`'s
configuration or overrides of it.

    python bench/train_quality.py                              # 3 seeds x 5 minutes, the defaults
    python bench/train_quality.py --time 5 15 30 60 --plot curve.png
    python bench/train_quality.py --seeds 0 --set depth=6 dropout=0.1 --train-tokens 200000
    python bench/train_quality.py --set precision=float32 compile=false depth=4 weight_decay=0 dropout=0  # old defaults
    python bench/train_quality.py --replot --json runs.jsonl --plot curve.png   # redraw, training nothing

--time is in minutes. --train-tokens keeps only the first N training tokens (a smaller corpus:
what many passes over the data do, in a short run). --data takes a folder from `twofile data
prepare` instead of the default corpus; its tokenizer must be the default's for the figures to
compare, e.g. Shakespeare and Milton (the validation play stays the same):

    twofile data prepare ~/.cache/twofile/shakespeare ~/.cache/twofile/milton \
        --tokenizer ~/.cache/twofile/tokenizer-shakespeare-4096.json -o runs/data-milton
    python bench/train_quality.py --data runs/data-milton
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
    p.add_argument("--replot", action="store_true",
                   help="train nothing: draw --plot from the runs already in --json, one line per --set (default: off)")
    args = p.parse_args()
    if args.replot:
        if not (args.plot and args.json and Path(args.json).is_file()):
            raise SystemExit(f"--replot needs --plot and an existing --json file (got --plot {args.plot}, --json {args.json})")
        return plot(args.plot, [json.loads(line) for line in Path(args.json).read_text().splitlines() if line.strip()])
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
    medians, runs = {}, []
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
                runs.append({"minutes": minutes, "seed": seed, "set": args.set, **results[-1]})
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
        plot(args.plot, runs)


def plot(path: str, runs: list[dict]):
    """Median best validation bits per byte against minutes, one line per configuration, every seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    lines: dict[str, dict[float, list[float]]] = {}
    for r in runs:
        label = " ".join(r["set"]) or "twofile train --time (defaults)"
        lines.setdefault(label, {}).setdefault(r["minutes"], []).append(r["best_val_bpb"])
    for label, points in lines.items():
        xs = sorted(points)
        ys = [statistics.median(points[x]) for x in xs]
        (line,) = ax.plot(xs, ys, "o-", label=label)
        for x, y in zip(xs, ys):  # each seed a faint dot, so the spread behind a median shows
            n = len(points[x])
            ax.plot([x] * n, points[x], ".", color=line.get_color(), alpha=0.4)
            ax.annotate(f"{y:.3f}" + (f" (median of {n})" if n > 1 else ""), (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    xs = sorted({r["minutes"] for r in runs})
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{m:g}" for m in xs])
    ax.set_xticks([], minor=True)  # no log-scale minor labels between the budgets
    ax.set_xlabel(f"training minutes ({machine()})", fontsize=8)
    ax.set_ylabel("best validation bits per byte (held-out play)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"curve: {path}")


if __name__ == "__main__":
    main()

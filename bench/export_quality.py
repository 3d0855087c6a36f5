"""What quantized export costs: for each GGUF type, file size, validation bits per byte
(run.py on the held-out text of the run's data) and top-1 agreement with the f32 file.

    python bench/export_quality.py out              # a run folder from `twofile train`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twofile import data, export, run  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_folder")
    p.add_argument("--types", nargs="+", default=list(export.TYPES))
    args = p.parse_args()
    state = json.loads((export.chosen_checkpoint(args.run_folder) / "state.json").read_text())
    folder = state["train_config"]["data"]
    text_tokens = np.concatenate(data.open_split(folder, "val")).astype(np.int64).tolist()
    bos = data.load_manifest(folder)["bos_id"]  # BOS targets have no bytes: left out, as train.evaluate does
    print(f"run {args.run_folder}: step {state['step']}, {state['tokens']:,} tokens; validation: "
          f"{len(text_tokens):,} tokens of {folder}")
    print("type | MB | val bits/byte | change vs f32 | top-1 agreement with f32")
    val_bytes = data.load_manifest(folder)["splits"]["val"]["bytes"]
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for ftype in args.types:
            path = export.export(args.run_folder, Path(tmp) / f"{ftype}.gguf", ftype)
            model = run.load(path)
            n_ctx, nats, top1 = model.n_ctx, 0.0, []
            for start in range(0, len(text_tokens) - 1, n_ctx):
                window = text_tokens[start:start + n_ctx + 1]
                logits = model.logits(window[:-1])
                logprobs = run.log_softmax(logits)[np.arange(len(window) - 1), window[1:]]
                nats -= float(logprobs[np.array(window[1:]) != bos].sum())
                top1.append(logits.argmax(-1))
            top1 = np.concatenate(top1)
            bpb = nats / val_bytes / np.log(2)
            if reference is None:
                reference = (bpb, top1)
            print(f"{ftype} | {os.path.getsize(path) / 1e6:.1f} | {bpb:.4f} | {bpb - reference[0]:+.4f} | "
                  f"{(top1 == reference[1]).mean():.2%}", flush=True)


if __name__ == "__main__":
    main()

"""How to batch conversations for finetuning, measured: packing (finetune.py's way: a step's
conversations packed first-fit into rows of at most --context tokens, positions restarting at
each, attention within each; micro-batches of --micro-batch rows) against padding (the step's
conversations sorted by length, micro-batches of --micro-batch conversations padded to their
longest, plain causal attention). Both bound a pass at micro-batch x context positions.

Reports the share of computed positions that are padding, and real (not padding) tokens per
second of forward and backward with LoRA, the two ways interleaved round after round (the
machine drifts), median over rounds.

    python bench/finetune_batching.py                       # SmolLM2-135M, ShareGPT, context 384
    python bench/finetune_batching.py --model gemma3-270m --context 384 --steps 3
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twofile import assets, finetune, run  # noqa: E402
from twofile.model import load_gguf  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default="smollm2", help="a name of assets.MODELS or a .gguf file (default: smollm2)")
p.add_argument("--context", type=int, default=384, help="tokens per row (default: 384)")
p.add_argument("--batch-size", type=int, default=16, help="conversations per step (default: 16)")
p.add_argument("--micro-batch", type=int, default=4, help="rows per pass (default: 4)")
p.add_argument("--steps", type=int, default=4, help="steps timed per round (default: 4)")
p.add_argument("--rounds", type=int, default=3, help="rounds, each way once per round (default: 3)")
p.add_argument("--lora", type=int, default=16, help="LoRA rank (default: 16)")
args = p.parse_args()
torch.manual_seed(0)

path = args.model if args.model.endswith(".gguf") else assets.model_path(args.model)
model, meta = load_gguf(path, n_ctx=args.context)
meta = {**meta, "tokenizer.chat_template": finetune.chat_template(meta, path)}
tok = run.Tokenizer(meta, path)
conversations = finetune.load_conversations(str(assets.fetch(assets.SHAREGPT))).train
encoded = []
for i in np.random.default_rng(0).permutation(len(conversations)):
    e = finetune.encode(tok, meta, conversations[i], args.context)
    if e is not None and e[1][1:].any():
        encoded.append(e)
    if len(encoded) == args.batch_size * args.steps:
        break
steps = [encoded[s:s + args.batch_size] for s in range(0, len(encoded), args.batch_size)]


def padded(step):
    step = sorted(step, key=lambda c: len(c[0]))
    return [[[c] for c in step[a:a + args.micro_batch]] for a in range(0, len(step), args.micro_batch)]


def packed(step):
    rows = sorted(finetune.pack(step, args.context), key=lambda row: sum(len(c[0]) for c in row))
    return [rows[a:a + args.micro_batch] for a in range(0, len(rows), args.micro_batch)]


real = sum(len(c[0]) - 1 for c in encoded)
for name, way in (("padding", padded), ("packing", packed)):
    computed = sum(len(g) * max(sum(len(c[0]) - 1 for c in row) for row in g) for s in steps for g in way(s))
    print(f"{name}: {computed - real} of {computed} computed positions are padding ({1 - real / computed:.1%})")

model = finetune.with_lora(model, args.lora)
rates = {"padding": [], "packing": []}
for r in range(args.rounds):
    for name, way in (("padding", padded), ("packing", packed)):
        t = time.perf_counter()
        for step in steps:
            for group in way(step):
                _, loss = model(**finetune.micro_batch(group, 0), reduction="sum")
                loss.backward()
        rates[name].append(real / (time.perf_counter() - t))
        print(f"round {r + 1} {name}: {rates[name][-1]:.0f} real tokens/s", flush=True)
a, b = statistics.median(rates["padding"]), statistics.median(rates["packing"])
print(f"{path}, context {args.context}, {len(encoded)} conversations, steps of {args.batch_size}, micro-batches "
      f"of {args.micro_batch}, LoRA {args.lora}: padding {a:.0f}, packing {b:.0f} real tokens/s (median of "
      f"{args.rounds}); packing / padding {b / a:.2f}")

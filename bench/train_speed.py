"""Training throughput: tokens/s and MFU of forward + backward + optimizer step.

    python bench/train_speed.py                     # CPU: depths 4/6/8, float32 vs bf16, compile off/on
    python bench/train_speed.py --device cuda --depths 8 12 16 --micro-batch 64 --context 1024 --precisions bfloat16

MFU is measured against the peak the training loop uses for that precision (a 2048x2048
product timed here in it, or the known dense bf16 peak of common GPUs). Medians of --steps
timed steps after warmup; "first steps" are the untimed ones (with compile: compilation; run it
twice to see a cached compile). Muon's Newton-Schulz runs as in training, in bf16 where the
hardware has it, whatever the precision of the model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run_speed import machine  # noqa: E402
from twofile import train  # noqa: E402
from twofile.model import ModelConfig, Transformer  # noqa: E402


def measure(depth, optimizer, compile_, device, micro_batch, context, vocab, steps, dtype) -> tuple[float, float, float]:
    """Tokens/s (median of `steps` timed steps), FLOP/s, and the seconds of the untimed first
    steps (with compile: compilation)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_depth(depth, vocab, context)).to(device)
    cfg = train.TrainConfig(data="", optimizer=optimizer)
    optimizers = train.make_optimizer(model, cfg)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randint(0, vocab, (micro_batch, context), device=device)
    times = train.timed_steps(step_model, optimizers, x, x, steps + (3 if compile_ else 2), dtype)
    tok_s = micro_batch * context / statistics.median(times[-steps:])
    return tok_s, model.flops_per_token() * tok_s, sum(times[:-steps])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="(default: cuda if there is one, else cpu)")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8], help="(default: 4 6 8)")
    p.add_argument("--micro-batch", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--context", type=int, default=128, help="(default: %(default)s)")
    p.add_argument("--vocab", type=int, default=4096, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default: %(default)s)")
    p.add_argument("--optimizers", nargs="+", default=["muon"], choices=["muon", "adamw"], help="(default: muon)")
    p.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                   help="(default: float32 bfloat16)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows (default: off)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtypes = {"float32": None, "bfloat16": torch.bfloat16}
    peaks = {name: train.peak_flops(device, dtypes[name]) for name in args.precisions}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; peaks for MFU (a "
          f"2048x2048 product timed here, or a GPU's known dense bf16 peak): "
          + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peaks.items())
          + f"; micro-batch {args.micro_batch} x context {args.context}")
    print("depth | params | optimizer | precision | compile | tok/s | TFLOP/s | MFU | first steps")
    for depth in args.depths:
        params = Transformer(ModelConfig.from_depth(depth, args.vocab, args.context)).num_params()
        for optimizer in args.optimizers:
            for precision in args.precisions:
                for compile_ in ((False,) if args.no_compile else (False, True)):
                    tok_s, flops, first = measure(depth, optimizer, compile_, device, args.micro_batch, args.context,
                                                  args.vocab, args.steps, dtypes[precision])
                    print(f"{depth} | {params / 1e6:.1f}M | {optimizer} | {precision} | {'on' if compile_ else 'off'} | "
                          f"{tok_s:,.0f} | {flops / 1e12:.3f} | {flops / peaks[precision]:.1%} | {first:.1f} s",
                          flush=True)


if __name__ == "__main__":
    main()

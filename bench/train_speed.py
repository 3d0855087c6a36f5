"""Training throughput: tokens/s and MFU of forward + backward + optimizer step.

    python bench/train_speed.py                     # CPU: depths 4/6/8, AdamW vs Muon, compile off/on
    python bench/train_speed.py --device cuda --depths 8 12 16 --micro-batch 64 --context 1024

MFU is measured against the peak the training loop uses (a timed float32 matmul on CPU,
the known dense bf16 peak on common GPUs). Medians of --steps timed steps after warmup.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.run_speed import machine  # noqa: E402
from twofile import train  # noqa: E402
from twofile.model import ModelConfig, Transformer  # noqa: E402


def measure(depth, optimizer, compile_, device, micro_batch, context, vocab, steps) -> tuple[float, float]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_depth(depth, vocab, context)).to(device)
    cfg = train.TrainConfig(data="", optimizer=optimizer)
    optimizers = train.make_optimizer(model, cfg)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randint(0, vocab, (micro_batch, context), device=device)
    use_bf16 = device.type == "cuda"
    times = []
    for i in range(steps + (3 if compile_ else 2)):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            _, loss = step_model(x, x)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    tok_s = micro_batch * context / statistics.median(times[-steps:])
    return tok_s, model.flops_per_token() * tok_s


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8])
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args()
    device = torch.device(args.device)
    peak = train.peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"peak for MFU {peak / 1e12:.3f} TFLOP/s; micro-batch {args.micro_batch} x context {args.context}")
    print("depth | params | optimizer | compile | tok/s | TFLOP/s | MFU")
    for depth in args.depths:
        for optimizer in ("adamw", "muon"):
            for compile_ in ((False,) if args.no_compile else (False, True)):
                tok_s, flops = measure(depth, optimizer, compile_, device, args.micro_batch, args.context,
                                       args.vocab, args.steps)
                params = Transformer(ModelConfig.from_depth(depth, args.vocab, args.context)).num_params()
                print(f"{depth} | {params / 1e6:.1f}M | {optimizer} | {'on' if compile_ else 'off'} | {tok_s:,.0f} | "
                      f"{flops / 1e12:.3f} | {flops / peak:.1%}", flush=True)


if __name__ == "__main__":
    main()

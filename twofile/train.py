"""Pretraining: compress token shards into parameters by next-token prediction.

    twofile train                                    # the whole pipeline on the default corpus
    twofile train --data data/ --depth 8 --time 30m --out runs/d8
    twofile train --resume runs/d8                   # continues exactly where it stopped
    torchrun --nproc_per_node 4 -m twofile train --data data/ ...

What is not given is planned from the budget and the corpus (`plan`: the model's depth, and
regularization when the run will pass over the data many times); bf16 autocast where the
hardware multiplies bf16, torch.compile, the weights of the best validation kept for export.
One process or many (torchrun: DDP, gloo on CPU and NCCL on GPU, or FSDP2 with --fsdp).
Each optimizer step sees `batch_tokens` tokens, split into micro-batches across ranks and
accumulation steps; the data of micro-batch i of step s is a pure function of (seed, s, i),
so any number of ranks sees the same global batch, and a resumed run the same data.
Checkpoints (safetensors + JSON) are written to a temporary folder and renamed. Ctrl-C (or
the SIGTERM torchrun sends its workers) stops at the next step boundary with a checkpoint;
a step whose loss or gradient norm is not finite is not applied.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from twofile import data
from twofile.model import ModelConfig, Transformer


@dataclass
class TrainConfig:
    data: str                       # a folder from `twofile data prepare`
    out: str = "out"
    depth: int = 0                  # the model's one size knob (ModelConfig.from_depth); 0: planned (see plan)
    context: int = 128
    tie_embeddings: bool = True
    batch_tokens: int = 4096        # tokens per optimizer step, all ranks together
    micro_batch: int = 32           # sequences per forward/backward on one rank
    optimizer: str = "muon"         # Muon for hidden matrices (AdamW for embeddings, norms), or "adamw"
    lr: float = 3e-3
    schedule: str = "wsd"           # warmup-stable-decay, or "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.4     # wsd: the last part of training decays linearly to zero
    weight_decay: float = -1.0      # < 0: planned
    dropout: float = -1.0           # < 0: planned
    grad_clip: float = 1.0
    max_steps: int = 0              # 0: derived from the time budget
    time_budget: float = 300.0      # seconds of training (used when max_steps is 0)
    eval_every: int = 100
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    precision: str = "auto"         # see setup_runtime
    compile: bool = True            # torch.compile the training model (where a C++ compiler is found, on CPU)
    fsdp: bool = False


# ---------------------------------------------------------------------------
# Setup: processes, devices, precision
# ---------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # bfloat16, or None: float32

    @property
    def main(self) -> bool:
        return self.rank == 0


PRECISIONS = ("auto", "bfloat16", "float32")


def native_bf16(device: torch.device) -> bool:
    """Whether the hardware multiplies bfloat16 itself: CUDA, or a CPU with AVX-512 BF16 or
    AMX (oneDNN's test). Elsewhere bfloat16 products are emulated, many times slower."""
    return device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def setup_runtime(precision: str = "auto") -> Runtime:
    """Processes and device. precision "auto": bfloat16 autocast where the hardware multiplies
    bfloat16 natively (weights, gradients and optimizer state stay float32), else float32. On a
    2-core AMD EPYC with AVX-512 BF16, bfloat16 products run 4.2 times float32's (968 against
    217 GFLOP/s) and a depth-4 training step 2.1 times (bench/train_speed.py)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    if cuda:
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    bf16 = precision == "bfloat16" or (precision == "auto" and native_bf16(device))
    return Runtime(rank, world, device, torch.bfloat16 if bf16 else None)


def peak_flops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """The FLOP/s MFU is measured against: known dense bf16 peaks for common GPUs, else a
    large matrix multiply in the training's dtype (None: float32), timed here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("4090", 165e12)):
            if key in name:
                return peak
    n = 2048  # large enough for the BLAS to reach its best; the fastest of several runs
    g = torch.Generator(device).manual_seed(0)  # not the global generator: a resumed run's must not move
    a, b = (torch.randn(n, n, device=device, generator=g).to(dtype or torch.float32) for _ in range(2))
    times = []
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times[1:])


# ---------------------------------------------------------------------------
# The plan: what the budget and the corpus call for
# ---------------------------------------------------------------------------

PLANNED = ("depth", "weight_decay", "dropout")  # left to plan when 0 (depth) or negative


def planned(cfg: TrainConfig, name: str) -> bool:
    return getattr(cfg, name) <= 0 if name == "depth" else getattr(cfg, name) < 0


def expected_tokens(cfg: TrainConfig, depth: int, vocab_size: int, flops_per_s: float) -> float:
    """The tokens a run will see: its step budget's, or its time budget's at the training
    FLOP/s measured here (`training_flops`), times what compilation gains."""
    if cfg.max_steps:
        return cfg.max_steps * cfg.batch_tokens
    c = ModelConfig.from_depth(depth, vocab_size, cfg.context, tie_embeddings=cfg.tie_embeddings)
    return cfg.time_budget * flops_per_s * (COMPILE_GAIN if cfg.compile else 1.0) / _flops_per_token(c)


def timed_steps(model, optimizers, x: torch.Tensor, y: torch.Tensor, steps: int, dtype) -> list[float]:
    """Seconds of each of `steps` whole training steps (forward under autocast to `dtype` when
    it is not None, backward, optimizer) on one batch; shared with bench/train_speed.py."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, targets=y)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def training_flops(cfg: TrainConfig, rt: Runtime, vocab_size: int, steps: int = 6) -> float:
    """The FLOP/s training reaches here: uncompiled steps (forward, backward, optimizer) of a
    depth-PROBE_DEPTH model with the run's micro-batch, context, precision and optimizer, the
    fastest after two warm-up ones (bf16's first steps are slower); 2 s on 2 cores. A matrix
    multiply's peak cannot say this: a 256-wide model reaches 10 to 20% of it with bf16 on AMX
    and 60% in float32 on AVX2. All ranks take the slowest rank's figure, so they plan the
    same model."""
    c = ModelConfig.from_depth(PROBE_DEPTH, vocab_size, cfg.context, tie_embeddings=cfg.tie_embeddings)
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):  # the run's RNG stays
        torch.manual_seed(0)
        model = Transformer(c).to(rt.device)
        optimizers = make_optimizer(model, replace(cfg, weight_decay=0.0))
        idx = torch.randint(0, vocab_size, (cfg.micro_batch, cfg.context + 1), device=rt.device)
        times = timed_steps(model, optimizers, idx[:, :-1], idx[:, 1:], steps, rt.autocast_dtype)
    flops = torch.tensor(_flops_per_token(c) * idx[:, 1:].numel() / min(times[2:]), device=rt.device)
    if rt.world > 1:
        dist.all_reduce(flops, op=dist.ReduceOp.MIN)
    return float(flops)


def plan(cfg: TrainConfig, unique_tokens: int, vocab_size: int, flops_per_s: float) -> TrainConfig:
    """The configuration with the settings left to the run filled in, from the tokens training
    will see against the unique tokens of the corpus. The deepest model that still sees
    TOKENS_PER_PARAM tokens per parameter wins (a larger one sees too few in the budget), but
    none with more than PARAMS_PER_UNIQUE_TOKEN parameters per token of the corpus (past that a
    longer budget buys passes over text the model memorizes instead of a better model); weight
    decay and dropout come in past REGULARIZE_AFTER passes over the data, where a model starts
    to memorize its corpus, and weight decay doubles past twice that many. The rules and their
    constants come from measurements on the default corpus (README, "What moved the number")."""
    chosen = {}
    if planned(cfg, "depth"):
        def params(depth: int) -> float:  # the weights a token's FLOPs count (embeddings: once)
            return _flops_per_token(ModelConfig.from_depth(depth, vocab_size, cfg.context,
                                                           tie_embeddings=cfg.tie_embeddings)) / 6

        fits = [d for d in range(2, MAX_DEPTH + 1)
                if expected_tokens(cfg, d, vocab_size, flops_per_s) >= TOKENS_PER_PARAM * params(d)
                and params(d) <= PARAMS_PER_UNIQUE_TOKEN * unique_tokens]
        chosen["depth"] = max(fits, default=2)
    passes = expected_tokens(cfg, chosen.get("depth", cfg.depth), vocab_size, flops_per_s) / max(unique_tokens, 1)
    if planned(cfg, "weight_decay"):
        chosen["weight_decay"] = WEIGHT_DECAY * (0 if passes <= REGULARIZE_AFTER else
                                                 1 if passes <= 2 * REGULARIZE_AFTER else 2)
    if planned(cfg, "dropout"):
        chosen["dropout"] = 0.0 if passes <= REGULARIZE_AFTER else DROPOUT
    return replace(cfg, **chosen)


# Measured at 5 minutes on 2 cores: depth 4 (1.9 tokens per parameter) 1.770 bits per byte,
# depth 6 (0.5) 1.801, depth 8 (0.06) 1.979. Depth 6 on a 300K-token slice (8 passes): 2.317
# at its best (2.7 passes, then worse), 2.295 with both and still improving at the end; weight
# decay alone 2.332, dropout alone 2.317.
PROBE_DEPTH = 4  # deeper models reach more FLOP/s (wider products): their tokens are underestimated
# Compiled runs saw 1.2 to 1.3 times the probe's tokens at depth 4 in 5 minutes and 1.48 times
# at depth 5 in 15 (evaluation and compilation included; Intel Xeon with AMX, bf16). Without
# it the 15-minute plan expected 3.9 passes, so no regularization; the run made 5.7 and
# overfit (1.818 bits per byte, worse than 5 minutes' 1.770).
COMPILE_GAIN = 1.3
TOKENS_PER_PARAM = 1.0
# At 60 minutes on the 1.45M-token default corpus, depth 7 (7.3 parameters per unique token)
# scored 1.716 and depth 6 (4.0) 1.697, better than 30 minutes' depth 6 (1.699).
PARAMS_PER_UNIQUE_TOKEN = 5.0
MAX_DEPTH = 12
REGULARIZE_AFTER = 4.0  # passes over the data (overfitting began at 2.7 in the slice above)
WEIGHT_DECAY = 0.5      # decoupled: each step shrinks the matrices by lr x 0.5
# Past 8 passes (2 x REGULARIZE_AFTER) weight decay doubles: at depth 6, 1.0 instead of 0.5
# scored a median of 1.682 against 1.703 at 60 minutes (16 passes, 3 seeds) and 1.689 against
# 1.699 at 30 (8.5 passes; seed 0 at 0.5).
DROPOUT = 0.1


def _flops_per_token(c: ModelConfig) -> float:
    with torch.device("meta"):  # sizes only: no memory, no time
        return Transformer(c).flops_per_token()


# ---------------------------------------------------------------------------
# Optimizers and learning-rate schedule
# ---------------------------------------------------------------------------

class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's algorithm and state (momentum with Nesterov, five quintic
    Newton-Schulz steps that orthogonalize the update, decoupled weight decay, the
    "match_rms_adamw" learning-rate scale), with the Newton-Schulz products in `ns_dtype`.
    torch runs them in bfloat16, which CPUs without native bf16 products emulate about 100
    times slower than float32 (a 256 x 704 product: 80 ms against 0.7 ms on a 2-core AMD
    EPYC with AVX2 only), making Muon 5 times slower than AdamW there; make_optimizer picks
    bfloat16 where the hardware has it (native_bf16), as torch does, else float32.
    Checkpoints of either load into the other."""

    def __init__(self, params, lr: float, weight_decay: float, ns_dtype: torch.dtype, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=(3.4445, -4.775, 2.0315), eps: float = 1e-7, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            a, b, c = group["ns_coefficients"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                x = update.to(self.ns_dtype)
                wide = x.T if x.size(0) > x.size(1) else x  # iterate on the smaller Gram matrix
                wide = wide / wide.norm().clamp(min=group["eps"])  # spectral norm at most 1
                for _ in range(group["ns_steps"]):
                    gram = wide @ wide.T
                    wide = torch.addmm(wide, torch.addmm(gram, gram, gram, beta=b, alpha=c), wide, beta=a)
                x = wide.T if x.size(0) > x.size(1) else wide
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(x, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape[:2])))  # RMS of AdamW's steps


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith(("token_embd", "output."))]
    others = [p for n, p in model.named_parameters() if not (p.ndim == 2 and not n.startswith(("token_embd", "output.")))]
    if cfg.optimizer == "adamw":
        decay = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        return [torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)]
    if cfg.optimizer == "muon":
        # Muon orthogonalizes the updates of hidden matrices; embeddings and norms keep AdamW
        # (as modded-nanogpt and nanochat do). Its "match_rms_adamw" scale lets both share one lr.
        ns_dtype = torch.bfloat16 if native_bf16(matrices[0].device) else torch.float32
        return [Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype),
                torch.optim.AdamW(others, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)]
    raise ValueError(f"--optimizer {cfg.optimizer!r} is not one of adamw, muon")


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    start = decay_start(cfg, total)
    if step < start:
        return cfg.lr
    return cfg.lr * max(0.0, (total - step) / max(1, total - start))


def decay_start(cfg: TrainConfig, total: int) -> int:  # warmup-stable-decay's first decaying step
    return int(total * (1 - cfg.decay_fraction))


# ---------------------------------------------------------------------------
# Checkpoints: weights and optimizer state in safetensors, the rest in JSON
# ---------------------------------------------------------------------------

def _full(value) -> torch.Tensor:
    """A plain tensor: FSDP2's sharded DTensors are gathered (a collective: every rank calls)."""
    if not torch.is_tensor(value):
        return torch.tensor(value)
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _flatten_optimizer(optimizers) -> tuple[dict[str, torch.Tensor], list]:
    tensors, groups = {}, []
    for k, opt in enumerate(optimizers):
        sd = opt.state_dict()
        for pid, state in sd["state"].items():
            for name, value in state.items():
                tensors[f"{k}.{pid}.{name}"] = _full(value)
        groups.append(sd["param_groups"])
    return tensors, groups


def _unflatten_optimizer(optimizers, tensors: dict[str, torch.Tensor], groups: list):
    for k, opt in enumerate(optimizers):
        params = [p for group in opt.param_groups for p in group["params"]]
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            o, pid, name = key.split(".", 2)
            if int(o) == k:
                p = params[int(pid)]
                if hasattr(p, "device_mesh") and value.shape == p.shape:  # FSDP2: shard like the parameter
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
                state.setdefault(int(pid), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": groups[k]})


def checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its rename is done)."""
    return sorted(p for p in Path(out).glob("ckpt_*") if p.is_dir() and (p / "state.json").exists())


def gather_state(model, optimizers) -> tuple[dict, dict, list]:
    """Full weights and optimizer state on every rank (collective under FSDP2); of a model
    with frozen parameters (LoRA), the trained ones only."""
    tensors, groups = _flatten_optimizer(optimizers)
    return gather_weights(model), tensors, groups


def gather_weights(model) -> dict:
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: _full(v).detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in frozen}


def _write_folder(final: Path, write) -> Path:
    """write(folder) into a temporary folder renamed to `final` once whole (atomic: a folder
    with its final name is complete; a full disk leaves nothing half-written)."""
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_checkpoint(out: Path, weights: dict, tensors: dict, groups: list, state: dict, keep: int) -> Path:
    from safetensors.torch import save_file

    def write(folder: Path):
        save_file(weights, str(folder / "model.safetensors"))
        rest = {**tensors, "rng.torch": torch.get_rng_state()}
        save_file({k: v.to("cpu").contiguous() for k, v in rest.items()}, str(folder / "optimizer.safetensors"))
        (folder / "state.json").write_text(json.dumps({**state, "optimizer_groups": groups}, indent=1))

    final = _write_folder(out / f"ckpt_{state['step']:07d}", write)
    for old in checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def best_checkpoint(out: str | Path) -> Path | None:
    """The weights of the run's best validation so far (best_STEP: weights and state, no
    optimizer; what export writes), or None."""
    found = sorted(p for p in Path(out).glob("best_*") if p.is_dir() and (p / "state.json").exists())
    return found[-1] if found else None


def save_best(out: Path, weights: dict, state: dict) -> Path:
    """A new best: written whole before the previous one is removed."""
    from safetensors.torch import save_file

    def write(folder: Path):
        save_file(weights, str(folder / "model.safetensors"))
        (folder / "state.json").write_text(json.dumps(state, indent=1))

    final = _write_folder(out / f"best_{state['step']:07d}", write)
    for old in Path(out).glob("best_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    return state, load_file(str(path / "model.safetensors")), load_file(str(path / "optimizer.safetensors"))


# ---------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, shards, context: int, val_bytes: int, bos_id: int, rt: Runtime, batch: int = 16,
             split: bool = True) -> dict:
    """Over the whole validation split, in windows of the context: the loss per token (every
    target, BOS included) and bits per byte (nats / UTF-8 bytes / ln 2, comparable across
    tokenizers). The bytes are the text's, so the nats leave out BOS targets: prepare puts a
    BOS before each document, and it has no bytes in the text (as nanochat leaves out its
    special tokens). In float32 whatever the training's precision: the figure is then the
    exported file's (run.py computes in float32), and a forward pass is a small cost."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=rt.device)  # nats, nats of text targets, targets
    for i, (x, y) in enumerate(data.val_batches(shards, batch, context)):
        if split and i % rt.world != rt.rank:  # ranks share the batches (FSDP2: all run all)
            continue
        x, y = torch.from_numpy(x).to(rt.device), torch.from_numpy(y).to(rt.device)
        _, losses = model(x, y, reduction="none")  # (B * T,)
        totals[0] += losses.sum()
        totals[1] += torch.where(y.reshape(-1) != bos_id, losses, 0).sum()
        totals[2] += y.numel()
    if rt.world > 1 and split:
        dist.all_reduce(totals)
    nats, text_nats, count = totals.tolist()
    model.train()
    return {"val_loss": nats / max(count, 1), "val_bpb": text_nats / max(val_bytes, 1) / math.log(2)}


# ---------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------

def resume_from(cfg, resume: bool, key: str = "train_config", free=("data", "out", "compile"),
                verb: str = "trained") -> Path | None:
    """The checkpoint to resume from (None for a new run), after checking that its state's
    `key` (the run's configuration) equals cfg but for the fields in `free`."""
    found = checkpoints(cfg.out)
    if not resume:
        if found:
            raise ValueError(f"{cfg.out}: holds checkpoints ({found[-1].name}): --resume {cfg.out} to continue, "
                             f"or choose another --out")
        return None
    if not found:
        raise ValueError(f"{cfg.out}: no checkpoint to resume from")
    stored = json.loads((found[-1] / "state.json").read_text())[key]
    for name, value in asdict(cfg).items():
        if name not in free and stored.get(name) != value:
            raise ValueError(f"{cfg.out} was {verb} with {name} = {stored.get(name)!r}, not {value!r}: "
                             f"a resumed run keeps its configuration")
    return found[-1]


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a model; return the final metrics. Rank 0 alone writes files."""
    rt = setup_runtime(cfg.precision)
    out = Path(cfg.out)
    manifest = data.load_manifest(cfg.data)
    shards = data.open_split(cfg.data, "train")
    val_shards = data.open_split(cfg.data, "val")
    if not val_shards:
        raise ValueError(f"{cfg.data}: the validation split is empty (prepare with --val-fraction > 0)")
    if resume and checkpoints(cfg.out):  # the settings planned at the start stay
        stored = json.loads((checkpoints(cfg.out)[-1] / "state.json").read_text())["train_config"]
        cfg = replace(cfg, **{k: stored[k] for k in PLANNED if planned(cfg, k) and k in stored})
    elif any(planned(cfg, k) for k in PLANNED):
        unique = manifest["splits"]["train"]["tokens"]
        speed = 0.0 if cfg.max_steps else training_flops(cfg, rt, manifest["vocab_size"])
        cfg = plan(cfg, unique, manifest["vocab_size"], speed)
        if rt.main:
            expected = expected_tokens(cfg, cfg.depth, manifest["vocab_size"], speed)
            print(f"planned: depth {cfg.depth}, weight decay {cfg.weight_decay:g}, dropout {cfg.dropout:g} for about "
                  f"{expected / 1e6:.1f}M tokens, {expected / unique:.1f} passes over the corpus's {unique / 1e6:.2f}M",
                  file=sys.stderr)
    if cfg.dropout >= 1:
        raise ValueError(f"--dropout {cfg.dropout} must be below 1 (negative: planned)")
    saved = resume_from(cfg, resume)
    if saved is not None:
        state, weights, opt_tensors = load_checkpoint(saved)
        if state["tokenizer"] != manifest["tokenizer"]:
            raise ValueError(f"{cfg.data}: shards of tokenizer {manifest['tokenizer']}, but {out} was trained "
                             f"with tokenizer {state['tokenizer']}")
    per_micro = cfg.micro_batch * cfg.context * rt.world
    if cfg.batch_tokens % per_micro:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} is not a multiple of micro_batch x context x ranks "
                         f"= {per_micro}")
    accum = cfg.batch_tokens // per_micro
    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig.from_depth(cfg.depth, manifest["vocab_size"], cfg.context, tie_embeddings=cfg.tie_embeddings,
                                  dropout=cfg.dropout)
    model = Transformer(mcfg).to(rt.device)
    step, total = 0, cfg.max_steps
    if saved is not None:
        model.load_state_dict(weights)  # before sharding: FSDP2 shards what is loaded
        torch.set_rng_state(opt_tensors.pop("rng.torch"))
        step, total = state["step"], state["total_steps"]
    train_model = model
    if rt.world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            train_model = fully_shard(model)
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizers = make_optimizer(model, cfg)  # after sharding: FSDP2 replaces the parameters
    if saved is not None:
        _unflatten_optimizer(optimizers, opt_tensors, state["optimizer_groups"])
    if cfg.compile and rt.device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "g++",
                                                                                    "clang++")):
        if rt.main:
            print("no C++ compiler found (torch.compile needs one on CPU): training uncompiled", file=sys.stderr)
    elif cfg.compile:
        # compilation (20-30 s on 2 cores) counts against a time budget: it still pays off at 5
        # minutes (README, "Training speed"); the evaluation runs the uncompiled model
        train_model = torch.compile(train_model)
    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        tok_copy = out / "tokenizer.json"
        if not tok_copy.exists():
            shutil.copy(manifest["tokenizer_path"], tok_copy)  # export needs it, wherever data/ goes
        _trim_log(out / "metrics.jsonl", step)
        print(f"model: depth {mcfg.n_layer}, width {mcfg.n_embd}, heads {mcfg.n_head}/{mcfg.n_head_kv}, "
              f"FFN {mcfg.n_ff}, context {mcfg.context}, vocab {mcfg.vocab_size}: {model.num_params() / 1e6:.2f}M "
              f"parameters; {rt.world} process(es), {accum} micro-batch(es) of {cfg.micro_batch} per step, "
              f"{cfg.optimizer}, {rt.device.type}, {rt.autocast_dtype or torch.float32}".replace("torch.", ""),
              file=sys.stderr)

    def batches(s: int):
        micro_batches = []
        for micro in range(accum):
            index = rt.rank * accum + micro  # this micro-batch's place in the global batch
            x, y = data.train_batch(shards, cfg.micro_batch, cfg.context, cfg.seed, s, index)
            micro_batches.append({"idx": torch.from_numpy(x).to(rt.device), "targets": torch.from_numpy(y).to(rt.device)})
        return micro_batches, cfg.batch_tokens, cfg.batch_tokens

    def state_of(s: int, total: int, tokens: int) -> dict:
        return {"step": s, "total_steps": total, "tokens": tokens, "tokenizer": manifest["tokenizer"],
                "train_config": asdict(cfg), "model_config": mcfg.to_dict()}

    def validate() -> dict:
        return evaluate(model, val_shards, cfg.context, manifest["splits"]["val"]["bytes"], manifest["bos_id"], rt,
                        split=not cfg.fsdp)

    per_token = model.flops_per_token()  # once: it counts the parameters
    result = fit(cfg, rt, out, model, train_model, optimizers, step, total, step * cfg.batch_tokens, batches,
                 validate, state_of, lambda positions, targets: per_token * positions, progress)
    if rt.world > 1:  # together: a rank leaving while another still writes can abort gloo
        dist.barrier()
        dist.destroy_process_group()
    return result


def fit(cfg, rt: Runtime, out: Path, model, train_model, optimizers, step: int, total: int, tokens: int, batches,
        validate, state_of, flops, progress: bool) -> dict:
    """The loop that pretraining and finetuning share: steps from `step` to `total` (0: as many
    as cfg.time_budget allows, measured), evaluations, checkpoints, signals, the log and the
    loss plot. batches(s) gives step s's micro-batches for this rank (each a dict of the
    model's arguments: idx, targets, maybe rows; targets of -100 left out), the number of
    targets and of positions in the whole step (all ranks):
    the loss is the mean over the step's targets, however they fall into micro-batches.
    state_of(step, total, tokens) is a checkpoint's state.json; flops(positions, targets) a
    step's training FLOPs (for MFU). cfg: lr_at's fields,
    grad_clip, time_budget, eval_every, checkpoint_every, keep_checkpoints, fsdp."""
    peak = peak_flops(rt.device, rt.autocast_dtype)

    def train_step(s: int) -> tuple[float, float, int, float]:
        lr = lr_at(s, cfg, total)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        t = time.perf_counter()
        micro_batches, n_targets, n_positions = batches(s)
        spent["data"] += time.perf_counter() - t
        step_flops = flops(n_positions, n_targets)
        loss_sum = torch.zeros((), device=rt.device)
        for micro, inputs in enumerate(micro_batches):
            sync = micro == len(micro_batches) - 1 or rt.world == 1 or cfg.fsdp
            ctx = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else nullcontext()
            with ctx, torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
                _, loss = train_model(**inputs, reduction="sum")
                # DDP and FSDP2 average the ranks' gradients: times world, the step's mean
                (loss * (rt.world / n_targets)).backward()
            loss_sum += loss.detach()
        if rt.world > 1:
            dist.all_reduce(loss_sum)
        loss_mean = loss_sum / n_targets
        # the norm of the gradients every rank holds after DDP's all-reduce (FSDP2: a DTensor,
        # gathered), so all ranks agree on skipping a step
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        loss_value, norm_value = torch.stack([loss_mean, _full(norm).to(loss_mean)]).tolist()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            last = checkpoints(out)
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {norm_value}"
            raise ValueError(f"{what} at step {s + 1}: training diverged (lower --lr?); the step was not applied, "
                             f"the last good checkpoint is {last[-1] if last else 'none'}")
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_value, norm_value, n_positions, step_flops

    # seconds of the run not spent training: reading batches, evaluations, checkpoints, and the
    # first two steps (compilation, allocation); their shares of the run are reported
    spent = {"data": 0.0, "eval": 0.0, "checkpoint": 0.0, "first steps": 0.0}

    @contextmanager
    def timed(what: str):
        t = time.perf_counter()
        yield
        spent[what] += time.perf_counter() - t

    saved_step = step  # the step of the newest checkpoint (0: none needed yet)
    # the best validation so far and its weights (best_STEP), what export writes: a long run on
    # a small corpus ends worse than it was midway. A new run starts without one.
    best = best_checkpoint(out)
    if rt.main and step == 0 and best is not None:
        shutil.rmtree(best, ignore_errors=True)
    best_val = json.loads((best / "state.json").read_text())["best"] if best is not None and step else None

    def keep_if_best(s: int, evaluation: dict):
        """Save the weights when this evaluation (bits per byte, else loss) beats every earlier one."""
        nonlocal best_val
        key = "val_bpb" if "val_bpb" in evaluation else "val_loss"
        better = torch.tensor([best_val is None or evaluation[key] < best_val[key]], dtype=torch.float32,
                              device=rt.device)
        if rt.world > 1:  # rank 0 decides: under FSDP each rank evaluated by itself, and all must gather
            dist.broadcast(better, 0)
        if not better.item():
            return
        best_val = {key: evaluation[key]}
        with timed("checkpoint"):
            weights = gather_weights(model)
            if rt.main:
                save_best(out, weights, {**state_of(s, total, tokens), "best": best_val})

    def checkpoint(s: int):
        nonlocal saved_step
        with timed("checkpoint"):
            gathered = gather_state(model, optimizers)
            if rt.main:
                save_checkpoint(out, *gathered, state_of(s, total, tokens), cfg.keep_checkpoints)
            if rt.world > 1:
                dist.barrier()
        saved_step = s

    def stop_requested(signals: list) -> bool:
        """Whether any rank got a signal: all ranks stop together, or one would wait forever
        in the next collective."""
        if rt.world == 1:
            return bool(signals)
        flag = torch.tensor([float(bool(signals))], device=rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    def steps_left(step: int, seconds_per_step: float) -> int:  # the step count the budget allows
        if rt.world > 1:  # every rank runs the same steps: the slowest one's
            t = torch.tensor([seconds_per_step], device=rt.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds_per_step = t.item()
        remaining = cfg.time_budget - (time.perf_counter() - t_start) - eval_time  # the final eval too
        return step + max(1, int(remaining / seconds_per_step))

    with _deferred_signals(announce=rt.main) as signals:
        t_start = time.perf_counter()
        metrics: dict = {}
        last_eval = None
        timed_budget = total == 0
        if timed_budget:  # a time budget: measure an eval and a few steps, then fix the step count
            with timed("eval"):
                last_eval = validate()
            eval_time = time.perf_counter() - t_start
            total = 10**9
            for probe in range(7):  # 2 untimed steps (compilation, allocation), then 5 timed ones
                if probe == 2:
                    t0 = time.perf_counter()
                with timed("first steps") if probe < 2 else nullcontext():
                    tokens += train_step(step)[2]
                step += 1
            step_time = (time.perf_counter() - t0) / 5
            total = steps_left(step, step_time + eval_time / cfg.eval_every)
            t_measured, step_measured = time.perf_counter(), step
            # the probe steps ran inside the warmup (20 steps by default), where the schedule
            # does not depend on the total, so fixing the total now changes nothing before
            if rt.main:
                _log(out, {"step": 0, "tokens": 0, **last_eval})
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, disable=not (progress and rt.main), unit="step", file=sys.stderr,
                   dynamic_ncols=True)
        t_last = time.perf_counter()
        # a signal is acted on here only: after a whole step, its evaluation and its checkpoint
        while not (interrupted := stop_requested(signals)) and step < total:
            loss, grad_norm, n_positions, step_flops = train_step(step)
            step += 1
            tokens += n_positions
            now = time.perf_counter()
            tok_s = n_positions / max(now - t_last, 1e-9)
            mfu = step_flops / max(now - t_last, 1e-9) / (peak * rt.world)
            metrics = {"step": step, "tokens": tokens, "loss": loss, "grad_norm": grad_norm,
                       "lr": lr_at(step - 1, cfg, total), "tok_s": tok_s, "mfu": mfu, "time": now - t_start}
            if step % cfg.eval_every == 0 or step == total:
                with timed("eval"):
                    last_eval = validate()
                metrics.update(last_eval)
                keep_if_best(step, last_eval)
                if timed_budget and cfg.schedule == "wsd" and step < decay_start(cfg, total):
                    # Five steps' timing misjudged whole runs by -15% to +12% (a noisy shared
                    # machine). While the learning rate is still flat the total can move freely,
                    # so it is fixed again from the steps so far, evaluations and checkpoints
                    # included, never so low that the decay should have begun already.
                    rate = (time.perf_counter() - t_measured) / (step - step_measured)
                    total = max(steps_left(step, rate), math.ceil(step / (1 - cfg.decay_fraction)) + 1)
                    bar.total = total
            if rt.main:
                _log(out, metrics)
                shown = next((k for k in ("val_bpb", "val_loss") if last_eval and k in last_eval), None)
                bar.set_postfix_str(f"loss {loss:.3f} | {tok_s:,.0f} tok/s | MFU {mfu:.1%}"
                                    + (f" | {shown.replace('_', ' ')} {last_eval[shown]:.3f}" if shown else ""),
                                    refresh=False)
                bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == total:
                checkpoint(step)
            t_last = time.perf_counter()  # evals and saves are not training speed
        bar.close()
        if interrupted or signals:  # keep what the completed steps learned, then stop
            if step > saved_step:  # (after the last step, the final checkpoint is saved already)
                checkpoint(step)
            if rt.main:
                print(f"interrupted at step {step}: " + (f"checkpoint saved in {out}; --resume {out} continues"
                      if step else "nothing to save"), file=sys.stderr)
            raise KeyboardInterrupt
    if rt.main:
        plot_losses(out)
    elapsed = time.perf_counter() - t_start
    return {**metrics, **(last_eval or {}), "shares": {k: round(v / elapsed, 4) for k, v in spent.items()}}


@contextmanager
def _deferred_signals(announce: bool):
    """During training, SIGINT (Ctrl-C) and SIGTERM (what torchrun sends its workers) only
    append to the list this yields; the loop stops at the next step boundary. Stopped
    anywhere, an optimizer step could be half applied (Muon updates parameters one by one)
    and checkpointed under the old step number. A second Ctrl-C stops at once: the newest
    checkpoint on disk is then the last good one."""
    signals: list[int] = []

    def handler(signum, frame):
        if signals and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not signals and announce:  # os.write: print() could re-enter tqdm's write to stderr
            os.write(2, b"\nstopping after this step, with a checkpoint (Ctrl-C again: stop now)\n")
        signals.append(signum)

    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        yield signals
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signals
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _log(out: Path, record: dict):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _trim_log(path: Path, step: int):
    """On resume, drop the log lines of steps after the checkpoint (they will be redone)."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(l + "\n" for l in lines))


def plot_losses(out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.6)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# The main job: every step from the default corpus to a sample from the exported file
# ---------------------------------------------------------------------------

def default_data(vocab_size: int) -> str:
    """Fetch the default corpus, train (or reuse) its tokenizer, prepare (or reuse) its shards."""
    from twofile import assets
    from twofile import tokenizer as tokenizers_

    corpus = str(assets.fetch(assets.DEFAULT_CORPUS))
    tok_path = assets.cache_dir() / f"tokenizer-shakespeare-{vocab_size}.json"
    # one cached before twofile trained with ignore_merges would tokenize unlike run.py: retrain
    if not tok_path.exists() or not json.loads(tok_path.read_text())["model"].get("ignore_merges"):
        print(f"training a {vocab_size}-token BPE tokenizer on {corpus}", file=sys.stderr)
        tokenizers_.save(tokenizers_.train(data.texts([corpus]), vocab_size, show_progress=False), tok_path)
    folder = assets.cache_dir() / f"data-shakespeare-{tokenizers_.fingerprint(tokenizers_.load(tok_path))}"
    data.prepare([corpus], str(tok_path), str(folder))
    return str(folder)


def finish(out: Path, result: dict) -> None:
    """After training: export the parameters file and show what it learned, through run.py."""
    from twofile import export, run

    gguf_path = export.export(out, out / "model.gguf", "f32")
    model = run.load(gguf_path)
    prompt = "ROMEO:\n"
    sample = prompt + "".join(model.session().generate(model.tokenize(prompt), 120, temperature=0.8, seed=0))
    print(f"\nvalidation: loss {result.get('val_loss', float('nan')):.4f}, "
          f"bits per byte {result.get('val_bpb', float('nan')):.4f} after {result.get('tokens', 0):,} tokens", file=sys.stderr)
    if result.get("shares"):
        print("share of the run: " + ", ".join(f"{k} {v:.1%}" for k, v in result["shares"].items()), file=sys.stderr)
    print(f"parameters file: {gguf_path}\nloss curve: {out / 'loss.png'}\nsample (run.py, {gguf_path.name}):\n", file=sys.stderr)
    print(sample)

"""Finetuning: a pretrained model into an assistant, trained on conversations (the second
stage of a model's life).

    twofile finetune smollm2 --lora 16 --time 20m --out runs/sft      # ShareGPT, fetched once
    twofile finetune MODEL.gguf --data chats.jsonl --steps 200 --out runs/sft
    twofile finetune --resume runs/sft
    twofile export runs/sft -o sft.gguf                               # LoRA merged, one GGUF

Any GGUF file run.py runs is loaded into PyTorch (model.load_gguf: weights decoded to
float32). Conversations are rendered with the file's own chat template and tokenized as
run.py tokenizes them; the loss is on the assistant's tokens only (its replies and their
end-of-turn tokens, as the template writes them). Full finetuning, or LoRA through PEFT on the
attention and MLP matrices; the checkpoints, exact resume, signals, log and loss plot are
pretraining's (train.fit), torchrun included.

Data: jsonl records with OpenAI-style "messages" [{"role", "content"}] or ShareGPT-style
"conversations" [{"from", "value"}], or a JSON array of them (read record by record, so a
file cut off mid-record still gives its whole records). Records that are not a conversation
a template can render (unknown roles, empty turns, no reply, roles out of turn) are skipped and
counted, with where the first of each kind is. The default set is ShareGPT V3: conversations
with an assistant, which is what finetuning should teach (chitchat-dataset, the other choice
on the package index, is people chatting with each other).
"""

from __future__ import annotations

import json
import math
import sys
import zlib
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist

from twofile import run, train
from twofile.model import load_gguf

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
HELD_OUT_EVERY = 50  # every 50th valid conversation is held out
# a base model's file has no chat template: its family's, where the vocabulary has its tokens
# (Gemma's as Google's instruction-tuned models write it, text only), else ChatML's
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' + "
    "(prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@dataclass
class FinetuneConfig:
    model: str                      # a .gguf file or a name of assets.MODELS
    data: str = ""                  # conversations (.jsonl or a .json array); "": ShareGPT from the package index
    out: str = "out/sft"
    lora: int = 0                   # LoRA rank (0: full finetuning)
    context: int = 1024             # tokens per conversation (longer ones are cut at a turn boundary)
    batch_size: int = 16            # conversations per optimizer step, all ranks together
    micro_batch: int = 4            # rows of up to `context` tokens (conversations packed) per pass on one rank
    lr: float = 0.0                 # peak; 0: 2e-4 with LoRA, 2e-5 without
    schedule: str = "cosine"
    warmup_steps: int = 10
    decay_fraction: float = 0.4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 0              # 0: derived from the time budget
    time_budget: float = 1200.0
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    val_conversations: int = 100    # held-out conversations evaluated (at most)
    seed: int = 0
    precision: str = "auto"         # bfloat16 autocast where the hardware has it (train.setup_runtime)
    fsdp: bool = False

    def __post_init__(self):
        self.lr = self.lr or (2e-4 if self.lora else 2e-5)


# ---------------------------------------------------------------------------
# Conversations: records -> checked messages -> tokens with the assistant's marked
# ---------------------------------------------------------------------------

def read_records(path: str) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a .jsonl file (a line) or a JSON array (an element);
    a line that is not JSON gives (where, None); an array cut off mid-record ends there."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".jsonl") or not text.lstrip().startswith("["):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError:
                    yield f"line {n}", None
        return
    decoder, i, n = json.JSONDecoder(), text.index("[") + 1, 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        n += 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            yield f"record {n}", "cut off"
            return
        yield f"record {n}", record


def messages_of(record) -> tuple[list[dict] | None, str]:
    """A record as messages a chat template renders ([system,] user, assistant, user, ...,
    ending with an assistant turn: a last unanswered user turn is dropped), or None and the
    reason it is skipped."""
    if record == "cut off":
        return None, "cut off (the file ends inside it)"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    turns, role_key, text_key = record.get("messages"), "role", "content"
    if turns is None:
        turns, role_key, text_key = record.get("conversations"), "from", "value"
    if not isinstance(turns, list) or not turns:
        return None, "no messages or conversations list"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None, "a turn that is not an object"
        role = ROLES.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            return None, f"unknown role {str(turn.get(role_key))[:20]!r}"
        content = turn.get(text_key)
        if not isinstance(content, str) or not content.strip():
            return None, "an empty turn"
        messages.append({"role": role, "content": content})
    first = 1 if messages[0]["role"] == "system" else 0
    if messages[-1]["role"] == "user":
        messages = messages[:-1]
    if len(messages) <= first:
        return None, "no assistant turn"
    if any(m["role"] != ("user" if k % 2 == 0 else "assistant") for k, m in enumerate(messages[first:])):
        return None, "roles out of turn (not user, assistant, user, ...)"
    return messages, ""


def encode(tokenizer: run.Tokenizer, metadata: dict, messages: list[dict], context: int
           ) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The conversation's token ids as run.py's chat renders and tokenizes them (at most
    context + 1: the inputs and the targets shifted by one), whether each is an assistant's
    (a reply or its end-of-turn tokens), and whether turns were cut off; None when not even the
    first reply fits. A reply's tokens are the difference between the conversation rendered
    through that reply and rendered up to it with the generation prompt, so the template
    decides; a template whose renderings are not each other's prefixes is refused."""
    ids: list[int] = []
    mask: list[bool] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = run.chat_tokens(tokenizer, metadata, messages[:k], add_generation_prompt=True)
        through = run.chat_tokens(tokenizer, metadata, messages[:k + 1], add_generation_prompt=False)
        if before[:len(ids)] != ids or through[:len(before)] != before:
            raise ValueError("the chat template does not render a conversation's beginning as the beginning of the "
                             "whole, so the assistant's tokens cannot be found")
        if len(through) > context + 1:
            return (np.array(ids, np.int64), np.array(mask), True) if ids else None
        mask += [False] * (len(before) - len(ids)) + [True] * (len(through) - len(before))
        ids = through
    return np.array(ids, np.int64), np.array(mask), False


@dataclass
class Conversations:
    train: list
    held_out: list
    skipped: Counter            # reason -> count
    first_skipped: dict         # reason -> where its first record is


def load_conversations(path: str) -> Conversations:
    """The valid conversations of a file, every HELD_OUT_EVERY-th held out."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file (conversations: .jsonl with 'messages' or 'conversations', "
                         f"or a JSON array of them)")
    valid, skipped, first = [], Counter(), {}
    for where, record in read_records(path):
        messages, reason = messages_of(record) if record is not None else (None, "not JSON")
        if messages is None:
            skipped[reason] += 1
            first.setdefault(reason, where)
        else:
            valid.append(messages)
    if not valid:
        raise ValueError(f"{path}: no usable conversation ({describe_skipped(skipped, first) or 'the file is empty'})")
    held = [m for i, m in enumerate(valid) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    rest = [m for i, m in enumerate(valid) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    if not held:  # a small file: its last conversation
        held, rest = valid[-1:], valid[:-1] or valid[-1:]
    return Conversations(rest, held, skipped, first)


def describe_skipped(skipped: Counter, first: dict) -> str:
    return "; ".join(f"{n} skipped: {reason} (first at {first[reason]})" for reason, n in skipped.most_common())


def pack(conversations: list, context: int) -> list[list]:
    """Conversations into rows of at most context positions (a conversation of n tokens takes
    n - 1: inputs and targets are shifted by one), longest first, each into the first row with
    room (first-fit decreasing): rows nearly full, so little padding (bench/finetune_batching.py)."""
    rows, room = [], []
    for conversation in sorted(conversations, key=lambda c: -len(c[0])):
        n = len(conversation[0]) - 1
        r = next((r for r, free in enumerate(room) if n <= free), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(context)
        rows[r].append(conversation)
        room[r] -= n
    return rows


def micro_batch(rows: list[list], pad: int) -> dict[str, torch.Tensor]:
    """Rows of conversations as the model's arguments: inputs (B, T), padded at the end (causal
    attention never sees it); the targets of the positions whose next token is the assistant's
    and those positions (flat: Transformer.forward's rows); and where a row packs several
    conversations, each token's position within its own (attention stays within each)."""
    T = max(sum(len(ids) - 1 for ids, _, _ in row) for row in rows)
    x = np.full((len(rows), T), pad, np.int64)
    y = np.full((len(rows), T), -100, np.int64)
    positions = np.tile(np.arange(T), (len(rows), 1))
    for b, row in enumerate(rows):
        start = 0
        for ids, mask, _ in row:
            n = len(ids) - 1
            x[b, start:start + n] = ids[:-1]
            y[b, start:start + n] = np.where(mask[1:], ids[1:], -100)
            positions[b, start:] = np.arange(T - start)  # (the padding after the last goes on counting)
            start += n
    flat = np.flatnonzero(y.reshape(-1) != -100)
    batch = {"idx": torch.from_numpy(x), "targets": torch.from_numpy(y.reshape(-1)[flat]), "rows": torch.from_numpy(flat)}
    if any(len(row) > 1 for row in rows):
        batch["positions"] = torch.from_numpy(positions)
    return batch


# ---------------------------------------------------------------------------
# The run: source model (and its metadata for export), LoRA, the loop
# ---------------------------------------------------------------------------

def chat_template(metadata: dict, source: str) -> str:
    """The file's chat template; for a base model without one, its family's (see GEMMA_TEMPLATE)."""
    from twofile.tokenizer import CHATML_TEMPLATE

    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        return template
    tokens = set(metadata.get("tokenizer.ggml.tokens") or [])
    if {"<start_of_turn>", "<end_of_turn>"} <= tokens:
        return GEMMA_TEMPLATE
    if {"<|im_start|>", "<|im_end|>"} <= tokens:
        return CHATML_TEMPLATE
    raise ValueError(f"{source}: no chat template (tokenizer.chat_template), and the vocabulary has neither "
                     f"ChatML's nor Gemma's turn tokens to write one with")


def save_metadata(source: str, path: Path, template: str) -> None:
    """The source file's metadata (tokenizer, architecture), the chat template the run used,
    and the source's tensors that are not parameters (RoPE factors) as a small GGUF file,
    written with the gguf package: export takes them from here."""
    import gguf

    reader = gguf.GGUFReader(source)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "tokenizer.chat_template"):
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    writer.add_chat_template(template)
    for t in reader.tensors:
        if t.name.startswith("rope_"):
            writer.add_tensor(t.name, np.array(t.data, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)


def trained_model(run_folder: str | Path):
    """A finetuning run's weights (of its best held-out loss, else its latest checkpoint) as a
    plain Transformer (LoRA merged into the source file's weights, which a LoRA run's export
    reads again) and its state."""
    from safetensors.torch import load_file

    from twofile.export import chosen_checkpoint
    from twofile.model import ModelConfig, Transformer

    ckpt = chosen_checkpoint(run_folder)
    state, weights = json.loads((ckpt / "state.json").read_text()), load_file(str(ckpt / "model.safetensors"))
    cfg = FinetuneConfig(**state["finetune_config"])
    if not cfg.lora:
        model = Transformer(ModelConfig(**state["model_config"]))
        model.load_state_dict(weights)
        return model, state
    if not Path(state["source"]).is_file():
        raise ValueError(f"{run_folder}: LoRA was trained on {state['source']}, which is gone: export needs its weights")
    model = with_lora(load_gguf(state["source"], n_ctx=cfg.context)[0], cfg.lora)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(n in missing for n, p in model.named_parameters() if p.requires_grad):
        raise ValueError(f"{ckpt}: its adapters do not fit {state['source']}")
    return model.merge_and_unload(), state


def with_lora(model, rank: int):
    """PEFT's LoRA on every attention and MLP matrix (alpha = 2 x rank); the rest frozen."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> dict:
    """Finetune (or resume); the final metrics. Rank 0 alone writes files."""
    from twofile import assets

    for name in ("context", "batch_size", "micro_batch"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if cfg.lora < 0:
        raise ValueError(f"--lora must be a rank of 1 or more (or 0: full finetuning), not {cfg.lora}")
    rt = train.setup_runtime(cfg.precision)
    out = Path(cfg.out)
    saved = train.resume_from(cfg, resume, "finetune_config", ("out",), "finetuned")
    data_path = cfg.data or str(assets.fetch(assets.SHAREGPT))
    conversations = load_conversations(data_path)
    if Path(cfg.model).is_dir():  # a pretraining run: its export (best validation) as a GGUF file (ChatML)
        from twofile import export

        source = str(out / "base.gguf")
        if rt.main and not resume:
            out.mkdir(parents=True, exist_ok=True)
            export.export(cfg.model, source, "f32")
        if rt.world > 1:
            dist.barrier()
    else:
        source = assets.model_path(cfg.model) if not cfg.model.endswith(".gguf") else cfg.model
    if not Path(source).is_file():
        raise ValueError(f"{source}: no such model file")
    model, metadata = load_gguf(source, n_ctx=cfg.context)
    if model.config.context < cfg.context:
        raise ValueError(f"--context {cfg.context} is longer than {source}'s context ({model.config.context})")
    tokenizer = run.Tokenizer(metadata, source)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    metadata = {**metadata, "tokenizer.chat_template": chat_template(metadata, source)}
    torch.manual_seed(cfg.seed)
    if cfg.lora:
        model = with_lora(model, cfg.lora)
    model.to(rt.device)
    step, total, tokens = 0, cfg.max_steps, 0
    if saved is not None:
        state, weights, opt_tensors = train.load_checkpoint(saved)
        missing, unexpected = model.load_state_dict(weights, strict=not cfg.lora)
        if unexpected or any(n in missing for n, p in model.named_parameters() if p.requires_grad):
            raise ValueError(f"{saved}: its weights do not fit this model")
        torch.set_rng_state(opt_tensors.pop("rng.torch"))
        step, total, tokens = state["step"], state["total_steps"], state["tokens"]
    train_model = model
    if rt.world > 1:
        if cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            inner = model.base_model.model if cfg.lora else model
            for block in inner.blocks:
                fully_shard(block)
            train_model = fully_shard(model)
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW(trainable, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=cfg.weight_decay)]
    if saved is not None:
        train._unflatten_optimizer(optimizers, opt_tensors, state["optimizer_groups"])
    n_train = len(conversations.train)
    # the conversations in a stream: epoch after epoch, each in an order drawn from (seed, epoch);
    # a step takes the next batch_size of them that fit, so where a step starts (the cursor)
    # depends on the steps before it, and a checkpoint keeps it. The counts are of those passed over
    # or cut at a turn boundary to fit.
    stream = dict(state["data"]) if saved is not None else {"cursor": 0, "truncated": 0, "too_long": 0}
    encoded: dict[int, tuple | None] = {}  # conversation index -> encode(...), as the steps need them

    def batches(s: int):
        """Step s's conversations, the same on every rank (each encodes the whole step's), packed
        into rows (pack), the rows sorted by length into micro-batches, micro-batch j on rank
        j % world."""
        picked, start = [], stream["cursor"]
        while len(picked) < cfg.batch_size:
            p = stream["cursor"]
            if p - start > n_train and not picked:
                raise ValueError(f"no conversation has a first reply within --context {cfg.context}: a longer "
                                 f"context, or data with shorter turns")
            i = int(np.random.default_rng([cfg.seed, p // n_train]).permutation(n_train)[p % n_train])
            if i not in encoded:
                encoded[i] = encode(tokenizer, metadata, conversations.train[i], cfg.context)
            stream["cursor"] += 1
            if encoded[i] is None or not encoded[i][1][1:].any():
                stream["too_long"] += 1
                continue
            stream["truncated"] += encoded[i][2]
            picked.append(encoded[i])
        rows = sorted(pack(picked, cfg.context), key=lambda row: sum(len(c[0]) for c in row))
        groups = [rows[a:a + cfg.micro_batch] for a in range(0, len(rows), cfg.micro_batch)]
        mine = [micro_batch(g, pad) for j, g in enumerate(groups) if j % rt.world == rt.rank]
        if not mine:  # every rank runs a pass (the collectives): an empty one
            mine = [{"idx": torch.zeros((1, 1), dtype=torch.int64), "targets": torch.zeros(0, dtype=torch.int64),
                     "rows": torch.zeros(0, dtype=torch.int64)}]
        n_targets = sum(int(c[1][1:].sum()) for c in picked)
        return ([{k: t.to(rt.device) for k, t in m.items()} for m in mine], n_targets,
                sum(len(c[0]) - 1 for c in picked))

    held = [e for e in (encode(tokenizer, metadata, m, cfg.context)
                        for m in conversations.held_out[:cfg.val_conversations]) if e is not None]

    @torch.no_grad()
    def validate() -> dict:
        """Mean loss per assistant token over the held-out conversations: the model itself (not
        DDP's wrapper, whose forward is a collective) on a share of them per rank; under FSDP2
        (every forward a collective) each rank runs them all."""
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
        split = rt.world > 1 and not cfg.fsdp
        for j in range(rt.rank if split else 0, len(held), rt.world if split else 1):
            batch = {k: t.to(rt.device) for k, t in micro_batch([[held[j]]], pad).items()}
            with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
                _, loss = model(**batch, reduction="sum")
            totals += torch.stack([loss.double(), torch.tensor(len(batch["targets"]), dtype=torch.float64,
                                                                device=rt.device)])
        if split:
            dist.all_reduce(totals)
        model.train()
        return {"val_loss": (totals[0] / totals[1].clamp(min=1)).item()}

    def state_of(s: int, total: int, tokens: int) -> dict:
        return {"step": s, "total_steps": total, "tokens": tokens, "source": str(Path(source).resolve()),
                "finetune_config": asdict(cfg), "model_config": (model.base_model.model if cfg.lora else model).config.to_dict(),
                "data": {**stream, "train": n_train, "held_out": len(held), "skipped": dict(conversations.skipped)}}

    if rt.main:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "source.gguf").exists():
            save_metadata(source, out / "source.gguf", metadata["tokenizer.chat_template"])
        train._trim_log(out / "metrics.jsonl", step)
        n_trainable = sum(p.numel() for p in trainable)
        print(f"finetuning {source}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{n_trainable / 1e6:.2f}M trained ({f'LoRA rank {cfg.lora}' if cfg.lora else 'all'}); "
              f"{data_path}: {n_train} conversations to train on, {len(held)} held out"
              + (f"; {describe_skipped(conversations.skipped, conversations.first_skipped)}"
                 if conversations.skipped else ""), file=sys.stderr)
    inner = model.base_model.model if cfg.lora else model
    c = inner.config
    vocab = c.vocab_size * c.n_embd  # the output matrix: for the targets' rows only
    body = inner.flops_per_token() - 6 * vocab
    frozen = 2 / 3 if cfg.lora else 1.0  # LoRA: no gradients of the frozen weights (4 of the 6 FLOPs)

    def flops(positions: int, targets: int) -> float:
        return frozen * (body * positions + 6 * vocab * targets)

    result = train.fit(cfg, rt, out, model, train_model, optimizers, step, total, tokens, batches, validate,
                       state_of, flops, progress)
    if rt.main:
        print(f"conversations: {stream['cursor']} drawn, {stream['truncated']} of them cut at a turn boundary to fit "
              f"--context {cfg.context}, {stream['too_long']} passed over (even the first reply longer)", file=sys.stderr)
    if rt.world > 1:  # together: a rank leaving while another still writes can abort gloo
        dist.barrier()
        dist.destroy_process_group()
    return result


def finish(out: Path, result: dict) -> None:
    """After finetuning: export the parameters file and show a reply from it, through run.py."""
    from twofile import export

    path = export.export(out, out / "model.gguf", "f32")
    model = run.load(str(path))
    question = [{"role": "user", "content": "What are three good ways to learn a new language?"}]
    ids = model.chat_tokens(question)
    print(f"\nheld-out loss per assistant token: {result.get('val_loss', float('nan')):.4f} after "
          f"{result.get('step', 0)} steps\nparameters file: {path}\nloss curve: {out / 'loss.png'}", file=sys.stderr)
    if len(ids) < model.n_ctx:  # (a small model of our own may have a short context)
        print(f"reply (run.py, greedy) to {question[0]['content']!r}:\n", file=sys.stderr)
        print("".join(model.session().generate(ids, min(120, model.n_ctx - len(ids)), temperature=0)))

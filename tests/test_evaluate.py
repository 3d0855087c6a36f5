"""`twofile eval --task`: the benchmark sets as published, the metrics on hand-built items,
per-choice log-likelihoods against transformers, chance for a random model, and clearly above
chance for the default model."""

import json
import math
import subprocess
import sys

import pytest
import torch

from twofile import evaluate, run
from twofile.evaluate import Item

# the published sizes of the sets the suite evaluates on (validation/dev splits; MMLU's test
# split, LAMBADA's OpenAI test set)
SIZES = {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "csqa": 1221, "hellaswag": 10042, "openbookqa": 500,
         "piqa": 1838, "sciq": 1000, "socialiqa": 1954, "winogrande": 1267, "mmlu": 14042, "lambada": 5153}


def test_metrics_on_hand_built_items():
    items = [Item(["c"] * 2, [" a", " bbbb"], 1),   # raw: choice 0 wins (wrong); per byte: 1 (-4/5 > -2/2)
             Item(["c"] * 3, [" x", " y", " z"], 2),  # a tie between 1 and 2: the first (1) wins, so wrong
             Item(["c"] * 2, [" p", " q"], 0)]        # right either way
    m = evaluate.metrics(items, [[-2.0, -4.0], [-5.0, -1.0, -1.0], [-0.5, -3.0]])
    assert m["items"] == 3 and m["acc"] == pytest.approx(1 / 3) and m["acc_norm"] == pytest.approx(2 / 3)
    # the sample standard deviation of the 0/1 outcomes over sqrt(n): sqrt(p (1 - p) / (n - 1))
    assert m["acc_stderr"] == pytest.approx(math.sqrt(1 / 3 * 2 / 3 / 2))
    assert m["acc_norm_stderr"] == pytest.approx(math.sqrt(2 / 3 * 1 / 3 / 2))
    assert m["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_normalization_by_bytes_changes_the_winner():
    items = [Item(["q"] * 2, [" é", " abcdefgh"], 1)]  # " é" is 3 bytes, 2 characters
    m = evaluate.metrics(items, [[-1.0, -2.5]])
    assert m["acc"] == 0 and m["acc_norm"] == 1  # -1/3 < -2.5/9


def test_lambada_metrics_by_hand():
    m = evaluate.lambada_metrics([-1.0, -3.0, -2.0, -6.0], [True, False, True, False])
    assert m["items"] == 4 and m["acc"] == 0.5 and m["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 3))
    assert m["perplexity"] == pytest.approx(math.exp(3.0))  # exp(-mean log-likelihood)


@pytest.mark.parametrize("task", sorted(SIZES))
def test_sets_are_the_published_ones(task):
    items = evaluate.load(task)
    assert len(items) == SIZES[task]
    choices = 1 if task == "lambada" else 2
    assert all(len(i.choices) >= choices and 0 <= i.gold < len(i.choices) and len(i.contexts) == len(i.choices)
               for i in items)
    if task != "lambada":
        shots = evaluate.load(task, shots=5)[0]
        assert len(shots.contexts[0]) > len(items[0].contexts[0])  # the examples come first


def test_mmlu_prompts_are_the_suites():
    """Subject by subject (57, alphabetical), "Question: ...\nAnswer:" and " choice"; 5-shot
    with the subject named and its 5 dev questions answered (the dev set's first, from the file)."""
    zero, five = evaluate.load("mmlu"), evaluate.load("mmlu", shots=5)
    first = zero[0]
    assert first.contexts[0] == ("Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), "
                                 "sqrt(18)) over Q.\nAnswer:")
    assert first.choices == [" 0", " 4", " 2", " 6"] and first.gold == 1
    context = five[0].contexts[0]
    assert context.startswith("The following are multiple choice questions (with answers) about abstract algebra:"
                              "\n\nQuestion: ")
    assert context.endswith("\n\n" + first.contexts[0]) and context.count("\nAnswer: ") == 5
    assert five[-1].contexts[0].startswith("The following are multiple choice questions (with answers) about "
                                           "world religions:")


def test_limit_draws_a_seeded_subset_in_order():
    items = evaluate.load("mmlu")
    a, b = evaluate.subset(items, 300), evaluate.subset(items, 300)
    assert a == b and len(a) == 300  # the same items every time
    where = [items.index(i) for i in a[:20]]
    assert where == sorted(where) and where[-1] > 300  # in order, from across the set
    assert evaluate.subset(items, 300, seed=1) != a
    assert evaluate.subset(items[:10], 300) == items[:10]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return run.load(smollm2_path)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("task", ["hellaswag", "arc_challenge", "winogrande", "piqa", "boolq", "mmlu", "lambada"])
def test_choice_loglikelihoods_match_transformers(smollm2, hf_model, task):
    """Two real items of each kind, scored together as the command does (shared contexts,
    WinoGrande's different ones, LAMBADA's greedy word): each choice's log-likelihood within
    1e-3 of transformers on the same GGUF, and its greediness the same."""
    items = evaluate.load(task)[3:5]
    groups = [[pair for choice in evaluate.requests(smollm2, item) for pair in choice] for item in items]
    for group, result in zip(groups, smollm2.loglikelihoods(groups)):
        for (ctx, cont), (logprobs, greedy) in zip(group, result):
            with torch.no_grad():
                logp = torch.log_softmax(hf_model(torch.tensor([ctx + cont])).logits[0].double(), -1)
            rows = logp[len(ctx) - 1:-1]
            assert abs(logprobs.sum() - float(rows[range(len(cont)), cont].sum())) <= 1e-3
            assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_a_random_model_scores_near_chance(tiny_gguf):
    m = run.load(tiny_gguf[0])
    r = evaluate.evaluate(m, "arc_easy", limit=60, progress=False)
    se = math.sqrt(r["chance"] * (1 - r["chance"]) / r["items"])
    assert abs(r["acc"] - r["chance"]) < 3 * se and abs(r["acc_norm"] - r["chance"]) < 3 * se, r


@pytest.mark.slow
@pytest.mark.parametrize("task,limit", [("arc_easy", 60), ("hellaswag", 100)])
def test_the_default_model_scores_clearly_above_chance(smollm2, task, limit):
    r = evaluate.evaluate(smollm2, task, limit=limit, progress=False)
    se = math.sqrt(r["chance"] * (1 - r["chance"]) / r["items"])
    assert max(r["acc"], r["acc_norm"]) > r["chance"] + 3 * se, r


def test_a_choice_longer_than_the_context_is_scored_in_pieces(tiny_gguf):
    """Every token of the choice scored once, in order; each piece fits the context and comes
    after at least half a context of the tokens before it (or all of them)."""
    m = run.load(tiny_gguf[0])  # a context of 128 tokens
    item = Item(["Once upon a time"] * 2, [" there was a king" * 60, " end"], 0)
    long, short = evaluate.requests(m, item)
    context, continuation = evaluate.split_tokens(m, item.contexts[0], item.choices[0])
    whole = context + continuation
    assert len(continuation) > 2 * m.n_ctx and len(long) > 2 and len(short) == 1
    first = len(context)
    for ctx, cont in long:
        assert cont == whole[first:first + len(cont)] and ctx == whole[first - len(ctx):first]
        assert len(ctx) + len(cont) <= m.n_ctx and len(ctx) >= min(first, m.n_ctx // 2)
        first += len(cont)
    assert first == len(whole)
    r = evaluate.evaluate(m, "arc_easy", limit=2, progress=False)  # the pieces' sums go through evaluate
    assert r["items"] == 2


def test_command_line(tmp_path, tiny_gguf):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "twofile", "eval", str(tiny_gguf[0]), "--task", "arc_easy", "lambada",
                        "--limit", "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| arc_easy | 0 | 3 |" in r.stdout and "| lambada | 0 | 3 |" in r.stdout
    results = json.loads(out.read_text())["results"]
    assert [x["task"] for x in results] == ["arc_easy", "lambada"] and all(x["items"] == 3 for x in results)
    assert results[1]["perplexity"] > 1 and "acc_norm" not in results[1]
    for args, message in ((["--task", "nope"], "unknown task 'nope'"), (["--task", "piqa", "--limit", "0"],
                                                                        "--limit 0 must be at least 1")):
        r = subprocess.run([sys.executable, "-m", "twofile", "eval", str(tiny_gguf[0]), *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

"""`twofile eval --task`: the benchmark sets as published, the metrics on hand-built items,
per-choice log-likelihoods against transformers, chance for a random model, and clearly above
chance for the default model."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from twofile import evaluate, run
from twofile.evaluate import Item

# the published sizes of the sets the suite evaluates on (validation/dev splits)
SIZES = {"arc_easy": 570, "arc_challenge": 299, "boolq": 3270, "csqa": 1221, "hellaswag": 10042, "openbookqa": 500,
         "piqa": 1838, "sciq": 1000, "socialiqa": 1954, "winogrande": 1267}


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


@pytest.mark.parametrize("task", sorted(SIZES))
def test_sets_are_the_published_ones(task):
    items = evaluate.load(task)
    assert len(items) == SIZES[task]
    assert all(len(i.choices) >= 2 and 0 <= i.gold < len(i.choices) and len(i.contexts) == len(i.choices)
               for i in items)
    shots = evaluate.load(task, shots=5)[0]
    assert len(shots.contexts[0]) > len(items[0].contexts[0])  # the examples come first


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
@pytest.mark.parametrize("task", ["hellaswag", "arc_challenge", "winogrande", "piqa", "boolq"])
def test_choice_loglikelihoods_match_transformers(smollm2, hf_model, task):
    """The numpy path (float32) within 1e-3 of transformers on the same GGUF, per choice; the
    kernels (16-bit activations) within 0.05 and with the same ranking of the choices."""
    item = evaluate.load(task)[3]
    oracle = []
    for context, continuation in zip(item.contexts, item.choices):
        ctx, cont = evaluate.split_tokens(smollm2, context, continuation)
        with torch.no_grad():
            logp = torch.log_softmax(hf_model(torch.tensor([ctx + cont])).logits[0].double(), -1)
        oracle.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
    fast = evaluate.choice_scores(smollm2.session(), smollm2, item)
    smollm2.use_numba = False
    try:
        exact = evaluate.choice_scores(smollm2.session(), smollm2, item)
    finally:
        smollm2.use_numba = run.numba is not None
    assert np.allclose(exact, oracle, atol=1e-3), (exact, oracle)
    assert np.allclose(fast, oracle, atol=0.05), (fast, oracle)
    assert np.argmax(fast) == np.argmax(oracle)


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


def test_command_line(tmp_path, tiny_gguf):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "twofile", "eval", str(tiny_gguf[0]), "--task", "arc_easy", "boolq",
                        "--limit", "3", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| arc_easy | 3 |" in r.stdout and "| boolq | 3 |" in r.stdout
    results = json.loads(out.read_text())["results"]
    assert [x["task"] for x in results] == ["arc_easy", "boolq"] and all(x["items"] == 3 for x in results)
    for args, message in ((["--task", "nope"], "unknown task 'nope'"), (["--task", "piqa", "--limit", "0"],
                                                                        "--limit 0 must be at least 1")):
        r = subprocess.run([sys.executable, "-m", "twofile", "eval", str(tiny_gguf[0]), *args],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

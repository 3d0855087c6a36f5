"""Sampling against hand-computed distributions, and generation's stop rules."""

import numpy as np

from twofile import run


def frequencies(logits, n=4000, **kw):
    rng = np.random.default_rng(0)
    picks = [run.sample(np.asarray(logits, np.float32), rng, **kw) for _ in range(n)]
    return np.bincount(picks, minlength=len(logits)) / n


LOGITS = np.log([0.5, 0.25, 0.15, 0.07, 0.03])  # probabilities at temperature 1
OFF = dict(top_k=0, top_p=1.0, min_p=0.0)


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    assert run.sample(np.array([0.1, 3.0, 2.9], np.float32), rng, temperature=0) == 1
    assert run.sample(np.array([0.1, 3.0, 2.9], np.float32), rng, temperature=1.0, top_k=1) == 1


def test_temperature_one_samples_the_softmax():
    np.testing.assert_allclose(frequencies(LOGITS, temperature=1.0, **OFF), np.exp(LOGITS), atol=0.03)


def test_temperature_sharpens():
    expected = np.exp(LOGITS / 0.5) / np.exp(LOGITS / 0.5).sum()  # p^2, renormalized
    np.testing.assert_allclose(frequencies(LOGITS, temperature=0.5, **OFF), expected, atol=0.03)


def test_top_k_top_p_min_p_filters():
    f = frequencies(LOGITS, temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    np.testing.assert_allclose(f, [2 / 3, 1 / 3, 0, 0, 0], atol=0.03)
    # top_p 0.8: 0.5 + 0.25 = 0.75 < 0.8, so the third token (0.15) completes the nucleus
    f = frequencies(LOGITS, temperature=1.0, top_k=0, top_p=0.8, min_p=0.0)
    np.testing.assert_allclose(f, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0], atol=0.03)
    # min_p 0.2: keep p >= 0.1 (0.5, 0.25, 0.15)
    f = frequencies(LOGITS, temperature=1.0, top_k=0, top_p=1.0, min_p=0.2)
    np.testing.assert_allclose(f, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0], atol=0.03)


def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -1.0, 1.9, 0.5], np.float32)
    rng = np.random.default_rng(0)
    # penalized: token 0 -> 2.0 / 1.5 = 1.33 < 1.9, so token 2 wins
    assert run.sample(logits, rng, temperature=0, repeat_penalty=1.5, recent=[0, 1]) == 2
    assert run.sample(logits, rng, temperature=0, repeat_penalty=1.0, recent=[0, 1]) == 0
    f = frequencies(np.log([0.5, 0.5]), temperature=1.0, repeat_penalty=2.0, recent=[0], **OFF)
    # log(0.5) = -0.69 is multiplied by 2: weights 0.25 vs 0.5
    np.testing.assert_allclose(f, [1 / 3, 2 / 3], atol=0.03)


def test_same_seed_same_output(tiny_gguf):
    m = run.load(tiny_gguf[0])
    ids = m.tokenize("The quick")
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = list(m.generate(ids, seed=123, **kw))
    b = list(m.generate(ids, seed=123, **kw))
    c = list(m.generate(ids, seed=124, **kw))
    assert a == b and a != c


def test_stop_strings_end_generation_without_printing_them(tiny_gguf):
    m = run.load(tiny_gguf[0])
    ids = m.tokenize("The quick")
    kw = dict(max_tokens=40, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    full = m.detokenize(list(m.generate(ids, **kw)))
    assert len(full) > 20
    stop = full[10:14]
    out = list(m.generate(ids, stop=[stop], **kw))
    text = m.detokenize(out)
    assert m.finish_reason == "stop"
    assert stop not in text and full.startswith(text) and len(text) <= full.index(stop)
    # a token that ends a stop string's first half is held back until it is known
    assert len(text) >= full.index(stop) - max(len(m.tokenizer.token_bytes(t)) for t in out + [0]) - 1


def test_generation_stops_at_end_of_turn(tiny_gguf):
    m = run.load(tiny_gguf[0])
    end = m.tokenizer.token_to_id["<|im_end|>"]
    assert end in m.tokenizer.eog_ids
    logits = np.zeros(m.config.n_vocab, np.float32)
    logits[end] = 100.0
    m._prefill = lambda ids: logits  # the next token is certainly <|im_end|>
    assert list(m.generate([5, 6], max_tokens=10, temperature=0)) == []
    assert m.finish_reason == "eos"

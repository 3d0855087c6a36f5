"""Sampling against hand-computed distributions and a brute-force reference sampler, and
generation's stop rules (stop strings on bytes, end of turn) on scripted token sequences."""

import itertools

import numpy as np
import pytest

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


def reference_distribution(logits, temperature, top_k, top_p, min_p):
    """The straightforward sampler (sort the whole vocabulary, as run.py did before): the oracle
    for the partial-selection one."""
    logits = logits.astype(np.float64) / temperature
    order = np.argsort(-logits, kind="stable")
    if 0 < top_k < len(order):
        order = order[:top_k]
    probs = np.exp(logits[order] - logits[order].max())
    probs /= probs.sum()
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        order, probs = order[:keep], probs[:keep]
    if min_p > 0.0:
        keep = probs >= min_p * probs[0]
        order, probs = order[keep], probs[keep]
    return order, probs / probs.sum()


def test_top_k_ids_on_ties_sorted_and_constant_logits():
    """The k largest, against a full sort: distinct ids whose values are the k largest values
    (with ties, which of the equal ones is free)."""
    rng = np.random.default_rng(0)
    cases = [np.arange(1000, dtype=np.float32), np.arange(1000, dtype=np.float32)[::-1].copy(),
             np.zeros(777, np.float32), rng.integers(0, 5, 1001).astype(np.float32),
             rng.standard_normal(49152).astype(np.float32)]
    for logits in cases:
        for k in (1, 2, 3, 40, 333, len(logits) - 1):
            ids = run.top_k_ids(logits, k)
            assert len(ids) == len(set(ids.tolist())) == k
            assert np.array_equal(np.sort(logits[ids]), np.sort(logits)[-k:]), (len(logits), k)


@pytest.mark.parametrize("vocab", [50, 5000, 49152])
def test_distribution_equals_the_full_sort(vocab):
    """Every combination of filters on peaked and flat logits: the same tokens kept, with the
    same probabilities, as sorting the whole vocabulary."""
    rng = np.random.default_rng(vocab)
    checked = 0
    for scale, temperature, top_k, top_p, min_p in itertools.product(
            (0.5, 3.0, 12.0), (0.3, 0.8, 1.5), (0, 1, 40, vocab), (1.0, 0.95, 0.5), (0.0, 0.05, 0.5)):
        logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
        ids, p = run.sampling_distribution(logits, temperature, top_k, top_p, min_p)
        want_ids, want_p = reference_distribution(logits, temperature, top_k, top_p, min_p)
        order = np.argsort(-logits[ids], kind="stable")
        assert np.array_equal(np.sort(ids), np.sort(want_ids)), (scale, temperature, top_k, top_p, min_p)
        np.testing.assert_allclose(p[order], want_p, rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked == 324


def test_same_seed_same_output(tiny_gguf):
    m = run.load(tiny_gguf[0])
    ids = m.tokenize("The quick")
    kw = dict(max_tokens=24, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    a, b, c = (m.session().generate(ids, seed=seed, **kw) for seed in (123, 123, 124))
    texts = ["".join(g) for g in (a, b, c)]
    assert len(a.tokens) == 24 and a.tokens == b.tokens and texts[0] == texts[1]
    assert a.tokens != c.tokens


def scripted(m, tokens):
    """A session whose model 'predicts' the given tokens, one after another, with certainty."""
    s = m.session()
    script = iter(list(tokens) + [sorted(m.tokenizer.eog_ids)[0]])

    def logits(*args):
        row = np.zeros(m.config.n_vocab, np.float32)
        row[next(script)] = 100.0
        return row

    s.prefill = s.step = logits
    s.tokens = [0]
    return s


def byte_tokens(tok, data: bytes) -> list[int]:
    """One token per byte (byte-level BPE has a token for each)."""
    return [tok.token_to_id[tok.byte_char[b]] for b in data]


def run_script(m, tokens, stop):
    gen = scripted(m, tokens).generate([1], max_tokens=50, temperature=0, stop=stop)
    pieces = list(gen)
    return gen, pieces


def test_stop_string_split_across_tokens_and_characters(tiny_gguf):
    """A stop string whose first character's UTF-8 bytes are split between two tokens still
    matches on bytes; the text ends exactly where it begins, and everything before it is
    emitted (OpenAI's rule); no piece holds half a character."""
    m = run.load(tiny_gguf[0])
    tok = m.tokenizer
    text = "naïve café — fin"
    tokens = byte_tokens(tok, text.encode())
    for stop, expected in (("é —", "naïve caf"), ("ïve", "na"), ("fin", "naïve café — "), ("—", "naïve café ")):
        gen, pieces = run_script(m, tokens, [stop, "never there"])
        assert gen.finish_reason == "stop" and gen.text == expected == "".join(pieces), stop
        assert not any("\ufffd" in piece for piece in pieces)
    gen, pieces = run_script(m, tokens, ["not in it"])
    assert gen.finish_reason == "eos" and gen.text == text and len(pieces) > 5  # streamed, not held
    # a multi-byte token that holds text before the stop string: that text is emitted
    word = next(i for i in range(len(tok.tokens)) if len(tok.token_bytes(i)) >= 3 and tok.token_bytes(i).isalpha())
    spelled = tok.token_bytes(word).decode()
    gen, _ = run_script(m, [word] + byte_tokens(tok, b"!!"), [spelled[-1] + "!"])
    assert gen.text == spelled[:-1] and gen.finish_reason == "stop"


def test_stop_strings_with_sentencepiece_keep_the_leading_space(tmp_path, tiny_gguf):
    """A SentencePiece model's first generated token '▁Hello' is ' Hello' in a continuation:
    the text before a stop string keeps its spaces."""
    from conftest import tiny_llama, write_llama_gguf
    from test_tokenizer import spm_metadata, train_sentencepiece

    sp = train_sentencepiece(tmp_path)
    path = write_llama_gguf(tmp_path / "spm.gguf", tiny_llama(tie=True, vocab=sp.get_piece_size()), spm_metadata(sp))
    m = run.load(path)
    ids = sp.encode("Hello world, the quick")
    assert sp.id_to_piece(ids[0]).startswith("\u2581")
    gen, pieces = run_script(m, ids, ["quick"])
    assert gen.text == " Hello world, the " and gen.finish_reason == "stop"
    gen, pieces = run_script(m, ids, [])
    assert gen.text == " Hello world, the quick" and "".join(pieces) == gen.text


def test_generation_stops_at_end_of_turn(tiny_gguf):
    m = run.load(tiny_gguf[0])
    end = m.tokenizer.token_to_id["<|im_end|>"]
    assert end in m.tokenizer.eog_ids
    s = m.session()
    logits = np.zeros(m.config.n_vocab, np.float32)
    logits[end] = 100.0
    s.prefill = lambda ids: logits  # the next token is certainly <|im_end|>
    gen = s.generate([5, 6], max_tokens=10, temperature=0)
    assert list(gen) == [] and gen.finish_reason == "eos" and gen.tokens == []
    gen = s.generate([5, 6], max_tokens=3, temperature=0, ignore_eos=True)
    s.step = lambda token: logits
    list(gen)
    assert gen.finish_reason == "length" and len(gen.tokens) == 3 and end not in gen.tokens

"""Gemma 3 270M (Q4_K_M, from the package index: twofile.assets.GEMMA3) against Hugging Face
transformers loading the same GGUF file: logits on both paths, greedy generations,
tokenization of 1,000 varied strings with its 262,144-token SentencePiece vocabulary."""

import pytest

from conftest import check_greedy_tokens, check_near_greedy_tokens, check_real_model_logits, hf_gguf, varied_strings
from twofile import assets, run

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
           "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def path():
    return assets.fetch(assets.GEMMA3)


@pytest.fixture(scope="module")
def ours(path):
    return run.load(str(path))


@pytest.fixture(scope="module")
def hf(path):
    return hf_gguf(path)


@pytest.fixture(scope="module")
def hf_tokenizer(hf):
    return hf[0]


@pytest.fixture(scope="module")
def hf_model(hf):
    return hf[1]


def test_the_file_is_gemma3_with_its_windows(ours):
    c = ours.config
    assert (c.arch, c.n_layer, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_vocab) == \
        ("gemma3", 18, 640, 4, 1, 256, 262144)
    assert c.sliding_window == 512 and [i for i, swa in enumerate(c.swa_layers) if not swa] == [5, 11, 17]


def test_logits_match_transformers(path, hf_model, ours):
    """Both paths (conftest); the prompt runs past no window (512): the sliding-window layers
    are checked on tiny models (test_architectures)."""
    check_real_model_logits(path, hf_model, ours.tokenize(PROMPTS[2] + " " + PROMPTS[1]))  # measured 2e-5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_identical(ours, hf_model, hf_tokenizer, prompt):
    check_greedy_tokens(ours, hf_model, hf_tokenizer, prompt, pad_token_id=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_with_8_bit_activations(path, hf_model, hf_tokenizer, prompt):
    """run.load(activations=8): each greedy token within 0.25 of transformers' best logit (it
    parts from transformers' greedy text on the third prompt, at a near tie)."""
    check_near_greedy_tokens(run.load(str(path), activations=8), hf_model, hf_tokenizer, prompt)


def test_tokenizer_matches_transformers_on_1000_strings(ours, hf_tokenizer):
    """The same ids, and the same text back, on 1,000 varied strings with Gemma's special
    tokens among them. One rule differs on purpose: a <bos> written at the start of the text
    is not doubled (llama.cpp's rule; transformers adds a second)."""
    bos = ours.tokenizer.bos_id
    texts = varied_strings(1000, seed=11, specials=["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"])
    doubled = 0
    for text in texts:
        mine, theirs = ours.tokenize(text), hf_tokenizer(text)["input_ids"]
        if text.startswith("<bos>"):
            doubled += 1
            theirs = theirs[1:] if theirs[:2] == [bos, bos] else theirs
        assert mine == theirs, repr(text)
        assert ours.detokenize(mine) == hf_tokenizer.decode(mine), repr(text)
    assert 0 < doubled < 50


def test_command_line_knows_it_by_name(path):
    """`twofile run gemma3-270m` fetches (here: finds) the verified file and runs it."""
    import subprocess
    import sys

    assert assets.model_path("gemma3-270m") == str(path) and assets.model_path("x.gguf") == "x.gguf"
    out = subprocess.run([sys.executable, "-m", "twofile", "run", "gemma3-270m", "-p", "The capital of France is",
                          "-n", "6", "--temperature", "0"], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.startswith(" the capital of the country")  # what transformers' greedy tokens say too

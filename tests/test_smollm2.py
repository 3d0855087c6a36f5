"""The default model, SmolLM2-135M-Instruct (Q4_1), against Hugging Face transformers
loading the same GGUF file: logits, greedy generations, tokenization, chat template."""

import unicodedata

import numpy as np
import pytest
import torch

from conftest import varied_strings
from twofile import run

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
           "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return run.load(smollm2_path)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


def test_logits_match_transformers(smollm2_path, hf_model, hf_tokenizer):
    """Both paths: numpy's float32 (the reference) and numba's kernels (16-bit activations)."""
    ids = hf_tokenizer(PROMPTS[2] + " " + PROMPTS[1])["input_ids"]
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids])).logits[0].numpy()
    numpy_path = run.load(smollm2_path)
    numpy_path.use_numba = False
    mine = numpy_path.logits(ids)
    # float32 noise: the two sum in different orders over 30 layers; logits reach ~30
    assert np.abs(mine - theirs).max() <= 5e-4
    assert (mine.argmax(-1) == theirs.argmax(-1)).all()
    kernels = run.load(smollm2_path)
    if kernels.use_numba:
        fast = kernels.session(exact=True).feed(ids, all_logits=True)
        assert np.abs(fast - theirs).max() <= 1e-3 * np.abs(theirs).max()
        assert (fast.argmax(-1) == theirs.argmax(-1)).all()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_identical(ours, hf_model, hf_tokenizer, prompt):
    ids = hf_tokenizer(prompt)["input_ids"]
    assert ours.tokenize(prompt) == ids
    with torch.no_grad():
        # an explicit mask: otherwise transformers masks prompt tokens equal to the pad id (<|im_end|>)
        x = torch.tensor([ids])
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                                eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    gen = ours.session().generate(ids, max_tokens=32, temperature=0)
    text = "".join(gen)
    mine = gen.tokens
    # ours stops at end-of-turn; transformers was told not to, so compare up to it
    assert mine == out[:len(mine)] and text == hf_tokenizer.decode(mine)
    assert len(mine) == 32 or out[len(mine)] in ours.tokenizer.eog_ids


def test_tokenizer_matches_transformers_on_1000_strings(ours, hf_tokenizer):
    """transformers' GGUF loader ignores tokenizer.ggml.pre: for SmolLM2 (`smollm`) it drops
    the model's own first split, every digit on its own (Digits(individual_digits=True), as
    in SmolLM2's tokenizer.json and in llama.cpp). Oracle 1 is transformers' tokenizer for
    the file with that split restored; oracle 2 is transformers' tokenizer as it loads, on
    the strings without digits, where the missing split cannot matter."""
    import copy

    from tokenizers import pre_tokenizers

    original = copy.deepcopy(hf_tokenizer)
    original.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), hf_tokenizer.backend_tokenizer.pre_tokenizer])
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>"]
    texts = varied_strings(1200, seed=11, specials=specials)
    without_digits = 0
    for text in texts:
        mine = ours.tokenize(text)
        assert mine == original(text)["input_ids"], repr(text)
        if not any(unicodedata.category(c)[0] == "N" for c in text):  # \p{N}
            without_digits += 1
            assert mine == hf_tokenizer(text)["input_ids"], repr(text)
        assert ours.detokenize(mine) == hf_tokenizer.decode(mine), repr(text)
    assert without_digits >= 400


def test_chat_template_matches_transformers(ours, hf_tokenizer):
    conversations = [
        [{"role": "user", "content": "Hi!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? 🙂"}],
    ]
    for messages in conversations:
        for add in (True, False):
            assert ours.chat_prompt(messages, add) == hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add)
            expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add)
            expected = expected["input_ids"] if hasattr(expected, "keys") else expected
            assert ours.chat_tokens(messages, add) == list(expected)
    assert ours.tokenizer.eos_id in ours.tokenizer.eog_ids
    assert ours.tokenizer.token_to_id["<|im_end|>"] in ours.tokenizer.eog_ids

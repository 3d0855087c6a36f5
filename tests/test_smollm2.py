"""The default model, SmolLM2-135M-Instruct (Q4_1), against Hugging Face transformers
loading the same GGUF file: logits, greedy generations, tokenization, chat template."""

import unicodedata

import pytest

from conftest import check_greedy_tokens, check_real_model_logits, hf_gguf, varied_strings
from twofile import run

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away,",
           "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return run.load(smollm2_path)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    return hf_gguf(smollm2_path)


@pytest.fixture(scope="module")
def hf_tokenizer(hf):
    return hf[0]


@pytest.fixture(scope="module")
def hf_model(hf):
    return hf[1]


def test_logits_match_transformers(smollm2_path, hf_model, hf_tokenizer):
    """Both paths (conftest); logits reach ~30."""
    check_real_model_logits(smollm2_path, hf_model, hf_tokenizer(PROMPTS[2] + " " + PROMPTS[1])["input_ids"])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_32_greedy_tokens_identical(ours, hf_model, hf_tokenizer, prompt):
    check_greedy_tokens(ours, hf_model, hf_tokenizer, prompt, pad_token_id=2)  # 2: <|im_end|>


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

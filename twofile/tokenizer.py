"""Byte-level BPE tokenizers: trained by Hugging Face `tokenizers`, written into GGUF.

    twofile tokenizer train                              # the default corpus, 4096 tokens
    twofile tokenizer train CORPUS... --vocab-size 8192 -o tok.json

The split regex is Llama 3's, which llama.cpp knows by the name `llama-bpe`, so a GGUF
file can say exactly how to pre-tokenize (tokenizer.ggml.pre) and run.py, llama.cpp and
transformers all tokenize the same way. The tokenizer is saved as tokenizer.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Llama 3's pre-tokenizer split (llama.cpp: LLAMA_VOCAB_PRE_TYPE_LLAMA3, "llama-bpe")
SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = "llama-bpe"
BOS, EOS, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]  # ids 0..3: documents start with BOS; chat uses the rest
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                   " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|im_start|>assistant\n' }}{% endif %}")
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def new_tokenizer() -> Tokenizer:
    # llama.cpp (and run.py) encode a `llama-bpe` file with ignore_merges: a pre-tokenized
    # word that is itself a token is taken whole, without merges; so must `tokenizers`
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def train(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train on an iterator of texts (streamed: the corpus need not fit in memory)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"--vocab-size {vocab_size} is too small: 256 byte tokens and "
                         f"{len(SPECIAL_TOKENS)} special tokens need at least {MIN_VOCAB}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seen = 0

    def counted():
        nonlocal seen
        for text in texts:
            seen += len(text)
            yield text

    tok.train_from_iterator(counted(), trainer)
    if seen == 0:
        raise ValueError("the corpus is empty: no text to train a tokenizer on")
    return tok


def save(tok: Tokenizer, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: a half-written tokenizer never has the final name


def load(path: str | Path) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a bad file
        raise ValueError(f"{path}: not a tokenizer.json file ({str(e).splitlines()[0][:120]})") from None
    if tok.token_to_id(BOS) is None:
        raise ValueError(f"{path}: tokenizer has no {BOS} token (not trained by twofile?)")
    return tok


def fingerprint(tok: Tokenizer) -> str:
    """A hash of the vocabulary and merges: shards and checkpoints name the tokenizer by it."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def gguf_metadata(tok: Tokenizer) -> dict:
    """The tokenizer.* GGUF keys (llama.cpp's names), for the export step's writer."""
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": GGUF_PRE,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in SPECIAL_TOKENS else 1 for t in tokens],  # 3 = control
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": vocab[BOS],
        "tokenizer.ggml.eos_token_id": vocab[EOS],
        "tokenizer.ggml.eot_token_id": vocab[IM_END],
        "tokenizer.ggml.padding_token_id": vocab[EOS],
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }

"""run.py's tokenizers against llama.cpp's own tokenizer test vectors, the oracle here: the
vocabulary-only GGUF files of llama.cpp's models/ folder (ggml-vocab-NAME.gguf, no tensors),
each with texts (.gguf.inp, separated by a "__ggml_vocab_test__" line) and, one line per text,
the ids llama.cpp's tests/test-tokenizer-0.cpp expects (.gguf.out). That test tokenizes with
add_special=false (no BOS) and parse_special=false (special tokens written in the text stay
text). The files come from the llama.cpp source inside the sdist llama-cpp-python 0.3.36
(twofile.assets.LLAMA_CPP_VOCABS, fetched once through pip).

    python -m pytest -q tests/test_llama_cpp_vocab.py
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from twofile import assets, run

SEPARATOR = "\n__ggml_vocab_test__\n"

# the vocabularies whose tokenizer run.py supports -> how many test vectors llama.cpp ships for them
SUPPORTED = {
    "gpt-2": 46,        # gpt2, pre gpt-2
    "llama-bpe": 46,    # gpt2, pre llama-bpe (Llama 3: its own split, ignore_merges)
    "qwen2": 46,        # gpt2, pre qwen2
    "starcoder": 46,    # gpt2, pre starcoder (digits one by one, then the GPT-2 split)
    "llama-spm": 46,    # llama (SentencePiece, Llama 2)
    "phi-3": 46,        # llama (SentencePiece)
    "command-r": 46,    # gpt2, pre command-r (as starcoder)
    "deepseek-coder": 46,  # gpt2, pre deepseek-coder (newlines, letters, punctuation, CJK, digits in turn)
    "deepseek-llm": 46,    # gpt2, pre deepseek-llm (its own letter and punctuation lists)
    "falcon": 46,       # gpt2, pre falcon (punctuation runs first, then GPT-2, then 3 digits)
    "mpt": 46,          # gpt2, pre mpt (the GPT-2 split)
    "qwen35": 50,       # gpt2, pre qwen35 (as qwen2, letters with their combining marks)
    "refact": 46,       # gpt2, pre refact (as starcoder)
    "aquila": 0,        # gpt2 without tokenizer.ggml.pre (llama.cpp's "default"); no vectors shipped
    "gpt-neox": 0,      # gpt2 without tokenizer.ggml.pre (llama.cpp's "default"); no vectors shipped
    "baichuan": 0,      # llama (SentencePiece); no vectors shipped
}
# the others -> what run.Tokenizer's error names (their vectors are not run)
NOT_SUPPORTED = {
    "bert-bge": "tokenizer.ggml.model = 'bert'",          # WordPiece
    "nomic-bert-moe": "tokenizer.ggml.model = 't5'",      # Unigram
    "gemma-4": "tokenizer.ggml.model = 'gemma4'",         # BPE over raw UTF-8 with U+2581 spaces
}


@pytest.fixture(scope="module")
def vocab_dir() -> Path:
    return assets.fetch(assets.LLAMA_CPP_VOCABS)


@functools.cache
def tokenizer(path: Path) -> run.Tokenizer:
    return run.Tokenizer(run.read_gguf(str(path)).metadata, str(path))


def read_vectors(path: Path) -> list[tuple[str, list[int]]]:
    """(text, ids) pairs, read as test-tokenizer-0.cpp reads them: the .inp split at the
    separator (the text after the last one, empty here, is not a test), one .out line per text."""
    inp, out = Path(f"{path}.inp"), Path(f"{path}.out")
    if not inp.exists():
        return []
    texts = inp.read_bytes().decode("utf-8").split(SEPARATOR)
    if texts[-1] == "":
        texts.pop()
    lines = out.read_bytes().decode("utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), f"{path.name}: {len(texts)} texts but {len(lines)} lines of ids"
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


def test_every_vocab_file_is_listed(vocab_dir):
    names = {p.name[len("ggml-vocab-"):-len(".gguf")] for p in vocab_dir.glob("ggml-vocab-*.gguf")}
    assert names == set(SUPPORTED) | set(NOT_SUPPORTED)
    assert not set(SUPPORTED) & set(NOT_SUPPORTED)


@pytest.mark.parametrize("name", sorted(NOT_SUPPORTED))
def test_unsupported_tokenizers_are_refused(vocab_dir, name):
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    with pytest.raises(run.GGUFError, match="is not supported") as error:
        tokenizer(path)
    assert NOT_SUPPORTED[name] in str(error.value)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_matches_llama_cpp_vectors(vocab_dir, name):
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    tok = tokenizer(path)
    vectors = read_vectors(path)
    assert len(vectors) == SUPPORTED[name]
    wrong = []
    for text, expected in vectors:
        ids = tok.encode(text, add_bos=False, parse_special=False)
        if ids != expected:
            wrong.append(f"{text!r}:\n  llama.cpp {expected}\n  run.py    {ids}")
        # llama.cpp's ids decode back to the text (byte-level BPE and SentencePiece with byte
        # fallback lose nothing; the space SentencePiece adds in front is taken off again)
        elif tok.decode(expected) != text:
            wrong.append(f"{text!r}: decodes to {tok.decode(expected)!r}")
    assert not wrong, f"{len(wrong)} of {len(vectors)} vectors differ:\n" + "\n".join(wrong)


# Pieces from llama.cpp's unicode_regex_split (src/unicode.cpp of the same sdist, compiled once
# by hand) with the regexes llama-vocab.cpp gives its default pre-tokenizer, which a gpt2 file
# without tokenizer.ggml.pre gets (aquila and gpt-neox here, which ship no vectors)
DEFAULT_SPLITS = {
    "I've 3.14159 apples, they'd say: \"$1,000+\" ~ x|y <= z^2 \t\n  ok":
        ["I", "'", "ve", " ", "3", ".", "141", "59", " apples", ",", " they", "'", "d", " say", ":", " ",
         "\"$", "1", ",", "000", "+\"", " ", "~", " x", "|", "y", " ", "<=", " z", "^", "2", " \t\n ", " ok"],
    "naïve 中文١٢٣4567 — ‘quoted’ `code`   ":
        ["naïve", " 中文", "١٢٣", "456", "7", " ", "—", " ", "‘", "quoted", "’", " `", "code", "`", "   "],
}


@pytest.mark.parametrize("name", ["aquila", "gpt-neox"])
def test_default_pre_tokenizer_splits_as_llama_cpp(vocab_dir, name):
    tok = tokenizer(vocab_dir / f"ggml-vocab-{name}.gguf")
    for text, pieces in DEFAULT_SPLITS.items():
        assert tok._pre_split(text) == pieces


def test_special_tokens_as_llama_cpp_finds_them(vocab_dir):
    """The rules llama-vocab.cpp states (tokenizer_st_partition and the per-model attributes),
    on texts that hold special tokens, which the vectors never do."""
    phi3 = tokenizer(vocab_dir / "ggml-vocab-phi-3.gguf")
    hello, world = phi3.encode("Hello", add_bos=False), phi3.encode("world", add_bos=False)
    # user-defined tokens (Phi-3's </s>) are split out even where special tokens stay text;
    # Phi-3's special tokens drop the whitespace after them, and SentencePiece's space prefix
    # follows any special token
    assert phi3.encode("Hello</s>  world", add_bos=False, parse_special=False) == hello + [2] + world
    assert phi3.encode("<|user|>\nHello<|end|>\n<|assistant|>\n", add_bos=False) == [32010] + hello + [32007, 32001]
    assert 32010 not in phi3.encode("<|user|>", parse_special=False)  # a control token stays text
    assert phi3.encode("[PAD32011]", add_bos=False) == [32011]  # unknown-type tokens are special too
    assert 32011 not in phi3.encode("[PAD32011]", parse_special=False)
    spm = tokenizer(vocab_dir / "ggml-vocab-llama-spm.gguf")  # no Phi-3 name: whitespace stays
    assert spm.encode("<s>\nHi", add_bos=False) == [1] + spm.encode("\nHi", add_bos=False)
    assert spm.encode("", parse_special=False) == [1] and spm.encode("", add_bos=False, parse_special=False) == []


def test_llama3_adds_bos_by_default(vocab_dir):
    """llama.cpp adds BOS for the LLAMA3 pre-tokenizer type when the file has no add_bos_token
    (the llama-bpe vocabulary has none); other gpt2 files add none, SentencePiece files do."""
    llama3 = tokenizer(vocab_dir / "ggml-vocab-llama-bpe.gguf")
    assert llama3.encode("Hello")[0] == llama3.bos_id == 128000
    assert tokenizer(vocab_dir / "ggml-vocab-gpt-2.gguf").encode("Hello") == [15496]

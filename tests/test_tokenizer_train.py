"""Tokenizer training (Hugging Face `tokenizers`) and its GGUF form: run.py's own BPE,
reading the keys from a GGUF file written by the gguf package, gives exactly the ids of
the `tokenizers` library (the oracle)."""

import pytest

from conftest import add_metadata, gguf, varied_strings
from twofile import assets, data, run, tokenizer


@pytest.fixture(scope="module")
def default_corpus():
    return assets.fetch(assets.DEFAULT_CORPUS)


@pytest.fixture(scope="module")
def trained(default_corpus):
    """A tokenizer trained on the default corpus, and the corpus's validation text."""
    sources = data.expand([str(default_corpus)])
    val = data.validation_files(sources, 0.01)
    train_texts = (text for name, text, _ in data.read_documents(sources) if name not in val)
    tok = tokenizer.train(train_texts, 8192, show_progress=False)
    val_text = "".join(text for name, text, _ in data.read_documents(sources) if name in val)
    return tok, val_text


def test_default_corpus_is_verified(default_corpus):
    files = sorted(default_corpus.glob("*_gut.txt"))
    assert len(files) == 42 and not list(default_corpus.glob("*_gut_f.txt"))
    assert any(f.name == "hamlet_gut.txt" for f in files)
    assert "To be, or not to be" in (default_corpus / "hamlet_gut.txt").read_text()


def test_run_py_bpe_matches_tokenizers_on_validation_and_varied_text(tmp_path, trained):
    tok, val_text = trained
    assert len(val_text) > 50_000
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    add_metadata(writer, tokenizer.gguf_metadata(tok))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = run.Tokenizer(run.read_gguf(tmp_path / "tok.gguf").metadata)
    assert ours.bos_id == tok.token_to_id(tokenizer.BOS) and ours.add_bos
    assert tok.token_to_id(tokenizer.IM_END) in ours.eog_ids
    expected = tok.encode(val_text, add_special_tokens=False).ids
    assert ours.encode(val_text, add_bos=False) == expected
    assert ours.decode(expected) == val_text
    for text in varied_strings(1000, seed=21, specials=tokenizer.SPECIAL_TOKENS):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ours.encode(text, add_bos=False) == ids, repr(text)
        assert ours.decode(ids) == tok.decode(ids, skip_special_tokens=False), repr(text)


def test_special_tokens_and_bytes(trained):
    import json

    tok, _ = trained
    assert json.loads(tok.to_str())["model"]["ignore_merges"]  # as llama.cpp encodes llama-bpe
    assert [tok.token_to_id(t) for t in tokenizer.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.get_vocab_size() == 8192
    # every byte is encodable: unseen characters fall back to byte tokens, nothing is lost
    text = "日本語 \x00 \U0001F600"
    assert tok.decode(tok.encode(text).ids) == text


def test_vocab_too_small_for_special_tokens():
    with pytest.raises(ValueError, match="--vocab-size 100 is too small.*at least 260"):
        tokenizer.train(["some text"], 100)


def test_empty_corpus_is_refused():
    with pytest.raises(ValueError, match="corpus is empty"):
        tokenizer.train(iter([]), 300, show_progress=False)


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a tokenizer.json file"):
        tokenizer.load(tmp_path / "bad.json")

"""run.py's tokenizers against their references: Hugging Face `tokenizers` for byte-level
BPE (GPT-2 and Llama 3 splits), Google's `sentencepiece` for SentencePiece BPE."""

import pytest

from conftest import LLAMA3_SPLIT, SAMPLE_TEXT, SPECIALS, add_metadata, bpe_metadata, gguf, train_bpe, varied_strings
from twofile import run


def tokenizer_from_gguf(tmp_path, metadata) -> run.Tokenizer:
    """Write the tokenizer keys to a GGUF file and read them back, as a model load does."""
    writer = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    add_metadata(writer, metadata)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return run.Tokenizer(run.read_gguf(tmp_path / "tok.gguf").metadata)


@pytest.mark.parametrize("pre,split", [("gpt-2", None), ("llama-bpe", LLAMA3_SPLIT)])
def test_bpe_matches_hf_tokenizers(tmp_path, pre, split):
    ref = train_bpe(600, split)
    ours = tokenizer_from_gguf(tmp_path, bpe_metadata(ref, pre))
    texts = varied_strings(1000, seed=3, specials=SPECIALS) + [SAMPLE_TEXT, "", " ", "\n\n\n", "a" * 300]
    for text in texts:
        expected = ref.encode(text, add_special_tokens=False).ids
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=False), text


def test_bos_added_by_rule_and_never_doubled(tmp_path):
    meta = bpe_metadata(train_bpe(300), "gpt-2")
    meta["tokenizer.ggml.add_bos_token"] = True
    tok = tokenizer_from_gguf(tmp_path, meta)
    bos = tok.bos_id
    plain = tok.encode("hi there", add_bos=False)
    assert tok.encode("hi there") == [bos] + plain            # the file's rule
    assert tok.encode("<|im_start|>hi there") == [bos] + plain  # BOS written in the text: not doubled
    assert tok.encode("hi there", add_bos=False) == plain
    assert tok.encode("x<|im_start|>")[-1] == bos and tok.encode("x<|im_start|>")[0] == bos


def test_stream_decoder_never_splits_utf8(tmp_path):
    tok = tokenizer_from_gguf(tmp_path, bpe_metadata(train_bpe(300), "gpt-2"))
    text = "emoji 👨‍👩‍👧‍👦 and 你好世界 and 🇫🇷 done"
    ids = tok.encode(text)
    # a multi-byte character spans several byte-level tokens here: the stream must hold it back
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="ignore")) == 0 for i in ids)
    decode = run.StreamDecoder(tok)
    pieces = [decode(i) for i in ids] + [decode.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def train_sentencepiece(tmp_path, byte_fallback=True):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([SAMPLE_TEXT] * 5 + varied_strings(300, seed=5)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=800,
                                   model_type="bpe", byte_fallback=byte_fallback, character_coverage=0.98,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)  # as Llama's own tokenizer: no normalization
    return spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


def spm_metadata(sp) -> dict:
    """GGUF keys for a SentencePiece model, as llama.cpp's converter writes them."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(), "tokenizer.ggml.unknown_token_id": sp.unk_id(),
            "tokenizer.ggml.add_bos_token": True}


def test_sentencepiece_matches_google_sentencepiece(tmp_path):
    sp = train_sentencepiece(tmp_path)
    ours = tokenizer_from_gguf(tmp_path, spm_metadata(sp))
    for text in varied_strings(1000, seed=4) + [SAMPLE_TEXT, "  leading", "trailing  ", "日本語のテキスト"]:
        expected = sp.encode(text)
        assert ours.encode(text, add_bos=False) == expected, text
        assert ours.encode(text) == [sp.bos_id()] + expected
        assert ours.decode(expected) == sp.decode(expected), text

"""Corpus reading, token shards and the training loader. Oracles: the `tokenizers` library
encoding the documents directly, hand-written inputs, and measured peak memory."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twofile import data, tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    from conftest import SAMPLE_TEXT, varied_strings

    tok = tokenizer.train([SAMPLE_TEXT] * 3 + varied_strings(300, seed=2), 600, show_progress=False)
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    tokenizer.save(tok, path)
    return path


def write(path: Path, content, opener=open):
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wb") as f:
        f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def docs(corpus, **kw):
    pieces = list(data.read_documents(data.expand([str(c) for c in corpus]), **kw))
    out = {}
    for name, text, start in pieces:
        out[name] = (out.get(name, "") if not start else "") + text
    return out


def test_reads_every_kind_of_corpus(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    write(tmp_path / "c/a.txt", "plain text\n")
    write(tmp_path / "c/sub/b.md", "# markdown\n")
    write(tmp_path / "c/sub/c.txt.gz", "gzipped\n", gzip.open)
    write(tmp_path / "c/d.txt.zst", zstandard.ZstdCompressor().compress(b"zstd text\n"))
    write(tmp_path / "c/skip.bin", b"\x00\x01")  # not a corpus file: ignored in folders
    write(tmp_path / "r.jsonl", '{"text": "one"}\n{"text": "two", "x": 1}\n\n{"body": "three"}\n')
    pq.write_table(pa.table({"content": ["row one", "row two"]}), tmp_path / "t.parquet")
    got = docs([tmp_path / "c"])
    assert got == {"a.txt": "plain text\n", "sub/b.md": "# markdown\n", "sub/c.txt.gz": "gzipped\n",
                   "d.txt.zst": "zstd text\n"}
    assert docs([tmp_path / "r.jsonl"], skip_bad=True) == {"r.jsonl:1": "one", "r.jsonl:2": "two"}
    assert docs([tmp_path / "r.jsonl"], text_field="body", skip_bad=True) == {"r.jsonl:4": "three"}
    assert docs([tmp_path / "t.parquet"], text_field="content") == {"t.parquet:1": "row one", "t.parquet:2": "row two"}
    monkeypatch.setattr(sys, "stdin", type("S", (), {"buffer": open(write(tmp_path / "in", "from stdin"), "rb")})())
    assert docs(["-"]) == {"<stdin>": "from stdin"}


def test_bad_records_are_reported_with_line_numbers(tmp_path):
    path = write(tmp_path / "r.jsonl", '{"text": "ok"}\n{"body": "x"}\nnot json\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"r.jsonl: line 2, 3, 4: not JSON with a string field 'text'"):
        docs([path])
    stats = data.ReadStats()
    assert len(list(data.read_documents(data.expand([str(path)]), skip_bad=True, stats=stats))) == 1
    assert "3 lines" in stats.skipped[0]
    with pytest.raises(ValueError, match="no column 'text'"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": ["a"]}), tmp_path / "t.parquet")
        docs([tmp_path / "t.parquet"])


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = write(tmp_path / "bad.txt", b"caf\xe9 ok \xff\xfe end \xe2\x82")
    stats = data.ReadStats()
    [(_, text, _)] = list(data.read_documents(data.expand([str(path)]), stats=stats))
    assert text == "caf\ufffd ok \ufffd\ufffd end \ufffd" and stats.replaced == 4


def test_binary_file_and_missing_path(tmp_path):
    path = write(tmp_path / "img.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match="img.txt: looks binary"):
        docs([path])
    assert docs([path], skip_bad=True) == {}
    with pytest.raises(FileNotFoundError):
        data.expand([str(tmp_path / "missing.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder holds no"):
        data.expand([str(tmp_path / "empty")])


def test_large_text_is_cut_where_tokenization_cannot_change(tmp_path, tok_path, monkeypatch):
    monkeypatch.setattr(data, "PIECE_BYTES", 1000)
    from conftest import SAMPLE_TEXT

    text = SAMPLE_TEXT * 40
    path = write(tmp_path / "big.txt", text)
    pieces = list(data.read_documents(data.expand([str(path)])))
    assert len(pieces) > 10 and "".join(t for _, t, _ in pieces) == text
    tok = tokenizer.load(tok_path)
    joined = [i for _, t, _ in pieces for i in tok.encode(t, add_special_tokens=False).ids]
    assert joined == tok.encode(text, add_special_tokens=False).ids


def make_corpus(folder: Path, n_files=12) -> Path:
    from conftest import varied_strings

    for i in range(n_files):
        write(folder / f"doc{i:02d}.txt", "\n".join(varied_strings(40, seed=100 + i)) + "\n")
    return folder


def test_prepare_writes_exact_tokens_and_whole_document_split(tmp_path, tok_path):
    corpus = make_corpus(tmp_path / "corpus")
    manifest = data.prepare([str(corpus)], str(tok_path), str(tmp_path / "out"), val_fraction=0.2, progress=False)
    tok = tokenizer.load(tok_path)
    bos = tok.token_to_id(tokenizer.BOS)
    sources = data.expand([str(corpus)])
    val = data.validation_files(sources, 0.2)
    assert 1 <= len(val) < 12
    for split in ("train", "val"):
        expected = []
        for s in sources:
            if (s.name in val) == (split == "val"):
                expected += [bos] + tok.encode(Path(s.path).read_bytes().decode(), add_special_tokens=False).ids
        shards = data.open_split(tmp_path / "out", split)
        assert np.concatenate(shards).tolist() == expected
        assert manifest["splits"][split]["tokens"] == len(expected)
    assert manifest["dtype"] == "uint16" and manifest["splits"]["val"]["documents"] == len(val)
    assert manifest["splits"]["train"]["documents"] + len(val) == 12
    # the same corpus and settings give the same split on every run
    assert data.validation_files(data.expand([str(corpus)]), 0.2) == val


def test_output_folder_rules(tmp_path, tok_path):
    corpus = make_corpus(tmp_path / "corpus", 3)
    out = tmp_path / "out"
    data.prepare([str(corpus)], str(tok_path), str(out), progress=False)
    before = (out / "train_00000.bin").read_bytes()
    # again: nothing to do, nothing touched
    data.prepare([str(corpus)], str(tok_path), str(out), progress=False)
    assert (out / "train_00000.bin").read_bytes() == before
    # another tokenizer: refused, the shards are kept
    other = tmp_path / "other.json"
    tokenizer.save(tokenizer.train(["different text entirely, to get different merges"] * 3, 300,
                                   show_progress=False), other)
    with pytest.raises(ValueError, match="holds shards of another tokenizer"):
        data.prepare([str(corpus)], str(other), str(out), progress=False)
    assert (out / "train_00000.bin").read_bytes() == before
    data.prepare([str(corpus)], str(other), str(out), progress=False, force=True)
    assert json.loads((out / "manifest.json").read_text())["tokenizer"] == tokenizer.fingerprint(tokenizer.load(other))


def test_interrupted_prepare_leaves_no_complete_looking_folder(tmp_path, tok_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus", 6)
    out = tmp_path / "out"
    monkeypatch.setattr(data, "SHARD_TOKENS", 500)  # several shards
    real = data._ShardWriter.flush
    calls = {"n": 0}

    def failing_flush(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived mid-prepare
        real(self)

    monkeypatch.setattr(data._ShardWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        data.prepare([str(corpus)], str(tok_path), str(out), progress=False)
    assert not (out / "manifest.json").exists() and list(out.glob("*.bin"))
    with pytest.raises(ValueError, match="no manifest.json"):
        data.open_split(out, "train")
    monkeypatch.setattr(data._ShardWriter, "flush", real)
    manifest = data.prepare([str(corpus)], str(tok_path), str(out), progress=False)  # rebuilds cleanly
    clean = data.prepare([str(corpus)], str(tok_path), str(tmp_path / "clean"), progress=False)
    assert manifest["splits"] == clean["splits"]
    for shard in manifest["splits"]["train"]["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "clean" / shard["file"]).read_bytes()


def test_empty_corpus_is_refused(tmp_path, tok_path):
    write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match="corpus is empty"):
        data.prepare([str(tmp_path / "empty.txt")], str(tok_path), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


PEAK = """
import sys
sys.path.insert(0, {root!r})
from twofile import data
data.SHARD_TOKENS = 1 << 20
data.prepare([{corpus!r}], {tok!r}, {out!r}, progress=False)
print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])
"""


def test_memory_stays_flat_as_the_corpus_grows(tmp_path, tok_path):
    """Peak RSS of `prepare` on a 16 MB and a 48 MB single-file corpus (compressed, so the
    whole text is never on disk either): streaming keeps the difference small. Both sizes are
    past the first ~12 MB, over which the heap settles (it grows by ~20 MB from 6 MB to 16 MB,
    then by ~2 MB to 48 MB or 96 MB: measured here)."""
    from conftest import SAMPLE_TEXT

    block = (SAMPLE_TEXT * 20).encode()
    peaks = []
    for mb in (16, 48):
        corpus = tmp_path / f"c{mb}.txt.gz"
        with gzip.open(corpus, "wb", compresslevel=1) as f:
            for _ in range(mb * (1 << 20) // len(block)):
                f.write(block)
        code = PEAK.format(root=str(ROOT), corpus=str(corpus), tok=str(tok_path), out=str(tmp_path / f"o{mb}"))
        # one tokenizer thread and one malloc arena: the size of per-thread arenas varies from run to run
        env = {**os.environ, "RAYON_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr
        peaks.append(int(r.stdout.split()[-1]) / 1024)  # MB
    print("peak RSS MB", peaks)
    assert peaks[1] - peaks[0] < 16, peaks  # 32 MB more text, far less than 32 MB more memory


def test_train_batches_deterministic_per_seed_step_rank(tmp_path, tok_path):
    corpus = make_corpus(tmp_path / "corpus", 4)
    data.prepare([str(corpus)], str(tok_path), str(tmp_path / "out"), val_fraction=0, progress=False)
    shards = data.open_split(tmp_path / "out", "train")
    stream = np.concatenate(shards).astype(np.int64)
    x, y = data.train_batch(shards, 8, 16, seed=1, step=5, rank=0)
    assert x.shape == y.shape == (8, 16) and x.dtype == np.int64
    assert (x[:, 1:] == y[:, :-1]).all()
    for row in np.concatenate([x, y[:, -1:]], axis=1):  # each window is a slice of the token stream
        starts = np.flatnonzero(stream[:len(stream) - 16] == row[0])
        assert any((stream[s:s + 17] == row).all() for s in starts)
    again = data.train_batch(shards, 8, 16, seed=1, step=5, rank=0)
    assert (again[0] == x).all()  # resumable: the batch of step 5 is the batch of step 5
    assert not (data.train_batch(shards, 8, 16, seed=1, step=5, rank=1)[0] == x).all()
    assert not (data.train_batch(shards, 8, 16, seed=1, step=6, rank=0)[0] == x).all()


def test_val_batches_cover_every_target_once(tmp_path, tok_path):
    corpus = make_corpus(tmp_path / "corpus", 6)
    data.prepare([str(corpus)], str(tok_path), str(tmp_path / "out"), val_fraction=0.4, progress=False)
    shards = data.open_split(tmp_path / "out", "val")
    targets = np.concatenate([y.reshape(-1) for _, y in data.val_batches(shards, 4, 32)])
    assert targets.tolist() == np.concatenate([s[1:] for s in shards]).tolist()


def test_cli_end_to_end_and_errors(tmp_path, tok_path):
    corpus = make_corpus(tmp_path / "corpus", 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "twofile"]
    r = subprocess.run([*cmd, "tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", str(tmp_path / "t.json")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cmd, "data", "prepare", str(corpus), "--tokenizer", str(tmp_path / "t.json"),
                        "-o", str(tmp_path / "d")], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and (tmp_path / "d/manifest.json").exists(), r.stderr
    for args, message in (
            (["tokenizer", "train", str(corpus), "--vocab-size", "10"], "error: --vocab-size 10 is too small"),
            (["data", "prepare", str(tmp_path / "nope"), "--tokenizer", str(tok_path), "-o", str(tmp_path / "x")],
             "error: " + str(tmp_path / "nope") + ": No such file or directory"),
            (["data", "prepare", str(corpus), "--tokenizer", str(tok_path), "-o", str(tmp_path / "d")],
             "error: " + str(tmp_path / "d") + ": holds shards of another tokenizer")):
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr


def split_tokens(folder) -> dict[str, list[int]]:
    return {split: np.concatenate(data.open_split(folder, split) or [np.zeros(0, np.int64)]).tolist()
            for split in ("train", "val")}


def test_one_file_is_split_at_its_end(tmp_path, tok_path):
    """A lone file (the usual input.txt) holds out its last 1% of bytes, cut at a line start:
    oracle: `tokenizers` encoding the head and the tail as two documents."""
    from conftest import varied_strings

    from twofile import train

    text = "\n".join(varied_strings(4000, seed=7)) + "\n"
    raw = text.encode("utf-8")
    assert len(raw) > 2 * data.PIECE_BYTES  # several pieces before the cut
    path = write(tmp_path / "input.txt", raw)
    manifest = data.prepare([str(path)], str(tok_path), str(tmp_path / "out"), progress=False)  # no flags
    tok = tokenizer.load(tok_path)
    bos = tok.token_to_id(tokenizer.BOS)
    tokens = split_tokens(tmp_path / "out")
    assert tokens["train"][0] == bos and tokens["val"][:1] == [bos], "both splits start a document"
    head = tok.decode(tokens["train"][1:], skip_special_tokens=False)
    tail = text[len(head):]
    assert head + tail == text and head.endswith("\n") and not tail[0].isspace()
    assert tokens["train"] == [bos] + tok.encode(head, add_special_tokens=False).ids
    assert tokens["val"] == [bos] + tok.encode(tail, add_special_tokens=False).ids
    held = len(tail.encode())
    assert len(raw) - round(0.99 * len(raw)) <= held < 0.02 * len(raw), held  # the last line start before 99%
    assert manifest["splits"]["val"]["bytes"] == held and manifest["splits"]["val"]["documents"] == 1
    # compressed, the same file gives the same shards (its size comes from a counting pass)
    gz = write(tmp_path / "input.txt.gz", raw, gzip.open)
    data.prepare([str(gz)], str(tok_path), str(tmp_path / "gz"), progress=False)
    assert split_tokens(tmp_path / "gz") == tokens
    # and training takes it with no flags about validation
    result = train.train(train.TrainConfig(data=str(tmp_path / "out"), out=str(tmp_path / "run"), depth=2, context=32,
                                           batch_tokens=256, micro_batch=8, max_steps=2, eval_every=2, compile=False),
                         progress=False)
    assert np.isfinite(result["val_bpb"]) and result["step"] == 2


def test_standard_input_is_spooled_and_split_like_a_file(tmp_path, tok_path):
    """`prepare -` gives the shards of the same text as a file, leaves no spool behind, and is
    never "already prepared" (standard input cannot be compared with last time)."""
    from conftest import varied_strings

    raw = ("\n".join(varied_strings(600, seed=8)) + "\n").encode()
    data.prepare([str(write(tmp_path / "in.txt", raw))], str(tok_path), str(tmp_path / "file"), progress=False)
    cmd = [sys.executable, "-m", "twofile", "data", "prepare", "-", "--tokenizer", str(tok_path), "-o",
           str(tmp_path / "stdin")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for rerun in (False, True):
        r = subprocess.run(cmd, input=raw, capture_output=True, env=env)
        assert r.returncode == 0, r.stderr.decode()
        assert ("rebuilding" in r.stderr.decode()) == rerun, r.stderr.decode()
        assert split_tokens(tmp_path / "stdin") == split_tokens(tmp_path / "file")
        assert split_tokens(tmp_path / "file")["val"], "the text's end is held out"
        assert not (tmp_path / "stdin" / data.STDIN_SPOOL).exists()


def test_whole_files_hold_out_at_most_half():
    """Whole files for validation only while they hold out at most half of the bytes; else
    none (and the end of each file is held out instead)."""
    first, second = sorted(["a.txt", "b.txt"], key=data._unit_hash)  # the order files are picked in
    small_first = [data.Source(first, first, 10), data.Source(second, second, 1000)]
    big_first = [data.Source(first, first, 1000), data.Source(second, second, 10)]
    assert data.validation_files(small_first, 0.01) == {first}
    assert data.validation_files(big_first, 0.01) == set()  # it would hold out 99% of the bytes


def test_default_corpus_keeps_its_validation_play():
    """The 42 Shakespeare files: whole files by name hash, one play, as the bench figures assume."""
    from twofile import assets

    sources = data.expand([str(assets.fetch(assets.DEFAULT_CORPUS))])
    assert len(sources) == 42 and data.validation_files(sources, 0.01) == {"henry_vi_part_2_gut.txt"}


def test_a_few_records_still_get_a_validation_record(tmp_path, tok_path):
    """Records go to validation one by one by hash; when none did, the last record does."""
    texts = ["first record\n", "second record\n", "third record\n"]
    path = write(tmp_path / "r.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert all(data._unit_hash(f"r.jsonl:{n}") >= 0.01 for n in (1, 2, 3))  # the hash alone picks none
    manifest = data.prepare([str(path)], str(tok_path), str(tmp_path / "out"), progress=False)
    tok = tokenizer.load(tok_path)
    bos = tok.token_to_id(tokenizer.BOS)
    expected = [[bos] + tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert split_tokens(tmp_path / "out") == {"train": expected[0] + expected[1], "val": expected[2]}
    assert manifest["splits"]["val"]["documents"] == 1


def test_a_changed_file_or_an_older_format_is_rebuilt(tmp_path, tok_path, capsys):
    """Same file names, new contents: the shards are rebuilt, not silently reused. Oracle: a
    fresh prepare of the new corpus."""
    corpus = make_corpus(tmp_path / "corpus", 3)
    out = tmp_path / "out"

    def prepare_again() -> str:
        data.prepare([str(corpus)], str(tok_path), str(out), progress=False)
        return capsys.readouterr().err

    prepare_again()
    before = split_tokens(out)
    assert "nothing to do" in prepare_again()
    write(corpus / "doc01.txt", (corpus / "doc01.txt").read_text() + "one more line\n")
    assert "doc01.txt changed since the shards were made: rebuilding them" in prepare_again()
    data.prepare([str(corpus)], str(tok_path), str(tmp_path / "fresh"), progress=False)
    assert split_tokens(out) == split_tokens(tmp_path / "fresh") != before
    # the same size, only another modification time: rebuilt too
    stat = (corpus / "doc02.txt").stat()
    os.utime(corpus / "doc02.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert "doc02.txt changed since the shards were made" in prepare_again()
    # a manifest of the older format (source names only) is rebuilt, not refused
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": "twofile-shards-1",
                                                   "sources": [s["name"] for s in manifest["sources"]]}))
    assert "rebuilding shards of an older format (twofile-shards-1)" in prepare_again()
    assert json.loads((out / "manifest.json").read_text())["format"] == data.FORMAT
    assert split_tokens(out) == split_tokens(tmp_path / "fresh")

"""From raw text to token shards, and the loader that feeds them to training.

    twofile data fetch-default                                   # Shakespeare into the cache
    twofile data prepare [CORPUS...] --tokenizer tok.json -o data/ [--val-fraction 0.01]

CORPUS is any mix of .txt/.md files, folders of them (recursive), .jsonl with a text field
(--field), .parquet with a text column, and - for standard input; each may be compressed
(.gz, .zst). Without CORPUS, the default corpus. A whole file is one document; so is each
jsonl line and parquet row, and each starts with the BOS token in the shards. The split into
train and validation is the same on every run: whole text files when there are several (see
`validation_files`), else the end of each text file (`tail_offsets`: one big input.txt
trains with no flags); records one by one.

The output folder holds shards (raw uint16 or uint32 tokens, memory-mappable) and a
manifest.json written last: a folder without a manifest is an interrupted prepare, and a
rerun rebuilds it. The manifest records each file's size and modification time, so a rerun
after a file changed rebuilds too.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".zst")
PIECE_BYTES = 1 << 16        # texts are read and tokenized in pieces of about this size (64 KB:
                             # `tokenizers` needs hundreds of bytes of memory per input byte)
SHARD_TOKENS = 1 << 24       # 16M tokens per shard (32 MB as uint16)
MANIFEST = "manifest.json"
FORMAT = "twofile-shards-2"
TAIL = ":tail"               # the document name of a text file's held-out end
STDIN_SPOOL = "stdin.tmp"    # standard input, copied into the output folder while preparing


# ---------------------------------------------------------------------------
# Reading corpora
# ---------------------------------------------------------------------------

@dataclass
class ReadStats:
    """What reading found, reported once at the end rather than per document."""
    documents: int = 0
    bytes: int = 0
    replaced: int = 0                        # invalid UTF-8 sequences replaced by U+FFFD
    skipped: list[str] = field(default_factory=list)  # what --skip-bad left out, and why

    def report(self) -> None:
        if self.replaced:
            print(f"warning: {self.replaced} invalid UTF-8 sequences were replaced by U+FFFD", file=sys.stderr)
        for line in self.skipped:
            print(f"warning: skipped {line}", file=sys.stderr)


@dataclass
class Source:
    path: str       # a file path, or "-" for standard input
    name: str       # the stable name a document's split is decided by
    size: int       # bytes on disk (0 for standard input)
    mtime_ns: int | None = None  # None for standard input

    @property
    def kind(self) -> str:
        base = self.path[:-3] if self.path.endswith(".gz") else self.path[:-4] if self.path.endswith(".zst") else self.path
        return "records" if base.endswith(RECORD_SUFFIXES) else "text"


def _usable(path: Path) -> bool:
    name = path.name
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    return name.endswith(TEXT_SUFFIXES + RECORD_SUFFIXES)


def expand(corpus: list[str]) -> list[Source]:
    """Files, folders (recursive, sorted) and "-" -> the list of sources to read."""
    sources = []
    for item in corpus:
        if item == "-":
            sources.append(Source("-", "<stdin>", 0))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _usable(p))
            if not files:
                raise ValueError(f"{item}: folder holds no {'/'.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} files")
            sources += [Source(str(p), p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in files]
        elif path.is_file():
            sources.append(Source(item, path.name, path.stat().st_size, path.stat().st_mtime_ns))
        else:
            raise FileNotFoundError(2, "No such file or directory", item)
    if not sources:
        raise ValueError("no corpus given")
    return sources


def _open(source: Source):
    """A binary stream of the source's bytes, decompressed."""
    if source.path == "-":
        return sys.stdin.buffer
    if source.path.endswith(".gz"):
        return gzip.open(source.path, "rb")
    if source.path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(source.path, "rb"), closefd=True)
    return open(source.path, "rb")


class _Utf8:
    """Decodes UTF-8 incrementally, replacing invalid sequences and counting them."""

    def __init__(self, stats: ReadStats):
        def count(error):
            stats.replaced += 1
            return "\ufffd", error.end

        self.name = f"twofile-count-{id(self)}"
        codecs.register_error(self.name, count)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors=self.name)

    def __call__(self, data: bytes, final: bool = False) -> str:
        return self.decoder.decode(data, final)


def _safe_cut(text: str) -> int:
    """The last position where a piece of text can end without changing tokenization:
    after a newline and before a non-space character (no split regex match crosses it)."""
    i = len(text) - 1
    while i > 0:
        i = text.rfind("\n", 0, i)
        if i < 0:
            return 0
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
    return 0


def _read_text(source: Source, stats: ReadStats, skip_bad: bool,
               tail_at: int | None = None) -> Iterator[tuple[str, str, bool]]:
    """A text file in pieces. With tail_at (a byte offset), a read ends there and the text is
    cut at the last safe cut before it (if the piece holds none, at a later one): what
    follows is a second document, named name + TAIL."""
    decode, pending, first, name, offset = _Utf8(stats), "", True, source.name, 0
    with _open(source) as f:
        while True:
            before_tail = tail_at is not None and offset < tail_at
            data = f.read(min(PIECE_BYTES, tail_at - offset) if before_tail else PIECE_BYTES)
            if offset == 0 and b"\0" in data[:8192]:
                if skip_bad:
                    stats.skipped.append(f"{source.path}: binary (NUL bytes)")
                    return
                raise ValueError(f"{source.path}: looks binary (NUL bytes), not text (--skip-bad skips such files)")
            stats.bytes += len(data)
            offset += len(data)
            pending += decode(data, final=not data)
            cut = _safe_cut(pending) if data else len(pending)
            if not cut and len(pending) > 8 * PIECE_BYTES:  # no safe cut (one huge line): cut after a space
                cut = pending.rfind(" ") + 1 or len(pending)
            head_ends = tail_at is not None and name == source.name and offset >= tail_at
            if cut and (len(pending) >= PIECE_BYTES or not data or head_ends):
                yield name, pending[:cut], first
                pending, first = pending[cut:], False
                if head_ends:
                    name, first = source.name + TAIL, True
            if not data:
                break
    if pending:
        yield name, pending, first


def _read_records(source: Source, text_field: str, stats: ReadStats, skip_bad: bool):
    base = source.path.removesuffix(".gz").removesuffix(".zst")
    if base.endswith(".parquet"):
        yield from _read_parquet(source, text_field, stats, skip_bad)
        return
    bad, counting = [], _Utf8(stats)
    with _open(source) as raw:
        for n, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors=counting.name, newline="\n"), 1):
            stats.bytes += len(line)
            if not line.strip():
                continue
            try:
                text = json.loads(line).get(text_field)
            except (json.JSONDecodeError, AttributeError):
                text = None
            if not isinstance(text, str):
                bad.append(n)
                continue
            yield f"{source.name}:{n}", text, True
    if bad:
        where = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        if not skip_bad:
            raise ValueError(f"{source.path}: line {where}: not JSON with a string field {text_field!r} "
                             f"(--skip-bad skips such lines, --field names another field)")
        stats.skipped.append(f"{source.path}: {len(bad)} lines without a string field {text_field!r} (line {where})")


def _read_parquet(source: Source, text_field: str, stats: ReadStats, skip_bad: bool):
    import pyarrow
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        path = source.path
        if source.path.endswith(COMPRESSED_SUFFIXES):  # parquet needs random access: decompress first
            path = os.path.join(tmp, "data.parquet")
            with _open(source) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            table = pq.ParquetFile(path)
        except pyarrow.ArrowException as e:
            raise ValueError(f"{source.path}: not a parquet file ({e})") from None
        if text_field not in table.schema_arrow.names:
            raise ValueError(f"{source.path}: no column {text_field!r} (columns: {', '.join(table.schema_arrow.names)};"
                             f" --field names the text column)")
        row, missing = 0, 0
        for batch in table.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    missing += 1
                    continue
                stats.bytes += len(text.encode("utf-8"))
                yield f"{source.name}:{row}", text, True
        if missing and not skip_bad:
            raise ValueError(f"{source.path}: {missing} rows have no text in column {text_field!r} (--skip-bad skips them)")
        if missing:
            stats.skipped.append(f"{source.path}: {missing} rows without text")


def read_documents(sources: list[Source], text_field: str = "text", skip_bad: bool = False,
                   stats: ReadStats | None = None,
                   tails: dict[str, int] | None = None) -> Iterator[tuple[str, str, bool]]:
    """Yield (document name, text, starts a document) pieces, streaming: a large file comes
    in pieces of about PIECE_BYTES, cut where tokenization cannot change. `tails` (from
    `tail_offsets`) makes the end of each text file it names a document of its own."""
    stats = stats if stats is not None else ReadStats()
    tails = tails or {}
    for source in sources:
        reader = _read_text(source, stats, skip_bad, tails.get(source.name)) if source.kind == "text" else \
            _read_records(source, text_field, stats, skip_bad)
        for name, text, start in reader:
            stats.documents += start
            yield name, text, start


def texts(corpus: list[str], text_field: str = "text", skip_bad: bool = False) -> Iterator[str]:
    """Just the text of a corpus, for tokenizer training."""
    stats = ReadStats()
    for _, text, _ in read_documents(expand(corpus), text_field, skip_bad, stats):
        yield text
    stats.report()


# ---------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------

def _unit_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def validation_files(sources: list[Source], fraction: float) -> set[str]:
    """Whole text files for validation: in the order of their names' hashes, until they hold
    `fraction` of the bytes (sizes on disk), at least one (so a small corpus of plays still
    gets a held-out play). Only when there are two or more and the choice holds at most half
    of the bytes; otherwise none (and `tail_offsets` holds out the end of each file). Records
    (jsonl lines, parquet rows) are split one by one in `is_validation`."""
    files = [s for s in sources if s.kind == "text"]
    if fraction <= 0 or len(files) < 2:
        return set()
    total, chosen, held = sum(s.size for s in files), set(), 0
    for s in sorted(files, key=lambda s: _unit_hash(s.name)):
        if held >= fraction * total or len(chosen) == len(files) - 1:
            break
        chosen.add(s.name)
        held += s.size
    return chosen if held <= total / 2 else set()


def _text_bytes(source: Source) -> int:
    """The bytes a text file holds: its size, or for a compressed file a counting pass through
    the decompressor, 1 MB at a time (so memory stays flat; the decompression runs twice)."""
    if not source.path.endswith(COMPRESSED_SUFFIXES):
        return source.size
    count = 0
    with _open(source) as f:
        while block := f.read(1 << 20):
            count += len(block)
    return count


def tail_offsets(sources: list[Source], fraction: float) -> dict[str, int]:
    """For a corpus whose whole files cannot be the validation split (one file, or a file
    that would hold more than half the bytes): the last `fraction` of each text file's bytes
    is held out instead, from a cut where tokenization cannot change (see `_read_text`).
    Returns file name -> the byte offset where its held-out tail begins."""
    if fraction <= 0:
        return {}
    return {s.name: round(_text_bytes(s) * (1 - fraction)) for s in sources if s.kind == "text"}


def is_validation(name: str, fraction: float, val_files: set[str], text_files: set[str]) -> bool:
    if name in text_files:
        return name in val_files
    return _unit_hash(name) < fraction  # a record: "file:line" or "file:row"


# ---------------------------------------------------------------------------
# Token shards
# ---------------------------------------------------------------------------

class _ShardWriter:
    """Appends tokens to one split's shards; each shard is written to a temporary name and
    renamed when complete, so a shard with its final name is always whole."""

    def __init__(self, folder: Path, split: str, dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.tokens = self.documents = self.bytes = 0

    def add(self, ids: np.ndarray, text_bytes: int, starts: bool):
        self.buffer.append(ids)
        self.buffered += len(ids)
        self.tokens += len(ids)
        self.bytes += text_bytes
        self.documents += starts
        if self.buffered >= SHARD_TOKENS:
            self.flush()

    def flush(self):
        if not self.buffered:
            return
        tokens = np.concatenate(self.buffer).astype(self.dtype)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        tmp = self.folder / (name + ".tmp")
        tokens.tofile(tmp)
        os.replace(tmp, self.folder / name)
        self.shards.append({"file": name, "tokens": int(len(tokens))})
        self.buffer, self.buffered = [], 0

    def summary(self) -> dict:
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents, "bytes": self.bytes}


def _our_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name == MANIFEST or p.name.endswith(".tmp")
            or (p.name.startswith(("train_", "val_")) and p.name.endswith(".bin"))]


def _check_output(folder: Path, settings: dict, force: bool) -> bool:
    """Decide what to do with an existing output folder; True when it is already done.
    Rebuilt without --force: an interrupted prepare, shards of an older format, and shards of
    the same files changed since (sizes or modification times differ) or of standard input
    (which cannot be compared)."""
    if not folder.exists():
        folder.mkdir(parents=True)
        return False
    if not folder.is_dir():
        raise ValueError(f"{folder}: exists and is not a folder")
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        if old.get("format") != FORMAT and not force:
            print(f"{folder}: rebuilding shards of an older format ({old.get('format')})", file=sys.stderr)
        elif not force:
            if old["tokenizer"] != settings["tokenizer"]:
                raise ValueError(f"{folder}: holds shards of another tokenizer ({old['tokenizer']}; this one is "
                                 f"{settings['tokenizer']}): choose another output folder, or --force to replace them")
            names = [s["name"] for s in settings["sources"]]
            if [s["name"] for s in old["sources"]] != names or \
                    any(old[k] != v for k, v in settings.items() if k != "sources"):
                raise ValueError(f"{folder}: holds shards of another corpus or split; choose another output folder, "
                                 f"or --force to replace them")
            changed = [new["name"] for new, was in zip(settings["sources"], old["sources"])
                       if new != was or new["mtime_ns"] is None]
            if not changed:
                return True
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            print(f"{folder}: {changed[0]}{more} changed since the shards were made: rebuilding them", file=sys.stderr)
    elif _our_files(folder):
        print(f"{folder}: removing the partial shards of an interrupted prepare", file=sys.stderr)
    for p in _our_files(folder):
        p.unlink()
    return False


def prepare(corpus: list[str], tokenizer_path: str, out: str, val_fraction: float = 0.01,
            text_field: str = "text", skip_bad: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Tokenize a corpus into train/val shards in `out`; return the manifest. Standard input
    is first copied to a file in `out` (its size must be known to hold out its end)."""
    from twofile import tokenizer as tokenizers_

    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} is out of range (0 <= f < 1)")
    tok = tokenizers_.load(tokenizer_path)
    sources = expand(corpus)
    folder = Path(out)
    settings = {"format": FORMAT, "tokenizer": tokenizers_.fingerprint(tok), "val_fraction": val_fraction,
                "sources": [{"name": s.name, "bytes": s.size, "mtime_ns": s.mtime_ns} for s in sources],
                "text_field": text_field}
    if _check_output(folder, settings, force):
        manifest = load_manifest(folder)
        print(f"{folder}: already prepared with this tokenizer and corpus "
              f"({manifest['splits']['train']['tokens']:,} train tokens); nothing to do", file=sys.stderr)
        return manifest
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    bos = tok.token_to_id(tokenizers_.BOS)
    sources = [_spool_stdin(folder) if s.path == "-" else s for s in sources]
    val_files = validation_files(sources, val_fraction)
    tails = {} if val_files else tail_offsets(sources, val_fraction)
    text_files = {s.name for s in sources if s.kind == "text"} | {name + TAIL for name in tails}
    val_files |= {name + TAIL for name in tails}
    writers = {split: _ShardWriter(folder, split, dtype) for split in ("train", "val")}
    stats = ReadStats()
    bar = _progress(sum(s.size for s in sources), progress)
    t0 = time.perf_counter()
    batch: list[tuple[str, str, bool]] = []
    held = None  # the newest record bound for train waits: it may be needed for validation

    def tokenize_batch():
        nonlocal held
        # `tokenizers` encodes a batch on all cores (its Rust thread pool)
        encoded = tok.encode_batch_fast([text for _, text, _ in batch], add_special_tokens=False)
        for (name, text, start), enc in zip(batch, encoded):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if start:
                ids = np.concatenate([[bos], ids])
            piece = (ids, len(text.encode("utf-8")), start)
            split = "val" if is_validation(name, val_fraction, val_files, text_files) else "train"
            if split == "train" and held is not None:  # anything later in train comes after it
                writers["train"].add(*held)
                held = None
            if split == "train" and name not in text_files:  # a record
                held = piece
            else:
                writers[split].add(*piece)
        tokens = writers["train"].tokens + writers["val"].tokens
        bar.update(stats.bytes - bar.n)
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9) / 1e3:.0f}k tok/s", refresh=False)
        batch.clear()

    for piece in read_documents(sources, text_field, skip_bad, stats, tails):
        batch.append(piece)
        if sum(len(t) for _, t, _ in batch) >= 64 * PIECE_BYTES or len(batch) >= 4096:
            tokenize_batch()
    if batch:
        tokenize_batch()
    if held is not None:  # the last record: validation's only one if none hashed into it (a few records)
        to_val = val_fraction > 0 and writers["val"].documents == 0 and writers["train"].documents > 0
        writers["val" if to_val else "train"].add(*held)
    bar.close()
    stats.report()
    if writers["train"].tokens == 0:
        raise ValueError("the corpus is empty: no text to prepare" if stats.documents == 0 else
                         "every document went to validation: lower --val-fraction")
    for w in writers.values():
        w.flush()
    manifest = {**settings, "tokenizer_path": str(Path(tokenizer_path).resolve()), "vocab_size": vocab_size,
                "dtype": np.dtype(dtype).name, "bos_id": bos, "replaced_utf8": stats.replaced,
                "splits": {split: w.summary() for split, w in writers.items()}}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, folder / MANIFEST)  # last: the folder is complete only once this exists
    (folder / STDIN_SPOOL).unlink(missing_ok=True)
    elapsed = time.perf_counter() - t0
    print(f"{folder}: {manifest['splits']['train']['tokens']:,} train and {manifest['splits']['val']['tokens']:,} "
          f"val tokens from {stats.documents} documents, {stats.bytes / 1e6:.1f} MB in {elapsed:.1f} s "
          f"({stats.bytes / 1e6 / elapsed:.1f} MB/s)", file=sys.stderr)
    return manifest


def _spool_stdin(folder: Path) -> Source:
    """Standard input copied to a file (on disk, not in memory): where its held-out end
    begins depends on its size. An interrupted prepare leaves it with the partial shards."""
    path = folder / STDIN_SPOOL
    with open(path, "wb") as f:
        shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
    return Source(str(path), "<stdin>", path.stat().st_size)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total or None, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled,
                file=sys.stderr, smoothing=0.1)


# ---------------------------------------------------------------------------
# Loading shards for training
# ---------------------------------------------------------------------------

def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise FileNotFoundError(2, "No such file or directory", str(folder))
    if not path.exists():
        raise ValueError(f"{folder}: no {MANIFEST} (not prepared, or prepare was interrupted: run twofile data prepare)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r} (run twofile data prepare "
                         f"again: it rebuilds the shards)")
    return manifest


def open_split(folder: str | Path, split: str) -> list[np.ndarray]:
    """The split's shards as read-only memory maps."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    shards = []
    for shard in manifest["splits"][split]["shards"]:
        path = folder / shard["file"]
        expected = shard["tokens"] * np.dtype(manifest["dtype"]).itemsize
        if not path.exists() or path.stat().st_size != expected:
            raise ValueError(f"{path}: missing or not {expected} bytes as the manifest says")
        shards.append(np.memmap(path, dtype=manifest["dtype"], mode="r"))
    return shards


def train_batch(shards: list[np.ndarray], batch_size: int, seq_len: int, seed: int, step: int,
                rank: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of seq_len + 1 tokens -> inputs and targets, int64 (batch_size, seq_len).
    The batch depends only on (seed, step, rank): each rank sees different data, and a
    resumed run gets exactly the batches it would have had."""
    rng = np.random.default_rng([seed, step, rank])
    windows = np.array([max(len(s) - seq_len, 0) for s in shards], dtype=np.float64)
    if windows.sum() == 0:
        raise ValueError(f"the training split has no window of {seq_len + 1} tokens: shorten the context or add data")
    which = rng.choice(len(shards), size=batch_size, p=windows / windows.sum())
    chunks = np.stack([shards[i][o:o + seq_len + 1] for i, o in
                       zip(which, (rng.random(batch_size) * windows[which]).astype(np.int64))]).astype(np.int64)
    return chunks[:, :-1], chunks[:, 1:]


def val_batches(shards: list[np.ndarray], batch_size: int, seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One sequential pass over the validation tokens in windows of seq_len: every token after
    the first of each shard is a target exactly once (the last window may be shorter)."""
    rows_x, rows_y = [], []
    for shard in shards:
        for start in range(0, len(shard) - 1, seq_len):
            window = np.asarray(shard[start:start + seq_len + 1], dtype=np.int64)
            if len(window) < seq_len + 1:  # the short tail goes alone
                yield window[None, :-1], window[None, 1:]
                continue
            rows_x.append(window[:-1])
            rows_y.append(window[1:])
            if len(rows_x) == batch_size:
                yield np.stack(rows_x), np.stack(rows_y)
                rows_x, rows_y = [], []
    if rows_x:
        yield np.stack(rows_x), np.stack(rows_y)

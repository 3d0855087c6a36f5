"""The model as a lossless compressor: `twofile compress` and `twofile decompress`.

    twofile compress play.txt                     # -> play.txt.tfz, with the default model
    twofile decompress play.txt.tfz -o copy.txt
    twofile compress - -m model.gguf < in > out.tfz

A model that predicts the next token well is a good compressor: an arithmetic coder spends
-log2 p(token) bits on each token, so the archive is about the model's cross-entropy on the
text (its bits per byte, the number training drives down) times the text's length. Decoding
runs the same model on the tokens decoded so far to get the same probabilities back, so both
directions must compute bit-identical distributions: the model runs in exact sessions (run.py's
compiled kernels, or numpy a token at a time without numba), whatever the thread count.

Any bytes go in. Valid UTF-8 is tokenized as usual; bytes that are not UTF-8, and any text the
tokenizer would not give back exactly, become the vocabulary's byte tokens (or an escape where
it has none), so the tokens always spell the input. The tokens are cut into independent chunks of `chunk` tokens,
each coded after the model's start token, and up to STREAMS chunks run side by side: one pass
of the model per step for all of them (run.feed_many).

An archive: MAGIC, the header's length (4 bytes, little-endian) and the header (JSON: format
version, the model's name and SHA-256, the kernel path, the chunk length, the original's size
and SHA-256, its token count, each chunk's code length), then the chunks' codes.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np

from twofile import run

MAGIC = b"\x89TFZ\r\n"
FORMAT = 2
CHUNK = 1024         # tokens per independent chunk (see bench/compress.py for the trade-off)
STEP = 16            # tokens of each chunk per pass when compressing
STREAMS = 16         # chunks run side by side: one pass over the weights per step for all
                     # (throughput stops growing here on 2 cores: the kernels are compute-bound)
TOTAL = 1 << 24      # the coder's frequencies sum to this; every token gets at least 1
PRECISION = 32       # bits of the coder's registers
FULL, HALF, QUARTER = (1 << PRECISION) - 1, 1 << (PRECISION - 1), 1 << (PRECISION - 2)


# -- bytes <-> tokens ----------------------------------------------------------------
HEX = "0123456789abcdef"


def byte_tokens(tokenizer: run.Tokenizer) -> list[list[int]]:
    """The tokens of each byte value 0..255: its byte token (GPT-2 style byte characters, or
    SentencePiece's <0xNN> pieces); where the vocabulary has none (SmolLM2's lacks 21, bytes
    UTF-8 never uses among them), the escape: the end-of-text token, which text never
    tokenizes to (special tokens are not parsed), then the byte's two hex digits."""
    if tokenizer.model == "gpt2":
        ids = [tokenizer.token_to_id.get(tokenizer.byte_char[b]) for b in range(256)]
    else:
        ids = [tokenizer.byte_ids.get(b) for b in range(256)]
    if None not in ids:
        return [[i] for i in ids]
    escape, digits = _escape(tokenizer)
    return [[i] if i is not None else [escape, digits[b >> 4], digits[b & 15]] for b, i in enumerate(ids)]


def _escape(tokenizer: run.Tokenizer) -> tuple[int, list[int]]:
    digits = [tokenizer.token_to_id.get(c) for c in HEX]
    if tokenizer.eos_id is None or None in digits or any(tokenizer.token_bytes(d) != c.encode()
                                                         for d, c in zip(digits, HEX)):
        raise ValueError("the vocabulary has neither a token for every byte nor an end-of-text token and hex "
                         "digits to escape bytes with: it cannot code arbitrary bytes")
    return tokenizer.eos_id, digits


def tokenize(tokenizer: run.Tokenizer, data: bytes) -> list[int]:
    """Tokens that spell exactly data (see spell)."""
    by_byte = byte_tokens(tokenizer)
    ids: list[int] = []
    # bytes that are not UTF-8 come out of the decoder as lone surrogates, one per byte
    for piece in re.split("([\udc80-\udcff]+)", data.decode("utf-8", errors="surrogateescape")):
        raw = piece.encode("utf-8", errors="surrogateescape")
        if not piece:
            continue
        if "\udc80" <= piece[0] <= "\udcff":
            ids += [i for b in raw for i in by_byte[b]]
            continue
        got = tokenizer.encode(piece, add_bos=False, parse_special=False)
        joined = b"".join(tokenizer.token_bytes(i) for i in got)
        if joined == b" " + raw and got and tokenizer.token_bytes(got[0]).startswith(b" "):
            # SentencePiece's space before the text: its first piece without the space
            rest = tokenizer.token_bytes(got[0])[1:]
            whole = tokenizer.token_to_id.get(rest.decode("utf-8", errors="replace"))
            head = ([whole] if whole is not None and tokenizer.token_bytes(whole) == rest
                    else [i for b in rest for i in by_byte[b]])
            got = head + got[1:]
            joined = b"".join(tokenizer.token_bytes(i) for i in got)
        ids += got if joined == raw else [i for b in raw for i in by_byte[b]]
    return ids


def spell(tokenizer: run.Tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes each token stands for (an escape's three tokens: the byte, then nothing)."""
    out, i = [], 0
    escape = tokenizer.eos_id
    while i < len(ids):
        if ids[i] == escape:
            digits = b"".join(tokenizer.token_bytes(t) for t in ids[i + 1:i + 3]).decode("latin-1")
            if len(digits) != 2 or any(c not in HEX for c in digits):
                raise ValueError("the archive is corrupted (a broken byte escape)")
            out += [bytes([int(digits, 16)]), b"", b""]
            i += 3
        else:
            out.append(tokenizer.token_bytes(ids[i]))
            i += 1
    return out


# -- probabilities -> integer frequencies ------------------------------------------------
def frequencies(logits: np.ndarray) -> np.ndarray:
    """One position's float32 logits -> int32 counts summing to TOTAL, each at least 1 (no
    token is ever impossible). Deterministic: the same logits give the same counts. The scale
    is a hair under the budget so that rounding never overshoots it; what is left goes to the
    likeliest token. Logits that are not all finite (a broken model) code as uniform."""
    if not np.isfinite(logits).all():
        logits = np.zeros_like(logits)
    p = np.exp(logits - logits.max())
    scale = (TOTAL - len(p)) * (1 - 2.0 ** -20) / p.sum(dtype=np.float64)
    counts = (p * np.float32(scale)).astype(np.int32) + 1
    counts[int(np.argmax(logits))] += TOTAL - int(counts.sum(dtype=np.int64))
    return counts


# -- the arithmetic coder (Witten, Neal and Cleary's, in integers) ------------------------
def _narrow(low: int, high: int, start: int, size: int) -> tuple[int, int]:
    """The interval [low, high] narrowed to the symbol [start, start + size) of TOTAL."""
    span = high - low + 1
    return low + span * start // TOTAL, low + span * (start + size) // TOTAL - 1


class Encoder:
    def __init__(self):
        self.low, self.high, self.pending, self.bits = 0, FULL, 0, []

    def encode(self, start: int, size: int) -> None:
        """Narrow the interval to the symbol [start, start + size) of TOTAL."""
        self.low, self.high = _narrow(self.low, self.high, start, size)
        while True:
            if self.high < HALF:
                self._emit(0)
            elif self.low >= HALF:
                self._emit(1)
                self.low, self.high = self.low - HALF, self.high - HALF
            elif self.low >= QUARTER and self.high < HALF + QUARTER:  # straddling the middle: decide later
                self.pending += 1
                self.low, self.high = self.low - QUARTER, self.high - QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1

    def _emit(self, bit: int) -> None:
        self.bits.append(bit)
        self.bits += [1 - bit] * self.pending
        self.pending = 0

    def finish(self) -> bytes:
        self.pending += 1
        self._emit(0 if self.low < QUARTER else 1)
        return np.packbits(np.array(self.bits, np.uint8)).tobytes()


class Decoder:
    def __init__(self, code: bytes):
        self.bits = np.unpackbits(np.frombuffer(code, np.uint8)).tolist()
        self.position = 0
        self.low, self.high, self.value = 0, FULL, 0
        for _ in range(PRECISION):
            self.value = 2 * self.value + self._bit()

    def _bit(self) -> int:
        self.position += 1
        return self.bits[self.position - 1] if self.position <= len(self.bits) else 0

    def target(self) -> int:
        """Where the code points, in [0, TOTAL): the symbol whose range holds it comes next."""
        span = self.high - self.low + 1
        t = ((self.value - self.low + 1) * TOTAL - 1) // span
        if not 0 <= t < TOTAL:
            raise ValueError("the archive is corrupted (its code leaves the coder's range)")
        return t

    def decode(self, start: int, size: int) -> None:
        self.low, self.high = _narrow(self.low, self.high, start, size)
        while True:
            if self.high < HALF:
                pass
            elif self.low >= HALF:
                self.low, self.high, self.value = self.low - HALF, self.high - HALF, self.value - HALF
            elif self.low >= QUARTER and self.high < HALF + QUARTER:
                self.low, self.high, self.value = self.low - QUARTER, self.high - QUARTER, self.value - QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._bit()


# -- compress and decompress ----------------------------------------------------------
def model_sha256(model: run.Model) -> str:
    h = hashlib.sha256()
    with open(model.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _start_token(model: run.Model) -> int:
    """What each chunk is coded after: the model's beginning-of-text token (or its end one)."""
    t = model.tokenizer
    return t.bos_id if t.bos_id is not None else t.eos_id if t.eos_id is not None else 0


def _kernels(model: run.Model) -> str:
    return "numba" if model.use_numba else "numpy"


def _streams(model: run.Model, lengths: list[int], fed: list[int]):
    """The chunks to run next, as {chunk index: its session}: up to STREAMS at once (each
    holds a KV cache of its chunk's length: about 47 MB for 1,024 tokens of the default
    model), a finished chunk (fed[i] == lengths[i], counted by the caller) replaced by the
    next. A chunk's numbers do not depend on its company (exact sessions), so compressing
    and decompressing may group the chunks differently."""
    waiting = [i for i in reversed(range(len(lengths))) if lengths[i]]
    live = {}
    while True:
        live = {i: s for i, s in live.items() if fed[i] < lengths[i]}
        while waiting and len(live) < STREAMS:
            live[waiting.pop()] = model.session(exact=True)
        if not live:
            return
        yield live


def compress(data: bytes, model: run.Model, chunk: int | None = None, progress: bool = False) -> bytes:
    """data -> an archive that decompress() with the same model file turns back into data.
    chunk: tokens per chunk (None: CHUNK, or the model's context minus one if shorter)."""
    from tqdm import tqdm

    chunk = min(CHUNK, model.n_ctx - 1) if chunk is None else chunk
    if not 1 <= chunk < model.n_ctx:
        raise ValueError(f"--chunk {chunk} must be between 1 and the model's context minus one ({model.n_ctx - 1})")
    tokens = tokenize(model.tokenizer, data)
    chunks = [tokens[i:i + chunk] for i in range(0, len(tokens), chunk)]
    encoders = [Encoder() for _ in chunks]
    start = _start_token(model)
    sizes = [len(b) for b in spell(model.tokenizer, tokens)]
    fed = [0] * len(chunks)  # tokens of each chunk coded so far
    bits, done = 0.0, 0
    bar = tqdm(total=len(data), unit="B", unit_scale=True, desc="compress", disable=not progress, file=sys.stderr)
    for live in _streams(model, [len(c) for c in chunks], fed):
        inputs = [([start] + chunks[i])[fed[i]:fed[i] + STEP][:len(chunks[i]) - fed[i]] for i in live]
        for i, rows in zip(live, run.feed_many(list(live.values()), inputs, all_logits=True)):
            for token, logits in zip(chunks[i][fed[i]:fed[i] + STEP], rows):
                counts = frequencies(logits)
                encoders[i].encode(int(counts[:token].sum()), int(counts[token]))
                bits -= np.log2(counts[token] / TOTAL)
            done += sum(sizes[i * chunk + fed[i]:i * chunk + fed[i] + len(rows)])
            fed[i] += len(rows)
        bar.update(done - bar.n)
        bar.set_postfix_str(f"{bits / max(done, 1):.3f} bits/byte", refresh=False)
    bar.close()
    codes = [e.finish() for e in encoders]
    header = {"format": FORMAT, "model": Path(model.path).name, "model_sha256": model_sha256(model),
              "kernels": _kernels(model), "chunk": chunk, "size": len(data),
              "sha256": hashlib.sha256(data).hexdigest(), "tokens": len(tokens),
              "codes": [len(c) for c in codes]}
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(head)) + head + b"".join(codes)


def chunk_lengths(tokens: int, chunk: int) -> list[int]:
    """The token counts of the chunks that `tokens` tokens are cut into."""
    if chunk < 1:
        raise ValueError(f"a chunk of {chunk} tokens")
    return [chunk] * (tokens // chunk) + [tokens % chunk] * (tokens % chunk > 0)


def read_header(archive: bytes, name: str = "archive") -> tuple[dict, int]:
    """The header and where the codes begin; a clear error for anything that is not an intact
    archive of this format."""
    if not archive.startswith(MAGIC):
        raise ValueError(f"{name} is not a twofile archive (no {MAGIC!r} at its start)")
    if len(archive) < len(MAGIC) + 4:
        raise ValueError(f"{name} is truncated (it ends inside its header)")
    (length,) = struct.unpack_from("<I", archive, len(MAGIC))
    begin = len(MAGIC) + 4 + length
    try:
        header = json.loads(archive[len(MAGIC) + 4:begin])
        keys = ("format", "model", "model_sha256", "kernels", "chunk", "size", "sha256", "tokens", "codes")
        if not isinstance(header, dict) or any(k not in header for k in keys):
            raise ValueError
        if (not all(isinstance(header[k], int) and header[k] >= 0 for k in ("chunk", "size", "tokens"))
                or not isinstance(header["codes"], list) or not all(isinstance(n, int) and n >= 0 for n in header["codes"])
                or len(header["codes"]) != len(chunk_lengths(header["tokens"], header["chunk"]))):
            raise ValueError
    except ValueError:
        raise ValueError(f"{name} is corrupted or truncated (its header does not read)") from None
    if header["format"] != FORMAT:
        raise ValueError(f"{name} has format {header['format']}; this twofile reads format {FORMAT}")
    if len(archive) != begin + sum(header["codes"]):
        raise ValueError(f"{name} is {len(archive):,} bytes, its header says {begin + sum(header['codes']):,}: "
                         "truncated or corrupted")
    return header, begin


def decompress(archive: bytes, model: run.Model, progress: bool = False, name: str = "archive") -> bytes:
    """An archive from compress() -> the original bytes, checked against its SHA-256."""
    from tqdm import tqdm

    header, begin = read_header(archive, name)
    if header["model_sha256"] != model_sha256(model):
        raise ValueError(f"{name} was made with the model {header['model']} (sha256 {header['model_sha256'][:12]}...), "
                         f"not {Path(model.path).name}: decompress with that file (-m)")
    if header["kernels"] != _kernels(model):
        raise ValueError(f"{name} was made with run.py's {header['kernels']} path, this run has {_kernels(model)}: "
                         "the probabilities would differ (install numba, or set RUN_PY_NUMBA as when compressing)")
    ends = np.cumsum([begin] + header["codes"])
    decoders = [Decoder(archive[a:b]) for a, b in zip(ends, ends[1:])]
    chunks: list[list[int]] = [[] for _ in decoders]
    last = [_start_token(model)] * len(decoders)
    fed = [0] * len(decoders)
    bar = tqdm(total=header["size"], unit="B", unit_scale=True, desc="decompress", disable=not progress,
               file=sys.stderr)
    for live in _streams(model, chunk_lengths(header["tokens"], header["chunk"]), fed):
        for i, logits in zip(live, run.feed_many(list(live.values()), [[last[i]] for i in live])):
            counts = frequencies(logits)
            cumulative = np.cumsum(counts)
            token = int(np.searchsorted(cumulative, decoders[i].target(), side="right"))
            decoders[i].decode(int(cumulative[token] - counts[token]), int(counts[token]))
            chunks[i].append(token)
            last[i], fed[i] = token, fed[i] + 1
            bar.update(1 if token == model.tokenizer.eos_id else len(model.tokenizer.token_bytes(token)))
    bar.close()
    data = b"".join(spell(model.tokenizer, [t for c in chunks for t in c]))
    if len(data) != header["size"] or hashlib.sha256(data).hexdigest() != header["sha256"]:
        raise ValueError(f"{name}: the decompressed bytes fail the archive's checksum: it is corrupted, or this "
                         "machine computes the model differently from the one that compressed it (another CPU's "
                         "vector instructions)")
    return data

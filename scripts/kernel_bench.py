"""The CPU kernels (mlximg/nn/native.py) against MLX's own ops and torch's, op by op, float32, as ratios.

Each engine runs in its own process (a BLAS thread pool left spinning by one library slows the other's next op),
with the same thread count, a warm-up, then the median of --reps:

    attention     softmax(q k^T / sqrt(d)) v, (1, 6, N, 128): MLX's mx.fast.scaled_dot_product_attention, the
                  kernel, torch's scaled_dot_product_attention
    swiglu        silu(gate) * value, (N, 2048): nn.silu(gate) * value, the kernel, torch.nn.functional.silu
    qk norm+rope  RMSNorm over the head dim then RoPE, (1, N, 6, 128): mx.fast.rms_norm + apply_rope, the kernel,
                  torch ops as diffusers writes them

    python scripts/kernel_bench.py                    # N = 1088 and 4128 (Z-Image's 512 and 1024 sequences)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENGINES = ("mlx", "mlximg", "torch")
OPS = ("attention", "swiglu", "qk norm+rope")


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mlx_ops(engine: str, length: int) -> dict:
    import mlximg  # noqa: F401  (preloads OpenBLAS before mlx)
    import mlx.core as mx
    import mlx.nn as nn

    from mlximg.nn import RMSNorm, apply_rope, attention, native, norm_rope_heads, silu_mul

    if engine == "mlximg" and not native.applies(mx.zeros(1)):
        raise SystemExit(f"the kernels are not in use: {native.status()}")
    q, k, v = (mx.random.normal((1, 6, length, 128)) for _ in range(3))
    gate, value = (mx.random.normal((length, 2048)) for _ in range(2))
    heads = mx.random.normal((1, length, 6, 128))
    angles = mx.random.uniform(0, 100, (1, 1, length, 64))
    cos, sin, norm = mx.cos(angles), mx.sin(angles), RMSNorm(128)
    mx.eval(q, k, v, gate, value, heads, cos, sin)
    if engine == "mlximg":
        return {"attention": lambda: mx.eval(attention(q, k, v)),
                "swiglu": lambda: mx.eval(silu_mul(gate, value)),
                "qk norm+rope": lambda: mx.eval(norm_rope_heads(heads, norm, cos, sin))}
    return {"attention": lambda: mx.eval(mx.fast.scaled_dot_product_attention(q, k, v, scale=128**-0.5)),
            "swiglu": lambda: mx.eval(nn.silu(gate) * value),
            "qk norm+rope": lambda: mx.eval(apply_rope(norm(heads).transpose(0, 2, 1, 3), cos, sin))}


def torch_ops(length: int) -> dict:
    import torch

    torch.set_grad_enabled(False)
    q, k, v = (torch.randn(1, 6, length, 128) for _ in range(3))
    gate, value = torch.randn(length, 2048), torch.randn(length, 2048)
    heads, weight = torch.randn(1, length, 6, 128), torch.ones(128)
    rotation = torch.polar(torch.ones(1, length, 1, 64), torch.rand(1, length, 1, 64) * 100)

    def norm_rope():  # diffusers' RMSNorm then Z-Image's complex-number RoPE
        normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        return torch.view_as_real(torch.view_as_complex(normed.reshape(1, length, 6, 64, 2)) * rotation).flatten(3)

    return {"attention": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            "swiglu": lambda: torch.nn.functional.silu(gate) * value,
            "qk norm+rope": norm_rope}


def child(engine: str, lengths: list[int], reps: int) -> None:
    results = {}
    for length in lengths:
        ops = torch_ops(length) if engine == "torch" else mlx_ops(engine, length)
        results[length] = {name: timed(fn, reps) for name, fn in ops.items()}
    print(json.dumps(results))


def run_child(engine: str, lengths: str, reps: int, threads: int) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, __file__, f"--child={engine}", f"--lengths={lengths}", f"--reps={reps}"],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1088,4128", help="sequence lengths, comma separated")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, [int(n) for n in args.lengths.split(",")], args.reps)
    results = {engine: run_child(engine, args.lengths, args.reps, args.threads) for engine in ENGINES}
    print(f"median of {args.reps}, float32, {args.threads} threads, ms")
    print(f"{'op':<14}{'N':>6}{'mlx ops':>10}{'mlximg':>10}{'torch':>10}{'mlximg/torch':>14}")
    for length in args.lengths.split(","):
        for op in OPS:
            ms = [results[engine][length][op] * 1e3 for engine in ENGINES]
            print(f"{op:<14}{length:>6}{ms[0]:>10.1f}{ms[1]:>10.1f}{ms[2]:>10.1f}{ms[1] / ms[2]:>14.2f}")


if __name__ == "__main__":
    main()

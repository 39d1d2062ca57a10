"""FP8 (MLX mode="mxfp8": E4M3 values, one power-of-two E8M0 scale per 32 weights) measured: size, error, speed.

    python scripts/fp8_bench.py --section size    # bytes at the real Z-Image-Turbo / FLUX.2-klein-4B configs
    python scripts/fp8_bench.py --section error   # per-layer and end-to-end error on the tiny parity models
    python scripts/fp8_bench.py --section speed   # quantized_matmul against float32 / bfloat16 matmul
    python scripts/fp8_bench.py                   # all three

The error section needs the reference oracle (torch + diffusers) and imports tests/oracle.py.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mlximg  # noqa: F401  (preloads OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from mlximg.models.flux2 import Flux2Config, Flux2Transformer, load_flux2_transformer
from mlximg.models.zimage import ZImageConfig, ZImageTransformer, load_zimage_transformer

QUANT = dict(group_size=32, bits=8, mode="mxfp8")
KLEIN_4B = dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                guidance_embeds=False)
BLOCKS = ("layers.", "noise_refiner.", "context_refiner.", "transformer_blocks.", "single_transformer_blocks.",
          "double_stream_modulation_", "single_stream_modulation.")
MiB = 2**20


def in_blocks(name: str) -> bool:
    """The policy: Linear layers of the transformer blocks (and FLUX.2's shared modulations), nothing else."""
    return name.startswith(BLOCKS)


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def layer_kind(name: str) -> str:
    if not in_blocks(name):
        return "final" if ("final_layer" in name or name.startswith(("norm_out", "proj_out"))) else "embedder"
    if "modulation" in name:
        return "modulation"
    if "to_qkv_mlp_proj" in name:
        return "qkv + MLP in (fused)"
    if name.startswith("single_transformer_blocks") and name.endswith("attn.to_out"):
        return "out + MLP out (fused)"
    if any(k in name for k in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")):
        return "attention qkv"
    if "to_out" in name or "to_add_out" in name:
        return "attention out"
    if name.endswith(("w1", "w3", "linear_in")):
        return "MLP in"
    return "MLP out"


def rel(actual: mx.array, expected: mx.array) -> tuple[float, float]:
    """(max |diff| / max |ref|, ||diff|| / ||ref||) in float64."""
    a, e = (np.asarray(t.astype(mx.float32), np.float64) for t in (actual, expected))
    d = a - e
    return float(np.abs(d).max() / np.abs(e).max()), float(np.linalg.norm(d) / np.linalg.norm(e))


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print()


# ---------------------------------------------------------------- size

def section_size() -> None:
    """The real configs, built lazily (never evaluated); one real quantization per distinct weight shape."""
    fp8_bytes = {}  # (out, in) -> bytes of the packed weight + scales, measured

    def quantized_nbytes(shape):
        if shape not in fp8_bytes:
            w = (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
            wq, scales = mx.quantize(w, **QUANT)
            mx.eval(wq, scales)
            fp8_bytes[shape] = wq.nbytes + scales.nbytes
            assert fp8_bytes[shape] == shape[0] * shape[1] * (1 + 1 / 32), shape  # 8 bits + one byte per 32
            del w, wq, scales
        return fp8_bytes[shape]

    rows = []
    for label, model in (("Z-Image-Turbo", ZImageTransformer(ZImageConfig())),
                         ("FLUX.2-klein-4B", Flux2Transformer(Flux2Config(**KLEIN_4B)))):
        params = sum(p.size for _, p in nn.utils.tree_flatten(model.parameters()))
        bf16 = 2 * params
        for policy, chosen in (("block linears", lambda n: in_blocks(n)), ("all linears", lambda n: True)):
            saved = sum(2 * m.weight.size - quantized_nbytes(m.weight.shape) for n, m in linears(model) if chosen(n))
            share = sum(m.weight.size for n, m in linears(model) if chosen(n)) / params
            fp8 = bf16 - saved
            rows.append([label, f"{params / 1e9:.2f}B", policy, f"{share:.1%}", f"{bf16 / MiB:,.0f}",
                         f"{fp8 / MiB:,.0f}", f"{fp8 / bf16:.3f}"])
        mx.clear_cache()
    table(["model", "params", "quantized", "share of params", "bf16 MiB", "fp8 MiB", "fp8 / bf16"], rows)
    print(f"{len(fp8_bytes)} distinct weight shapes quantized for real; each took 8 bits + 1 scale byte per 32 "
          "weights (8.25 bits per weight)\n")


# ---------------------------------------------------------------- error

def tiny_models(folder: Path):
    """The parity tests' tiny diffusers models, perturbed, saved, loaded by mlximg (float32)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel
    from oracle import perturb_
    from test_flux2_transformer import TINY as FLUX2_TINY
    from test_flux2_transformer import pipeline_ids
    from test_zimage_transformer import TINY as ZIMAGE_TINY

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    perturb_(ZImageTransformer2DModel(**ZIMAGE_TINY).eval()).save_pretrained(folder / "zimage" / "transformer")
    latents, caps = rng.standard_normal((1, 16, 32, 32)), [rng.standard_normal((40, 32))]
    zimage_inputs = (mx.array(latents, mx.float32), mx.array([0.6]), [mx.array(c, mx.float32) for c in caps])

    torch.manual_seed(0)
    perturb_(Flux2Transformer2DModel(**FLUX2_TINY, guidance_embeds=False).eval()).save_pretrained(
        folder / "flux2" / "transformer")
    img_ids, txt_ids = pipeline_ids(1, (12, 12), 24, [])
    x, text = rng.standard_normal((1, 144, 16)), rng.standard_normal((1, 24, 48))
    flux2_inputs = (mx.array(x, mx.float32), mx.array(text, mx.float32), mx.array([0.6]), img_ids, txt_ids)
    return {"Z-Image": (lambda: load_zimage_transformer(folder / "zimage"), zimage_inputs),
            "FLUX.2": (lambda: load_flux2_transformer(folder / "flux2"), flux2_inputs)}


def linear_inputs(model: nn.Module, inputs) -> dict[int, mx.array]:
    """Each Linear's input in a float32 forward (the first call's), keyed by id(layer)."""
    seen, call = {}, nn.Linear.__call__

    def record(self, x):
        seen.setdefault(id(self), x)
        return call(self, x)

    nn.Linear.__call__ = record
    try:
        mx.eval(model(*inputs))
    finally:
        nn.Linear.__call__ = call
    return seen


def quantizable(name: str, m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and m.weight.shape[1] % QUANT["group_size"] == 0


def runnable(name: str, m: nn.Module) -> bool:
    """Quantizable, and the model still runs: Z-Image's TimestepEmbedder casts its input to mlp[0].weight.dtype,
    which quantization makes uint32."""
    return quantizable(name, m) and name != "t_embedder.mlp.0"


def section_error() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = tiny_models(Path(tmp))
        for label, (load, inputs) in models.items():
            model = load()
            reference = model(*inputs)
            seen = linear_inputs(model, inputs)
            by_kind, skipped = {}, []
            for name, layer in linears(model):
                if not quantizable(name, layer):
                    skipped.append(f"{name} {tuple(layer.weight.shape)}")
                    continue
                wq, scales = mx.quantize(layer.weight, **QUANT)
                w_err = rel(mx.dequantize(wq, scales, dtype=mx.float32, **QUANT), layer.weight)
                x = seen[id(layer)]
                y_err = rel(nn.QuantizedLinear.from_linear(layer, **QUANT)(x), layer(x))
                by_kind.setdefault(layer_kind(name), []).append((*w_err, *y_err))
            rows = [[kind, len(errs), *(f"{max(e[i] for e in errs):.2e}" for i in range(4))]
                    for kind, errs in by_kind.items()]
            print(f"{label}: per-layer FP8 error, worst layer of each kind (max-rel = max|diff|/max|ref|, "
                  "rms-rel = ||diff||/||ref||)\n")
            table(["layer kind", "layers", "weight max-rel", "weight rms-rel", "output max-rel", "output rms-rel"],
                  rows)
            if skipped:
                print(f"not quantizable (input dim not a multiple of 32): {', '.join(skipped)}\n")

            rows = []
            bf16 = load()
            bf16.set_dtype(mx.bfloat16)
            rows.append(["bfloat16 weights and compute (for scale)", *rel(bf16(*inputs), reference)])
            policies = {"block linears (the policy)": lambda n, m: runnable(n, m) and in_blocks(n),
                        "block linears + embedders": lambda n, m: runnable(n, m) and layer_kind(n) != "final",
                        "block linears + final layer": lambda n, m: runnable(n, m) and layer_kind(n) != "embedder",
                        "all quantizable linears": runnable}
            for policy, predicate in policies.items():
                quantized = load()
                nn.quantize(quantized, class_predicate=predicate, **QUANT)
                rows.append([policy, *rel(quantized(*inputs), reference)])
            print(f"{label}: end-to-end output against float32\n")
            table(["quantized", "max-rel", "rms-rel"], [[r[0], f"{r[1]:.2e}", f"{r[2]:.2e}"] for r in rows])
            if any(name == "t_embedder.mlp.0" for name, _ in linears(model)):
                print("t_embedder.mlp.0 stays float32 end to end: the model casts its input to that weight's dtype\n")

    rows = []
    for out_dim, in_dim in ((3840, 3840), (10240, 3840), (3840, 10240)):
        for dist in ("normal", "student-t (df 3)"):
            key = mx.random.key(out_dim + in_dim)
            w = 0.02 * (mx.random.normal((out_dim, in_dim), key=key) if dist == "normal" else
                        mx.array(np.random.default_rng(0).standard_t(3, (out_dim, in_dim)), mx.float32))
            x = mx.random.normal((64, in_dim), key=mx.random.key(1))
            wq, scales = mx.quantize(w, **QUANT)
            y = mx.quantized_matmul(x, wq, scales, None, transpose=True, **QUANT)
            rows.append([f"{in_dim} -> {out_dim}", dist, *(f"{e:.2e}" for e in (
                *rel(mx.dequantize(wq, scales, dtype=mx.float32, **QUANT), w), *rel(y, x @ w.T)))])
    print("Real-scale random layers: weights std 0.02 (student-t scaled by 0.02), inputs N(0, 1), 64 tokens\n")
    table(["layer", "weights", "weight max-rel", "weight rms-rel", "output max-rel", "output rms-rel"], rows)


# ---------------------------------------------------------------- speed

SHAPES = [  # (model, layer, in, out)
    ("Z-Image", "attention q/k/v/out", 3840, 3840), ("Z-Image", "MLP w1/w3", 3840, 10240),
    ("Z-Image", "MLP w2", 10240, 3840), ("klein-4B", "double-block MLP in", 3072, 18432),
    ("klein-4B", "single-block qkv+MLP in", 3072, 27648), ("klein-4B", "single-block out", 12288, 3072),
]


def timed(fn, reps: int, budget: float) -> float:
    """Median seconds of up to `reps` runs after one warm-up, stopping early once `budget` seconds are spent."""
    mx.eval(fn())
    times, start = [], time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def section_speed(tokens: int, slow_tokens: int, reps: int, budget: float) -> None:
    rows = []
    for model, layer, in_dim, out_dim in SHAPES:
        w = 0.02 * mx.random.normal((out_dim, in_dim))
        wq, scales = mx.quantize(w, **QUANT)
        w_bf16 = w.astype(mx.bfloat16)
        x, x_slow = mx.random.normal((tokens, in_dim)), mx.random.normal((slow_tokens, in_dim))
        x_bf16 = x_slow.astype(mx.bfloat16)
        mx.eval(w, wq, scales, w_bf16, x, x_slow, x_bf16)
        cases = [
            ("float32 matmul", tokens, lambda: x @ w.T),
            ("dequantize + float32 matmul", tokens,
             lambda: x @ mx.dequantize(wq, scales, dtype=mx.float32, **QUANT).T),
            ("bfloat16 matmul", slow_tokens, lambda: x_bf16 @ w_bf16.T),
            ("mxfp8 quantized_matmul", slow_tokens,
             lambda: mx.quantized_matmul(x_slow, wq, scales, None, transpose=True, **QUANT)),
        ]
        for name, n, fn in cases:
            seconds = timed(fn, reps, budget)
            gflops = 2 * n * in_dim * out_dim / seconds / 1e9
            rows.append([f"{model} {layer}", f"{in_dim} -> {out_dim}", name, n, f"{seconds * 1e3:,.1f}",
                         f"{gflops:.1f}"])
            print(*rows[-1], sep=" | ", flush=True)
        del w, wq, scales, w_bf16
        mx.clear_cache()
    print()
    table(["layer", "shape", "kernel", "tokens", "median ms", "GFLOP/s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["size", "error", "speed", "all"], default="all")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens for the float32 kernels (1024x1024 image)")
    parser.add_argument("--slow-tokens", type=int, default=64, help="tokens for bfloat16 and mxfp8 (slow on CPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per measurement before stopping early")
    args = parser.parse_args()
    print(f"mlx {mx.__version__}, device {mx.default_device()}\n")
    if args.section in ("size", "all"):
        section_size()
    if args.section in ("error", "all"):
        section_error()
    if args.section in ("speed", "all"):
        section_speed(args.tokens, args.slow_tokens, args.reps, args.budget)


if __name__ == "__main__":
    main()

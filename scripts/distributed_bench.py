"""Tensor parallelism measured on this machine and computed for FLUX.2-dev: per-step time, each rank's kept
weights and MLX peak memory at 1, 2 and 4 ranks (mlx.launch, ring backend on loopback) on the mid-size random
models of pipeline_memory.py, the bytes the all-reduces carry per step (counted in the run, and by the formula
below, which the count checks), and that formula for the real FLUX.2-dev at 1024x1024 over 10 GbE and
Thunderbolt 5.

On this 2-core machine every rank shares the same two cores, so the step times are mostly the ranks' competition
and the communication, not what separate machines would see.

    python scripts/distributed_bench.py [--family zimage klein] [--ranks 1 2 4] [--size 512] [--steps 2]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

TEXT_TOKENS = 512
LINKS = {"10 GbE": 1.25e9, "Thunderbolt 5 (80 Gb/s)": 10e9}  # bytes per second, before protocol overheads
FAMILIES = {"zimage": "zimage", "klein": "flux2"}
# diffusers' Flux2Transformer2DModel defaults are FLUX.2-dev's released configuration.
FLUX2_DEV = {"num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "attention_head_dim": 128}


def payload_per_step(family: str, config: dict, image_tokens: int, text: int, batch: int,
                     compute_bytes: int) -> int:
    """The bytes all-reduced in one transformer forward: one (tokens x dim) tensor per attention and per MLP
    output. Z-Image: every block over [image, text] (refiners over their own stream); FLUX.2: each double block
    reduces the image and the text stream's attention and MLP, each single block once over both."""
    if family == "zimage":
        dim, refiners, layers = config["dim"], config.get("n_refiner_layers", 2), config["n_layers"]
        tokens = refiners * (image_tokens + text) + layers * (image_tokens + text)
        return 2 * batch * tokens * dim * compute_bytes
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    double = config["num_layers"] * 2 * (image_tokens + text)
    single = config["num_single_layers"] * (image_tokens + text)
    return batch * (double + single) * dim * compute_bytes


def ring_bytes(payload: int, ranks: int) -> float:
    """What each rank sends in a ring all-reduce of `payload`: reduce-scatter, then all-gather."""
    return 2 * (ranks - 1) / ranks * payload


def worker(folder: Path, family: str, size: int, steps: int) -> None:
    import mlximg
    import mlx.core as mx
    from mlximg.distributed import world
    from mlximg.models.zimage import padded_length

    group = world()
    pipeline = mlximg.load(str(folder), distributed="tensor" if group else None)
    pipeline.generate("a lighthouse", width=size, height=size, steps=1, guidance=0.0 if family == "zimage" else 1.0,
                      seed=0)  # loaded and warm
    text = TEXT_TOKENS  # klein pads every prompt to 512; Z-Image's caption length is the prompt's, padded
    if family == "zimage":
        text = padded_length(pipeline.encode_prompts(pipeline.component("text_encoder"), ["a lighthouse"])[0].shape[0])
        pipeline.release("text_encoder")  # as after any run: the transformer and the VAE stay
    counted, marks = {"bytes": 0}, []
    all_sum = mx.distributed.all_sum

    def counting(x, *args, **kwargs):
        counted["bytes"] += x.nbytes
        return all_sum(x, *args, **kwargs)

    mx.distributed.all_sum = counting
    mx.reset_peak_memory()
    pipeline.generate("a lighthouse", width=size, height=size, steps=steps, seed=0,
                      guidance=0.0 if family == "zimage" else 1.0, callback=lambda *_: marks.append(counted["bytes"]))
    denoise = next(r for r in pipeline.phases.records if r.name == "denoise")
    print(json.dumps({"rank": group.rank() if group else 0, "step": denoise.seconds / steps, "text": text,
                      "weights": pipeline.tracker.owners(), "peak": mx.get_peak_memory(),
                      "payload": (marks[-1] - marks[0]) / (steps - 1)}), flush=True)


def measure(folder: Path, family: str, ranks: int, size: int, steps: int) -> list[dict]:
    command = [sys.executable, __file__, f"--worker={folder}", f"--family={family}", f"--size={size}",
               f"--steps={steps}"]
    if ranks > 1:
        command = ["mlx.launch", "-n", str(ranks), "--backend", "ring", "--", *command]
    out = subprocess.run(command, capture_output=True, text=True)
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"rank"')]
    if len(reports) != ranks:
        sys.exit(out.stdout[-3000:] + out.stderr[-3000:])
    return sorted(reports, key=lambda report: report["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=["zimage", "klein"], choices=list(FAMILIES))
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="at least 2 (the count runs from the first step's end)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.family[0], args.size, args.steps)
    from pipeline_memory import build

    print(f"{args.size}x{args.size}, float32, {args.steps} steps; per rank: kept weights (transformer + VAE), MLX "
          "peak, all-reduced bytes per step (counted / formula)")
    print("| model | ranks | s/step | transformer MiB per rank | + VAE | peak MiB per rank | all-reduce MiB/step "
          "| formula MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.family:
        folder = Path(f"/tmp/mlximg-{family}-mid")
        if not (folder / "model_index.json").exists():
            build(family, folder)
        config = json.loads((folder / "transformer" / "config.json").read_text())
        for ranks in args.ranks:
            reports = measure(folder, family, ranks, args.size, args.steps)
            formula = payload_per_step(FAMILIES[family], config, (args.size // 16) ** 2, reports[0]["text"], 1, 4)
            step = max(r["step"] for r in reports)
            counted = reports[0]["payload"] / 2**20
            kept = reports[0]["weights"]
            print(f"| {family} mid | {ranks} | {step:.2f} | {kept['transformer'] / 2**20:.0f} | "
                  f"{kept['vae'] / 2**20:.0f} | "
                  f"{max(r['peak'] for r in reports) / 2**20:.0f} | {counted:.1f} | "
                  f"{formula / 2**20 if ranks > 1 else 0:.1f} |")
    payload = payload_per_step("flux2", FLUX2_DEV, (1024 // 16) ** 2, TEXT_TOKENS, 1, 2)
    print(f"\nFLUX.2-dev, 1024x1024, bfloat16, batch 1: {payload / 2**30:.2f} GiB all-reduced per step")
    for ranks in (2, 4):
        sent = ring_bytes(payload, ranks)
        times = ", ".join(f"{name} {sent / rate:.2f} s" for name, rate in LINKS.items())
        print(f"  {ranks} ranks: each sends {sent / 2**30:.2f} GiB per step: {times}")


if __name__ == "__main__":
    main()

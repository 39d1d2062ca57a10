"""Where a generation's time goes, in mlximg and in diffusers: per phase, and per kind of op within each phase.

Each engine runs in its own process on bench.py's random-weight mid models (same latents, float32, same thread
count), first a warm-up generation, then:

1. a plain generation (`--steps` steps at `--size`): each phase's wall time as the engine normally runs it;
2. the same generation instrumented: every linear layer, attention core, normalisation (mlximg's fused kernels
   counted there: QK norm + RoPE, and a block's norm with its modulation, gate and residual add, which diffusers
   runs as separate ops under "other"), activation and convolution is timed on its own (mlximg evaluates its inputs first and
   its output after, so the time is that op's alone; torch on the CPU runs synchronously anyway). "other" is
   the rest of the phase: in diffusers RoPE, modulation, gates, residual adds, copies and the scheduler; in
   mlximg the same, plus the cost of the synchronisations the instrumentation adds (the instrumented phase
   time is printed beside the plain one);
3. torch's own profiler over one transformer forward: its most expensive operators and how many it dispatches.

    python scripts/op_profile.py                        # both families, 256x256, 8 steps
    python scripts/op_profile.py --families zimage --size 512 --steps 1 --json /tmp/profile.json
    python scripts/op_profile.py --quick               # bench.py's tiny models, 64x64, 2 steps: a smoke test
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

from bench import MID, PROMPT, PHASES, QUICK, TITLES, add_timer, initial_latents, model_folder
from random_models import GUIDANCE

CATEGORIES = ("linear", "attention", "norms", "activation", "conv")


class OpTimer:
    """Adds the wall time of wrapped calls to their category within the running phase (`current["phase"]`;
    calls outside any phase are not counted); a call inside another wrapped call is the outer one's (the
    fallbacks some kernels call, or a norm inside an attention path)."""

    def __init__(self, current: dict, sync=lambda *values: None):
        self.totals = defaultdict(lambda: [0.0, 0])
        self.current = current
        self.sync = sync
        self.depth = 0

    def add(self, category: str, seconds: float) -> None:
        if self.current["phase"] is not None:
            entry = self.totals[self.current["phase"], category]
            entry[0] += seconds
            entry[1] += 1

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.sync(args, kwargs)
            self.depth += 1
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                self.sync(out)
            finally:
                self.depth -= 1
            self.add(category, time.perf_counter() - start)
            return out

        return timed

    def by_phase(self) -> dict:
        """{phase: {category: (seconds, calls)}} for every phase in PHASES."""
        return {p: {c: tuple(self.totals.get((p, c), (0.0, 0))) for c in CATEGORIES} for p in PHASES}


@contextmanager
def patched(targets, timer: OpTimer):
    """Replace each (owner, attribute, category) by its timed wrapper for the duration."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for (owner, name, category), (_, _, original) in zip(targets, saved):
        setattr(owner, name, timer.wrap(category, original))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def mlximg_targets():
    import mlx.core as mx
    import mlx.nn as nn

    from mlximg.models import autoencoder_kl
    from mlximg.nn import cpu_math, native, norms

    attention, rope = (importlib.import_module(f"mlximg.nn.{name}") for name in ("attention", "rope"))

    return [(nn.Linear, "__call__", "linear"), (nn.QuantizedLinear, "__call__", "linear"),
            (native, "attention", "attention"), (cpu_math, "attention", "attention"),
            (attention, "scaled_dot_product_attention", "attention"),
            (mx.fast, "scaled_dot_product_attention", "attention"),
            (native, "rms_norm_rope", "norms"), (native, "norm_modulate", "norms"), (rope, "apply_rope", "norms"),
            (mx.fast, "rms_norm", "norms"),
            (mx.fast, "layer_norm", "norms"), (norms.RMSNorm, "__call__", "norms"), (nn.RMSNorm, "__call__", "norms"),
            (autoencoder_kl.GroupNorm, "__call__", "norms"),
            (native, "silu_mul", "activation"), (cpu_math, "_silu_in_streams", "activation"),
            (cpu_math, "_silu_mul_in_streams", "activation"), (cpu_math, "mlx_silu", "activation"),
            (native, "conv3x3", "conv"), (mx, "conv2d", "conv")]


def run_mlximg(family: str, folder: Path, size: int, steps: int) -> dict:
    import mlximg  # noqa: F401  (preloads OpenBLAS before mlx)
    import mlx.core as mx

    from mlximg.pipelines.flux2 import Flux2Pipeline
    from mlximg.pipelines.zimage import ZImagePipeline

    pipeline = {"zimage": ZImagePipeline, "klein": Flux2Pipeline}[family](folder, keep_text_encoder=True)
    latents = initial_latents(family, folder, size)

    def generate(n):
        start = time.perf_counter()
        pipeline.generate(PROMPT, width=size, height=size, steps=n, guidance=GUIDANCE[family], latents=latents)
        wall = time.perf_counter() - start
        return {"total": wall, **{p: pipeline.phases.get(p).seconds for p in PHASES}}

    generate(1)
    plain = generate(steps)
    current = {"phase": None}
    timer = OpTimer(current, sync=lambda *values: mx.eval([v for v in _arrays(values, mx.array)]))
    original = pipeline.phases.phase

    @contextmanager
    def phase(name):  # the phase log's phases, as the running phase of the timer
        outer, current["phase"] = current["phase"], name
        try:
            with original(name):
                yield
        finally:
            current["phase"] = outer

    pipeline.phases.phase = phase
    try:
        with patched(mlximg_targets(), timer):
            seconds = generate(steps)
    finally:
        pipeline.phases.phase = original
    return {"plain": plain, "instrumented": {"seconds": seconds, "ops": timer.by_phase()}}


def _arrays(value, kind):
    """The arrays of type `kind` in nested tuples / lists / plain dicts."""
    if isinstance(value, kind):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _arrays(v, kind)
    elif type(value) is dict:  # not modules (MLX's are dicts): their parameters are evaluated already
        for v in value.values():
            yield from _arrays(v, kind)


def run_diffusers(family: str, folder: Path, size: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import Flux2KleinPipeline, ZImagePipeline

    pipe = {"zimage": ZImagePipeline, "klein": Flux2KleinPipeline}[family].from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = initial_latents(family, folder, size)
    current = {"phase": None}
    totals = dict.fromkeys(PHASES, 0.0)
    # The phases as bench.py times them: encode_prompt, the transformer forward + scheduler step, the VAE decode.
    for owner, name, phase in ((pipe, "encode_prompt", "encode"), (pipe.transformer, "forward", "denoise"),
                               (pipe.scheduler, "step", "denoise"), (pipe.vae, "decode", "decode")):
        add_timer(owner, name, phase, totals, current)

    def generate(n):
        totals.update(dict.fromkeys(PHASES, 0.0))
        start = time.perf_counter()
        pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=n, guidance_scale=GUIDANCE[family],
             latents=torch.from_numpy(latents.copy()))
        return {"total": time.perf_counter() - start, **totals}

    generate(1)
    plain = generate(steps)
    timer = OpTimer(current)  # torch on the CPU is synchronous: nothing to evaluate
    hooks = _torch_module_timers(pipe, timer)
    with patched([(F, "scaled_dot_product_attention", "attention"), (F, "silu", "activation")], timer):
        instrumented = generate(steps)
    for hook in hooks:
        hook.remove()
    profile = _torch_operator_profile(pipe, family, size, latents)
    return {"plain": plain, "instrumented": {"seconds": instrumented, "ops": timer.by_phase()}, "operators": profile}


def _torch_module_timers(pipe, timer: OpTimer) -> list:
    """Forward pre/post hooks timing every Linear, norm and conv module (none of them nests) into `timer`."""
    import torch

    def category(module):
        name = type(module).__name__
        if isinstance(module, torch.nn.Linear):
            return "linear"
        if isinstance(module, torch.nn.Conv2d):
            return "conv"
        if name.endswith("RMSNorm") or isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            return "norms"
        return None

    starts = {}

    def before(module, _):
        starts[id(module)] = time.perf_counter()

    def after(module, _, __):
        timer.add(category(module), time.perf_counter() - starts.pop(id(module)))

    hooks = []
    for component in (pipe.text_encoder, pipe.transformer, pipe.vae):
        for module in component.modules():
            if category(module) is not None:
                hooks += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    return hooks


def _torch_operator_profile(pipe, family: str, size: int, latents, top: int = 12) -> dict:
    """torch.profiler over one transformer forward of the pipeline: the operators by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    captured = {}
    forward = pipe.transformer.forward

    def capture(*args, **kwargs):
        captured.setdefault("call", (args, kwargs))
        return forward(*args, **kwargs)

    pipe.transformer.forward = capture
    pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=1, guidance_scale=GUIDANCE[family],
         latents=torch.from_numpy(latents.copy()))
    pipe.transformer.forward = forward
    args, kwargs = captured["call"]
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        forward(*args, **kwargs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    return {"seconds": total, "dispatched": sum(e.count for e in events),
            "top": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in events[:top]]}


ENGINES = {"mlximg": run_mlximg, "diffusers": run_diffusers}


def report(family: str, size: int, steps: int, results: dict) -> str:
    lines = [f"\n{TITLES[family]} {size}x{size}, {steps} steps, float32"]
    plain = {e: r["plain"] for e, r in results.items()}
    lines.append(f"{'phase (plain run) s':<28}{'mlximg':>10}{'diffusers':>11}{'ratio':>8}")
    for phase in ("total", *PHASES):
        a, b = plain["mlximg"][phase], plain["diffusers"][phase]
        lines.append(f"{phase:<28}{a:>10.3f}{b:>11.3f}{a / b:>8.2f}")
    for phase in PHASES:
        lines.append(f"\n{phase}, instrumented: seconds (calls)   mlximg            diffusers")
        rows = {e: r["instrumented"] for e, r in results.items()}
        for category in CATEGORIES:
            cells = []
            for engine in ENGINES:
                seconds, calls = rows[engine]["ops"].get(phase, {}).get(category, (0.0, 0))
                cells.append(f"{seconds:>9.3f} ({calls:>5})")
            lines.append(f"  {category:<32}" + "".join(f"{c:>18}" for c in cells))
        others = []
        for engine in ENGINES:
            phase_seconds = rows[engine]["seconds"][phase]
            ops = rows[engine]["ops"].get(phase, {})
            others.append(phase_seconds - sum(s for s, _ in ops.values()))
        lines.append(f"  {'other':<32}" + "".join(f"{o:>18.3f}" for o in others))
        lines.append(f"  {'phase, instrumented':<32}" + "".join(
            f"{rows[e]['seconds'][phase]:>18.3f}" for e in ENGINES))
    profile = results["diffusers"]["operators"]
    lines.append(f"\ntorch.profiler, one transformer forward: {profile['seconds']:.3f} s self CPU, "
                 f"{profile['dispatched']} operator calls; top by self time:")
    for name, seconds, count in profile["top"]:
        lines.append(f"  {name:<48}{seconds:>9.3f} s {count:>6} calls")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="zimage,klein")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--cache", type=Path, default=Path("/tmp/mlximg-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny models, 64x64, 2 steps")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(ENGINES[args.child](args.families, Path(args.folder), args.size, args.steps)))
        return
    if args.quick:
        args.size, args.steps = 64, 2
    env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"),
                                         str(args.threads))}
    everything = {}
    for family in args.families.split(","):
        folder = model_folder(args.cache, family, (QUICK if args.quick else MID)[family])
        results = {}
        for engine in ENGINES:
            proc = subprocess.run([sys.executable, __file__, f"--child={engine}", f"--families={family}",
                                   f"--folder={folder}", f"--size={args.size}", f"--steps={args.steps}"],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                sys.exit(f"{engine} {family}: failed\n{proc.stderr[-3000:]}")
            results[engine] = json.loads(proc.stdout.splitlines()[-1])
        everything[family] = results
        print(report(family, args.size, args.steps, results), flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()

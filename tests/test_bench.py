"""scripts/bench.py --quick: both engines run on tiny models of both families and the ratio table comes out;
scripts/kernel_bench.py times every op on every engine; scripts/op_profile.py --quick breaks both down."""

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlximg.nn import native
from oracle import require_oracle

BENCH = Path(__file__).parents[1] / "scripts" / "bench.py"


def test_quick_bench_prints_both_engines_and_ratios(tmp_path):
    require_oracle()
    report = tmp_path / "bench.json"
    # One thread: a smoke test should not stall on a busy, shared runner.
    result = subprocess.run([sys.executable, str(BENCH), "--quick", "--threads=1", f"--json={report}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.count("mlximg/diffusers") == 2, out  # one table per family
    header = next(line for line in out.splitlines() if "mlximg/diffusers" in line)
    assert header.split() == ["mlximg", "diffusers", "mlximg/diffusers"]
    step = re.search(r"denoise s/step\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out)
    assert step and float(step[1]) > 0 and float(step[2]) > 0 and float(step[3]) > 0, out
    numbers = json.loads(report.read_text())
    assert set(numbers) == {"zimage 64", "klein 64"}
    for entry in numbers.values():
        assert set(entry["summary"]) == {"mlximg", "diffusers"}
        assert entry["step_flops"] > 0
        assert all(engine["peak_mib"] > 0 for engine in entry["summary"].values())


def test_kernel_bench_prints_every_op_for_every_engine():
    require_oracle()
    if not native.applies(mx.zeros(1)):
        pytest.skip(f"the CPU kernels are not in use: {native.status()}")
    result = subprocess.run([sys.executable, str(BENCH.with_name("kernel_bench.py")), "--lengths=64", "--reps=1",
                             "--threads=1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [row[-5] for row in rows] == ["64"] * 3, result.stdout
    assert all(float(value) > 0 for row in rows for value in row[-4:]), result.stdout


def test_op_profile_breaks_down_both_engines(tmp_path):
    require_oracle()
    report = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, str(BENCH.with_name("op_profile.py")), "--quick", "--threads=1",
                             f"--cache={tmp_path}", f"--json={report}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    numbers = json.loads(report.read_text())
    assert set(numbers) == {"zimage", "klein"}
    for family in numbers.values():
        for engine in ("mlximg", "diffusers"):
            denoise = family[engine]["instrumented"]["ops"]["denoise"]
            assert all(denoise[kind][1] > 0 for kind in ("linear", "attention", "norms")), (engine, denoise)
            assert all(family[engine]["plain"][phase] > 0 for phase in ("total", "encode", "denoise", "decode"))
            assert family[engine]["instrumented"]["ops"]["decode"]["conv"][1] > 0
        assert family["diffusers"]["operators"]["dispatched"] > 0
    assert "torch.profiler, one transformer forward" in result.stdout

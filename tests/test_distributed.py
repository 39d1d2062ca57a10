"""Several processes on loopback, as users start them: `mlx.launch -n N --backend ring` runs tensor-parallel and
data-parallel generations of the tiny Z-Image, FLUX.2 klein and dev models. Tensor-parallel images equal the
single-process image within 1/255 and each rank keeps exactly its share of the sharded layers; data-parallel
images are the single process's bit for bit; a rank that dies or hangs makes the others stop with a clear error.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.nn as nn
import numpy as np
import pytest
from test_flux2_pipeline import build_dev, build_klein

import mlximg
from mlximg.distributed.tensor import _get
from mlximg.runtime import nbytes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from random_models import build_zimage  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
SETTINGS = {"width": 64, "height": 64, "steps": 3}
LAUNCH_TIMEOUT = 240


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models whose heads split four ways (Z-Image) or two (FLUX.2 klein and dev, text encoders too)."""
    root = tmp_path_factory.mktemp("distributed")
    build_zimage(root / "zimage", transformer=dict(dim=96, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4,
                                                  axes_dims=[8, 8, 8], axes_lens=[1024, 64, 64]),
                 text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=8, max_position_embeddings=1024),
                 vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8))
    # Wide enough that each rank's share of a row-split quantized layer is whole groups (64 for affine4).
    build_zimage(root / "zimage-wide", transformer=dict(dim=384, n_layers=1, n_refiner_layers=1, n_heads=4,
                                                       n_kv_heads=4, axes_dims=[32, 32, 32], axes_lens=[1024, 64, 64]),
                 text_encoder=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=32, max_position_embeddings=1024),
                 vae=dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8))
    build_klein(root / "klein", is_distilled=True)
    build_dev(root / "dev", text_heads=(2, 2))
    return root


def launch(ranks: int, *command: str) -> str:
    """`mlx.launch` on loopback; its own exit status says nothing of the ranks' (mlx 0.32), so callers check
    what the ranks printed and wrote."""
    out = subprocess.run(["mlx.launch", "-n", str(ranks), "--backend", "ring", "--", sys.executable, *command],
                         capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    return out.stdout + out.stderr


def rank_reports(output: str, ranks: int) -> list[dict]:
    reports = sorted((json.loads(line) for line in output.splitlines() if line.startswith('{"rank"')),
                     key=lambda report: report["rank"])
    assert [r["rank"] for r in reports] == list(range(ranks)), output
    return reports


def expected_bytes(pipeline, name: str, ranks: int) -> int:
    """A rank's bytes of a component: everything outside the plan's linears, and 1/N of those."""
    module = pipeline.component(name)
    module = module.model if name == "text_encoder" else module
    sharded = sum(nbytes(_get(module, path)) for path, _, _ in module.tensor_parallel_plan().linears)
    return nbytes(module) - sharded + sharded // ranks


@pytest.mark.parametrize("family, ranks", [("zimage", 2), ("zimage", 4), ("klein", 2), ("dev", 2)])
def test_tensor_parallel_matches_one_process(models, tmp_path, family, ranks):
    settings = {**SETTINGS, "guidance": {"dev": 2.5, "klein": 1.0}.get(family, 4.0)}
    output = launch(ranks, str(WORKER), str(models / family), "tensor", str(tmp_path),
                    "--settings", json.dumps(settings))
    reports = rank_reports(output, ranks)
    single = mlximg.load(str(models / family), keep_text_encoder=True)
    expected = np.asarray(single.generate("a red fox", seed=1, **settings), dtype=np.int16)
    ours = np.load(tmp_path / "1.npy").astype(np.int16)
    difference = np.abs(ours - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (difference.max(), (difference > 0).mean())
    for name in ("transformer", "text_encoder"):
        share = expected_bytes(single, name, ranks)
        assert share < single.tracker.nbytes(name)
        assert all(report["owners"][name] == share for report in reports), (name, share, reports)
    assert all(report["owners"]["vae"] == single.tracker.nbytes("vae") for report in reports)


QUANTIZED = [("zimage-wide", {"quantize": "mxfp8", "text_encoder_quantize": "mxfp8"}, 4.0),
             ("zimage-wide", {"quantize": "affine4", "text_encoder_quantize": "affine4"}, 4.0),
             ("klein", {"quantize": "mxfp8"}, 1.0)]  # klein: the single blocks' fused segments, packed


@pytest.mark.parametrize("model, modes, guidance", QUANTIZED)
def test_tensor_parallel_quantized_weights(models, tmp_path, model, modes, guidance):
    """Quantized layers (as a Mac runs them: MLX's quantized matmul) shard codes and scales together: the image
    is the single process's with the same weights within 1/255, and each rank keeps its share of the codes."""
    load, settings = {**modes, "fp8": "matmul"}, {**SETTINGS, "guidance": guidance}
    output = launch(2, str(WORKER), str(models / model), "tensor", str(tmp_path), "--settings",
                    json.dumps(settings), "--load", json.dumps(load))
    reports = rank_reports(output, 2)
    single = mlximg.load(str(models / model), keep_text_encoder=True, **load)
    expected = np.asarray(single.generate("a red fox", seed=1, **settings), dtype=np.int16)
    difference = np.abs(np.load(tmp_path / "1.npy").astype(np.int16) - expected)
    assert difference.max() <= 1, difference.max()
    for name in ("transformer", "text_encoder"):
        assert all(report["owners"][name] == expected_bytes(single, name, 2) for report in reports), name
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in single.component("transformer").named_modules())


def test_data_parallel_is_bit_identical(models, tmp_path):
    """Seeds 5, 6, 7 on two ranks: rank 0 makes 5 and 6 as one batch, rank 1 makes 7; each is the single
    process's image for that batch exactly."""
    output = launch(2, str(WORKER), str(models / "zimage"), "data", str(tmp_path), "--seeds", "5", "6", "7",
                    "--settings", json.dumps(SETTINGS))
    rank_reports(output, 2)
    single = mlximg.load(str(models / "zimage"))
    expected = [*single.generate("a red fox", seed=[5, 6], **SETTINGS), single.generate("a red fox", seed=7,
                                                                                         **SETTINGS)]
    for seed, image in zip((5, 6, 7), expected):
        assert np.array_equal(np.load(tmp_path / f"{seed}.npy"), np.asarray(image)), seed


def test_the_command_line_under_mlx_launch(models, tmp_path):
    """`mlx.launch ... -- mlximg generate --distributed tensor|data`: rank 0 writes the files, each rank reports
    what it keeps, and a random seed is rank 0's on every rank."""
    common = ["-m", "mlximg", "generate", "a red fox", "--model", str(models / "zimage"), "--width", "64",
              "--height", "64", "--steps", "2"]
    output = launch(2, *common, "--distributed", "tensor", "-o", str(tmp_path / "tensor.png"))
    assert (tmp_path / "tensor.png").is_file(), output
    assert "rank 0 of 2: kept weights" in output and "rank 1 of 2: kept weights" in output, output
    output = launch(2, *common, "--distributed", "data", "--num-images", "3", "--seed", "4",
                    "-o", str(tmp_path / "data.png"))
    assert sorted(p.name for p in tmp_path.glob("data-*.png")) == ["data-4.png", "data-5.png", "data-6.png"], output
    alone = subprocess.run([sys.executable, *common, "--distributed", "tensor", "-o", str(tmp_path / "x.png")],
                           capture_output=True, text=True)
    assert alone.returncode == 2 and "needs several processes" in alone.stderr and "mlx.launch" in alone.stderr


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def spawn_ranks(tmp_path: Path, command: list[str]) -> list[subprocess.Popen]:
    """Two ranks started as mlx.launch starts them (a ring hostfile and each rank's number), but as separate
    processes, so that one can be killed and the other's own exit status read."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in free_ports(2)]))
    return [subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)})
            for rank in range(2)]


@pytest.mark.parametrize("how", ["killed", "stopped"])
def test_a_lost_rank_stops_the_others(models, tmp_path, how):
    """Rank 1 killed mid-run (its connection closes: rank 0 fails at once) or stopped (it never answers: rank 0's
    watchdog ends it after --peer-timeout): rank 0 exits with a clear error instead of hanging."""
    ranks = spawn_ranks(tmp_path, ["-m", "mlximg", "generate", "a red fox", "--model", str(models / "zimage"),
                                   "--width", "64", "--height", "64", "--steps", "1000", "--distributed", "tensor",
                                   "--peer-timeout", "5", "-o", str(tmp_path / "out.png")])
    try:
        for line in ranks[0].stdout:  # rank 0 is denoising once its progress bar moves
            if "denoise:" in line and "1/1000" in line.replace(" ", ""):
                break
        time.sleep(1)
        ranks[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        rest = ranks[0].communicate(timeout=60)[0]
        assert ranks[0].returncode != 0 and time.monotonic() - started < 30
        expected = "another rank is gone" if how == "killed" else "another rank is not answering"
        assert expected in rest, rest[-2000:]
        assert not (tmp_path / "out.png").exists()
    finally:
        for process in ranks:
            process.kill()
            process.wait()

"""Checkpoint loading: a real diffusers save_pretrained layout (sharded, with index), strict keys, clear errors."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from oracle import assert_close, perturb_, require_oracle, save_tiny

from mlximg.loading import (component_dir, load_component, load_safetensors, load_weights_strict, read_config,
                            resolve_model, weight_files)
from mlximg.nn import RMSNorm
from mlximg.runtime import nbytes


class MlxTinyNet(nn.Module):
    """The MLX port of the test network below; parameter paths equal the diffusers keys."""

    def __init__(self, config: dict):
        super().__init__()
        self.norm = RMSNorm(config["in_dim"], eps=1e-6)
        self.proj_in = nn.Linear(config["in_dim"], config["hidden"])
        self.blocks = [nn.Linear(config["hidden"], config["hidden"]) for _ in range(config["depth"])]
        self.proj_out = nn.Linear(config["hidden"], config["out_dim"], bias=False)

    def __call__(self, x):
        x = self.proj_in(self.norm(x))
        for block in self.blocks:
            x = x + nn.gelu(block(x))
        return self.proj_out(x)


def build_reference():
    torch = require_oracle()
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.normalization import RMSNorm as TorchRMSNorm

    class TinyNet(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, in_dim=16, hidden=32, out_dim=8, depth=3):
            super().__init__()
            self.norm = TorchRMSNorm(in_dim, eps=1e-6)
            self.proj_in = torch.nn.Linear(in_dim, hidden)
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(hidden, hidden) for _ in range(depth)])
            self.proj_out = torch.nn.Linear(hidden, out_dim, bias=False)

        def forward(self, x):
            x = self.proj_in(self.norm(x))
            for block in self.blocks:
                x = x + torch.nn.functional.gelu(block(x))
            return self.proj_out(x)

    torch.manual_seed(0)
    return perturb_(TinyNet().eval())


@pytest.fixture
def checkpoint(tmp_path):
    """A model folder with one sharded component `net`, and the reference network that wrote it."""
    reference = build_reference()
    save_tiny(reference, tmp_path / "model" / "net", max_shard_size="2KB")
    (tmp_path / "model" / "model_index.json").write_text(json.dumps({"_class_name": "Tiny", "net": ["x", "TinyNet"]}))
    return tmp_path / "model", reference


def load_net(model_dir, **kwargs):
    return load_component(model_dir, "net", MlxTinyNet, **kwargs)


def test_sharded_checkpoint_matches_reference(checkpoint, rng):
    import torch

    model_dir, reference = checkpoint
    shards = weight_files(model_dir / "net")
    assert len(shards) > 1 and (model_dir / "net" / "diffusion_pytorch_model.safetensors.index.json").exists()
    before = mx.get_active_memory()
    net = load_net(model_dir)
    # Lazy: weights are read when first evaluated (a few bytes of RNG state may appear).
    assert mx.get_active_memory() - before < nbytes(net) / 100
    x = rng.standard_normal((3, 16)).astype(np.float32)
    assert_close(net(mx.array(x)), reference(torch.from_numpy(x)), 1e-5, "tiny network")


def test_weights_cast_to_compute_dtype(checkpoint):
    net = load_net(checkpoint[0], dtype=mx.bfloat16)
    assert net.proj_in.weight.dtype == mx.bfloat16


def test_missing_and_unexpected_keys_are_named(checkpoint):
    model_dir, _ = checkpoint
    with pytest.raises(ValueError, match="blocks.0.bias"):
        load_net(model_dir, sanitize=lambda w: {k: v for k, v in w.items() if k != "blocks.0.bias"})
    with pytest.raises(ValueError, match="extra.weight"):
        load_net(model_dir, sanitize=lambda w: {**w, "extra.weight": mx.zeros((2,))})


def test_shape_mismatch_names_both_shapes(checkpoint):
    model_dir, _ = checkpoint
    config_path = model_dir / "net" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "out_dim": 9}))
    with pytest.raises(ValueError, match=r"proj_out.weight") as error:
        load_net(model_dir)
    assert "(9, 32)" in str(error.value) and "(8, 32)" in str(error.value)


def test_failed_load_changes_nothing(checkpoint):
    model_dir, _ = checkpoint
    net = MlxTinyNet(read_config(model_dir / "net"))
    before = np.array(net.proj_in.weight)
    weights = load_safetensors(weight_files(model_dir / "net"))
    del weights["proj_out.weight"]
    with pytest.raises(ValueError, match="proj_out.weight"):
        load_weights_strict(net, weights, "net")
    np.testing.assert_array_equal(np.array(net.proj_in.weight), before)


def test_truncated_and_corrupt_files_are_named(checkpoint):
    model_dir, _ = checkpoint
    shard = weight_files(model_dir / "net")[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        load_net(model_dir)
    shard.write_bytes(data[:4])
    with pytest.raises(ValueError, match=f"{shard.name}.*corrupt"):
        load_net(model_dir)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json here!!" + data[24:])
    with pytest.raises(ValueError, match=f"{shard.name}.*corrupt safetensors header"):
        load_net(model_dir)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shards that are missing.*{shard.name}"):
        load_net(model_dir)


def test_missing_model_component_and_config(checkpoint, tmp_path):
    model_dir, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face repo id"):
        resolve_model("not a/repo id!")
    with pytest.raises(FileNotFoundError, match="is a file"):
        resolve_model(model_dir / "model_index.json")
    with pytest.raises(FileNotFoundError, match=r"missing component folder 'vae' \(found: \['net'\]\)"):
        component_dir(model_dir, "vae")
    (model_dir / "net" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_net(model_dir)
    (model_dir / "net" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_net(model_dir)
    for path in (model_dir / "net").glob("*.safetensors*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        weight_files(model_dir / "net")


def fake_hub_cache(cache, repo_id, source):
    """Lay `source` out as huggingface_hub's cache holds a downloaded snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(source, repo / "snapshots" / revision)
    return repo / "snapshots" / revision


def test_repo_id_resolves_offline_from_cache(checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    model_dir, _ = checkpoint
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-model", model_dir)
    assert resolve_model("tiny-org/tiny-model", components=["net"]) == snapshot
    assert load_net(snapshot).proj_in.weight.shape == (32, 16)
    with pytest.raises(FileNotFoundError, match="'tiny-org/absent' is not downloaded, and the Hugging Face hub is offline"):
        resolve_model("tiny-org/absent", components=["net"])


def test_an_interrupted_download_is_named_offline_and_resumed_online(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    model_dir, _ = checkpoint
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-model", model_dir)
    shard = sorted((snapshot / "net").glob("*.safetensors"))[-1]
    kept = tmp_path / "kept"
    shard.rename(kept)  # what an interrupted download leaves: the snapshot without that file
    with pytest.raises(FileNotFoundError, match=rf"'tiny-org/tiny-model' is downloaded only in part \(missing: "
                                                rf"net/{shard.name}\), and the Hugging Face hub is offline"):
        resolve_model("tiny-org/tiny-model", components=["net"])

    calls = []
    real = huggingface_hub.snapshot_download

    def hub(repo_id, allow_patterns=None, local_files_only=False):
        calls.append(local_files_only)
        if not local_files_only:
            kept.rename(shard)  # the hub brings the missing file
        return real(repo_id, allow_patterns=allow_patterns, local_files_only=True)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    assert resolve_model("tiny-org/tiny-model", components=["net"]) == snapshot
    assert calls == [True, False], "the cache first, then a download of what is missing"


def test_a_model_not_downloaded_offline_says_what_to_do(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError) as error:
        resolve_model("Tongyi-MAI/Z-Image-Turbo", components=["transformer"], download_gb=21)
    message = str(error.value)
    assert "'Tongyi-MAI/Z-Image-Turbo' (about 21 GB) is not downloaded" in message
    assert "--model z-image-digits" in message

"""LoRA and LoKr against diffusers' load_lora_weights on the tiny Z-Image and FLUX.2 [klein] pipelines: a random
PEFT adapter saved in diffusers' format, the same adapter written in every other supported format (the inverse
of diffusers' conversions, here), one and two adapters, several scales, scales changed between calls, FP8 bases,
and the errors for files that do not fit."""

import copy
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_flux2_pipeline import build_klein
from test_zimage_pipeline import build_reference

import mlximg
from mlximg import cli
from mlximg.lora import LoRA
from mlximg.quant.convert import convert

PROMPT = "a red fox in the snow"
SIZE = dict(height=64, width=96)
ZIMAGE_TARGETS = (r".*\.(to_q|to_k|to_v|to_out\.0|w1|w2|w3)$|.*(layers|noise_refiner)\.\d+\.adaLN_modulation\.0$"
                  r"|all_x_embedder\.2-1|all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|t_embedder\.mlp\.0")
FLUX2_TARGETS = (r".*\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out|linear_in|linear_out"
                 r"|to_qkv_mlp_proj)$|.*single_transformer_blocks\.\d+\.attn\.to_out$|x_embedder|context_embedder"
                 r"|proj_out|norm_out\.linear|.*timestep_embedder\.linear_[12]|double_stream_modulation_img\.linear")
SECOND_TARGETS = r".*\.(to_q|to_k|to_v|to_out\.0)$"  # the second adapter: attention only, another rank
QKV = {"zimage": [("attention", ("to_q", "to_k", "to_v"))],
       "flux2": [("attn", ("to_q", "to_k", "to_v")), ("attn", ("add_q_proj", "add_k_proj", "add_v_proj"))]}


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_same(ours, expected, what=""):
    difference = np.abs(pixels(ours) - pixels(expected))
    assert difference.max() <= 1, f"{what}: max pixel difference {difference.max()}"


def make_adapter(pipeline, family: str, folder: Path, rank: int, alpha: float, seed: int, targets: str) -> dict:
    """A random PEFT LoRA on a copy of the diffusers transformer, q/k/v sharing one down projection (so that the
    fused formats can hold it), saved as diffusers does. Returns {module: (A, B)} as float32 NumPy."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer = copy.deepcopy(pipeline.transformer)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    transformer.add_adapter(config, adapter_name="a")
    modules = dict(transformer.named_modules())
    for name, module in modules.items():
        if hasattr(module, "lora_A"):
            module.lora_A["a"].weight.mul_(0.5)
            module.lora_B["a"].weight.mul_(0.3)
    for prefix, group in [(n.rsplit(".", 1)[0], g) for n in modules for _, g in QKV[family]
                          if n.endswith(f".{g[0]}") and hasattr(modules[n], "lora_A")]:
        shared = modules[f"{prefix}.{group[0]}"].lora_A["a"].weight
        for name in group[1:]:
            modules[f"{prefix}.{name}"].lora_A["a"].weight.copy_(shared)
    state = get_peft_model_state_dict(transformer, adapter_name="a")
    type(pipeline).save_lora_weights(folder, transformer_lora_layers=state,
                                     transformer_lora_adapter_metadata=config.to_dict())
    weights = {k: v.float().numpy() for k, v in state.items()}
    return {k.removesuffix(".lora_A.weight"): (weights[k], weights[k.replace("lora_A", "lora_B")])
            for k in weights if k.endswith("lora_A.weight")}


def fused(adapter: dict, family: str):
    """Yield (block prefix, attention name, fused names, A, B stacked) for every q/k/v group of the adapter."""
    for module in sorted(adapter):
        for attention, group in QKV[family]:
            if module.endswith(f".{attention}.{group[0]}"):
                prefix = module.removesuffix(f".{group[0]}")
                parts = [adapter[f"{prefix}.{name}"] for name in group]
                yield prefix, group, parts[0][0], np.concatenate([b for _, b in parts])


# -- the formats, written from {module: (A, B)}; `scale` (alpha / rank) goes into the file as its format does ----------

ZIMAGE_ORIGINAL = {"all_x_embedder.2-1": "x_embedder", "all_final_layer.2-1.linear": "final_layer.linear",
                   "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1"}


def kohya(adapter: dict, family: str, alpha: float) -> dict:
    """kohya: lora_unet_<names with _>, lora_down / lora_up, alpha; q/k/v fused under the original names."""
    out, done = {}, set()

    def put(name, down, up):
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = np.array(alpha, np.float32)

    for prefix, group, down, up in fused(adapter, family):
        put(original_qkv(prefix, group, family), down, up)
        done.update(f"{prefix}.{n}" for n in group)
    for module, (down, up) in adapter.items():
        if module not in done:
            put(original(module, family), down, bfl_order(module, up))
    return out


def original_qkv(prefix: str, group: tuple, family: str) -> str:
    if family == "zimage":
        return f"{prefix}.qkv"
    block = prefix.split(".")[1]
    return f"double_blocks.{block}.{'img' if group[0] == 'to_q' else 'txt'}_attn.qkv"


FLUX2_ORIGINAL = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
                  "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0",
                  "ff_context.linear_out": "txt_mlp.2"}
FLUX2_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "norm_out.linear": "final_layer.adaLN_modulation.1",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin"}


def original(module: str, family: str) -> str:
    """A module's name in the original checkpoint (Z-Image's, or Black Forest Labs' for FLUX.2)."""
    if family == "zimage":
        if module.endswith(".attention.to_out.0"):
            return module.replace(".to_out.0", ".out")
        return ZIMAGE_ORIGINAL.get(module, module)
    if module in FLUX2_TOP:
        return FLUX2_TOP[module]
    stack, index, rest = module.split(".", 2)
    if stack == "single_transformer_blocks":
        return f"single_blocks.{index}.{'linear1' if rest == 'attn.to_qkv_mlp_proj' else 'linear2'}"
    return f"double_blocks.{index}.{FLUX2_ORIGINAL[rest]}"


def bfl_order(module: str, up: np.ndarray) -> np.ndarray:
    """FLUX.2's final modulation rows as BFL orders them, (shift, scale); diffusers' norm_out has (scale, shift)."""
    if module != "norm_out.linear":
        return up
    half = up.shape[0] // 2
    return np.concatenate([up[half:], up[:half]])


def original_names(adapter: dict, family: str, scale: float, prefix: str, suffix: str = ".weight") -> dict:
    """ai-toolkit / BFL: original names under `prefix`, lora_A / lora_B, the scale folded into B; FLUX.2's final
    modulation in BFL's (shift, scale) order."""
    out, done = {}, set()
    for block, group, down, up in fused(adapter, family):
        name = original_qkv(block, group, family)
        out[f"{prefix}{name}.lora_A{suffix}"], out[f"{prefix}{name}.lora_B{suffix}"] = down, up * scale
        done.update(f"{block}.{n}" for n in group)
    for module, (down, up) in adapter.items():
        if module in done:
            continue
        name, up = original(module, family), bfl_order(module, up)
        out[f"{prefix}{name}.lora_A{suffix}"], out[f"{prefix}{name}.lora_B{suffix}"] = down, up * scale
    return out


def diffusers_names(adapter: dict, scale: float, prefix: str, suffix: str = ".weight") -> dict:
    return {k: v for module, (down, up) in adapter.items()
            for k, v in ((f"{prefix}{module}.lora_A{suffix}", down), (f"{prefix}{module}.lora_B{suffix}", up * scale))}


def write(folder: Path, name: str, tensors: dict) -> Path:
    path = folder / name
    mx.save_safetensors(str(path), {k: mx.array(np.asarray(v, np.float32)) for k, v in tensors.items()})
    return path


FORMATS = {
    "zimage": {
        "kohya": lambda a, alpha, rank: kohya(a, "zimage", alpha),
        "ai-toolkit": lambda a, alpha, rank: original_names(a, "zimage", alpha / rank, "diffusion_model."),
        "fal": lambda a, alpha, rank: diffusers_names(a, alpha / rank, "base_model.model.", ".default.weight"),
    },
    "flux2": {
        "kohya": lambda a, alpha, rank: kohya(a, "flux2", alpha),
        "bfl": lambda a, alpha, rank: original_names(a, "flux2", alpha / rank, "diffusion_model."),
        "fal": lambda a, alpha, rank: original_names(a, "flux2", alpha / rank, "base_model.model."),
    },
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: the diffusers pipeline, its folder, and two adapters (file, {module: (A, B)}, alpha, rank)."""
    root = tmp_path_factory.mktemp("lora")
    built = {"zimage": (build_reference(root / "zimage"), root / "zimage", ZIMAGE_TARGETS),
             "flux2": (build_klein(root / "klein", is_distilled=True), root / "klein", FLUX2_TARGETS)}
    out = {}
    for family, (reference, folder, targets) in built.items():
        first = make_adapter(reference, family, root / f"{family}-a", 4, 8.0, 1, targets)
        second = make_adapter(reference, family, root / f"{family}-b", 8, 8.0, 2, SECOND_TARGETS)
        out[family] = {"reference": reference, "folder": folder, "root": root,
                       "adapters": [(root / f"{family}-a" / "pytorch_lora_weights.safetensors", first, 8.0, 4),
                                    (root / f"{family}-b" / "pytorch_lora_weights.safetensors", second, 8.0, 8)]}
    return out


def latents_for(family: str) -> np.ndarray:
    shape = (1, 16, 8, 12) if family == "zimage" else (1, 32, 4, 6)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def diffusers_image(model: dict, family: str, adapters: list[tuple[Path, float]]):
    import torch

    pipeline = copy.deepcopy(model["reference"])
    for i, (path, _) in enumerate(adapters):
        pipeline.load_lora_weights(str(path), adapter_name=f"a{i}")
    if adapters:
        pipeline.set_adapters([f"a{i}" for i in range(len(adapters))], adapter_weights=[s for _, s in adapters])
    guidance = 0.0 if family == "zimage" else 1.0
    return pipeline(prompt=PROMPT, num_inference_steps=3, guidance_scale=guidance,
                    latents=torch.from_numpy(latents_for(family)), **SIZE).images[0]


def ours_image(pipeline, family: str, **settings):
    guidance = 0.0 if family == "zimage" else 1.0
    return pipeline.generate(PROMPT, steps=3, guidance=guidance, latents=latents_for(family), **SIZE, **settings)


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_one_and_two_adapters_match_diffusers_and_scales_change_between_calls(models, family):
    model = models[family]
    (first, *_), (second, *_) = model["adapters"]
    pipeline = mlximg.load(str(model["folder"]))
    plain = ours_image(pipeline, family)
    for adapters in ([(first, 1.0)], [(first, 0.5)], [(first, 0.5), (second, 1.0)], [(second, 1.0), (first, 0.25)]):
        ours = ours_image(pipeline, family, loras=adapters)
        assert_same(ours, diffusers_image(model, family, adapters), f"{family} {adapters}")
        assert np.abs(pixels(ours) - pixels(plain)).mean() > 2, "the adapter changes the image"
        assert [a["scale"] for a in ours.info["parameters"]["loras"]] == [s for _, s in adapters]
    touched = {a["name"]: a["layers"] for a in pipeline.set_loras([first])}
    assert touched == {first.name: len(model["adapters"][0][1])}
    pipeline.set_loras([])
    assert_same(ours_image(pipeline, family), plain, "all adapters off")
    assert set(pipeline.tracker.owners()) == {"transformer", "vae"}, "adapters released when taken off"


@pytest.mark.parametrize("family, name", [(f, n) for f in FORMATS for n in FORMATS[f]])
def test_every_format_gives_the_diffusers_image(models, family, name, tmp_path):
    model = models[family]
    path, adapter, alpha, rank = model["adapters"][0]
    written = write(tmp_path, f"{name}.safetensors", FORMATS[family][name](adapter, alpha, rank))
    pipeline = mlximg.load(str(model["folder"]), loras=[(written, 0.7)])
    assert_same(ours_image(pipeline, family), diffusers_image(model, family, [(path, 0.7)]), f"{family} {name}")


def lokr_file(model: dict, family: str, tmp_path: Path) -> Path:
    """A LoKr on a few layers, in the names diffusers reads for the family (BFL's for FLUX.2, with one fused qkv
    split by its W1 rows); W2 decomposed, an alpha."""
    rng = np.random.default_rng(7)
    transformer = model["reference"].transformer
    if family == "zimage":
        modules = {"diffusion_model.layers.0.attention.to_q": "layers.0.attention.to_q",
                   "diffusion_model.layers.1.feed_forward.w2": "layers.1.feed_forward.w2"}
    else:
        modules = {"diffusion_model.double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
                   "diffusion_model.double_blocks.0.img_attn.qkv": None,
                   "diffusion_model.single_blocks.1.linear2": "single_transformer_blocks.1.attn.to_out"}
    tensors = {}
    for key, module in modules.items():
        weight = dict(transformer.named_modules())[module].weight if module else None
        out, width = (weight.shape if module else (3 * transformer.config.num_attention_heads
                                                   * transformer.config.attention_head_dim,
                                                   transformer.config.num_attention_heads
                                                   * transformer.config.attention_head_dim))
        a, b = (3 if out % 3 == 0 else 2), 2
        tensors[f"{key}.lokr_w1"] = rng.standard_normal((a, b)) * 0.5
        tensors[f"{key}.lokr_w2_a"] = rng.standard_normal((out // a, 2)) * 0.3
        tensors[f"{key}.lokr_w2_b"] = rng.standard_normal((2, width // b)) * 0.3
        tensors[f"{key}.alpha"] = np.array(1.0)
    return write(tmp_path, "lokr.safetensors", tensors)


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_lokr_matches_diffusers(models, family, tmp_path):
    model = models[family]
    path = lokr_file(model, family, tmp_path)
    pipeline = mlximg.load(str(model["folder"]), loras=[(path, 0.8)])
    assert_same(ours_image(pipeline, family), diffusers_image(model, family, [(path, 0.8)]), f"{family} LoKr")


def test_lycoris_lokr_names_match_diffusers(models, tmp_path):
    """FLUX.2 LoKr in LyCORIS's spelling: lycoris_<diffusers block path with underscores>."""
    model = models["flux2"]
    tensors = mx.load(str(lokr_file(model, "flux2", tmp_path)))
    renamed = {}
    for key, value in tensors.items():
        module, kind = key.rsplit(".", 1)
        if module.endswith("img_attn.proj"):
            renamed[f"lycoris_transformer_blocks_0_attn_to_out_0.{kind}"] = np.array(value)
        elif module.endswith("single_blocks.1.linear2"):
            renamed[f"lycoris_single_transformer_blocks_1_attn_to_out.{kind}"] = np.array(value)
    path = write(tmp_path, "lycoris.safetensors", renamed)
    pipeline = mlximg.load(str(model["folder"]), loras=[(path, 1.0)])
    assert_same(ours_image(pipeline, "flux2"), diffusers_image(model, "flux2", [(path, 1.0)]), "LyCORIS LoKr")


FP8_BOUNDS = (3.0, 24)  # klein's FP8 vs float image, mean / max levels (test_fp8.BOUNDS)


@pytest.mark.parametrize("execution", ["matmul", "dequantize"])
def test_lora_on_fp8_weights(models, execution, tmp_path):
    """The adapter stays unfused on top of the FP8 layers: the FP8 + LoRA image is the float + LoRA image within
    FP8's error, and clearly not the FP8 image without the adapter."""
    model = models["flux2"]
    fp8 = convert(model["folder"], tmp_path / "klein-fp8", log=lambda line: None)
    path = model["adapters"][0][0]
    with_lora = ours_image(mlximg.load(str(fp8), fp8=execution, loras=[(path, 1.0)]), "flux2")
    without = ours_image(mlximg.load(str(fp8), fp8=execution), "flux2")
    float_lora = ours_image(mlximg.load(str(model["folder"]), loras=[(path, 1.0)]), "flux2")
    difference = np.abs(pixels(with_lora) - pixels(float_lora))
    assert difference.mean() <= FP8_BOUNDS[0] and difference.max() <= FP8_BOUNDS[1]
    assert np.abs(pixels(with_lora) - pixels(without)).mean() > 3 * difference.mean()


def test_cli_takes_adapters_with_scales(models, tmp_path, capsys):
    model = models["zimage"]
    path = model["adapters"][0][0]
    out = tmp_path / "out.png"
    assert cli.main(["generate", PROMPT, "--model", str(model["folder"]), "--steps", "2", "--width", "32",
                     "--height", "32", "--seed", "1", "--lora", f"{path}:0.6", "-o", str(out)]) == 0
    assert f"lora {path.name}: scale 0.6" in capsys.readouterr().out
    from mlximg.output import read_parameters

    assert read_parameters(out)["loras"][0]["scale"] == 0.6


# -- what does not fit is refused, naming what ------------------------------------------------------------------


def test_bad_files_and_values(models, tmp_path):
    model = models["zimage"]
    pipeline = mlximg.load(str(model["folder"]))
    path, adapter, alpha, rank = model["adapters"][0]
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    mismatched = dict(kohya(adapter, "zimage", alpha))
    key = next(k for k in mismatched if k.endswith(".lora_up.weight"))
    mismatched[key] = mismatched[key][:, :2]
    unknown = {**diffusers_names(adapter, 1.0, "transformer."), "transformer.layers.0.attention.to_z.lora_A.weight":
               np.zeros((4, 64)), "transformer.layers.0.attention.to_z.lora_B.weight": np.zeros((64, 4))}
    dora = {**diffusers_names(adapter, 1.0, "transformer."), "transformer.layers.0.attention.to_q.dora_scale":
            np.ones((1, 64))}
    cases = [
        (text, r"corrupt safetensors"),
        (truncated, r"truncated safetensors file"),
        (tmp_path / "weights.bin", r"only .safetensors files are read"),
        (tmp_path / "missing.safetensors", r"no such file or folder"),
        (write(tmp_path, "rank.safetensors", mismatched), r"do not share a rank"),
        (write(tmp_path, "unknown.safetensors", unknown), r"2 of its \d+ tensors match nothing in this Z-Image "
                                                          r"transformer: \['transformer.layers.0.attention.to_z"),
        (write(tmp_path, "dora.safetensors", dora), r"DoRA .* is not supported"),
        (write(tmp_path, "diff.safetensors", {"diffusion_model.layers.0.attention.to_q.diff": np.zeros((64, 64))}),
         r"full-weight patches \(.diff / .diff_b\) are not supported"),
    ]
    for source, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pipeline.set_loras([source])
    for scale in (float("nan"), float("inf"), "strong", True):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            pipeline.set_loras([(path, scale)])
    assert pipeline.adapters.active == [] and set(pipeline.tracker.owners()) == {"transformer"}


def test_the_other_family_and_text_encoder_tensors_are_named(models, tmp_path):
    flux2_lora = models["flux2"]["adapters"][0][0]
    zimage = mlximg.load(str(models["zimage"]["folder"]))
    with pytest.raises(ValueError, match="match nothing in this Z-Image transformer; it looks like a LoRA for FLUX.2"):
        zimage.set_loras([flux2_lora])
    path, adapter, alpha, rank = models["zimage"]["adapters"][0]
    with_text = {**diffusers_names(adapter, alpha / rank, "transformer."),
                 "text_encoder.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 32)),
                 "text_encoder.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, 4))}
    written = write(tmp_path, "with_text.safetensors", with_text)
    with pytest.raises(ValueError, match=r"2 tensors adapt the text encoder .* skip_text_encoder=True"):
        zimage.set_loras([written])
    report = zimage.set_loras([LoRA(str(written), 0.5, skip_text_encoder=True)])
    assert report[0]["layers"] == len(adapter)
    assert math.isclose(report[0]["scale"], 0.5)
    metadata = json.loads(json.dumps(report))  # what goes into the image's parameters is plain JSON
    assert metadata[0]["name"] == "with_text.safetensors"

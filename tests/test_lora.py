"""LoRA adapters against diffusers + peft: tiny random SD3 / SD3.5 transformers and CLIP encoders, two LoRAs made
with peft (different ranks, alphas, rank / alpha patterns) and saved by diffusers' `save_lora_weights`, loaded by
diffusers' SD3 loader and mixed with `set_adapters([a, b], [0.7, 0.4])`; the same adapters in the other namings."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
import lora_maker
from lora_maker import (
    CLIP_TARGETS,
    TRANSFORMER_TARGETS,
    add_adapter,
    save_lora,
    to_kohya,
)
from safetensors.torch import save_file
from tiny import randomize
from transformers import CLIPTextModelWithProjection

from mlx_flash import lora
from mlx_flash.clip import load_clip
from mlx_flash.mmdit import load_mmdit
from mlx_flash.quantization import QuantizedLinear, quantized

SCALES = [0.7, 0.4]
TINY = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
            num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=24, pooled_projection_dim=20,
            pos_embed_max_size=16)
VARIANTS = {
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
    "sd3-medium": dict(qk_norm=None),
    "sd3.5-large": dict(qk_norm="rms_norm"),
}
WIDE = dict(TINY, attention_head_dim=32, num_attention_heads=2, caption_projection_dim=64, joint_attention_dim=64,
            pooled_projection_dim=64)  # widths that 4-bit quantization (groups of 64) takes


def make_loras(model: torch.nn.Module, folder: Path, text_encoders=(None, None)) -> list[Path]:
    """LoRA a: transformer, rank 4 (to_k 2), alpha 8 (proj_out 3); LoRA b: rank 3, alpha 1.5, and rank 2, alpha 4 on
    both CLIPs when given. Large enough that each changes the output far beyond the tolerances."""
    a = add_adapter(model, "a", TRANSFORMER_TARGETS, 1, 0.15, r=4, lora_alpha=8, rank_pattern={"to_k": 2},
                    alpha_pattern={"proj_out": 3})
    b = add_adapter(model, "b", TRANSFORMER_TARGETS, 2, 0.2, r=3, lora_alpha=1.5)
    te = [add_adapter(m, "b", CLIP_TARGETS, 3 + i, 0.3, r=2, lora_alpha=4) if m is not None else None
          for i, m in enumerate(text_encoders)]
    return [save_lora(folder / "a.safetensors", transformer=a),
            save_lora(folder / "b.safetensors", transformer=b, text_encoder=te[0], text_encoder_2=te[1])]


def diffusers_transformer(path: Path, files: list[Path], scales=SCALES) -> SD3Transformer2DModel:
    """The reference: diffusers' SD3 LoRA loader (what load_lora_weights runs for the transformer)."""
    model = SD3Transformer2DModel.from_pretrained(path)
    for name, file in zip("ab", files):
        state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(file), return_lora_metadata=True)
        StableDiffusion3Pipeline.load_lora_into_transformer(state, model, adapter_name=name, metadata=metadata)
    model.set_adapters(list("ab")[: len(files)], scales)
    return model.eval()


def inputs(config: dict, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, 16, 8, 12)).astype(np.float32),
            np.array([900.0, 250.0], np.float32),
            rng.standard_normal((2, 7, config["joint_attention_dim"])).astype(np.float32),
            rng.standard_normal((2, config["pooled_projection_dim"])).astype(np.float32))


def run_reference(model, x) -> np.ndarray:
    latents, t, ctx, pooled = (torch.from_numpy(a) for a in x)
    with torch.no_grad():
        out = model(hidden_states=latents, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)
    return out.sample.numpy()


def run_ours(model, x) -> np.ndarray:
    latents, t, ctx, pooled = x
    out = model(mx.array(latents.transpose(0, 2, 3, 1)), mx.array(t), mx.array(ctx), mx.array(pooled))
    return np.array(out).transpose(0, 3, 1, 2)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def build(variant: str, folder: Path) -> tuple:
    """(variant, transformer folder, [LoRA a, LoRA b], config) of a tiny random transformer in `variant`'s style."""
    torch.manual_seed(0)
    config = dict(TINY, **VARIANTS[variant])
    randomize(SD3Transformer2DModel(**config), 0).save_pretrained(folder / "transformer")
    files = make_loras(SD3Transformer2DModel.from_pretrained(folder / "transformer"), folder)
    return variant, folder / "transformer", files, config


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny_loras(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def medium_loras(tmp_path_factory):
    """The SD3.5-Medium style only: the namings and the error messages do not depend on the architecture."""
    return build("sd3.5-medium", tmp_path_factory.mktemp("medium"))


def ours_with(path: Path, files: list[Path], scales=SCALES):
    model = load_mmdit(path)
    shared = lora.LoRAScales(scales)
    lora.apply_loras(model, "transformer", [lora.read_lora(f) for f in files], shared)
    return model, shared


def test_transformer_parity_unfused_and_fused(tiny_loras):
    name, path, files, config = tiny_loras
    x = inputs(config)
    ref = run_reference(diffusers_transformer(path, files), x)
    base = run_ours(load_mmdit(path), x)
    model, _ = ours_with(path, files)
    unfused = run_ours(model, x)
    report = lora.fuse_loras(model)
    fused = run_ours(model, x)
    print(f"\n{name}: LoRA effect {rel(base, ref):.3f}, unfused {rel(unfused, ref):.1e}, fused {rel(fused, ref):.1e}, "
          f"{report.layers} layers fused")
    assert rel(base, ref) > 0.05  # the adapters matter far beyond the tolerance
    assert rel(unfused, ref) <= 1e-5
    assert rel(fused, ref) <= 1e-5
    assert not lora.lora_layers(model) and report.requantized == 0


def test_transformer_parity_per_part_ups(medium_loras, monkeypatch):
    """The q/k/v adapters kept one up per part (as files of rank PER_PART_MIN_RANK or more are), added per part
    into the attention's q, k and v (`output_parts`): still diffusers' output."""
    monkeypatch.setattr(lora, "PER_PART_MIN_RANK", 1)
    _, path, files, config = medium_loras
    x = inputs(config)
    ref = run_reference(diffusers_transformer(path, files), x)
    model, _ = ours_with(path, files)
    qkv = [m for p, m in lora.lora_layers(model).items() if p.endswith("qkv")]
    assert qkv and all(m["lora"]["0"]["up"].ndim == 3 for m in qkv)
    assert rel(run_ours(model, x), ref) <= 1e-5


def test_every_target_is_adapted(tiny_loras):
    """Each targeted diffusers module lands on one of our layers (q/k/v into the fused ones)."""
    name, path, files, _ = tiny_loras
    model, _ = ours_with(path, files[:1])
    layers = set(lora.lora_layers(model))
    expected = {"proj_out", "norm_out.linear"}
    for i in range(3):
        block = f"transformer_blocks.{i}"
        expected |= {f"{block}.{m}" for m in ("attn.qkv", "attn.add_qkv", "attn.to_out", "ff.fc1", "ff.fc2",
                                              "norm1.linear", "norm1_context.linear")}
        if i < 2:
            expected |= {f"{block}.{m}" for m in ("attn.to_add_out", "ff_context.fc1", "ff_context.fc2")}
        if i in VARIANTS[name].get("dual_attention_layers", ()):
            expected |= {f"{block}.attn2.qkv", f"{block}.attn2.to_out"}
    assert layers == expected


def test_scales_change_without_reload(tiny_loras):
    name, path, files, config = tiny_loras
    x = inputs(config, seed=1)
    model, shared = ours_with(path, files, [0.0, 0.0])
    assert np.array_equal(run_ours(model, x), run_ours(load_mmdit(path), x))
    shared.values[:] = [1.0, -0.5]
    assert rel(run_ours(model, x), run_reference(diffusers_transformer(path, files, [1.0, -0.5]), x)) <= 1e-5


@pytest.mark.parametrize("style", ["kohya", "kohya-split-qkv", "comfy", "onetrainer"])
def test_other_namings_give_identical_outputs(medium_loras, tmp_path, style):
    name, path, files, config = medium_loras
    split = style == "kohya-split-qkv"
    files = files[1:] if split else files  # split_qkv needs one rank for q, k and v: LoRA b
    converted = [to_kohya(f, tmp_path / f"{style}-{f.name}", config["num_layers"], style=style.split("-")[0],
                          split_qkv=split) for f in files]
    x = inputs(config, seed=2)
    expected = run_ours(ours_with(path, files, SCALES[: len(files)])[0], x)
    got = run_ours(ours_with(path, converted, SCALES[: len(files)])[0], x)
    print(f"\n{style}: {rel(got, expected):.1e}")
    assert rel(got, expected) <= 1e-5


def test_raw_peft_file_with_its_adapter_config(medium_loras, tmp_path):
    """`base_model.model.` keys, the alphas in adapter_config.json beside the file (as PEFT saves them)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    _, path, files, config = medium_loras
    with safe_open(str(files[0]), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    state = {k.replace("transformer.", "base_model.model.", 1): v for k, v in load_file(str(files[0])).items()}
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}))
    x = inputs(config, seed=3)
    expected = run_ours(ours_with(path, files[:1], SCALES[:1])[0], x)
    got = run_ours(ours_with(path, [tmp_path / "adapter_model.safetensors"], SCALES[:1])[0], x)
    assert rel(got, expected) == 0.0


def test_t5_lora_in_kohya_naming(tiny_pipeline_dir, tmp_path):
    """lora_te3_ (kohya's T5-XXL prefix): against transformers' T5EncoderModel with the same peft adapter."""
    from transformers import T5EncoderModel

    from mlx_flash.t5 import load_t5

    model = T5EncoderModel.from_pretrained(tiny_pipeline_dir / "text_encoder_3").eval()
    state, _ = add_adapter(model, "c", ["q", "k", "v", "o", "wi_0", "wi_1", "wo"], 5, 0.1, r=2, lora_alpha=3)
    kohya = {}
    for key, value in state.items():
        module, _, matrix = key.rpartition(".lora_")
        name = "lora_te3_" + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if matrix.startswith('A') else 'up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(3.0)
    save_file(kohya, str(tmp_path / "t5.safetensors"))
    ids = np.random.default_rng(0).integers(0, 100, (2, 30))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state.numpy()
        with _no_adapter(model):
            plain = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    ours = load_t5(tiny_pipeline_dir / "text_encoder_3")
    lora.apply_loras(ours, "text_encoder_3", [lora.read_lora(tmp_path / "t5.safetensors")], lora.LoRAScales([1.0]))
    got = np.array(ours(mx.array(ids)))
    print(f"\nT5 lora_te3: effect {rel(plain, expected):.3f}, error {rel(got, expected):.1e}")
    assert rel(plain, expected) > 0.05 and rel(got, expected) <= 1e-5


def _no_adapter(model):
    """peft's layers switched off for the duration of a `with`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    class Off:
        def __enter__(self):
            for m in model.modules():
                if isinstance(m, BaseTunerLayer):
                    m.enable_adapters(False)

        def __exit__(self, *exc):
            for m in model.modules():
                if isinstance(m, BaseTunerLayer):
                    m.enable_adapters(True)
    return Off()


def test_hub_file(monkeypatch, tmp_path, medium_loras):
    """ORG/REPO/PATH.safetensors is fetched (with an adapter_config.json beside it when the repo has one)."""
    from mlx_flash.hub import ModelNotFoundError

    calls = []

    def download(repo, filename, revision=None):
        calls.append((repo, filename))
        if filename.endswith("adapter_config.json"):
            raise ModelNotFoundError(f"{repo}: no {filename}")
        return medium_loras[2][0]

    monkeypatch.setattr(lora, "download_file", download)
    assert lora.resolve_lora_file("org/repo/sub/x.safetensors") == medium_loras[2][0]
    assert calls == [("org/repo", "sub/x.safetensors"), ("org/repo", "sub/adapter_config.json")]


@pytest.fixture(scope="module")
def clip_loras(tiny_pipeline_dir, tmp_path_factory):
    """LoRA b of make_loras on the tiny pipeline's transformer and both CLIPs, and the encoders with it loaded by
    diffusers' SD3 text-encoder loader."""
    folder = tmp_path_factory.mktemp("clip_loras")
    encoders = [CLIPTextModelWithProjection.from_pretrained(tiny_pipeline_dir / n)
                for n in ("text_encoder", "text_encoder_2")]
    transformer = SD3Transformer2DModel.from_pretrained(tiny_pipeline_dir / "transformer")
    files = make_loras(transformer, folder, encoders)
    refs = []
    for name in ("text_encoder", "text_encoder_2"):
        model = CLIPTextModelWithProjection.from_pretrained(tiny_pipeline_dir / name)
        state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(files[1]), return_lora_metadata=True)
        StableDiffusion3Pipeline.load_lora_into_text_encoder(state, None, model, prefix=name, adapter_name="b",
                                                             metadata=metadata)
        from diffusers.utils.peft_utils import set_weights_and_activate_adapters

        set_weights_and_activate_adapters(model, ["b"], [SCALES[1]])
        refs.append(model.eval())
    return files, refs


@pytest.mark.parametrize("index", [0, 1])
def test_clip_parity(tiny_pipeline_dir, clip_loras, tmp_path, index):
    files, refs = clip_loras
    name = ("text_encoder", "text_encoder_2")[index]
    ids = np.random.default_rng(index).integers(0, 49406, (2, 77))
    ids[:, 0], ids[:, 20] = 49406, 49407
    with torch.no_grad():
        out = refs[index](torch.from_numpy(ids), output_hidden_states=True)
    ref_tokens, ref_pooled = out.hidden_states[-2].numpy(), out.text_embeds.numpy()
    base_tokens, _ = load_clip(tiny_pipeline_dir / name)(mx.array(ids))
    for source in (files[1], to_kohya(files[1], tmp_path / "kohya.safetensors", 3)):
        model = load_clip(tiny_pipeline_dir / name)
        lora.apply_loras(model, name, [lora.read_lora(source)], lora.LoRAScales([SCALES[1]]))
        tokens, pooled = model(mx.array(ids))
        print(f"\n{name} {source.name}: effect {rel(np.array(base_tokens), ref_tokens):.3f}, "
              f"tokens {rel(np.array(tokens), ref_tokens):.1e}, pooled {rel(np.array(pooled), ref_pooled):.1e}")
        assert rel(np.array(base_tokens), ref_tokens) > 0.05
        assert rel(np.array(tokens), ref_tokens) <= 1e-5 and rel(np.array(pooled), ref_pooled) <= 1e-5


def test_quantized_base_takes_adapters(tmp_path):
    """4-bit transformer: each adapted layer's output is the quantized layer's plus the adapter delta of the
    full-precision model (checked against diffusers above); fusing requantizes and reports the added error."""
    torch.manual_seed(0)
    config = dict(WIDE, qk_norm="rms_norm", dual_attention_layers=(0,))
    randomize(SD3Transformer2DModel(**config), 0).save_pretrained(tmp_path / "transformer")
    files = make_loras(SD3Transformer2DModel.from_pretrained(tmp_path / "transformer"), tmp_path)
    full, _ = ours_with(tmp_path / "transformer", files)
    model = quantized(load_mmdit(tmp_path / "transformer"), 4)
    plain = dict(model.named_modules())
    lora.apply_loras(model, "transformer", [lora.read_lora(f) for f in files], lora.LoRAScales(SCALES))
    adapted = lora.lora_layers(model)
    full_layers = lora.lora_layers(full)
    assert adapted and all(isinstance(m, lora.LoRAQuantizedLinear) for m in adapted.values())
    assert all(isinstance(m, QuantizedLinear) for m in adapted.values())  # the CPU backend's fast path too
    rng = np.random.default_rng(0)
    worst = 0.0
    for path, layer in adapted.items():
        x = mx.array(rng.standard_normal((2, 5, lora._layer_dims(layer)[1])).astype(np.float32))
        reference = full_layers[path]
        delta = reference(x) - super(lora._Adapted, reference).__call__(x)
        expected = plain[path](x) + delta
        worst = max(worst, float(mx.abs(layer(x) - expected).max() / mx.abs(expected).max()))
    x = inputs(config)
    unfused = run_ours(model, x)
    later = quantized(full, 4)  # quantizing an adapted model keeps its adapters
    assert set(lora.lora_layers(later)) == set(adapted)
    assert rel(run_ours(later, x), unfused) <= 1e-6
    report = lora.fuse_loras(model)
    fused = run_ours(model, x)
    print(f"\n4-bit: unfused layer error {worst:.1e}; fused and requantized {report.requantized} layers: added weight "
          f"error {report.max_error:.2e} ({report.relative_error:.1%} of the largest weight), output change "
          f"{rel(fused, unfused):.2e}")
    assert worst <= 1e-5
    assert report.requantized == len(adapted) and 0 < report.max_error
    assert all(type(dict(model.named_modules())[path]) is QuantizedLinear for path in adapted)
    assert rel(fused, unfused) < 0.2  # requantizing adds 4-bit rounding noise, not a different model


def test_adapter_bytes(tiny_loras):
    _, path, files, _ = tiny_loras
    model, _ = ours_with(path, files)
    expected = sum(v.nbytes for m in lora.lora_layers(model).values() for a in m["lora"].values() for v in a.values())
    assert lora.adapter_bytes(model) == expected > 0



@pytest.mark.parametrize("per_part", [True, False])
def test_adapters_equal_separate_deltas(per_part, monkeypatch):
    """A fused q/k/v layer holding adapters of every kind (one up per part of different ranks, a block-diagonal
    up, a shared down), some scaled to zero: its output for each set of active adapters, whole and per part,
    equals the base output plus each adapter's delta computed separately in float64."""
    monkeypatch.setattr(lora, "PER_PART_MIN_RANK", 1 if per_part else 10**6)
    rng = np.random.default_rng(0)
    base = nn.Linear(8, 12)
    adapters = {
        "0": {"down": rng.standard_normal((3 * 2, 8)), "up": rng.standard_normal((3, 4, 2))},  # per part, rank 2
        "1": {"down": rng.standard_normal((3 * 3, 8)), "up": rng.standard_normal((3, 4, 3))},  # per part, rank 3
        "2": {"down": rng.standard_normal((5, 8)), "up": rng.standard_normal((12, 5))},  # shared down (kohya qkv)
        "3": {"down": rng.standard_normal((4, 8)),  # q and v only: block-diagonal, k rows zero
              "up": np.concatenate([np.pad(rng.standard_normal((4, 2)), [(0, 0), (0, 2)]), np.zeros((4, 4)),
                                    np.pad(rng.standard_normal((4, 2)), [(0, 0), (2, 0)])])},
    }
    as_mx = {k: {n: lora.transposed_layout(mx.array(v.astype(np.float32))) for n, v in a.items()}
             for k, a in adapters.items()}
    scales = lora.LoRAScales([0.0] * 4)
    layer = lora._adapted(base, as_mx, scales)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    plain = np.array(base(mx.array(x))).astype(np.float64)
    for values in ([0.7, 0, 0, 0], [0, 0, -1.3, 0], [0.7, 0.4, 0, 0], [0.7, 0.4, 0.5, 0], [0, 0.4, 0, 2.0],
                   [0.7, 0.4, 0.5, 2.0], [0, 0, 0, 0]):
        scales.values[:] = values
        expected = plain + sum(s * x @ (np.array(lora.dense_up(mx.array(a["up"]))) @ a["down"]).T
                               for s, a in zip(values, adapters.values()))
        assert np.abs(np.array(layer(mx.array(x))) - expected).max() <= 1e-5 * np.abs(expected).max(), values
        parts = np.array(layer.output_parts(mx.array(x), 3))  # as the attention takes q, k and v
        assert np.abs(parts - expected.reshape(2, 5, 3, 4).transpose(2, 0, 1, 3)).max() <= 1e-5 * np.abs(
            expected).max(), values


def test_output_parts_over_a_quantized_layer(monkeypatch):
    """A 4-bit fused q/k/v layer with per-part and block-diagonal adapters: `output_parts` is its output cut
    into q, k and v, the quantized base's plus the adapters' delta computed separately."""
    monkeypatch.setattr(lora, "PER_PART_MIN_RANK", 2)
    rng = np.random.default_rng(1)
    base = QuantizedLinear.from_linear(nn.Linear(64, 96), 64, 4)
    adapters = {"0": {"down": rng.standard_normal((3 * 2, 64)), "up": rng.standard_normal((3, 32, 2))},
                "1": {"down": rng.standard_normal((3, 64)), "up": rng.standard_normal((96, 3))}}
    layer = lora._adapted(base, {k: {n: mx.array(v.astype(np.float32)) for n, v in a.items()}
                                 for k, a in adapters.items()}, lora.LoRAScales([0.5, 0.0]))
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    for values in ([0.5, 0.0], [0.5, -0.8], [0.0, -0.8]):
        layer.lora_scales.values[:] = values
        expected = np.array(base(mx.array(x))).astype(np.float64) + sum(
            s * x @ (np.array(lora.dense_up(mx.array(a["up"]))) @ a["down"]).T
            for s, a in zip(values, adapters.values()))
        parts = np.array(layer.output_parts(mx.array(x), 3))
        assert np.abs(parts - expected.reshape(2, 5, 3, 32).transpose(2, 0, 1, 3)).max() <= 1e-5 * np.abs(
            expected).max(), values

# Bad input: one line each -------------------------------------------------------------------------------------

def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file_and_pickles(tmp_path):
    with pytest.raises(lora.LoRAError) as err:
        lora.read_lora(tmp_path / "nope.safetensors")
    assert "no such file" in _one_line(err)
    for suffix in (".ckpt", ".pt", ".bin"):
        (tmp_path / f"x{suffix}").write_bytes(b"\x80\x04")
        with pytest.raises(ValueError) as err:
            lora.read_lora(tmp_path / f"x{suffix}")
        assert "pickled" in _one_line(err)


@pytest.mark.parametrize("text", ["a.safetensors:abc", "a.safetensors:nan", "a.safetensors:"])
def test_scale_not_a_number(text):
    with pytest.raises(ValueError) as err:
        lora.parse_scaled_arg(text)
    assert "scale" in _one_line(err)


def test_scale_parsing():
    assert lora.parse_scaled_arg("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
    assert lora.parse_scaled_arg("org/repo/a.safetensors") == ("org/repo/a.safetensors", 1.0)
    with pytest.raises(ValueError):
        lora.check_scale(True, "a")


@pytest.mark.parametrize("key, kind", [
    ("transformer.proj_out.dora_scale", "DoRA"),
    ("transformer.proj_out.lora_magnitude_vector", "DoRA"),
    ("lora_unet_final_layer_linear.hada_w1_a", "LoHa"),
    ("lora_unet_final_layer_linear.lokr_w1", "LoKr"),
])
def test_unsupported_kinds_refused_by_name(tmp_path, key, kind):
    tensors = {"transformer.proj_out.lora_A.weight": torch.zeros(2, 24), "transformer.proj_out.lora_B.weight":
               torch.zeros(64, 2), key: torch.zeros(2, 2)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(lora.LoRAError) as err:
        lora.read_lora(tmp_path / "x.safetensors")
    assert kind in _one_line(err)


def _file(tmp_path: Path, keys: dict[str, tuple[int, int]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(tmp_path / "other.safetensors"))
    return tmp_path / "other.safetensors"


@pytest.mark.parametrize("make, expected", [
    (lambda: {f"transformer.transformer_blocks.{i}.attn.to_q.lora_{ab}.weight": s for i in range(38)
              for ab, s in (("A", (4, 2432)), ("B", (2432, 4)))}, "38 blocks, width 2432 (sd3.5-large"),
    (lambda: {f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{ud}.weight": s
              for ud, s in (("down", (4, 320)), ("up", (320, 4)))}, "SDXL"),
    (lambda: {f"transformer.single_transformer_blocks.0.attn.to_q.lora_{ab}.weight": s
              for ab, s in (("A", (4, 3072)), ("B", (3072, 4)))}, "FLUX"),
    (lambda: {f"transformer.transformer_blocks.0.attn.to_q.lora_{ab}.weight": s
              for ab, s in (("A", (4, 1536)), ("B", (1536, 4)))}, "is 1536x1536 but this model's layer is 24x24"),
])
def test_lora_for_another_architecture(medium_loras, tmp_path, make, expected):
    name, path, _, _ = medium_loras
    with pytest.raises(lora.LoRAError) as err:
        ours_with(path, [_file(tmp_path, make())])
    message = _one_line(err)
    print("\n" + message)
    assert expected in message and "this model's transformer has 3 blocks" in message


# Pipeline, converter and command line -------------------------------------------------------------------------

HEIGHT, WIDTH = 64, 96
PROMPT = dict(prompt="a red fox in the snow", negative_prompt="blurry")


@pytest.fixture(scope="module")
def reference_pipeline(tiny_pipeline_dir, clip_loras):
    """diffusers' StableDiffusion3Pipeline with both LoRAs: load_lora_weights + set_adapters([a, b], SCALES)."""
    files, _ = clip_loras
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for name, file in zip("ab", files):
        pipe.load_lora_weights(str(file), adapter_name=name)
    pipe.set_adapters(["a", "b"], SCALES)
    return pipe


def images(pipe, reference: bool = False, **settings) -> np.ndarray:
    latents = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(0))
    settings = {**PROMPT, "height": HEIGHT, "width": WIDTH, "output_type": "np", **settings}
    if reference:
        return pipe(**settings, latents=latents).images
    return pipe.generate(**settings, latents=latents.numpy(), skip_layer_guidance=False, progress=False)


@pytest.mark.parametrize("steps, guidance, low_memory", [(2, 4.0, False), (4, 1.0, True)])
def test_pipeline_parity_with_diffusers(tiny_pipeline_dir, clip_loras, reference_pipeline, steps, guidance,
                                        low_memory):
    """Images <= 1e-3 on [0, 1]. The 4-step run without CFG precomputes the adaLN modulations (so the adaLN
    adapters must be in) and, in low-memory mode, reloads (and re-adapts) every component on each call."""
    import mlx_flash

    files, _ = clip_loras
    settings = dict(num_inference_steps=steps, guidance_scale=guidance)
    expected = images(reference_pipeline, reference=True, **settings)
    plain = images(mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False), **settings)
    pipe = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=low_memory,
                                   loras=[(files[0], SCALES[0]), (files[1], SCALES[1])])
    got = [images(pipe, **settings) for _ in range(2)]
    effect, err = np.abs(plain - expected).max(), max(np.abs(g - expected).max() for g in got)
    print(f"\n{steps} steps, guidance {guidance}, low_memory {low_memory}: LoRA effect {effect:.3f}, error {err:.1e}")
    assert effect > 0.05 and err <= 1e-3
    pipe.set_lora_scales([0.0, 0.0])
    assert np.abs(images(pipe, **settings) - plain).max() <= 1e-6


@pytest.mark.parametrize("style", [dict(dual_attention_layers=(), qk_norm=None),  # SD3 Medium
                                   dict(dual_attention_layers=(), qk_norm="rms_norm")])  # SD3.5 Large
def test_pipeline_parity_other_architectures(tmp_path, style):
    from tiny import make_tiny_pipeline

    import mlx_flash

    root = make_tiny_pipeline(tmp_path / "pipe", **style)
    transformer = SD3Transformer2DModel.from_pretrained(root / "transformer")
    encoders = [CLIPTextModelWithProjection.from_pretrained(root / n) for n in ("text_encoder", "text_encoder_2")]
    files = make_loras(transformer, tmp_path, encoders)
    reference = StableDiffusion3Pipeline.from_pretrained(root, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    for name, file in zip("ab", files):
        reference.load_lora_weights(str(file), adapter_name=name)
    reference.set_adapters(["a", "b"], SCALES)
    settings = dict(num_inference_steps=2, guidance_scale=1.0)
    expected = images(reference, reference=True, **settings)
    plain = images(mlx_flash.load_pipeline(root, dtype="float32", low_memory=False), **settings)
    got = images(mlx_flash.load_pipeline(root, dtype="float32", low_memory=False,
                                         loras=list(zip(files, SCALES))), **settings)
    effect, err = np.abs(plain - expected).max(), np.abs(got - expected).max()
    print(f"\n{style}: LoRA effect {effect:.3f}, error {err:.1e}")
    assert effect > 0.05 and err <= 1e-3


def test_converted_with_fused_loras(tiny_pipeline_dir, clip_loras, reference_pipeline, tmp_path):
    """`mlx-flash convert SRC OUT --lora A:0.7 --lora B:0.4`: the LoRAs fused into the written weights."""
    import json

    import mlx_flash
    from mlx_flash import cli

    files, _ = clip_loras
    out = tmp_path / "fused"
    assert cli.main(["convert", str(tiny_pipeline_dir), str(out), "--dtype", "float32",
                     "--lora", f"{files[0]}:{SCALES[0]}", "--lora", f"{files[1]}:{SCALES[1]}"]) == 0
    manifest = json.loads((out / "mlx_flash.json").read_text())
    assert manifest["loras_fused"] == [{"source": str(f), "scale": s} for f, s in zip(files, SCALES)]
    expected = images(reference_pipeline, reference=True, num_inference_steps=2, guidance_scale=4.0)
    got = images(mlx_flash.load_pipeline(out, low_memory=False), num_inference_steps=2, guidance_scale=4.0)
    print(f"\nfused by the converter: error {np.abs(got - expected).max():.1e}")
    assert np.abs(got - expected).max() <= 1e-3


def test_estimator_counts_unfused_adapters(tiny_pipeline_dir, clip_loras):
    import mlx_flash

    files, _ = clip_loras
    plain = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False)
    pipe = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False,
                                   loras=[(f, 1.0) for f in files])
    model = pipe.transformer
    added = {a.name: b.weights - a.weights for a, b in zip(plain.estimate_memory(64, 64), pipe.estimate_memory(64, 64))}
    assert added["transformer"] == lora.adapter_bytes(model) > 0


def test_cli_lora_metadata_and_from(tiny_pipeline_dir, clip_loras, tmp_path):
    from test_cli import run

    from mlx_flash.image_io import read_metadata

    files, _ = clip_loras
    common = ["--model", str(tiny_pipeline_dir), "--steps", "2", "--width", "64", "--height", "64", "--seed", "3",
              "--dtype", "float32"]
    result = run("generate", "a fox", *common, "--lora", f"{files[0]}:0.7", "--lora", str(files[1]),
                 "--output", str(tmp_path / "a.png"))
    assert result.returncode == 0, result.stderr
    meta = read_metadata(tmp_path / "a.png")
    assert meta["loras"] == [{"source": str(files[0]), "scale": 0.7}, {"source": str(files[1]), "scale": 1.0}]
    again = run("generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png"))
    assert again.returncode == 0, again.stderr
    from PIL import Image

    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    for option, bad, message in (("--lora", f"{files[0]}:abc", "is not a number"),
                                 ("--lora", str(tmp_path / "none.safetensors"), "no such file"),
                                 ("--controlnet", "net:strong", "ControlNet net: scale 'strong' is not a number")):
        result = run("generate", "a fox", *common, option, bad, "--output", str(tmp_path / "c.png"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("style", ["diffusers", "kohya", "comfy"])
def test_patch_embedding_convolution_lora(medium_loras, tmp_path, style):
    """A LoRA on the patch embedding's convolution (Hyper-SD3's files carry one): peft's conv adapter, loaded by
    diffusers, against ours unfused and fused, in the diffusers and the Stability namings."""
    _, path, _, config = medium_loras
    made = add_adapter(SD3Transformer2DModel.from_pretrained(path), "a", ["pos_embed.proj", "to_q", "to_k", "to_v", "proj_out"],
                       5, 0.3, r=3, lora_alpha=6)
    file = save_lora(tmp_path / "conv.safetensors", transformer=made)
    x = inputs(config, seed=2)
    ref = run_reference(diffusers_transformer(path, [file], [0.8]), x)
    if style != "diffusers":
        file = lora_maker.to_kohya(file, tmp_path / f"{style}.safetensors", config["num_layers"], style=style)
    model, _ = ours_with(path, [file], [0.8])
    assert isinstance(model.pos_embed.proj, lora.LoRAPatchConv2d)
    unfused = run_ours(model, x)
    adapter = model.pos_embed.proj["lora"]["0"]
    kept, adapter["up"] = adapter["up"], mx.zeros_like(adapter["up"])
    assert rel(run_ours(model, x), ref) > 0.01  # the convolution's adapter matters
    adapter["up"] = kept
    lora.fuse_loras(model)
    fused = run_ours(model, x)
    assert rel(unfused, ref) <= 1e-5 and rel(fused, ref) <= 1e-5
    assert not lora.lora_layers(model)

"""Stability single-file checkpoints: the test's inverse mapping checked by diffusers, then read back into
the diffusers-layout tensors and configs, the same model outputs, full-size key coverage and clear errors."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_sd3_t5_checkpoint_to_diffusers,
)
from safetensors.torch import save_file
from single_file_maker import (
    PREFIXES,
    diffusers_to_single_file,
    read_folder_state_dicts,
    to_single_file,
)
from tiny import make_tiny_pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5EncoderModel
from transformers import T5Config as HFT5Config

from mlx_flash.clip import CLIP_G, CLIP_L, CLIPConfig, load_clip
from mlx_flash.mmdit import load_mmdit
from mlx_flash.presets import PRESETS
from mlx_flash.single_file import (
    map_single_file,
    read_encoder_file,
    read_header,
    read_single_file,
)
from mlx_flash.t5 import T5_XXL, T5Config, load_t5
from mlx_flash.vae import load_vae
from mlx_flash.weights import WeightsError, read_component

ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# What shapes cannot tell about the tiny models: CLIP heads (4 of 8 and 12 channels), sample sizes.
TINY_OVERRIDES = {
    "transformer": {"sample_size": 16, "attention_head_dim": 8},
    "vae": {"sample_size": 32},
    "text_encoder": {"num_attention_heads": 4},
    "text_encoder_2": {"num_attention_heads": 4},
}


def save(state: dict[str, torch.Tensor], path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module", params=["mmdit-x", "sd3"])
def checkpoint(request, tiny_pipeline_dir, tmp_path_factory):
    """(folder, single file, components): MMDiT-X (dual attention, qk norm) with all text encoders bundled,
    and plain SD3 (no qk norm, no dual attention) with transformer and VAE only."""
    if request.param == "mmdit-x":
        folder, components = tiny_pipeline_dir, tuple(PREFIXES)
    else:
        folder = make_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3_plain"), dual_attention_layers=(), qk_norm=None)
        components = ("transformer", "vae")
    path = save(diffusers_to_single_file(folder, components), tmp_path_factory.mktemp("single") / "model.safetensors")
    return folder, path, components


def assert_same_state(ours: dict, reference: dict[str, torch.Tensor]):
    assert sorted(ours) == sorted(reference)
    for key, value in reference.items():
        mine = torch.from_numpy(np.array(ours[key])) if isinstance(ours[key], mx.array) else ours[key]
        assert torch.equal(mine, value), key


def test_inverse_mapping_agrees_with_diffusers(checkpoint):
    """diffusers' own single-file loaders read the test's checkpoint back into the original weights."""
    folder, path, components = checkpoint
    reference = read_folder_state_dicts(folder, components)
    transformer = SD3Transformer2DModel.from_single_file(
        str(path), config=str(folder), subfolder="transformer", local_files_only=True)
    assert_same_state(transformer.state_dict(), reference["transformer"])
    vae = AutoencoderKL.from_single_file(str(path), config=str(folder), subfolder="vae", local_files_only=True)
    assert_same_state(vae.state_dict(), reference["vae"])
    if "text_encoder" in components:
        state = diffusers_to_single_file(folder, components)
        clip_l = convert_ldm_clip_checkpoint(dict(state), PREFIXES["text_encoder"])
        assert_same_state(clip_l, {k: v for k, v in reference["text_encoder"].items() if "projection" not in k})
        assert_same_state(convert_ldm_clip_checkpoint(dict(state), PREFIXES["text_encoder_2"]),
                          reference["text_encoder_2"])
        assert_same_state(convert_sd3_t5_checkpoint_to_diffusers(dict(state)), reference["text_encoder_3"])


def test_read_single_file_gives_the_folder_tensors_and_configs(checkpoint):
    folder, path, components = checkpoint
    read = read_single_file(path, TINY_OVERRIDES)
    assert sorted(read) == sorted(components)
    for component, (config, tensors) in read.items():
        folder_config, folder_tensors = read_component(folder / component)
        if component == "text_encoder":  # Stability's CLIP-L has no projection: left absent (identity)
            folder_tensors.pop("text_projection.weight")
        assert sorted(tensors) == sorted(folder_tensors), component
        for key, value in folder_tensors.items():
            assert tensors[key].shape == value.shape and tensors[key].dtype == value.dtype, key
            assert mx.array_equal(tensors[key], value).item(), key
        if component in ("transformer", "vae", "text_encoder_3"):  # every config.json field that matters
            ignored = {"_diffusers_version", "transformers_version", "dtype"}
            shared = {k for k in folder_config if k in config and k not in ignored}
            assert {k: config[k] for k in shared} == {k: folder_config[k] for k in shared}, component
            assert len(shared) >= {"transformer": 14, "vae": 17, "text_encoder_3": 15}[component]
        else:
            clip = CLIPConfig.from_dict(config)
            expected = CLIPConfig.from_dict({**folder_config, "projection_dim": clip.projection_dim})
            assert clip.__dict__ | {"eos_token_id": 2} == expected.__dict__  # tiny configs use the legacy id 2
    if "text_encoder_3" in read:
        assert T5Config.from_dict(read["text_encoder_3"][0]) == T5Config.from_dict(
            read_component(folder / "text_encoder_3")[0])


def write_folder(folder, config: dict, tensors: dict[str, mx.array]):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), tensors)
    return folder


def test_models_from_single_file_match_the_folder(checkpoint, tmp_path):
    folder, path, components = checkpoint
    read = {c: write_folder(tmp_path / c, *pair) for c, pair in read_single_file(path, TINY_OVERRIDES).items()}
    rng = np.random.default_rng(0)
    latents = mx.array(rng.standard_normal((2, 8, 12, 16)).astype(np.float32))
    args = (latents, mx.array([900.0, 20.0]), mx.array(rng.standard_normal((2, 5, 96)).astype(np.float32)),
            mx.array(rng.standard_normal((2, 64)).astype(np.float32)))
    reference = load_mmdit(folder / "transformer")(*args)
    ours = load_mmdit(read["transformer"])(*args)
    assert float(reference.std()) > 0.05 and mx.array_equal(ours, reference).item()

    reference = load_vae(folder / "vae").decode(latents)
    assert float(reference.std()) > 0.01 and mx.array_equal(load_vae(read["vae"]).decode(latents), reference).item()
    if "text_encoder" not in components:
        return

    ids = np.array([[49406, 320, 1125, 539, 49407, 49407, 49407], [49406, 2368, 49407, 0, 0, 0, 0]])
    for component in ("text_encoder", "text_encoder_2"):
        tokens, pooled = load_clip(read[component])(mx.array(ids))
        ref_tokens, ref_pooled = load_clip(folder / component)(mx.array(ids))
        assert mx.array_equal(tokens, ref_tokens).item()
        if component == "text_encoder_2":
            assert mx.array_equal(pooled, ref_pooled).item()
        else:  # unprojected: transformers' final-norm state at the end token
            with torch.no_grad():
                hidden = CLIPTextModelWithProjection.from_pretrained(folder / component)(
                    torch.from_numpy(ids)).last_hidden_state
            expected = hidden[torch.arange(2), torch.from_numpy(ids).argmax(-1)].numpy()
            assert np.abs(np.array(pooled) - expected).max() < 1e-5
    ids = mx.array([[5, 17, 42, 1], [8, 1, 0, 0]])
    assert mx.array_equal(load_t5(read["text_encoder_3"])(ids), load_t5(folder / "text_encoder_3")(ids)).item()


def test_separate_encoder_files(tiny_pipeline_dir, tmp_path):
    """clip_l / clip_g / t5xxl files with and without the text_model. / transformer. prefixes."""
    state = read_folder_state_dicts(tiny_pipeline_dir, ENCODERS)
    files = {
        "clip_l": state["text_encoder"],  # with a projection, which SD3 does not use: dropped
        "clip_g": {k.removeprefix("text_model."): v for k, v in state["text_encoder_2"].items()},
        "t5xxl": {"transformer." + k: v for k, v in state["text_encoder_3"].items()}
        | {"transformer.encoder.embed_tokens.weight": state["text_encoder_3"]["shared.weight"].clone()},  # tied copy
    }
    for (kind, tensors), component in zip(files.items(), ENCODERS):
        config, read = read_encoder_file(save(tensors, tmp_path / f"{kind}.safetensors"), kind,
                                         TINY_OVERRIDES.get(component))
        expected = {k: v for k, v in state[component].items() if not (kind == "clip_l" and "projection" in k)}
        assert_same_state(read, expected)
        assert config["hidden_act" if kind != "t5xxl" else "feed_forward_proj"] == {
            "clip_l": "quick_gelu", "clip_g": "gelu", "t5xxl": "gated-gelu"}[kind]
    with pytest.raises(WeightsError, match="text_encoder_3: .* tensor shared.weight is missing"):
        read_encoder_file(tmp_path / "clip_g.safetensors", "t5xxl")
    with pytest.raises(WeightsError, match="48-wide CLIP .* give num_attention_heads in the text_encoder_2 config overrides"):
        read_encoder_file(tmp_path / "clip_g.safetensors", "clip_g")
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        read_encoder_file(tmp_path / "clip_g.safetensors", "clip_h")


def lazy_single_file(components: dict[str, torch.nn.Module]) -> tuple[dict, dict[str, mx.array]]:
    """Full-size state dicts (meta tensors) -> (diffusers shapes, lazy single-file tensors, never evaluated)."""
    states = {c: m.state_dict() for c, m in components.items()}
    single = to_single_file(states)
    return states, {k: mx.zeros(tuple(v.shape), mx.float16) for k, v in single.items()}


def assert_same_keys_and_shapes(tensors: dict[str, mx.array], reference: dict[str, torch.Tensor]):
    assert sorted(tensors) == sorted(reference)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in reference.items()}


@pytest.mark.parametrize("preset", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_full_size_transformer_keys_and_config(preset):
    config = PRESETS[preset].transformer.to_diffusers()
    with torch.device("meta"):
        states, single = lazy_single_file({"transformer": SD3Transformer2DModel(**config)})
    read_config, tensors = map_single_file(single)["transformer"]
    assert_same_keys_and_shapes(tensors, states["transformer"])
    assert read_config == {"_class_name": "SD3Transformer2DModel", **config}
    assert read_config["pos_embed_max_size"] == (384 if preset == "sd3.5-medium" else 192)
    assert read_config["dual_attention_layers"] == (list(range(13)) if preset == "sd3.5-medium" else [])


def test_full_size_vae_and_text_encoder_keys_and_configs():
    vae_config = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024)
    clip = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5)
    with torch.device("meta"):
        states, single = lazy_single_file({
            "vae": AutoencoderKL(**vae_config),
            "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, hidden_act="quick_gelu", **clip)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu", **clip)),
            "text_encoder_3": T5EncoderModel(HFT5Config(
                vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                feed_forward_proj="gated-gelu")),
        })
    read = map_single_file(single)
    assert sorted(read) == ["text_encoder", "text_encoder_2", "text_encoder_3", "vae"]
    states["text_encoder"].pop("text_projection.weight")  # absent from Stability's files (identity)
    states["text_encoder_3"].pop("encoder.embed_tokens.weight")  # tied to shared.weight, which folders hold
    for component, (_, tensors) in read.items():
        assert_same_keys_and_shapes(tensors, states[component])
    assert {k: read["vae"][0][k] for k in vae_config} == {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in vae_config.items()}
    assert CLIPConfig.from_dict(read["text_encoder"][0]) == CLIP_L
    assert CLIPConfig.from_dict(read["text_encoder_2"][0]) == CLIP_G
    assert T5Config.from_dict(read["text_encoder_3"][0]) == T5_XXL


def test_header_is_read_without_loading(checkpoint):
    _, path, components = checkpoint
    header = read_header(path)
    assert {k.split(".")[0] for k in header} == {PREFIXES[c].split(".")[0] for c in components}
    assert header["model.diffusion_model.pos_embed"]["shape"][0] == 1


def one_line_error(path, match: str, call=read_single_file):
    with pytest.raises(WeightsError, match=match) as err:
        call(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_bad_files(checkpoint, tmp_path):
    _, path, _ = checkpoint
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(tmp_path / "cut.safetensors", "truncated: .* tensors .* end past the end of the file")
    (tmp_path / "header.safetensors").write_bytes(data[:100])
    one_line_error(tmp_path / "header.safetensors", "not a safetensors file or truncated")
    (tmp_path / "json.safetensors").write_bytes(data[:8] + b"{" * (len(data) - 8))
    one_line_error(tmp_path / "json.safetensors", "corrupt safetensors header")
    other = save({"encoder.weight": torch.zeros(2), "transformer_blocks.0.x": torch.zeros(1)},
                 tmp_path / "other.safetensors")
    one_line_error(other, "not a Stability SD3 single-file checkpoint .* pass its folder instead")
    (tmp_path / "sd3.ckpt").write_bytes(b"\x80\x02}q\x00.")
    one_line_error(tmp_path / "sd3.ckpt", "pickled checkpoints are refused")
    one_line_error(tmp_path / "missing.safetensors", "no such file")
    one_line_error(tmp_path / "sd3.ckpt", "pickled", lambda p: read_encoder_file(p, "clip_l"))


def test_missing_and_ambiguous_tensors(checkpoint):
    folder, path, _ = checkpoint
    weights = mx.load(str(path))
    broken = {k: v for k, v in weights.items() if "context_embedder" not in k}
    with pytest.raises(WeightsError, match=r"transformer: cannot infer .*context_embedder\.weight.? is missing"):
        map_single_file(broken, TINY_OVERRIDES)
    with pytest.raises(WeightsError, match="vae: cannot infer .* decoder.conv_in.weight is missing"):
        map_single_file({k: v for k, v in weights.items() if "decoder.conv_in" not in k}, TINY_OVERRIDES)
    head_dim = read_component(folder / "transformer")[0]["attention_head_dim"]
    if "x_block.attn.ln_q" not in str(list(weights)):  # without qk norm the head size is 64 unless told
        with pytest.raises(WeightsError, match="hidden size 24 is not a multiple of the head size 64"):
            map_single_file(weights, {"transformer": {"sample_size": 16}})
    else:  # with qk norm it shows in the norm weights
        assert map_single_file(weights, TINY_OVERRIDES | {"transformer": {}})["transformer"][0][
            "attention_head_dim"] == head_dim

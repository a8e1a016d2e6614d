"""Parity of the MLX ControlNets with diffusers' SD3ControlNetModel / SD3MultiControlNetModel and of the
transformer's residual injection with SD3Transformer2DModel; full-size key coverage in diffusers and
single-file naming."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel, SD3MultiControlNetModel, SD3Transformer2DModel
from mlx.utils import tree_flatten
from safetensors.torch import save_file
from tiny import randomize

from mlx_flash import hub
from mlx_flash.controlnet import (
    DIFFUSERS_RULES,
    SINGLE_FILE_CONFIG,
    SINGLE_FILE_RULES,
    ControlNet,
    ControlNetConfig,
    combine_residuals,
    controlnet_from_diffusers_weights,
    load_controlnet,
    save_controlnet,
)
from mlx_flash.mmdit import load_mmdit
from mlx_flash.quantization import Quantization, quantize_model, quantized
from mlx_flash.weights import WeightsError, check_weights, remap

TRANSFORMER = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=8,
                   num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=24, pooled_projection_dim=20,
                   pos_embed_max_size=16)
COMMON = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=8,
              num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=24, pooled_projection_dim=20,
              pos_embed_max_size=16)
VARIANTS = {  # the InstantX shape, with qk-norm and dual attention, the inpainting shape, SD3.5 Large's shape
    "instantx": dict(COMMON, num_layers=2),
    "qk-dual": dict(COMMON, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(1,)),
    "inpainting": dict(COMMON, num_layers=2, extra_conditioning_channels=1),
    "sd3.5-large": dict(COMMON, num_layers=2, joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None,
                        use_pos_embed=False, force_zeros_for_pooled_projection=False),
}


@pytest.fixture(scope="module")
def transformer(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(SD3Transformer2DModel(**TRANSFORMER), seed=3)
    path = tmp_path_factory.mktemp("transformer")
    model.save_pretrained(path)
    return model, path


def tiny_controlnet(name: str, seed: int = 1) -> SD3ControlNetModel:
    torch.manual_seed(0)
    return randomize(SD3ControlNetModel(**VARIANTS[name]), seed=seed)  # zero-initialised layers made random too


@pytest.fixture(scope="module", params=list(VARIANTS))
def controlnet(request, transformer, tmp_path_factory):
    model = tiny_controlnet(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    if not model.config.use_pos_embed:  # as StableDiffusion3ControlNetPipeline does for these
        model.pos_embed = model._get_pos_embed_from_transformer(transformer[0])
    return request.param, model, path


def inputs(config, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    extra = config.get("extra_conditioning_channels", 0)
    return dict(latents=rng.standard_normal((batch, 16, 12, 20)).astype(np.float32),  # non-square
                control=rng.standard_normal((batch, 16 + extra, 12, 20)).astype(np.float32),
                context=rng.standard_normal((batch, 7, 40)).astype(np.float32),
                pooled=rng.standard_normal((batch, 20)).astype(np.float32),
                t=np.array([1000.0, 412.0][:batch], np.float32))


def reference(model, x: dict, scale: float) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(x["latents"]), controlnet_cond=torch.from_numpy(x["control"]),
                    conditioning_scale=scale, pooled_projections=torch.from_numpy(x["pooled"]),
                    encoder_hidden_states=torch.from_numpy(x["context"]) if model.config.joint_attention_dim else None,
                    timestep=torch.from_numpy(x["t"]), return_dict=False)[0]
    return [o.numpy() for o in out]


def nhwc(a: np.ndarray) -> mx.array:
    return mx.array(a.transpose(0, 2, 3, 1))


def ours(model: ControlNet, x: dict, scale: float, patch_embed=None) -> list[np.ndarray]:
    out = model(nhwc(x["latents"]), nhwc(x["control"]), mx.array(x["t"]), mx.array(x["pooled"]),
                mx.array(x["context"]) if model.config.joint_attention_dim else None, scale, patch_embed)
    return [np.array(o) for o in out]


def rel_error(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    assert len(ref) == len(got)
    return max(np.abs(g - r).max() / np.abs(r).max() for r, g in zip(ref, got))


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_parity_with_diffusers(controlnet, transformer, scale):
    name, model, path = controlnet
    x = inputs(VARIANTS[name])
    ref = reference(model, x, scale)
    got = ours(load_controlnet(path), x, scale, load_mmdit(transformer[1]).pos_embed)
    rel = rel_error(ref, got)
    print(f"\n{name} scale={scale}: max|err|/max|ref| = {rel:.2e} over {len(ref)} residuals")
    assert min(r.std() for r in ref) > 0.05
    assert rel <= 1e-5


def test_config_inferred_from_weights(controlnet):
    name, model, path = controlnet
    assert load_controlnet(path).config == ControlNetConfig.from_diffusers(model.config)
    assert ControlNetConfig.from_diffusers(model.config).to_diffusers().items() <= {
        **model.config, "dual_attention_layers": list(model.config.dual_attention_layers)}.items()


def single_file_state(model: SD3ControlNetModel) -> dict[str, torch.Tensor]:
    """A diffusers SD3.5 Large ControlNet in Stability's single-file names (the inverse of diffusers'
    scripts/convert_sd3_controlnet_to_diffusers.py)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pos_embed.")}
    out = {}
    for key, value in state.items():
        for old, new in ((".attn.to_out.0.", ".attn.proj."), (".ff.net.0.proj.", ".mlp.fc1."),
                         (".ff.net.2.", ".mlp.fc2."), (".norm1.linear.", ".adaLN_modulation.1.")):
            key = key.replace(old, new)
        if ".attn.to_q." in key:
            parts = [state[key.replace("to_q", p)] for p in ("to_q", "to_k", "to_v")]
            out[key.replace("to_q", "qkv")] = torch.cat(parts)
        elif ".attn.to_k." not in key and ".attn.to_v." not in key:
            out[key] = value
    return out


def test_single_file_parity(transformer, tmp_path):
    """Stability's single-file SD3.5 Large ControlNet loads as diffusers' conversion script converts it."""
    model = tiny_controlnet("sd3.5-large", seed=5)
    path = tmp_path / "sd3.5_large_controlnet_canny.safetensors"
    save_file({k: v.contiguous() for k, v in single_file_state(model).items()}, path)
    model.pos_embed = model._get_pos_embed_from_transformer(transformer[0])
    x = inputs(VARIANTS["sd3.5-large"], seed=1)
    loaded = load_controlnet(path, transformer=load_mmdit(transformer[1]).config)
    assert not loaded.config.force_zeros_for_pooled_projection  # as the conversion script configures them
    rel = rel_error(reference(model, x, 0.5), ours(loaded, x, 0.5, load_mmdit(transformer[1]).pos_embed))
    print(f"\nsingle file: max|err|/max|ref| = {rel:.2e}")
    assert rel <= 1e-5


def test_multi_controlnet_combination(transformer):
    """Two ControlNets at scales 0.7 and 0.4, summed as SD3MultiControlNetModel does."""
    nets = [tiny_controlnet("instantx", seed=1), tiny_controlnet("instantx", seed=2)]
    x = inputs(VARIANTS["instantx"])
    controls = [x["control"], np.flip(x["control"], axis=2).copy()]
    with torch.no_grad():
        ref = SD3MultiControlNetModel(nets)(
            hidden_states=torch.from_numpy(x["latents"]), controlnet_cond=[torch.from_numpy(c) for c in controls],
            conditioning_scale=[0.7, 0.4], pooled_projections=torch.from_numpy(x["pooled"]),
            encoder_hidden_states=torch.from_numpy(x["context"]), timestep=torch.from_numpy(x["t"]),
            return_dict=False)[0]
    state = [{k: mx.array(v.numpy()) for k, v in net.state_dict().items()} for net in nets]
    mine = [controlnet_from_diffusers_weights(s, dict(net.config)) for s, net in zip(state, nets)]
    got = combine_residuals([ours(m, dict(x, control=c), s) for m, c, s in zip(mine, controls, (0.7, 0.4))])
    rel = rel_error([r.numpy() for r in ref], [np.array(g) for g in got])
    print(f"\nmulti: max|err|/max|ref| = {rel:.2e}")
    assert rel <= 1e-5


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("skip_layers", [None, [1]])
def test_transformer_adds_residuals_at_diffusers_interval(transformer, count, skip_layers):
    model, path = transformer
    rng = np.random.default_rng(count)
    x = inputs(TRANSFORMER)
    tokens = 12 * 20 // 4
    residuals = [rng.standard_normal((2, tokens, 24)).astype(np.float32) for _ in range(count)]
    with torch.no_grad():
        ref = model(hidden_states=torch.from_numpy(x["latents"]), encoder_hidden_states=torch.from_numpy(x["context"]),
                    pooled_projections=torch.from_numpy(x["pooled"]), timestep=torch.from_numpy(x["t"]),
                    block_controlnet_hidden_states=[torch.from_numpy(r) for r in residuals],
                    skip_layers=skip_layers).sample.numpy()
        plain = model(hidden_states=torch.from_numpy(x["latents"]),
                      encoder_hidden_states=torch.from_numpy(x["context"]),
                      pooled_projections=torch.from_numpy(x["pooled"]), timestep=torch.from_numpy(x["t"]),
                      skip_layers=skip_layers).sample.numpy()
    got = load_mmdit(path)(nhwc(x["latents"]), mx.array(x["t"]), mx.array(x["context"]), mx.array(x["pooled"]),
                           skip_layers or (), controlnet_residuals=[mx.array(r) for r in residuals])
    got = np.array(got).transpose(0, 3, 1, 2)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"\n{count} residuals skip={skip_layers}: max|err|/max|ref| = {rel:.2e}")
    assert np.abs(ref - plain).max() > 0.1 * np.abs(ref).max()  # the residuals matter
    assert rel <= 1e-5


def test_quantized_and_converted_round_trip(controlnet, transformer, tmp_path):
    name, model, path = controlnet
    x = inputs(VARIANTS[name], seed=2)
    embed = load_mmdit(transformer[1]).pos_embed
    ref = ours(load_controlnet(path), x, 1.0, embed)
    qmodel = quantized(load_controlnet(path), 8)
    assert any("scales" in k for k, _ in tree_flatten(qmodel.parameters()))
    q = ours(qmodel, x, 1.0, embed)
    print(f"\n{name} 8-bit: rel err {rel_error(ref, q):.2e}")
    assert rel_error(ref, q) < 5e-2
    saved = load_controlnet(path)
    settings = quantize_model(saved, Quantization(8, group_size=32))
    save_controlnet(tmp_path / "q", saved, settings)
    assert np.array_equal(np.concatenate([r.ravel() for r in ours(load_controlnet(tmp_path / "q"), x, 1.0, embed)]),
                          np.concatenate([r.ravel() for r in ours(saved, x, 1.0, embed)]))


def test_errors(controlnet, tmp_path):
    name, model, path = controlnet
    loaded = load_controlnet(path)
    x = inputs(VARIANTS[name])
    if not model.config.use_pos_embed:
        with pytest.raises(ValueError, match="pass the transformer's"):
            ours(loaded, x, 1.0)
    bad = tmp_path / "transformer.safetensors"
    save_file({"context_embedder.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(WeightsError, match="not a Stability SD3.5 ControlNet file"):
        load_controlnet(bad)
    state = {k: mx.array(v.numpy()) for k, v in model.state_dict().items() if "controlnet_blocks" not in k}
    with pytest.raises(WeightsError, match="is this an SD3 / SD3.5 ControlNet"):
        ControlNetConfig.infer(state)


# Published configurations: InstantX SD3 ControlNets (canny, pose, tile) and the SD3 inpainting ControlNet
# (alimama-creative) share SD3 Medium's width; their depths are those of their config.json files as far as
# known offline (key coverage holds for any depth). SD3.5 Large's: diffusers' conversion script's config.
SD3_CONTROLNET = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                      num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                      pooled_projection_dim=2048, pos_embed_max_size=192)
PUBLISHED = {
    "InstantX/SD3-Controlnet-Canny": dict(SD3_CONTROLNET, num_layers=6),
    "InstantX/SD3-Controlnet-Pose": dict(SD3_CONTROLNET, num_layers=12),
    "InstantX/SD3-Controlnet-Tile": dict(SD3_CONTROLNET, num_layers=12),
    "alimama-creative/SD3-Controlnet-Inpainting": dict(SD3_CONTROLNET, num_layers=23, extra_conditioning_channels=1),
    "stabilityai/stable-diffusion-3.5-large-controlnet": dict(
        patch_size=2, in_channels=16, num_layers=19, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=None, caption_projection_dim=2048, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False),
}


@pytest.mark.parametrize("repo", list(PUBLISHED))
def test_full_size_keys_and_shapes(repo):
    """diffusers' full-size ControlNets (meta device, no memory) map onto ours exactly."""
    with torch.device("meta"):
        reference_model = SD3ControlNetModel(**PUBLISHED[repo])
    lazy = {k: mx.zeros(tuple(v.shape)) for k, v in reference_model.state_dict().items()}  # never evaluated
    config = ControlNetConfig.infer(lazy, reference_model.config)
    assert config == ControlNetConfig.from_diffusers(reference_model.config)
    check_weights(ControlNet(config), remap(lazy, DIFFUSERS_RULES), "ControlNet")
    if not reference_model.config.use_pos_embed:  # and in Stability's single-file names
        single = {k: mx.zeros(tuple(v.shape)) for k, v in single_file_state(reference_model).items()}
        assert ControlNetConfig.infer(single, SINGLE_FILE_CONFIG) == config
        check_weights(ControlNet(config), remap(single, SINGLE_FILE_RULES), "ControlNet")


def test_hub_controlnet_resolution(tmp_path, monkeypatch):
    """A repo id resolves to its diffusers folder, or to the one single file it holds; anything else: one line."""
    folders = {"org/diffusers": tmp_path / "a", "org/single": tmp_path / "b", "org/several": tmp_path / "c"}
    for folder in folders.values():
        folder.mkdir()
    (folders["org/diffusers"] / "config.json").write_text("{}")
    (folders["org/single"] / "sd3.5_large_controlnet_canny.safetensors").write_bytes(b"")
    for name in ("blur", "depth"):
        (folders["org/several"] / f"{name}.safetensors").write_bytes(b"")
    monkeypatch.setattr(hub, "snapshot_download", lambda repo, **kwargs: str(folders[repo]))
    assert hub.resolve_controlnet("org/diffusers") == folders["org/diffusers"]
    assert hub.resolve_controlnet("org/single").name == "sd3.5_large_controlnet_canny.safetensors"
    with pytest.raises(hub.ModelNotFoundError, match="2 ControlNet weight files"):
        hub.resolve_controlnet("org/several")
    with pytest.raises(hub.ModelNotFoundError, match="not a Hugging Face repo id"):
        hub.resolve_controlnet("no such thing")
    assert hub.resolve_controlnet(tmp_path / "a") == tmp_path / "a"

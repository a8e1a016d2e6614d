"""Parity of the MLX transformer with diffusers' SD3Transformer2DModel, and full-size key coverage."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from mlx.utils import tree_flatten

from mlx_flash.lanes import Lanes
from mlx_flash.mmdit import DIFFUSERS_RULES, MMDiT, MMDiTConfig, load_mmdit
from mlx_flash.presets import PRESETS
from mlx_flash.quantization import Quantization, quantize_model
from mlx_flash.weights import WeightsError, check_weights, remap

TINY = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
    num_attention_heads=3, joint_attention_dim=40, caption_projection_dim=24, pooled_projection_dim=20,
    pos_embed_max_size=16,
)
VARIANTS = {
    "sd3": dict(qk_norm=None),
    "sd3.5-large": dict(qk_norm="rms_norm"),
    "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}


def randomize(module: torch.nn.Module, seed: int, std: float = 0.08) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if "norm" in name:  # RMS-norm weights near one, as trained models have them
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(std * torch.randn(tensor.shape, generator=gen))
    return module.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny_transformer(request, tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(SD3Transformer2DModel(**TINY, **VARIANTS[request.param]), seed=1)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, max_shard_size="20KB")  # several shards and an index
    return request.param, model, path


def run_both(model, path, latents, t, ctx, pooled, skip_layers=None):
    with torch.no_grad():
        ref = model(
            hidden_states=torch.from_numpy(latents), encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(t), skip_layers=skip_layers,
        ).sample.numpy()
    ours = load_mmdit(path)(
        mx.array(latents.transpose(0, 2, 3, 1)), mx.array(t), mx.array(ctx), mx.array(pooled), skip_layers or ()
    )
    return ref, np.array(ours).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("timesteps", [(1000.0, 500.0), (9.0, 9.0)])
@pytest.mark.parametrize("skip_layers", [None, [1]])
@pytest.mark.parametrize("lanes", [1, 3])  # one: as on a GPU; three: uneven token slices (mlx_flash.lanes)
def test_parity_with_diffusers(tiny_transformer, timesteps, skip_layers, lanes, set_lanes):
    name, model, path = tiny_transformer
    set_lanes(lanes)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 12, 20)).astype(np.float32)  # non-square
    ctx = rng.standard_normal((2, 7, 40)).astype(np.float32)
    pooled = rng.standard_normal((2, 20)).astype(np.float32)
    ref, ours = run_both(model, path, latents, np.array(timesteps, np.float32), ctx, pooled, skip_layers)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"\n{name} t={timesteps} skip={skip_layers}: max|err|/max|ref| = {rel:.2e}")
    assert ref.std() > 0.05  # not a near-constant output
    assert rel <= 1e-4


@pytest.mark.parametrize("sizes", [dict(sample_size=16, pos_embed_max_size=16), dict(sample_size=32, pos_embed_max_size=24)])
def test_new_model_has_sd3s_position_table(sizes):
    """A freshly built transformer starts from diffusers' sin-cos table (what training from scratch needs)."""
    config = {**TINY, **sizes}
    reference = SD3Transformer2DModel(**config).pos_embed.pos_embed.numpy()
    ours = MMDiT(MMDiTConfig.from_diffusers(config)).pos_embed.pos_embed
    np.testing.assert_allclose(np.array(ours), reference, rtol=0, atol=2e-6)


def test_config_inferred_from_weights(tiny_transformer):
    name, model, path = tiny_transformer
    loaded = load_mmdit(path)
    assert loaded.config.to_diffusers() == MMDiTConfig.from_diffusers(model.config).to_diffusers()
    assert loaded.config.dual_attention_layers == tuple(VARIANTS[name].get("dual_attention_layers", ()))


def test_half_precision_and_float32_residual(tiny_transformer):
    _, _, path = tiny_transformer
    rng = np.random.default_rng(1)
    args = (
        mx.array(rng.standard_normal((1, 8, 8, 16)).astype(np.float32)), mx.array([300.0]),
        mx.array(rng.standard_normal((1, 5, 40)).astype(np.float32)), mx.array(rng.standard_normal((1, 20)).astype(np.float32)),
    )
    ref = np.array(load_mmdit(path)(*args))
    for dtype in (mx.float16, mx.bfloat16):
        for residual in (False, True):
            model = load_mmdit(path, dtype=dtype, float32_residual=residual)
            out = model(*args)
            assert out.dtype == dtype
            rel = np.abs(np.array(out.astype(mx.float32)) - ref).max() / np.abs(ref).max()
            print(f"\n{dtype} float32_residual={residual}: rel err {rel:.2e}")
            assert rel < (2e-2 if dtype == mx.float16 else 8e-2)


def test_size_errors(tiny_transformer):
    _, _, path = tiny_transformer
    model = load_mmdit(path)
    ctx, pooled = mx.zeros((1, 3, 40)), mx.zeros((1, 20))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(mx.zeros((1, 9, 8, 16)), mx.array([1.0]), ctx, pooled)
    with pytest.raises(ValueError, match="exceeds the position table"):
        model(mx.zeros((1, 34, 8, 16)), mx.array([1.0]), ctx, pooled)


def test_clear_errors_for_bad_checkpoints(tiny_transformer):
    _, model, _ = tiny_transformer
    state = {k: mx.array(v.numpy()) for k, v in model.state_dict().items()}
    mlx_model = MMDiT(MMDiTConfig.infer(state, head_dim=8))
    broken = remap(state, DIFFUSERS_RULES)
    del broken["proj_out.bias"]
    broken["context_embedder.weight"] = mx.zeros((24, 41))
    broken["extra.weight"] = mx.zeros((1,))
    with pytest.raises(WeightsError) as err:
        check_weights(mlx_model, broken, "transformer")
    message = str(err.value)
    assert "\n" not in message
    assert "1 missing (proj_out.bias)" in message
    assert "1 unexpected (extra.weight)" in message
    assert "context_embedder.weight (24, 41) != (24, 40)" in message
    with pytest.raises(WeightsError, match="cannot infer"):
        MMDiTConfig.infer({k: v for k, v in state.items() if not k.startswith("context_embedder")}, head_dim=8)


@pytest.mark.parametrize("preset", ["sd3-medium", "sd3.5-medium", "sd3.5-large"])
def test_full_size_keys_and_shapes(preset):
    """diffusers' full-size model (meta device, no memory) maps onto ours exactly: nothing missing or left over."""
    config = PRESETS[preset].transformer
    with torch.device("meta"):
        reference = SD3Transformer2DModel(**config.to_diffusers())
    lazy = {k: mx.zeros(tuple(v.shape)) for k, v in reference.state_dict().items()}  # never evaluated
    assert MMDiTConfig.infer(lazy) == config
    check_weights(MMDiT(config), remap(lazy, DIFFUSERS_RULES), "transformer")


def test_precomputed_modulation_is_exact_and_frees_weights(tiny_transformer):
    _, _, path = tiny_transformer
    rng = np.random.default_rng(2)
    latents = mx.array(rng.standard_normal((2, 8, 10, 16)).astype(np.float32))
    t = mx.array([857.0, 857.0])
    ctx, pooled = mx.array(rng.standard_normal((2, 5, 40)).astype(np.float32)), mx.array(rng.standard_normal((2, 20)).astype(np.float32))
    model = load_mmdit(path)
    expected = model(latents, t, ctx, pooled)
    modulation = model.modulation(t, pooled)
    mx.eval(modulation)
    model.drop_modulation_weights()
    assert not any("norm1" in k or "norm_out" in k or "time_text_embed" in k for k, _ in tree_flatten(model.parameters()))
    assert np.array_equal(np.array(model(latents, None, ctx, modulation=modulation)), np.array(expected))
    with pytest.raises(RuntimeError, match="dropped"):
        model(latents, t, ctx, pooled)


@pytest.mark.parametrize("bits", [None, 4])
def test_modulations_of_several_timesteps_in_one_batch(bits):
    """`modulations` (one batch over a run's timesteps, each weight read once) equals `modulation` per timestep,
    float and quantized (on the CPU each quantized layer is dequantized once for all timesteps)."""
    mx.random.seed(3)
    model = MMDiT(MMDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                              pooled_projection_dim=64, dual_attention_layers=(0,)))
    if bits:
        quantize_model(model, Quantization(bits, group_size=32))
        assert isinstance(model.transformer_blocks[0].norm1.linear, nn.QuantizedLinear)
    pooled = mx.random.normal((2, 64))
    timesteps = [1000.0, 750.0, 1000.0, 250.0]
    batched = model.modulations(timesteps, pooled)
    assert list(batched) == [1000.0, 750.0, 250.0]
    for t, modulation in batched.items():
        alone = tree_flatten(model.modulation(mx.full((2,), t), pooled))
        assert [k for k, _ in tree_flatten(modulation)] == [k for k, _ in alone]
        for (_, got), (_, want) in zip(tree_flatten(modulation), alone):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["sd3.5-medium", "sd3.5-large"])
def test_modulation_weights_are_about_a_third_of_the_model(preset):
    """Measured: 31.4% of SD3.5 Medium (34.6% without its 384x384 position table), 33.2% of SD3.5 Large."""
    model = MMDiT(PRESETS[preset].transformer)  # lazy: shapes only
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    model.drop_modulation_weights()
    kept = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"\n{preset}: adaLN weights {100 * (total - kept) / total:.1f}% of {total / 1e9:.2f}B parameters")
    assert (total - kept) / total > 0.3


def test_lanes_cut_tokens_evenly_and_join_them_back():
    x = mx.arange(2 * 7 * 3).reshape(2, 7, 3)
    lanes = Lanes(3)
    parts = lanes.split(x)
    assert [p.shape[1] for p in parts] == [2, 2, 3]
    assert mx.array_equal(lanes.join(parts), x)
    assert lanes.map(lambda p, k: p.shape[1] * k, parts, [1, 10, 100]) == [2, 20, 300]
    assert Lanes().split(x)[0] is x

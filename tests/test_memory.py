"""The memory estimator against peaks measured on MLX (CPU backend), and the pipeline's refusal to start a run
that cannot fit."""

import os

import mlx.core as mx
import pytest

import mlx_flash
from mlx_flash import memory
from mlx_flash.controlnet import ControlNet, ControlNetConfig
from mlx_flash.mmdit import MMDiT, MMDiTConfig
from mlx_flash.presets import PRESETS
from mlx_flash.vae import Autoencoder, VAEConfig


def measured_activations(run, *inputs) -> int:
    mx.eval(inputs)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(run(*inputs))
    return mx.get_peak_memory() - base


@pytest.mark.parametrize("size", [256, 512])
def test_transformer_activations(size, set_lanes):
    set_lanes(1)  # the estimate models one lane; token lanes (mlx_flash.lanes) evaluate block by block, peak lower
    config = MMDiTConfig(num_layers=2, num_attention_heads=4, pos_embed_max_size=64, qk_norm=True,
                         dual_attention_layers=(0,))
    model = MMDiT(config)
    mx.eval(model.parameters())
    h = size // 8
    inputs = (mx.random.normal((1, h, h, 16)), mx.array([500.0]), mx.random.normal((1, 333, 4096)),
              mx.random.normal((1, 2048)))
    measured = measured_activations(model, *inputs)
    predicted = memory.estimate(config, VAEConfig(), dtype=mx.float32, height=size, width=size, device=mx.cpu)[1]
    print(f"\ntransformer {size}px: measured {measured / 1e6:.0f} MB, predicted {predicted.activations / 1e6:.0f} MB")
    assert abs(predicted.activations - measured) <= 0.1 * measured


def test_controlnet_weights_and_residuals(set_lanes):
    """A ControlNet step (the ControlNet, then the transformer with its residuals) against the estimate."""
    set_lanes(1)  # as in test_transformer_activations
    config = MMDiTConfig(num_layers=2, num_attention_heads=4, pos_embed_max_size=64, qk_norm=True)
    control = ControlNetConfig(num_layers=2, num_attention_heads=4, pos_embed_max_size=64, qk_norm=True)
    model, net = MMDiT(config), ControlNet(control)
    mx.eval(model.parameters(), net.parameters())
    inputs = (mx.random.normal((1, 32, 32, 16)), mx.random.normal((1, 32, 32, 16)), mx.array([500.0]),
              mx.random.normal((1, 333, 4096)), mx.random.normal((1, 2048)))

    def step(x, control_latents, t, context, pooled):
        residuals = net(x, control_latents, t, pooled, context)
        mx.eval(residuals)
        return model(x, t, context, pooled, controlnet_residuals=residuals)

    measured = measured_activations(step, *inputs)
    plain, with_net = (memory.estimate(config, VAEConfig(), dtype=mx.float32, height=256, width=256, device=mx.cpu,
                                       controlnets=nets)[1] for nets in ((), (control,)))
    print(f"\ncontrolnet step: measured {measured / 1e6:.0f} MB, predicted {with_net.activations / 1e6:.0f} MB")
    assert with_net.weights - plain.weights == memory.model_bytes(net)
    assert abs(with_net.activations - measured) <= 0.1 * measured


def test_vae_decoder_activations():
    vae = Autoencoder(VAEConfig(tile_above=10**9))
    mx.eval(vae.parameters())
    measured = measured_activations(lambda z: vae.decode(z, tiled=False), mx.random.normal((1, 16, 16, 16)))
    predicted = memory.estimate(PRESETS["sd3.5-medium"].transformer, VAEConfig(), dtype=mx.float32, height=128,
                                width=128, device=mx.cpu)[2]
    print(f"\nVAE decode 128px: measured {measured / 1e6:.0f} MB, predicted {predicted.activations / 1e6:.0f} MB")
    assert abs(predicted.activations - measured) <= 0.1 * measured


def test_banded_vae_decoder_activations():
    """The CPU's memory-bounded float32 decode: 16 bands of rows (small bands at this size), layer by layer."""
    vae = Autoencoder(VAEConfig(band_bytes=2**20))
    mx.eval(vae.parameters())
    assert vae.config.bands(16, 16) == 16
    measured = measured_activations(lambda z: vae.decode(z, tiled=True), mx.random.normal((1, 16, 16, 16)))
    predicted = memory.estimate(PRESETS["sd3.5-medium"].transformer, vae.config, dtype=mx.float32, height=128,
                                width=128, device=mx.cpu, vae_tiled=True)[2]
    untiled = memory.estimate(PRESETS["sd3.5-medium"].transformer, vae.config, dtype=mx.float32, height=128,
                              width=128, device=mx.cpu)[2]
    print(f"\nVAE banded decode 128px: measured {measured / 1e6:.0f} MB, predicted {predicted.activations / 1e6:.0f} MB"
          f" (untiled: {untiled.activations / 1e6:.0f} MB)")
    assert abs(predicted.activations - measured) <= 0.1 * measured and untiled.activations > 2.5 * measured


def test_full_size_weights_are_exact():
    stages = memory.estimate(PRESETS["sd3.5-large"].transformer, VAEConfig(), dtype=mx.float16, height=1024,
                             width=1024)
    assert stages[1].weights == 2 * sum(v.size for v in _leaves(MMDiT(PRESETS["sd3.5-large"].transformer)))
    assert [s.name for s in stages] == ["text encoders", "transformer", "vae decoder"]
    assert 11e9 < stages[0].weights < 12e9  # T5-XXL in float16, its FFN output projections kept in float32
    bf16 = memory.estimate(PRESETS["sd3.5-large"].transformer, VAEConfig(), dtype=mx.bfloat16, height=1024, width=1024)
    assert 9e9 < bf16[0].weights < 10e9


def test_text_encoders_stay_loaded_without_low_memory():
    """All three encoders' weights are held at once unless low-memory mode runs them one at a time."""
    args = dict(dtype=mx.float16, height=1024, width=1024)
    config = PRESETS["sd3.5-large"].transformer
    one_at_a_time, all_loaded = (memory.estimate(config, VAEConfig(), **args, low_memory=m)[0] for m in (True, False))
    encoders = [memory.estimate(config, VAEConfig(), **args, clips=clips, t5=t5)[0]
                for clips, t5 in (((memory.CLIP_L,), None), ((memory.CLIP_G,), None), ((), memory.T5_XXL))]
    assert all_loaded.weights == sum(e.weights for e in encoders)
    assert all_loaded.activations == max(e.activations for e in encoders)
    assert one_at_a_time == max(encoders, key=lambda e: e.peak)


def _leaves(model):
    from mlx.utils import tree_flatten

    return [v for _, v in tree_flatten(model.parameters())]


def test_run_that_cannot_fit_is_refused_before_loading(tiny_pipeline_dir, monkeypatch):
    pipe = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=True)
    args = dict(height=128, width=64)
    stages = pipe.estimate_memory(**args)
    needed = max(s.peak for s in stages)
    monkeypatch.setattr("mlx_flash.memory.memory_budget", lambda: needed - 1)
    with pytest.raises(MemoryError) as err:
        pipe.generate("a cat", **args, num_inference_steps=1, progress=False)
    message = str(err.value)
    print("\n" + message)
    assert "\n" not in message and "GB at its peak" in message and "it would fit with --width 64 --height 64" in message
    assert pipe._transformer is None and not pipe.text_encoders._models  # nothing was loaded
    monkeypatch.setattr("mlx_flash.memory.memory_budget", lambda: needed)
    pipe.generate("a cat", **args, num_inference_steps=1, progress=False)


def test_advice_names_what_would_fit(tiny_pipeline_dir, monkeypatch):
    """With made-up stage sizes: the first setting whose predicted peak fits is named."""
    pipe = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=True)

    def fake(height, width, images=1, cfg=False, max_sequence_length=256, steps=None, quantize=None, use_t5=None,
             vae_tiled=None, low_memory=None):
        t5 = 5 if use_t5 is not False else 1
        transformer = 2 if quantize == 4 else 8
        vae = 1 if vae_tiled else 3
        return [memory.StageEstimate(n, int(g * 1e9), 0) for n, g in (("text", t5), ("transformer", transformer),
                                                                       ("vae decoder", vae))]

    monkeypatch.setattr(pipe, "estimate_memory", fake)
    request = pipe.request("a cat", height=64, width=64, num_inference_steps=4, guidance_scale=1.0)
    for budget, advice in ((6e9, "--quantize 4."), (4e9, "--quantize 4 --no-t5."), (0.5e9, "more memory.")):
        monkeypatch.setattr("mlx_flash.memory.memory_budget", lambda budget=budget: budget)
        with pytest.raises(MemoryError, match=advice):
            pipe.plan_memory(request, steps=4)
    monkeypatch.setattr(pipe, "estimate_memory", lambda *a, vae_tiled=None, **k: [
        memory.StageEstimate("vae decoder", int((1 if vae_tiled else 9) * 1e9), 0)])
    monkeypatch.setattr("mlx_flash.memory.memory_budget", lambda: 2e9)
    plan = pipe.plan_memory(request, steps=4)  # tiling alone makes it fit: no error, and the decode will tile
    assert plan.tile_decode


def test_cpu_only_builds_keep_a_step_of_freed_buffers():
    """Importing mlx_flash on an MLX build without a GPU raises MLX's buffer cache from its 32 MB to
    CPU_BUFFER_CACHE, and the CPU memory budget leaves that room."""
    if not memory.cpu_only():  # honest: Metal's and CUDA's allocators keep their own, larger limit, left unset
        pytest.skip("a GPU build keeps its allocator's own cache limit")
    previous = mx.set_cache_limit(0)
    mx.set_cache_limit(previous)
    assert previous == memory.CPU_BUFFER_CACHE
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory.memory_budget() == ram - memory.CPU_BUFFER_CACHE

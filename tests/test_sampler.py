"""The sampler against diffusers' FlowMatchEulerDiscreteScheduler and the SD3 pipelines' own loops."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    retrieve_timesteps,
)

from mlx_flash.sampler import (
    add_noise,
    euler_step,
    flow_sigmas,
    flow_timesteps,
    guidance,
    img2img_start,
    skip_layer_guidance,
    slg_active,
)

STEPS = [1, 2, 3, 4, 8, 28, 40]
CUSTOM_SIGMAS = [[1.0, 0.75, 0.5, 0.25], [0.9, 0.3], [1.0, 0.1234567, 0.001]]


def scheduler(shift: float = 3.0) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.float().numpy())


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.mark.parametrize("shift", [3.0, 1.0, 2.5, 3.1])
@pytest.mark.parametrize("n", STEPS)
def test_sigmas_and_timesteps_bit_identical(n, shift):
    ref = scheduler(shift)
    timesteps, count = retrieve_timesteps(ref, n, "cpu")
    sigmas = flow_sigmas(n, shift)
    assert sigmas.dtype == np.float32 and sigmas.shape == (n + 1,) and count == n
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(flow_timesteps(sigmas), timesteps.numpy())


@pytest.mark.parametrize("shift", [3.0, 3.1])
@pytest.mark.parametrize("custom", CUSTOM_SIGMAS)
def test_custom_sigmas_bit_identical(custom, shift):
    ref = scheduler(shift)
    timesteps, count = retrieve_timesteps(ref, None, "cpu", sigmas=custom)
    sigmas = flow_sigmas(len(custom), shift, custom)
    assert count == len(custom)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(flow_timesteps(sigmas), timesteps.numpy())


def test_reference_four_step_values():
    np.testing.assert_allclose(flow_sigmas(4), [1.0, 0.857692, 0.602151, 0.008929, 0.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("strength", [0.3, 0.56, 0.6, 1.0, 0.05, 0.95])
@pytest.mark.parametrize("n", [1, 3, 4, 10, 25, 28, 40])
def test_img2img_schedule_matches_get_timesteps(n, strength):
    ref = scheduler()
    retrieve_timesteps(ref, n, "cpu")
    owner = SimpleNamespace(scheduler=ref)
    timesteps, count = StableDiffusion3Img2ImgPipeline.get_timesteps(owner, n, strength, "cpu")
    start = img2img_start(n, strength)
    sigmas = flow_sigmas(n)
    assert start == ref.begin_index and n - start == count
    np.testing.assert_array_equal(flow_timesteps(sigmas)[start:], timesteps.numpy())
    np.testing.assert_array_equal(sigmas[start:], ref.sigmas[ref.begin_index :].numpy())


def test_img2img_start_float_semantics():
    # 25 * 0.56 == 14.000000000000002 in binary floating point, so diffusers runs 15 steps, not 14.
    assert img2img_start(25, 0.56) == 10


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5])
def test_img2img_start_rejects_bad_strength(strength):
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        img2img_start(10, strength)


def test_img2img_start_rejects_zero_steps():
    with pytest.raises(ValueError, match="leaves no denoising step; raise strength"):
        img2img_start(4, 1e-17)


def test_flow_sigmas_rejects_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match="one sigma per step"):
        flow_sigmas(3, sigmas=[1.0, 0.5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_euler_loop_matches_scheduler_step(dtype):
    ref = scheduler()
    timesteps, _ = retrieve_timesteps(ref, 8, "cpu")
    sigmas = flow_sigmas(8)
    gen = torch.Generator().manual_seed(0)
    x_ref = torch.randn(2, 16, 8, 8, generator=gen).to(dtype)
    mx_dtype = getattr(mx, str(dtype).split(".")[1])
    x = to_mx(x_ref).astype(mx_dtype)
    for i, t in enumerate(timesteps):
        v = (3 * torch.randn(2, 16, 8, 8, generator=gen)).to(dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x = euler_step(x, to_mx(v).astype(x.dtype), float(sigmas[i]), float(sigmas[i + 1]))
        assert x.dtype == mx_dtype
        np.testing.assert_array_equal(to_np(x), x_ref.float().numpy())


def test_add_noise_matches_scale_noise():
    ref = scheduler()
    retrieve_timesteps(ref, 10, "cpu")
    start = img2img_start(10, 0.6)
    ref.set_begin_index(start)
    gen = torch.Generator().manual_seed(1)
    init, noise = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    expected = ref.scale_noise(init, ref.timesteps[start : start + 1].repeat(2), noise)
    got = add_noise(to_mx(init), to_mx(noise), float(flow_sigmas(10)[start]))
    np.testing.assert_array_equal(to_np(got), expected.numpy())


@pytest.fixture(scope="module")
def transformer():
    """A tiny SD3 transformer whose calls (skip_layers, timestep, input, output) are recorded in `.calls`."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8,
        pos_embed_max_size=8,
    ).eval()
    forward = model.forward

    def recording_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        record = (kwargs.get("skip_layers"), kwargs["timestep"][0].item(), kwargs["hidden_states"], out[0])
        model.calls.append(record)
        return out

    model.forward = recording_forward
    return model


def conditioning() -> dict:
    gen = torch.Generator().manual_seed(2)
    embeds = [torch.randn(1, 5, 16, generator=gen) for _ in range(2)]
    pooled = [torch.randn(1, 8, generator=gen) for _ in range(2)]
    return dict(
        prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
        pooled_prompt_embeds=pooled[0], negative_pooled_prompt_embeds=pooled[1],
    )


def build(cls, transformer, **components):
    encoders = {name: None for name in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    tokenizers = {name: None for name in ("tokenizer", "tokenizer_2", "tokenizer_3")}
    pipe = cls(transformer=transformer, scheduler=scheduler(), **encoders, **tokenizers, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def replay(calls, x: mx.array, sigmas: np.ndarray, scale: float, slg_scale: float) -> mx.array:
    """Run our sampler on the recorded model outputs, checking each step's input against the pipeline's."""
    i = 0
    for j, (skip_layers, _, hidden, out) in enumerate(calls):
        if skip_layers is not None:
            continue
        np.testing.assert_array_equal(to_np(x), hidden[:1].numpy())
        uncond, cond = to_mx(out[:1]), to_mx(out[1:])
        v = guidance(cond, uncond, scale)
        if j + 1 < len(calls) and calls[j + 1][0] is not None:
            v = skip_layer_guidance(v, cond, to_mx(calls[j + 1][3]), slg_scale)
        x = euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        i += 1
    assert i == len(sigmas) - 1
    return x


@pytest.mark.parametrize(
    "n, start, stop", [(40, 0.01, 0.2), (10, 0.1, 0.3), (4, 0.01, 0.2), (12, 0.0, 0.5), (5, 0.2, 1.0)]
)
def test_txt2img_loop_and_slg_window_match_pipeline(transformer, n, start, stop):
    transformer.calls = []
    pipe = build(StableDiffusion3Pipeline, transformer, vae=None)
    out = pipe(
        **conditioning(), height=32, width=32, num_inference_steps=n, guidance_scale=4.0,
        skip_guidance_layers=[1], skip_layer_guidance_scale=2.5, skip_layer_guidance_start=start,
        skip_layer_guidance_stop=stop, output_type="latent", generator=torch.Generator().manual_seed(0),
    ).images
    calls = transformer.calls
    main = [j for j, c in enumerate(calls) if c[0] is None]
    ref_window = [main.index(j - 1) for j, c in enumerate(calls) if c[0] is not None]
    assert ref_window == [i for i in range(n) if slg_active(i, n, start, stop)]
    sigmas = flow_sigmas(n)
    assert [calls[j][1] for j in main] == flow_timesteps(sigmas).tolist()
    x = replay(calls, to_mx(calls[0][2][:1]), sigmas, 4.0, 2.5)
    np.testing.assert_array_equal(to_np(x), out.numpy())


@pytest.mark.parametrize("n, strength", [(10, 0.3), (4, 0.6), (8, 1.0)])
def test_img2img_loop_matches_pipeline(transformer, n, strength):
    transformer.calls = []
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=2,
    )
    pipe = build(StableDiffusion3Img2ImgPipeline, transformer, vae=vae)
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    out = pipe(
        **conditioning(), image=init, strength=strength, height=32, width=32, num_inference_steps=n,
        guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(4),
    ).images
    start = img2img_start(n, strength)
    sigmas = flow_sigmas(n)[start:]
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    x = add_noise(to_mx(init), to_mx(noise), float(sigmas[0]))
    assert [c[1] for c in transformer.calls] == flow_timesteps(sigmas).tolist()
    x = replay(transformer.calls, x, sigmas, 3.0, 0.0)
    np.testing.assert_array_equal(to_np(x), out.numpy())

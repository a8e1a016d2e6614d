"""End-to-end parity of `load_pipeline(...).generate` with diffusers' SD3 pipelines on a tiny random model."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3 import (
    pipeline_stable_diffusion_3_img2img as img2img_module,
)
from PIL import Image

import mlx_flash
from mlx_flash import SkipLayerGuidance

HEIGHT, WIDTH = 64, 96  # non-square; latents 8 x 12
TOLERANCE = 1e-3  # max abs error on [0, 1] images


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline_dir):
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False)
    return reference, ours


def noise(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((batch, 16, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(seed))


def compare(reference_images: np.ndarray, ours: np.ndarray, label: str) -> None:
    err = np.abs(reference_images - ours).max()
    print(f"\n{label}: max abs error on [0, 1] images {err:.2e} (image std {reference_images.std():.3f})")
    assert ours.shape == reference_images.shape
    assert reference_images.std() > 0.02  # a real image, not a constant
    assert err <= TOLERANCE


CASES = {
    "4 steps, no CFG": dict(prompt="a red fox in the snow", num_inference_steps=4, guidance_scale=1.0),
    "CFG 5 with negative prompt": dict(
        prompt="a lighthouse at dusk", negative_prompt="blurry, low quality", num_inference_steps=3, guidance_scale=5.0
    ),
    "batch of 2 prompts": dict(prompt=["a cat", "a bowl of ramen, studio light"], num_inference_steps=2, guidance_scale=3.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_parity(pipelines, case):
    reference, ours = pipelines
    kwargs = CASES[case]
    batch = 1 if isinstance(kwargs["prompt"], str) else len(kwargs["prompt"])
    latents = noise(batch)
    expected = reference(**kwargs, height=HEIGHT, width=WIDTH, latents=latents, output_type="np").images
    got = ours.generate(**kwargs, height=HEIGHT, width=WIDTH, latents=latents.numpy(), output_type="np",
                        skip_layer_guidance=False, progress=False)
    compare(expected, got, case)


def test_skip_layer_guidance_parity(pipelines):
    reference, ours = pipelines
    slg = SkipLayerGuidance(layers=(1,), scale=2.8, start=0.0, stop=0.6)  # active at steps 1 and 2 of 4
    latents = noise(1, seed=3)
    kwargs = dict(prompt="an astronaut riding a horse", num_inference_steps=4, guidance_scale=4.0)
    expected = reference(**kwargs, height=HEIGHT, width=WIDTH, latents=latents, output_type="np",
                         skip_guidance_layers=list(slg.layers), skip_layer_guidance_scale=slg.scale,
                         skip_layer_guidance_start=slg.start, skip_layer_guidance_stop=slg.stop).images
    got = ours.generate(**kwargs, height=HEIGHT, width=WIDTH, latents=latents.numpy(), output_type="np",
                        skip_layer_guidance=slg, progress=False)
    without = ours.generate(**kwargs, height=HEIGHT, width=WIDTH, latents=latents.numpy(), output_type="np",
                            skip_layer_guidance=False, progress=False)
    compare(expected, got, "skip-layer guidance")
    assert np.abs(got - without).max() > 10 * TOLERANCE  # the guidance really changed the image


def test_without_t5_parity(tiny_pipeline_dir):
    reference = StableDiffusion3Pipeline.from_pretrained(
        tiny_pipeline_dir, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    reference.set_progress_bar_config(disable=True)
    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", use_t5=False, low_memory=True)
    kwargs = dict(prompt="a watercolor of a tree", num_inference_steps=2, guidance_scale=2.0)
    latents = noise(1, seed=5)
    expected = reference(**kwargs, height=HEIGHT, width=WIDTH, latents=latents, output_type="np").images
    got = ours.generate(**kwargs, height=HEIGHT, width=WIDTH, latents=latents.numpy(), output_type="np", progress=False)
    compare(expected, got, "without T5 (low memory)")
    assert "text_encoder_3" not in ours.text_encoders._models
    assert [s.name for s in ours.stages] == ["text encoders", "transformer", "vae decoder"]


def test_img2img_parity(pipelines, tiny_pipeline_dir, tmp_path, monkeypatch):
    _, ours = pipelines
    reference = StableDiffusion3Img2ImgPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    # mlx-flash encodes the init image to the posterior mean (deterministic given the noise); align diffusers,
    # which otherwise draws a posterior sample from its generator before drawing the noise.
    original = img2img_module.retrieve_latents
    monkeypatch.setattr(img2img_module, "retrieve_latents",
                        lambda output, generator=None: original(output, generator, sample_mode="argmax"))
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, WIDTH)[None, :, None] * np.ones((HEIGHT, 1, 3))
    init = Image.fromarray(np.clip(gradient + rng.normal(0, 20, gradient.shape), 0, 255).astype(np.uint8))
    init.save(tmp_path / "init.png")
    kwargs = dict(prompt="a sunset over the sea", num_inference_steps=5, guidance_scale=1.0, strength=0.6)
    expected = reference(**kwargs, image=init, height=HEIGHT, width=WIDTH, output_type="np",
                         generator=torch.Generator().manual_seed(7)).images
    got = ours.generate(**kwargs, image=tmp_path / "init.png", height=HEIGHT, width=WIDTH, output_type="np",
                        latents=noise(1, seed=7).numpy(), progress=False)
    compare(expected, got, "img2img strength 0.6")
    full = ours.generate(**kwargs | {"strength": 1.0}, image=init, height=HEIGHT, width=WIDTH, output_type="np",
                         latents=noise(1, seed=7).numpy(), progress=False)
    init_pixels = np.asarray(init, np.float32)[None] / 255
    assert np.abs(got - init_pixels).mean() > 0.02  # not the input returned
    assert np.abs(got - full).max() > 0.02  # strength changes the result: steps were not silently dropped


def test_seeds(pipelines):
    _, ours = pipelines
    kwargs = dict(height=HEIGHT, width=WIDTH, num_inference_steps=2, guidance_scale=1.0, output_type="np", progress=False)
    first = ours.generate("a bridge", seed=11, **kwargs)
    again = ours.generate("a bridge", seed=11, **kwargs)
    other = ours.generate("a bridge", seed=12, **kwargs)
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0.05
    batch = ours.generate("a bridge", seed=[12, 11], num_images=2, **kwargs)
    assert np.array_equal(batch[0], other[0]) and np.array_equal(batch[1], first[0])
    two = ours.generate("a bridge", seed=11, num_images=2, **kwargs)  # int seed: image i uses seed + i
    assert np.array_equal(two[1], other[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=72), "not a multiple of 16"),
    (dict(width=272), "exceeds this model's position table"),
    (dict(num_inference_steps=0), "num_inference_steps must be"),
    (dict(strength=0.5), "strength only applies to img2img"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
])
def test_bad_arguments(pipelines, kwargs, message):
    _, ours = pipelines
    with pytest.raises(ValueError, match=message):
        ours.generate("x", **{"height": HEIGHT, "width": WIDTH, **kwargs})


def test_model_folder_defaults_override_the_preset(tiny_pipeline_dir, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "model")
    defaults = {"num_inference_steps": 3, "guidance_scale": 1.0, "max_sequence_length": 16,
                "skip_layer_guidance": {"layers": [1], "scale": 2.0, "start": 0.0, "stop": 0.5}}
    (folder / "mlx_flash.json").write_text(json.dumps({"defaults": defaults}))
    pipe = mlx_flash.load_pipeline(folder, dtype="float32", low_memory=False)
    assert pipe.defaults() == (3, 1.0, SkipLayerGuidance(layers=[1], scale=2.0, start=0.0, stop=0.5))
    encode = pipe.text_encoders.encode
    calls = []
    pipe.text_encoders.encode = lambda *args, **kwargs: calls.append(kwargs) or encode(*args, **kwargs)
    pipe.generate("x", height=HEIGHT, width=WIDTH, progress=False)
    assert calls[0]["max_sequence_length"] == 16 and calls[0]["do_cfg"] is False

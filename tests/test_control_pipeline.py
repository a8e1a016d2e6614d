"""End-to-end parity of ControlNet, inpainting and outpainting runs with diffusers' StableDiffusion3ControlNet-,
StableDiffusion3Inpaint- and StableDiffusion3ControlNetInpaintingPipeline on tiny random models.

diffusers encodes images with a random draw from the VAE posterior, mlx-flash with its mean: the reference is
run with the draw replaced by the mean (its only difference). diffusers' inpaint pipeline decodes without the
VAE's shift factor (its text-to-image and ControlNet pipelines add it; so does mlx-flash): its parity runs on a
copy of the model whose VAE has shift factor 0, where both agree."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    SD3ControlNetModel,
    SD3MultiControlNetModel,
    StableDiffusion3ControlNetInpaintingPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from PIL import Image, ImageDraw
from tiny import make_tiny_controlnet

import mlx_flash
from mlx_flash.inpaint import blur_mask, outpaint
from mlx_flash.memory import model_bytes
from mlx_flash.quantization import is_quantized

HEIGHT, WIDTH = 48, 64  # latents 6 x 8
TOLERANCE = 1e-3  # max abs error on [0, 1] images
ARGS = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=3.0)


@pytest.fixture(autouse=True)
def posterior_mean(monkeypatch):
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnets")
    return {name: make_tiny_controlnet(root / name, kind, seed=seed)
            for name, kind, seed in [("instantx", "instantx", 10), ("instantx-2", "instantx", 11),
                                     ("sd3.5-large", "sd3.5-large", 12), ("inpainting", "inpainting", 13)]}


@pytest.fixture(scope="module")
def unshifted_dir(tiny_pipeline_dir, tmp_path_factory):
    """The tiny model with a VAE shift factor of 0 (see the module docstring)."""
    folder = tmp_path_factory.mktemp("unshifted") / "model"
    shutil.copytree(tiny_pipeline_dir, folder)
    config = folder / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "shift_factor": 0.0}))
    return folder


@pytest.fixture(scope="module")
def components(tiny_pipeline_dir):
    """The reference model's components, loaded once for every reference pipeline."""
    return StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir).components


@pytest.fixture(scope="module")
def inpaint_pipelines(unshifted_dir):
    reference = quiet(StableDiffusion3InpaintPipeline.from_pretrained(unshifted_dir))
    return reference, mlx_flash.load_pipeline(unshifted_dir, dtype="float32")


def picture(seed: int, size=(WIDTH, HEIGHT)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def lower_half(size=(WIDTH, HEIGHT)) -> Image.Image:
    mask = Image.new("L", size)
    ImageDraw.Draw(mask).rectangle((0, size[1] // 2, size[0], size[1]), fill=255)
    return mask


def noise(seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    return torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))


def compare(expected: np.ndarray, got: np.ndarray, label: str) -> None:
    err = np.abs(expected - got).max()
    print(f"\n{label}: max abs error on [0, 1] images {err:.2e} (image std {expected.std():.3f})")
    assert got.shape == expected.shape
    assert expected.std() > 0.02
    assert err <= TOLERANCE


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name", ["instantx", "sd3.5-large"])
def test_one_controlnet(tiny_pipeline_dir, components, controlnets, name):
    net = SD3ControlNetModel.from_pretrained(controlnets[name])
    reference = quiet(StableDiffusion3ControlNetPipeline(**components, controlnet=net))
    control, latents = picture(1), noise(1)
    expected = reference(**ARGS, control_image=control, controlnet_conditioning_scale=0.7, height=HEIGHT,
                         width=WIDTH, latents=latents, output_type="np").images
    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", controlnets=[(controlnets[name], 0.7)],
                                   low_memory=True)
    got = ours.generate(**ARGS, control_image=control, height=HEIGHT, width=WIDTH, latents=latents.numpy(),
                        output_type="np", progress=False)
    assert ours._controlnets is None and ours._transformer is None  # low-memory mode freed them after the run
    plain = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32").generate(
        **ARGS, height=HEIGHT, width=WIDTH, latents=latents.numpy(), output_type="np", progress=False)
    compare(expected, got, f"ControlNet {name}")
    assert np.abs(got - plain).max() > 10 * TOLERANCE  # the ControlNet changed the image


def test_two_controlnets_with_guidance_window(tiny_pipeline_dir, components, controlnets):
    nets = [SD3ControlNetModel.from_pretrained(controlnets[n]) for n in ("instantx", "instantx-2")]
    reference = quiet(StableDiffusion3ControlNetPipeline(**components, controlnet=SD3MultiControlNetModel(nets)))
    images, latents = [picture(2), picture(3)], noise(2)
    window = dict(control_guidance_start=[0.0, 0.34], control_guidance_end=[0.67, 1.0])
    expected = reference(**ARGS, control_image=images, controlnet_conditioning_scale=[0.7, 0.4], **window,
                         height=HEIGHT, width=WIDTH, latents=latents, output_type="np").images
    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32",
                                   controlnets=[(controlnets["instantx"], 0.7), (controlnets["instantx-2"], 0.4)])
    got = ours.generate(**ARGS, control_image=images, control_start=[0.0, 0.34], control_end=[0.67, 1.0],
                        height=HEIGHT, width=WIDTH, latents=latents.numpy(), output_type="np", progress=False)
    compare(expected, got, "two ControlNets, scales 0.7 and 0.4, guidance windows")


def test_inpaint(inpaint_pipelines):
    reference, ours = inpaint_pipelines
    image, mask = picture(4), blur_mask(lower_half(), 4)
    expected = reference(**ARGS, image=image, mask_image=mask, strength=0.8, height=HEIGHT, width=WIDTH,
                         generator=torch.Generator().manual_seed(5), output_type="np").images
    got = ours.generate(**ARGS, image=image, mask=mask, strength=0.8, height=HEIGHT, width=WIDTH,
                        latents=noise(5).numpy(), output_type="np", progress=False)
    compare(expected, got, "inpaint, strength 0.8, blurred mask")


def test_inpaint_with_padding_mask_crop(inpaint_pipelines):
    reference, ours = inpaint_pipelines
    image = picture(6, (96, 80))
    mask = Image.new("L", image.size)
    ImageDraw.Draw(mask).ellipse((50, 30, 70, 52), fill=255)
    expected = reference(**ARGS, image=image, mask_image=mask, strength=1.0, height=HEIGHT, width=WIDTH,
                         padding_mask_crop=6, generator=torch.Generator().manual_seed(7)).images[0]
    got = ours.generate(**ARGS, image=image, mask=mask, strength=1.0, height=HEIGHT, width=WIDTH, padding_mask_crop=6,
                        latents=noise(7).numpy(), progress=False)[0]
    assert got.size == image.size
    compare(np.asarray(expected) / 255.0, np.asarray(got) / 255.0, "inpaint with padding_mask_crop (8-bit output)")


def test_outpaint_is_inpaint_of_the_padded_image(inpaint_pipelines):
    reference, ours = inpaint_pipelines
    image = picture(8, (32, 32))
    padded = outpaint(image, 16, 0, 16, 16)
    expected = reference(**ARGS, image=padded.image, mask_image=padded.mask, strength=1.0, height=HEIGHT,
                         width=WIDTH, generator=torch.Generator().manual_seed(9), output_type="np").images
    got = ours.generate(**ARGS, image=image, outpaint=(16, 0, 16, 16), strength=1.0, latents=noise(9).numpy(),
                        output_type="np", progress=False)
    compare(expected, got, "outpaint 16,0,16,16")


def test_controlnet_inpainting(tiny_pipeline_dir, components, controlnets):
    net = SD3ControlNetModel.from_pretrained(controlnets["inpainting"])
    reference = quiet(StableDiffusion3ControlNetInpaintingPipeline(**components, controlnet=net))
    image, mask, latents = picture(10), lower_half(), noise(11)
    expected = reference(**ARGS, control_image=image, control_mask=mask, controlnet_conditioning_scale=0.9,
                         height=HEIGHT, width=WIDTH, latents=latents, output_type="np").images
    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", controlnets=[(controlnets["inpainting"], 0.9)])
    got = ours.generate(**ARGS, control_image=image, mask=mask, height=HEIGHT, width=WIDTH, latents=latents.numpy(),
                        output_type="np", progress=False)
    compare(expected, got, "ControlNet inpainting")


def test_controlnets_quantized_with_the_transformer(tiny_pipeline_dir, controlnets):
    pipe = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", quantize=8,
                                   controlnets=[controlnets["sd3.5-large"]])
    assert is_quantized(pipe.controlnets[0]) and is_quantized(pipe.transformer)
    plain = pipe.estimate_memory(HEIGHT, WIDTH)
    with_net = pipe.estimate_memory(HEIGHT, WIDTH, controlnets=True)
    assert with_net[1].weights - plain[1].weights == model_bytes(pipe.controlnets[0])

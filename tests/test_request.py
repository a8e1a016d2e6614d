"""Requests are resolved and checked in one place: each bad value is refused in one line naming the argument
and what is allowed; settings that would be ignored say so; non-finite results never become images."""

import logging
import os
import shutil
import subprocess

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import mlx_flash
from mlx_flash import NonFiniteError
from mlx_flash.request import image_seeds

SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False)


BAD = [
    (dict(width=0), "width must be a positive multiple of 16 pixels, got 0"),
    (dict(height=-32), "height must be a positive multiple of 16 pixels, got -32"),
    (dict(width=40), "not a multiple of 16; use e.g. 48x32"),
    (dict(seed=-1), "seed must be an integer from 0 to 2**64 - 1, got -1"),
    (dict(seed=2**64), "seed must be an integer from 0 to 2**64 - 1"),
    (dict(seed=2**64 - 1, num_images=2), "the first seed must be < 2**64 - 1"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (dict(num_inference_steps=1001), "num_inference_steps must be an integer from 1 to 1000"),
    (dict(num_inference_steps=10**9), "num_inference_steps must be an integer from 1 to 1000"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer"),
    (dict(num_images=0), "num_images must be an integer from 1"),
    (dict(strength=0.5), "strength only applies to img2img"),
    (dict(output_type="jpeg"), "output_type must be one of pil, np, mlx, latent"),
    (dict(shift=float("nan")), "shift must be a number"),
    (dict(max_sequence_length=0), "max_sequence_length must be an integer from 1 to 512"),
]


@pytest.mark.parametrize("settings, message", BAD)
def test_bad_values_are_refused_in_one_line(pipe, settings, message):
    with pytest.raises(ValueError) as err:
        pipe.request("a cat", **{**SIZE, **settings})
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("prompt", [[], "", None, [1, 2]])
def test_prompt_must_be_text(pipe, prompt):
    if prompt == "":  # an empty string is a valid (unconditional) prompt
        assert pipe.request(prompt, **SIZE).prompts == ("",)
        return
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list of strings"):
        pipe.request(prompt, **SIZE)


def test_input_image_smaller_than_a_patch(pipe):
    with pytest.raises(ValueError, match="img2img needs at least 16x16"):
        pipe.request("a cat", image=Image.new("RGB", (40, 10)))


def test_seeds():
    assert image_seeds(2**64 - 2, 2) == (2**64 - 2, 2**64 - 1)
    assert image_seeds([5, 0], 2) == (5, 0)
    assert len(set(image_seeds(None, 3))) == 3


def test_ignored_negative_prompt_says_so(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="mlx_flash"):
        pipe.request("a cat", negative_prompt="blurry", guidance_scale=1.0, **SIZE)
    assert any("negative prompt is ignored" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlx_flash"):
        pipe.request("a cat", negative_prompt="blurry", guidance_scale=3.0, **SIZE)
    assert not caplog.records


def test_nan_latents_stop_the_run_naming_the_stage(pipe):
    latents = np.full((1, 16, 4, 4), np.nan, dtype=np.float32)
    with pytest.raises(NonFiniteError, match=r"the transformer \(step 1 of 2\) produced NaN"):
        pipe.generate("a cat", latents=latents, num_inference_steps=2, guidance_scale=1.0, progress=False, **SIZE)


def test_nan_weights_write_no_file(tiny_pipeline_dir, tmp_path):
    model = shutil.copytree(tiny_pipeline_dir, tmp_path / "broken")
    weights = next((model / "transformer").glob("*.safetensors"))
    tensors = mx.load(str(weights))
    key = next(k for k in tensors if k.endswith("proj_out.weight"))
    tensors[key] = mx.full(tensors[key].shape, float("nan"))
    mx.save_safetensors(str(weights), tensors, metadata={"format": "pt"})
    out = tmp_path / "out.png"
    result = subprocess.run(["mlx-flash", "generate", "a cat", "--model", str(model), "--steps", "1", "--width", "32",
                             "--height", "32", "--output", str(out)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("denoising")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr  # besides the progress bar
    assert "the transformer (step 1 of 1) produced NaN or infinite values" in lines[0]
    assert not out.exists()

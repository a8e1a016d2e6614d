"""Prompt encoding: equal to diffusers' StableDiffusion3Pipeline.encode_prompt on the tiny pipeline."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from mlx_flash import text_encoders
from mlx_flash.text_encoders import TextEncoders

PROMPTS = ["a photo of a cat!! sitting on a red mat", "Café naïve, 123 dragon flying over the ocean"]
CASES = {
    "one prompt, default negative": dict(prompt=PROMPTS[0]),
    "two prompts, negatives, clip_skip 1, 2 per prompt": dict(
        prompt=PROMPTS, negative_prompt=["ugly, blurry", "bad!"], clip_skip=1, num_images_per_prompt=2),
    "no guidance, 40 T5 tokens (truncating)": dict(prompt=PROMPTS, do_cfg=False, max_sequence_length=40),
}


@pytest.fixture(scope="module")
def pipes(tiny_pipeline_dir):
    """diffusers pipelines with and without T5."""
    full = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir)
    no_t5 = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, text_encoder_3=None, tokenizer_3=None)
    return {True: full, False: no_t5}


def reference(pipe, prompt, negative_prompt=None, do_cfg=True, num_images_per_prompt=1, max_sequence_length=256,
              clip_skip=None):
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt, None, None, do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length, clip_skip=clip_skip)
    return embeds, pooled, negative, negative_pooled


@pytest.mark.parametrize("use_t5", [True, False], ids=["t5", "no_t5"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_diffusers(tiny_pipeline_dir, pipes, use_t5, case):
    kwargs = CASES[case]
    expected = reference(pipes[use_t5], **kwargs)
    encoders = TextEncoders(tiny_pipeline_dir, use_t5=use_t5, joint_attention_dim=96)
    got = encoders.encode(**kwargs)
    errors = []
    for name, ours, ref in zip(("embeds", "pooled", "negative", "negative_pooled"), got, expected):
        assert (ours is None) == (ref is None), name
        if ref is not None:
            assert ours.shape == tuple(ref.shape), name
            ref = ref.numpy()
            errors.append(float(np.abs(np.array(ours) - ref).max() / np.abs(ref).max()))
    print(f"\n{case}, T5 {use_t5}: rel. errors {', '.join(f'{e:.1e}' for e in errors)}")
    assert max(errors) <= 1e-4


def test_low_memory_and_t5_free(tiny_pipeline_dir, monkeypatch):
    """low_memory frees each encoder after use, with equal results; without T5, T5 is never loaded."""
    kwargs = dict(prompt=PROMPTS, negative_prompt="blurry", max_sequence_length=16)
    cached = TextEncoders(tiny_pipeline_dir, joint_attention_dim=96)
    expected = cached.encode(**kwargs)
    assert set(cached._models) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    cached.release()
    assert not cached._models
    low = TextEncoders(tiny_pipeline_dir, low_memory=True, joint_attention_dim=96)
    for ours, ref in zip(low.encode(**kwargs), expected):
        assert mx.array_equal(ours, ref).item()
    assert not low._models

    def refuse(*args):
        raise AssertionError("T5 loaded")

    monkeypatch.setitem(text_encoders.LOADERS, "text_encoder_3", refuse)
    embeds, *_ = TextEncoders(tiny_pipeline_dir, use_t5=False, joint_attention_dim=96).encode(**kwargs)
    assert embeds.shape == (2, 77 + 16, 96) and not mx.any(embeds[:, 77:]).item()


def test_clear_errors(tiny_pipeline_dir):
    encoders = TextEncoders(tiny_pipeline_dir, joint_attention_dim=96)
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        encoders.encode("a cat", negative_prompt=["x", "y"])
    with pytest.raises(ValueError, match="max_sequence_length must be 1 to 512"):
        encoders.encode("a cat", max_sequence_length=600)
    with pytest.raises(TypeError, match="prompt must be a string or a non-empty list"):
        encoders.encode([])
    with pytest.raises(ValueError, match="joint_attention_dim 4096"):
        TextEncoders(tiny_pipeline_dir).encode("a cat", do_cfg=False)


def test_tiny_pipeline_runs_in_diffusers(pipes):
    """The shared fixture is a working pipeline: one denoising step and a decode give a finite, varied image."""
    with torch.no_grad():
        image = pipes[True](PROMPTS[0], num_inference_steps=1, height=32, width=32, output_type="np",
                            max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images
    print(f"\ntiny pipeline image {image.shape}, std {image.std():.3f}")
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0.01

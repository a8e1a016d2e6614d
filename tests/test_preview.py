"""The linear latent-to-RGB preview: the map itself, its least-squares fit, the factors a model gets, and the
shipped digit models' fitted map and tiny autoencoder against their VAE."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.loading import on_base
from mlx_flash.preview import (
    MANIFEST_KEY,
    SD3_LATENT_RGB,
    LatentRGB,
    fit_latent_rgb,
    latent_preview,
    model_latent_rgb,
)
from mlx_flash.taesd import MODEL_FOLDER, load_tiny_autoencoder
from mlx_flash.vae import Autoencoder, VAEConfig, load_vae

MODELS = Path(__file__).resolve().parents[1] / "mlx_flash" / "models"
DIGITS = ("digits", "digits-flash")


def test_preview_is_the_affine_map_to_0_1():
    latents = mx.random.normal((2, 3, 4, 16), key=mx.random.key(0))
    preview = latent_preview(latents, SD3_LATENT_RGB, upscale=2)
    assert preview.shape == (2, 6, 8, 3) and preview.dtype == mx.float32
    x = np.array(latents)[1, 2, 3]
    expected = np.clip((x @ np.array(SD3_LATENT_RGB.weight) + np.array(SD3_LATENT_RGB.bias) + 1) / 2, 0, 1)
    np.testing.assert_allclose(np.array(preview)[1, 4:6, 6:8], np.broadcast_to(expected, (2, 2, 3)), rtol=1e-5)
    zero = latent_preview(mx.zeros((1, 1, 1, 16)), SD3_LATENT_RGB)
    np.testing.assert_allclose(np.array(zero)[0, 0, 0], (np.array(SD3_LATENT_RGB.bias) + 1) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="16 latent channels"):
        latent_preview(mx.zeros((1, 4, 4, 4)), SD3_LATENT_RGB)


def test_fit_recovers_a_linear_decoder(monkeypatch):
    """A 'VAE' whose decode is an affine map of the latent, constant over each 8 x 8 block: the fit finds it."""
    rng = np.random.default_rng(0)
    truth = LatentRGB(tuple(map(tuple, rng.normal(0, 0.05, (16, 3)).round(5))), tuple(rng.normal(0, 0.05, 3).round(5)))
    vae = Autoencoder(VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=8))

    def linear_decode(latents, tiled=None):
        return latent_preview(latents, truth, upscale=8) * 2 - 1

    monkeypatch.setattr(vae, "latents_to_image", linear_decode)
    latents = mx.array(rng.normal(0, 1, (4, 6, 5, 16)).astype(np.float32))
    fitted = fit_latent_rgb(vae, latents)
    np.testing.assert_allclose(fitted.weight, truth.weight, atol=2e-5)
    np.testing.assert_allclose(fitted.bias, truth.bias, atol=2e-5)
    assert LatentRGB.from_dict(fitted.to_dict()) == fitted


def test_model_factors():
    assert model_latent_rgb({}, VAEConfig()) == SD3_LATENT_RGB  # SD3 / SD3.5's VAE
    assert model_latent_rgb({}, VAEConfig(scaling_factor=0.9)) is None  # another VAE, nothing fitted
    own = LatentRGB(((0.1, 0.2, 0.3),) * 16, (0.0, 0.0, 0.0))
    assert model_latent_rgb({MANIFEST_KEY: own.to_dict()}, VAEConfig()) == own
    with pytest.raises(ValueError, match="fit_latent_rgb"):
        model_latent_rgb({MANIFEST_KEY: {"weight": [[0.1, 0.2, 0.3]] * 16}}, VAEConfig())
    with pytest.raises(ValueError, match="one \\[r, g, b\\] row"):
        LatentRGB.from_dict({"weight": [[0.1, 0.2]] * 16, "bias": [0, 0, 0]})


@pytest.fixture(scope="module")
def digit_latents() -> tuple[Autoencoder, mx.array]:
    """The digit models' VAE and diffusion-space latents of real digits (held out from its training)."""
    from training.digits_data import splits, to_images

    vae = load_vae(MODELS / "digits" / "vae", mx.float32)
    _, (held_out, _) = splits()
    mean, _ = vae.encode(mx.array(to_images(held_out[:40])), tiled=False)
    return vae, vae.config.to_diffusion(mean)


@pytest.mark.parametrize("model", DIGITS)
def test_digit_models_previews_close_to_their_vae(model, digit_latents):
    """Each shipped digit model's manifest map and tiny autoencoder (its base's, for a model on a base) come close to
    its VAE's decodes."""
    vae, latents = digit_latents
    root, _, manifest = on_base(MODELS / model)
    factors = model_latent_rgb(manifest, vae.config)
    assert factors is not None and MANIFEST_KEY in manifest
    full = np.clip(np.array(vae.latents_to_image(latents, tiled=False)) / 2 + 0.5, 0, 1)
    linear = np.array(latent_preview(latents, factors, upscale=vae.config.factor))
    tiny = load_tiny_autoencoder(root / MODEL_FOLDER, mx.float32)
    fast = np.clip(np.array(tiny.decode(latents)) / 2 + 0.5, 0, 1)
    errors = {name: float(np.abs(x - full).mean()) for name, x in [("linear", linear), ("tiny", fast)]}
    spread = float(np.abs(full - full.mean()).mean())  # the error of a flat grey image
    print(model, {k: round(v, 4) for k, v in errors.items()}, "flat image", round(spread, 4))
    assert errors["tiny"] < 0.05 and errors["linear"] < 0.15
    assert errors["tiny"] < errors["linear"] < 0.5 * spread
    encoded = np.array(tiny.encode(mx.array(np.array(vae.latents_to_image(latents, tiled=False)))))
    assert np.abs(encoded - np.array(latents)).mean() < 0.3 * np.abs(np.array(latents)).mean()

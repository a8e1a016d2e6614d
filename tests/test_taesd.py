"""Parity of mlx_flash.taesd with diffusers' AutoencoderTiny (tiny random models, 16 latent channels, saved by
save_pretrained), used as diffusers' SD3 pipeline uses it; full-size key coverage, loading and errors."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from huggingface_hub.errors import LocalEntryNotFoundError
from huggingface_hub.utils import filter_repo_objects
from mlx.utils import tree_flatten
from safetensors.torch import save_file
from tiny import randomize

from mlx_flash import hub
from mlx_flash.hub import ModelNotFoundError
from mlx_flash.taesd import (
    SD3_REPO,
    WEIGHT_RULES,
    TinyAutoencoder,
    TinyConfig,
    load_tiny_autoencoder,
    save_tiny_autoencoder,
    tiny_autoencoder_source,
)
from mlx_flash.vae import VAEConfig
from mlx_flash.weights import LAYOUT_KEY, WeightsError, remap

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TINY = {  # name: diffusers config (taesd3's scaling, and a VAE-like one that the pipeline's formulas must apply)
    "taesd3": dict(scaling_factor=1.0, shift_factor=0.0),
    "scaled": dict(scaling_factor=1.5305, shift_factor=0.0609),
}
ARCHITECTURE = dict(latent_channels=16, encoder_block_out_channels=(16, 16, 16),
                    decoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 2, 1), num_decoder_blocks=(2, 1, 1))


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    """(diffusers model, its save_pretrained folder)."""
    model = randomize(AutoencoderTiny(**ARCHITECTURE, **TINY[request.param]), seed=0, std=0.1)  # outputs of std 0.3-6
    folder = tmp_path_factory.mktemp(f"taesd_{request.param}")
    model.save_pretrained(folder)
    return model, folder


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def assert_close(ours: mx.array, reference: np.ndarray) -> None:
    error = float(np.abs(np.array(ours) - reference).max())
    scale = float(np.abs(reference).max())
    print(f"max error {error:.3g} of max |reference| {scale:.3g}")
    assert ours.dtype == mx.float32 and ours.shape == reference.shape
    assert error <= 1e-4 * scale


def test_decode_matches_diffusers(tiny):
    """Ours on transformer latents == diffusers' SD3 pipeline: vae.decode(latents / scaling + shift)."""
    model, folder = tiny
    latents = 2 * torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(1))  # beyond the soft clamp
    c = model.config
    with torch.no_grad():
        reference = model.decode(latents / c.scaling_factor + c.shift_factor).sample
    assert reference.std() > 0.1
    ours = load_tiny_autoencoder(folder, mx.float32).decode(mx.array(nhwc(latents)))
    assert_close(ours, nhwc(reference))


def test_encode_matches_diffusers(tiny):
    """Ours == diffusers' SD3 img2img: (vae.encode(image).latents - shift) * scaling."""
    model, folder = tiny
    images = 2 * torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2)) - 1
    c = model.config
    with torch.no_grad():
        reference = (model.encode(images).latents - c.shift_factor) * c.scaling_factor
    assert reference.std() > 0.1
    ours = load_tiny_autoencoder(folder, mx.float32).encode(mx.array(nhwc(images)))
    assert_close(ours, nhwc(reference))


def test_full_size_keys_and_shapes():
    """Every tensor of the real taesd3 (AutoencoderTiny with 16 latent channels, on the meta device) maps onto
    exactly our parameters."""
    with torch.device("meta"):
        model = AutoencoderTiny(latent_channels=16)
    config = TinyConfig.from_dict(dict(model.config))
    assert config == TinyConfig()
    weights = {k: mx.zeros(tuple(v.shape)) for k, v in model.state_dict().items()}  # lazy: never allocated
    mapped = {k: tuple(v.shape) for k, v in remap(weights, WEIGHT_RULES).items()}
    ours = {k: tuple(v.shape) for k, v in tree_flatten(TinyAutoencoder(config).parameters())}
    print(f"full-size taesd3: {len(mapped)} tensors mapped, {len(ours)} parameters")
    assert mapped == ours and len(ours) == len(model.state_dict())


def test_saved_layout_round_trip(tiny, tmp_path):
    """save_tiny_autoencoder writes the mlx-flash layout; it loads back equal, and diffusers reads its config."""
    _, folder = tiny
    model = load_tiny_autoencoder(folder, mx.float32)
    save_tiny_autoencoder(tmp_path, model)
    again = load_tiny_autoencoder(tmp_path)
    latents = mx.random.normal((1, 4, 4, 16), key=mx.random.key(0))
    assert mx.array_equal(model.decode(latents), again.decode(latents))
    config = {k: v for k, v in json.loads((tmp_path / "config.json").read_text()).items() if k != LAYOUT_KEY}
    assert TinyConfig.from_dict(dict(AutoencoderTiny.from_config(config).config)) == model.config


def test_repo_id_fetches_config_and_diffusers_weights_only(tiny, tmp_path, monkeypatch):
    """A repo id is fetched with only config.json and the diffusers weights (taesd3 also ships original-format
    files); a folder holding those as well still loads its diffusers weights."""
    model, folder = tiny
    calls = []

    def download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(hub, "snapshot_download", download)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    save_file({"1.weight": torch.zeros(64, 16, 3, 3)}, tmp_path / "taesd3_decoder.safetensors")
    ours = load_tiny_autoencoder(SD3_REPO, mx.float32, revision="v1")
    (repo, kwargs), = calls
    listing = [".gitattributes", "README.md", "config.json", "diffusion_pytorch_model.safetensors",
               "taesd3_decoder.safetensors", "taesd3_encoder.safetensors", "taesd3_decoder.pth"]
    fetched = filter_repo_objects(listing, allow_patterns=kwargs["allow_patterns"],
                                  ignore_patterns=kwargs["ignore_patterns"])
    assert repo == SD3_REPO and kwargs["revision"] == "v1"
    assert set(fetched) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert ours.config == TinyConfig.from_dict(dict(model.config))


def test_bad_inputs(tiny, tmp_path):
    _, folder = tiny
    model = load_tiny_autoencoder(folder)
    with pytest.raises(ValueError, match=r"NHWC.*transpose"):
        model.decode(mx.zeros((1, 16, 8, 8)))
    with pytest.raises(ValueError, match="multiples of 4"):
        model.encode(mx.zeros((1, 10, 16, 3)))
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="act_fn"):
        TinyConfig.from_dict({**config, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="all equal"):
        TinyConfig.from_dict({**config, "decoder_block_out_channels": [16, 32, 16]})
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        load_tiny_autoencoder(tmp_path / "missing")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(WeightsError, match="not an AutoencoderTiny"):
        load_tiny_autoencoder(tmp_path / "vae")


def test_where_a_models_tiny_autoencoder_is(tmp_path):
    assert tiny_autoencoder_source(tmp_path, VAEConfig()) == SD3_REPO  # SD3 / SD3.5's VAE: taesd3
    assert tiny_autoencoder_source(tmp_path, VAEConfig(scaling_factor=0.9)) is None
    (tmp_path / "taesd").mkdir()
    assert tiny_autoencoder_source(tmp_path, VAEConfig(scaling_factor=0.9)) == tmp_path / "taesd"


def test_hub_errors_are_one_line(monkeypatch):
    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the cache.\nMore.")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError) as info:
        load_tiny_autoencoder(SD3_REPO)
    assert "\n" not in str(info.value) and SD3_REPO in str(info.value) and "connect to the internet" in str(info.value)

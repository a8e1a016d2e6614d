"""The tiny autoencoder (TAESD; diffusers `AutoencoderTiny`) in MLX, NHWC: a fast, small, lower-quality stand-in
for the VAE, for live previews and quick decodes. For SD3 / SD3.5 it is madebyollin/taesd3 (16 latent channels).

Latent scaling. TAESD "uses the same latent API" as the VAE it distils, on the latents the diffusion model works
in (madebyollin/taesd, issues 3 and 18: its latent "scale factor is 1"). In diffusers this is config: the SD3
pipeline decodes `vae.decode(latents / scaling_factor + shift_factor)` and img2img encodes
`(vae.encode(x).latents - shift_factor) * scaling_factor`, while AutoencoderTiny's own `decode` / `encode` scale
nothing. madebyollin/taesd3's config sets no scaling (AutoencoderTiny's defaults, `scaling_factor` 1.0 and
`shift_factor` 0.0: its diffusers example once had to set `shift_factor = 0.0` by hand because the config had
none, fixed by diffusers PR 8618; the config file itself could not be read here, offline), so the
diffusion-space latents reach the tiny decoder as they are. ComfyUI does the same: its previewer feeds the
sampler's x0 (model space, `(raw - 0.0609) * 1.5305`) to the taesd3 decoder unchanged, and as a VAE it first
maps raw latents back with `(raw - 0.0609) * 1.5305`. `latent_magnitude` / `latent_shift` only map latents to
[0, 1] for storing them as PNGs; encoding and decoding ignore them.

So `TinyAutoencoder.decode` takes the latents as our transformer produces them (what
`Autoencoder.latents_to_image` takes) and applies the config's `latents / scaling_factor + shift_factor` as the
diffusers pipeline does (the identity for taesd3 and for the digit models' tiny autoencoder); `encode` is its
inverse, like `Autoencoder.image_to_latents` without the sampling (the tiny encoder is deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import mlx.core as mx
import mlx.nn as nn

from .hub import resolve_component_dir
from .layout import read_json
from .vae import VAEConfig, sd3_latents
from .weights import (
    Rule,
    WeightsError,
    conv_to_nhwc,
    is_converted,
    load_into,
    load_safetensors,
    read_component,
    remap,
    save_component,
)

SD3_REPO = "madebyollin/taesd3"  # the tiny autoencoder of SD3 / SD3.5's VAE
MODEL_FOLDER = "taesd"  # a model folder's own tiny autoencoder, if it ships one: <model>/taesd
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")  # diffusers', ours
HUB_FILES = ["config.json", *WEIGHT_FILES]  # the repos also hold original-format copies, not needed


@dataclass
class TinyConfig:
    """Architecture and latent scaling, in diffusers' `AutoencoderTiny` config.json names (defaults: taesd3)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    upsampling_scaling_factor: int = 2
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5

    def __post_init__(self):
        for side in ("encoder", "decoder"):
            widths, blocks = getattr(self, f"{side}_block_out_channels"), getattr(self, f"num_{side}_blocks")
            if len(widths) != len(blocks) or len(set(widths)) != 1:
                raise ValueError(
                    f"tiny autoencoder config: {side}_block_out_channels {list(widths)} must have one width for "
                    f"every stage of num_{side}_blocks {list(blocks)}, all equal (AutoencoderTiny's stages do not "
                    "change width).")

    @classmethod
    def from_dict(cls, config: Mapping) -> TinyConfig:
        """The config of a diffusers AutoencoderTiny config.json; settings this model does not implement raise."""
        for key, value in {"act_fn": "relu", "upsample_fn": "nearest"}.items():
            if config.get(key, value) != value:
                raise ValueError(f"tiny autoencoder config: {key}={config[key]!r} is not supported (only {value!r}).")
        names = {f.name for f in fields(cls)}
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names and v is not None}
        return cls(**args)

    def to_dict(self) -> dict:
        """The diffusers config.json fields (loadable by `AutoencoderTiny.from_config`)."""
        values = {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}
        return {"_class_name": "AutoencoderTiny", "act_fn": "relu", "upsample_fn": "nearest", **values}

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each axis, of a decode."""
        return self.upsampling_scaling_factor ** (len(self.decoder_block_out_channels) - 1)

    # The diffusion model's latents <-> the latents this autoencoder reads and writes: the VAE's formulas, with
    # this config's `scaling_factor` and `shift_factor` (for taesd3, 1 and 0: the identity).
    to_diffusion = VAEConfig.to_diffusion
    from_diffusion = VAEConfig.from_diffusion


def conv(in_dims: int, out_dims: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(in_dims, out_dims, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """relu(x + conv(relu(conv(relu(conv(x)))))), the width kept."""

    def __init__(self, dims: int):
        super().__init__()
        self.conv = [conv(dims, dims) for _ in range(3)]

    def __call__(self, x: mx.array) -> mx.array:
        h = nn.relu(self.conv[0](x))
        h = nn.relu(self.conv[1](h))
        return nn.relu(self.conv[2](h) + x)


class Encoder(nn.Sequential):
    """Image in [0, 1] (B, H, W, 3) -> latents (B, H/f, W/f, latent_channels): a conv, then per stage a stride-2
    conv (not in the first) and its blocks, then a conv to the latent channels."""

    def __init__(self, config: TinyConfig):
        width = config.encoder_block_out_channels[0]
        layers = []
        for i, blocks in enumerate(config.num_encoder_blocks):
            layers.append(conv(config.in_channels, width) if i == 0 else conv(width, width, stride=2, bias=False))
            layers += [Block(width) for _ in range(blocks)]
        super().__init__(*layers, conv(width, config.latent_channels))


class Decoder(nn.Sequential):
    """Latents (B, h, w, latent_channels) -> image in about [0, 1] (B, h*f, w*f, 3): soft clamp to (-3, 3)
    (applied in `TinyAutoencoder.decode`), a conv and relu, then per stage its blocks, a nearest-neighbour
    upsampling and a conv (no bias) except in the last, whose conv (with bias) gives the image."""

    def __init__(self, config: TinyConfig):
        width, stages = config.decoder_block_out_channels[0], len(config.num_decoder_blocks)
        layers = [conv(config.latent_channels, width), nn.ReLU()]
        for i, blocks in enumerate(config.num_decoder_blocks):
            layers += [Block(width) for _ in range(blocks)]
            if i < stages - 1:
                upsample = nn.Upsample(config.upsampling_scaling_factor, mode="nearest")
                layers += [upsample, conv(width, width, bias=False)]
            else:
                layers.append(conv(width, config.out_channels))
        super().__init__(*layers)


class TinyAutoencoder(nn.Module):
    """The tiny autoencoder. Latents are diffusion-space (as the transformer takes and produces them), images NHWC
    in [-1, 1]; see the module docstring for the scaling."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.layers[0].weight.dtype

    def decode(self, latents: mx.array) -> mx.array:
        """Diffusion-space latents (B, h, w, latent_channels) -> float32 images (B, h*f, w*f, 3), about [-1, 1]."""
        c = self.config
        if latents.ndim != 4 or latents.shape[-1] != c.latent_channels:
            raise ValueError(
                f"tiny autoencoder decode: expected latents of shape (batch, height, width, {c.latent_channels}) "
                f"(NHWC), got {tuple(latents.shape)}; transpose NCHW latents with .transpose(0, 2, 3, 1).")
        z = c.from_diffusion(latents).astype(self.dtype)
        image = self.decoder(mx.tanh(z / 3) * 3)
        return (2 * image - 1).astype(mx.float32)

    def encode(self, images: mx.array) -> mx.array:
        """Images (B, H, W, 3) in [-1, 1] -> float32 diffusion-space latents (B, H/f, W/f, latent_channels)."""
        c = self.config
        f = 2 ** (len(c.num_encoder_blocks) - 1)  # the encoder's stride-2 convs
        if images.ndim != 4 or images.shape[-1] != c.in_channels or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"tiny autoencoder encode: expected images of shape (batch, height, width, {c.in_channels}) (NHWC) "
                f"with height and width multiples of {f}, got {tuple(images.shape)}; transpose NCHW images with "
                f".transpose(0, 2, 3, 1) and crop or resize to a multiple of {f}.")
        z = self.encoder(((images + 1) / 2).astype(self.dtype)).astype(mx.float32)
        return c.to_diffusion(z)


# The module names are diffusers' (`encoder.layers.N`, `decoder.layers.N`: nn.Sequential indices, activations and
# upsamplings included) but for a block's convs, which diffusers numbers 0, 2, 4 (ReLUs between) and we 0, 1, 2;
# conv weights change layout.
BLOCK_CONVS = {0: 0, 2: 1, 4: 2}
WEIGHT_RULES = [Rule(rf"(.+\.conv)\.{theirs}\.(weight|bias)", rf"\1.{ours}.\2", conv_to_nhwc)
                for theirs, ours in BLOCK_CONVS.items()] + [Rule(r".*\.weight", r"\g<0>", conv_to_nhwc)]


def tiny_from_weights(config: Mapping, weights: Mapping[str, mx.array], dtype: mx.Dtype | None = None,
                      name: str = "tiny autoencoder") -> TinyAutoencoder:
    """Build the tiny autoencoder from a config.json dictionary and its tensors: diffusers names, or the mlx-flash
    layout when the config says so. `dtype` casts the weights."""
    model = TinyAutoencoder(TinyConfig.from_dict(config))
    if not is_converted(config):
        weights = remap(weights, WEIGHT_RULES)
    return load_into(model, weights, name, dtype=dtype)


def _weights(folder: Path) -> dict[str, mx.array]:
    """The weights of a tiny autoencoder folder: diffusers' or our weights file when there is one (the hub repos
    also hold original-format `taesd3_*.safetensors`), else all its safetensors."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return load_safetensors(folder / name)
    return read_component(folder)[1]


def load_tiny_autoencoder(path_or_repo: str | Path, dtype: mx.Dtype | None = None, *, revision: str | None = None,
                          token: str | None = None) -> TinyAutoencoder:
    """Load a tiny autoencoder: a local folder (diffusers AutoencoderTiny or mlx-flash layout: config.json and
    safetensors weights) or a Hugging Face repo id such as `SD3_REPO` (only its config and diffusers weights are
    fetched). `dtype` casts the weights (default: as stored)."""
    folder = resolve_component_dir(path_or_repo, HUB_FILES, revision=revision, token=token)
    config = read_json(folder / "config.json")
    if config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise WeightsError(f"{folder}: config.json describes a {config['_class_name']}, not an AutoencoderTiny; "
                           f"pass a tiny autoencoder folder or repo such as {SD3_REPO}.")
    return tiny_from_weights(config, _weights(folder), dtype, f"tiny autoencoder ({folder})")


def tiny_autoencoder_source(root: Path, vae_config: VAEConfig) -> Path | str | None:
    """Where a model's tiny autoencoder is, for `load_tiny_autoencoder`: the model folder's own `<root>/taesd`,
    else `SD3_REPO` when its VAE is SD3's, else None (the model has none)."""
    if (root / MODEL_FOLDER).is_dir():
        return root / MODEL_FOLDER
    return SD3_REPO if sd3_latents(vae_config) else None


def save_tiny_autoencoder(folder: str | Path, model: TinyAutoencoder) -> None:
    """Write the tiny autoencoder as an mlx-flash layout folder."""
    save_component(folder, model, model.config.to_dict())

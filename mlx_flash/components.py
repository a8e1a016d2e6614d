"""The parts of one model folder (transformer, ControlNets, VAE, tiny autoencoder, text encoders, LoRAs), each
loaded when first needed and freed on request, and what the folder says about how it samples."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import mlx.core as mx

from .clip import CLIPConfig, CLIPTextModel, load_clip
from .controlnet import ControlNet, ControlNetConfig, load_controlnet
from .layout import dtype_name, fingerprint, model_identity, read_json, read_manifest
from .lora import LoRAs
from .mmdit import MMDiT, MMDiTConfig, load_mmdit
from .presets import Preset, SkipLayerGuidance
from .preview import latent_preview, model_latent_rgb
from .quantization import quantized
from .request import ModelDefaults
from .t5 import T5Config, T5Encoder, load_t5
from .taesd import TinyAutoencoder, load_tiny_autoencoder, tiny_autoencoder_source
from .text_encoders import TextEncoders
from .vae import Autoencoder, VAEConfig, load_vae

log = logging.getLogger("mlx_flash")

CLIP_ENCODERS = ("text_encoder", "text_encoder_2")
T5_ENCODER = "text_encoder_3"


class Components:
    """An SD3 / SD3.5 model folder's parts. Each loads when first used; with `low_memory` each stage's part is
    freed after it (`free`), so the peak is that of the largest stage rather than their sum."""

    def __init__(self, root: Path, *, name: str, dtype: mx.Dtype, quantize: int | None, use_t5: bool,
                 low_memory: bool, preset: Preset | None = None, shift: float | None = None,
                 transformer: Path | None = None, loras: LoRAs | None = None,
                 controlnets: Sequence[tuple[str, Path, float]] = (), manifest: dict | None = None):
        """`shift` overrides the scheduler config's (a named preset's); `transformer` is a folder replacing
        root/transformer (without a config.json it takes the base's); `loras` are applied to the transformer and
        text encoders on every load; `controlnets` are (name as given, local path, scale); `manifest` replaces
        root's mlx_flash.json (a model folder on a base, see `loading.on_base`)."""
        self.root, self.name, self.dtype, self.quantize = root, name, dtype, quantize
        self.low_memory, self.preset, self.transformer_dir = low_memory, preset, transformer
        self.loras = loras or LoRAs()
        self.transformer_config = MMDiTConfig.from_diffusers(self.read_transformer_config(root))
        self.controlnet_specs = list(controlnets)
        self.controlnet_configs = [self._check_controlnet(spec_name, path) for spec_name, path, _ in controlnets]
        self.vae_config = VAEConfig.from_dict(read_json(root / "vae" / "config.json"))
        self.vae_factor = self.vae_config.factor
        self.manifest = read_manifest(root) if manifest is None else manifest
        self.model_defaults = self.manifest.get("defaults", {})
        scheduler_config = root / "scheduler" / "scheduler_config.json"
        if shift is None:
            shift = read_json(scheduler_config).get("shift", 3.0) if scheduler_config.exists() else 3.0
        self.shift = shift
        self.text_encoders = TextEncoders(
            root, dtype, use_t5=use_t5, low_memory=low_memory,
            joint_attention_dim=self.transformer_config.joint_attention_dim,
            loaders={
                **{encoder: lambda folder, dtype, encoder=encoder: self.loras.apply(load_clip(folder, dtype), encoder)
                   for encoder in CLIP_ENCODERS},
                T5_ENCODER: lambda folder, dtype: self.loras.apply(
                    quantized(load_t5(folder, dtype), self.quantize), T5_ENCODER),
            },
        )
        # Applied in order whenever the transformer is (re)loaded: quantization first, then the LoRA adapters
        # (before any few-step adaLN precompute, which then includes the adaLN adapters).
        self.transformer_transforms: list[Callable[[MMDiT], MMDiT]] = [
            lambda m: quantized(m, self.quantize), lambda m: self.loras.apply(m, "transformer")]
        self.vae_tiling: bool | None = None  # None: tiled above the VAE's size threshold or to fit the budget
        self._transformer: MMDiT | None = None
        self._controlnets: list[ControlNet] | None = None
        self._vae: Autoencoder | None = None
        self._tiny: TinyAutoencoder | bool | None = None  # False: the model has none
        self._identity: dict | None = None

    @staticmethod
    def read_transformer_config(root: Path) -> dict:
        return read_json(root / "transformer" / "config.json")

    @property
    def transformer(self) -> MMDiT:
        if self._transformer is None:
            folder = self.transformer_dir or self.root / "transformer"
            model = load_mmdit(folder, self.dtype, float32_residual=self.dtype == mx.float16,
                               config=self.transformer_config.to_diffusers())
            if self.transformer_dir is not None and not model.config.same_architecture(self.transformer_config):
                raise ValueError(f"{folder}: this transformer ({model.config.num_layers} layers, width "
                                 f"{model.config.hidden_size}) does not fit the base model in {self.root}; "
                                 "pass the base it was made from.")
            for transform in self.transformer_transforms:
                model = transform(model)
            self._transformer = model
        return self._transformer

    @property
    def controlnets(self) -> list[ControlNet]:
        """The ControlNets given at load time, quantized like the transformer."""
        if self._controlnets is None:
            self._controlnets = [quantized(load_controlnet(path, self.dtype, self.transformer_config), self.quantize)
                                 for _, path, _ in self.controlnet_specs]
        return self._controlnets

    def _check_controlnet(self, name: str, path: Path) -> ControlNetConfig:
        """The ControlNet's configuration (its tensors are read lazily), or one line if it does not fit."""
        config, t = load_controlnet(path, transformer=self.transformer_config).config, self.transformer_config
        if (config.hidden_size, config.pooled_projection_dim, config.patch_size, config.in_channels) != \
                (t.hidden_size, t.pooled_projection_dim, t.patch_size, t.in_channels) or \
                config.joint_attention_dim not in (None, t.joint_attention_dim):
            raise ValueError(f"{name}: a ControlNet for another architecture (width {config.hidden_size}) than this "
                             f"model's transformer (width {t.hidden_size}); use a ControlNet made for this model.")
        return config

    @property
    def vae(self) -> Autoencoder:
        if self._vae is None:
            self._vae = load_vae(self.root / "vae", self.dtype)
        return self._vae

    def encode_image(self, pixels: mx.array) -> mx.array:
        """Images in [-1, 1] -> diffusion latents of the VAE's posterior mean."""
        return self.vae_config.to_diffusion(self.vae.encode(pixels.astype(self.dtype))[0])

    @property
    def tiny_autoencoder(self) -> TinyAutoencoder | None:
        """The model's tiny autoencoder (its own `taesd/`, else taesd3 for SD3's VAE), or None without one."""
        if self._tiny is None:
            source = tiny_autoencoder_source(self.root, self.vae_config)
            self._tiny = False if source is None else load_tiny_autoencoder(source, self.dtype)
        return self._tiny or None

    def require_tiny_autoencoder(self) -> TinyAutoencoder:
        if self.tiny_autoencoder is None:
            raise ValueError(f"{self.name} has no tiny autoencoder (its VAE is not SD3's and the folder has no "
                             "taesd/); use the full VAE.")
        return self.tiny_autoencoder

    def preview_decoder(self) -> Callable[[mx.array], mx.array]:
        """Latents -> images in [0, 1] for live previews: the tiny autoencoder when the model has one and it
        loads, else the weight-free linear map of the latents."""
        try:
            tiny = self.tiny_autoencoder
        except (OSError, ValueError) as err:  # e.g. taesd3 not downloadable offline
            log.warning("previews use the linear latent map: the tiny autoencoder did not load (%s)", err)
            tiny = self._tiny = None
        if tiny is not None:
            return lambda z: mx.clip(tiny.decode(z) / 2 + 0.5, 0, 1)
        factors = model_latent_rgb(self.manifest, self.vae_config)
        if factors is None:
            raise ValueError(f"{self.name} has no preview decoder: no tiny autoencoder and no \"latent_rgb\" factors "
                             "in its mlx_flash.json.")
        return lambda z: latent_preview(z, factors, upscale=self.vae_factor)

    def release(self) -> None:
        """Free every loaded part."""
        self.text_encoders.release()
        self._transformer = self._vae = self._tiny = self._controlnets = None
        mx.clear_cache()

    def free(self, *parts: str) -> None:
        """In low-memory mode, free parts ("transformer", "controlnets", "vae", "text_encoders") after their stage."""
        if not self.low_memory:
            return
        for part in parts:
            if part == "text_encoders":
                self.text_encoders.release()
            else:
                setattr(self, f"_{part}", None)
        mx.clear_cache()

    @property
    def identity(self) -> dict:
        """The model's identity and load settings (with the LoRAs at their current scales), as recorded in each
        image's metadata."""
        if self._identity is None:
            self._identity = {**model_identity(self.root, self.name), "dtype": dtype_name(self.dtype),
                              "quantize": self.quantize, "t5": self.text_encoders.use_t5}
            if self.transformer_dir is not None:
                self._identity.update(transformer=str(self.transformer_dir),
                                      transformer_fingerprint=fingerprint(self.transformer_dir))
            if self.controlnet_specs:
                self._identity["controlnets"] = [{"name": name, "scale": scale}
                                                 for name, _, scale in self.controlnet_specs]
        return {**self._identity, **({"loras": self.loras.metadata()} if self.loras else {})}

    def check_loras(self) -> None:
        """Raise LoRAError unless every LoRA fits this model, before any weight loads (lazy modules only)."""
        if not self.loras:
            return
        models = {"transformer": MMDiT(self.transformer_config)}
        for name in CLIP_ENCODERS + ((T5_ENCODER,) if self.text_encoders.use_t5 else ()):
            config = read_json(self.root / name / "config.json")
            models[name] = (T5Encoder(T5Config.from_dict(config)) if name == T5_ENCODER
                            else CLIPTextModel(CLIPConfig.from_dict(config)))
        self.loras.check(models)

    def sampling_defaults(self) -> ModelDefaults:
        """Everything a request falls back on: the manifest's defaults over the preset's, and the sizes."""
        p, own, config = self.preset, self.model_defaults, self.transformer_config
        steps, guidance, slg = (28, 5.0, None) if p is None else (p.num_steps, p.guidance_scale, p.skip_layer_guidance)
        if "skip_layer_guidance" in own:
            slg = SkipLayerGuidance(**own["skip_layer_guidance"]) if own["skip_layer_guidance"] else None
        multiple = self.vae_factor * config.patch_size
        sampler, sigmas, scales = ("euler", None, None) if p is None else (p.sampler, p.sigmas, p.scales)
        return ModelDefaults(
            steps=own.get("num_inference_steps", steps), guidance=own.get("guidance_scale", guidance),
            skip_layer_guidance=slg, max_sequence_length=own.get("max_sequence_length", 256),
            shift=own.get("shift", self.shift), sampler=own.get("sampler", sampler),
            sigmas=tuple(own["sigmas"]) if own.get("sigmas") else sigmas,
            scales=tuple(own["scales"]) if own.get("scales") else scales,
            size=config.sample_size * self.vae_factor, multiple=multiple,
            largest=config.pos_embed_max_size * multiple, num_layers=config.num_layers,
            latent_factor=self.vae_factor, latent_channels=self.vae_config.latent_channels,
            controlnets=len(self.controlnet_configs),
            inpainting_controlnet=any(c.extra_conditioning_channels for c in self.controlnet_configs),
        )

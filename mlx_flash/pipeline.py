"""Text (and optionally an image) in, images out: encode -> prepare -> denoise -> decode."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from . import memory
from .callbacks import ProgressBar
from .clip import CLIPConfig, CLIPTextModel, load_clip
from .conditionings import ControlInput, ControlNets, Img2Img, Inpaint
from .control_images import control_image
from .controlnet import ControlNet, ControlNetConfig, load_controlnet
from .denoise import (
    Callback,
    Conditioning,
    Prompts,
    check_finite,
    denoise,
    initial_noise,
    seeded_noise,
)
from .image_io import load_image, numpy_to_pil
from .inpaint import (
    blur_mask,
    crop_region,
    image_pixels,
    latent_mask,
    mask_pixels,
    overlay,
)
from .layout import dtype_name, fingerprint, model_identity, read_json, read_manifest
from .lora import LoRAs
from .mmdit import MMDiT, MMDiTConfig, load_mmdit
from .presets import Preset, SkipLayerGuidance
from .preview import latent_preview, model_latent_rgb
from .quantization import quantized
from .request import (
    GenerationRequest,
    GenerationResult,
    ModelDefaults,
    StageReport,
    resolve,
)
from .sampler import img2img_start
from .t5 import T5_XXL, T5Config, T5Encoder, load_t5
from .taesd import TinyAutoencoder, load_tiny_autoencoder, tiny_autoencoder_source
from .text_encoders import TextEncoders
from .vae import Autoencoder, VAEConfig, load_vae
from .weights import quantize_like, read_component

log = logging.getLogger("mlx_flash")

PRECOMPUTE_MAX_STEPS = 8  # runs this short (without CFG) precompute every adaLN modulation up front


@dataclass(frozen=True)
class MemoryPlan:
    """How a run fits the memory budget: `tile_decode` when only a tiled VAE decode makes it fit."""

    tile_decode: bool = False


class Pipeline:
    """An SD3 / SD3.5 model ready to generate. Components load when first needed; with `low_memory` each is
    loaded, run and freed in turn, so the peak is that of the largest stage rather than their sum. Calls are
    serialized: one Pipeline may be shared by threads, and nothing of one call leaks into the next."""

    def __init__(self, root: Path, *, name: str, dtype: mx.Dtype, quantize: int | None, use_t5: bool,
                 low_memory: bool, preset: Preset | None = None, shift: float | None = None,
                 transformer: Path | None = None, loras: LoRAs | None = None,
                 controlnets: Sequence[tuple[str, Path, float]] = ()):
        """`shift` overrides the scheduler config's (a named preset's); `transformer` is a folder replacing
        root/transformer (without a config.json it takes the base's); `loras` are applied to the transformer and
        text encoders on every load; `controlnets` are (name as given, local path, scale)."""
        self.root, self.name, self.dtype, self.quantize = root, name, dtype, quantize
        self.low_memory, self.preset, self.transformer_dir = low_memory, preset, transformer
        self.loras = loras or LoRAs()
        self.transformer_config = MMDiTConfig.from_diffusers(self.read_transformer_config(root))
        self.controlnet_specs = list(controlnets)  # (name as given, local path, scale)
        self.controlnet_configs = [self._check_controlnet(spec_name, path) for spec_name, path, _ in controlnets]
        self.vae_config = VAEConfig.from_dict(read_json(root / "vae" / "config.json"))
        self.vae_factor = self.vae_config.factor
        self.manifest = read_manifest(root)
        self.model_defaults = self.manifest.get("defaults", {})
        scheduler_config = root / "scheduler" / "scheduler_config.json"
        if shift is None:
            shift = read_json(scheduler_config).get("shift", 3.0) if scheduler_config.exists() else 3.0
        self.shift = shift
        self.text_encoders = TextEncoders(
            root, dtype, use_t5=use_t5, low_memory=low_memory,
            joint_attention_dim=self.transformer_config.joint_attention_dim,
            loaders={
                "text_encoder": lambda folder, dtype: self.loras.apply(load_clip(folder, dtype), "text_encoder"),
                "text_encoder_2": lambda folder, dtype: self.loras.apply(load_clip(folder, dtype), "text_encoder_2"),
                "text_encoder_3": lambda folder, dtype: self.loras.apply(
                    quantized(load_t5(folder, dtype), self.quantize), "text_encoder_3"),
            },
        )
        # Applied in order whenever the transformer is (re)loaded: quantization first, then the LoRA adapters
        # (before any few-step adaLN precompute, which then includes the adaLN adapters).
        self.transformer_transforms: list[Callable[[MMDiT], MMDiT]] = [
            lambda m: quantized(m, self.quantize), lambda m: self.loras.apply(m, "transformer")]
        self._transformer: MMDiT | None = None
        self._controlnets: list[ControlNet] | None = None
        self._vae: Autoencoder | None = None
        self._tiny: TinyAutoencoder | bool | None = None  # False: the model has none
        self._identity: dict | None = None
        self.vae_tiling: bool | None = None  # None: tiled above the VAE's size threshold or to fit the budget
        self.stages: list[StageReport] = []  # the last run's reports (GenerationResult.stages is per call)
        self._lock = threading.RLock()

    @staticmethod
    def read_transformer_config(root: Path) -> dict:
        return read_json(root / "transformer" / "config.json")

    # Components -------------------------------------------------------------------------------------------

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
        """Free every loaded component."""
        self.text_encoders.release()
        self._transformer = self._vae = self._tiny = self._controlnets = None
        mx.clear_cache()

    def _free(self, component: str) -> None:
        """In low-memory mode, free a component after its stage."""
        if self.low_memory:
            setattr(self, component, None)
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

    # LoRAs ------------------------------------------------------------------------------------------------

    def check_loras(self) -> None:
        """Raise LoRAError unless every LoRA fits this model, before any weight loads (lazy modules only)."""
        if not self.loras:
            return
        models = {"transformer": MMDiT(self.transformer_config)}
        encoders = ("text_encoder", "text_encoder_2") + (("text_encoder_3",) if self.text_encoders.use_t5 else ())
        for name in encoders:
            config = read_json(self.root / name / "config.json")
            models[name] = (T5Encoder(T5Config.from_dict(config)) if name == "text_encoder_3"
                            else CLIPTextModel(CLIPConfig.from_dict(config)))
        self.loras.check(models)

    def set_lora_scales(self, scales: Sequence[float]) -> None:
        """Change the LoRAs' scales (one per LoRA, in load order) without reloading; the next run uses them."""
        with self._lock:
            self.loras.set_scales(scales)

    # Requests ---------------------------------------------------------------------------------------------

    def defaults(self) -> tuple[int, float, SkipLayerGuidance | None]:
        """(steps, guidance scale, skip-layer guidance) this model runs with unless told otherwise: the model
        folder's manifest, else its preset's published settings."""
        d = self.sampling_defaults()
        return d.steps, d.guidance, d.skip_layer_guidance

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

    def request(self, prompt: str | Sequence[str], **settings) -> GenerationRequest:
        """`prompt` and `generate`'s keyword arguments resolved against this model's defaults and checked."""
        return resolve(self.sampling_defaults(), prompt, **settings)

    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | Sequence[int] | None = None,
        latents: mx.array | np.ndarray | None = None,
        image=None,
        strength: float | None = None,
        num_images: int = 1,
        max_sequence_length: int | None = None,
        skip_layer_guidance: SkipLayerGuidance | bool | None = None,
        output_type: str = "pil",
        progress: bool = True,
        sampler: str | None = None,
        shift: float | None = None,
        sigmas: Sequence[float] | None = None,
        vae: str = "full",
        callbacks: Sequence[Callback] = (),
        control_image=None,
        control_type: str | None = None,
        control_start: float | Sequence[float] | None = None,
        control_end: float | Sequence[float] | None = None,
        mask=None,
        mask_blur: float | None = None,
        padding_mask_crop: int | None = None,
        outpaint: Sequence[int] | None = None,
    ):
        """Generate `num_images` images per prompt.

        Unset sampling arguments take the model's defaults (`defaults()`). Guidance is active iff
        `guidance_scale > 1`; `skip_layer_guidance=False` turns the model's default skip-layer guidance off.
        `latents` (B, 16, H/8, W/8), diffusers' NCHW layout, replaces the seeded initial noise. With `image`,
        runs img2img: the image is encoded and noised to the `strength` level (default 0.6) and only the last
        `strength` fraction of the steps run, as in diffusers. `output_type`: "pil" (PIL images), "np" (float32
        array (B, H, W, 3) in [0, 1]), "mlx" (the same as an MLX array) or "latent" (the final latents, an MLX
        array (B, 16, H/8, W/8)). `vae="tiny"` decodes with the tiny autoencoder (fast, small, lower quality). `callbacks` watch (and may stop)
        the steps; `progress` adds a progress bar.
        `Pipeline.run` is the full form, returning a `GenerationResult`."""
        request = self.request(
            prompt, negative_prompt=negative_prompt, num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale, height=height, width=width, seed=seed, latents=latents, image=image,
            strength=strength, num_images=num_images, max_sequence_length=max_sequence_length,
            skip_layer_guidance=skip_layer_guidance, output_type=output_type, sampler=sampler, shift=shift,
            sigmas=sigmas, vae=vae, control_image=control_image, control_type=control_type,
            control_start=control_start, control_end=control_end, mask=mask, mask_blur=mask_blur,
            padding_mask_crop=padding_mask_crop, outpaint=outpaint,
        )
        return self.run(request, callbacks=[*callbacks, *([ProgressBar()] if progress else [])]).images

    def run(self, request: GenerationRequest, callbacks: Sequence[Callback] = (),
            conditionings: Sequence[Conditioning] = ()) -> GenerationResult:
        """Run a resolved request; `conditionings` add to those the request implies (img2img)."""
        with self._lock:
            stages: list[StageReport] = []
            try:
                return self._run(request, list(callbacks), list(conditionings), stages)
            finally:
                self.stages = stages

    def _run(self, request: GenerationRequest, callbacks: list[Callback], conditionings: list[Conditioning],
             stages: list[StageReport]) -> GenerationResult:
        sampler = request.make_sampler()
        sigmas = sampler.sigmas(request.steps, request.shift, request.sigmas)
        if request.image is not None:
            conditionings.insert(0, self._img2img(request) if request.mask is None else self._inpaint(request))
        first = img2img_start(request.steps, request.strength) if request.image is not None else 0
        plan = self.plan_memory(request, steps=request.steps - first)
        final_size = (request.height // self.vae_factor, request.width // self.vae_factor)
        latent_shape = (*sampler.latent_size(0, final_size), self.vae_config.latent_channels)
        x = (initial_noise(request.seeds, latent_shape) if request.latents is None
             else request.latents.transpose(0, 2, 3, 1))

        with self._stage("text encoders", stages):
            prompts = Prompts(*self.text_encoders.encode(
                list(request.prompts), list(request.negative_prompts or ()) or None, do_cfg=request.cfg,
                num_images_per_prompt=request.num_images, max_sequence_length=request.max_sequence_length,
            ))
            mx.eval(prompts.embeds, prompts.pooled, prompts.negative_embeds, prompts.negative_pooled)
            check_finite(prompts.embeds, "the text encoders")
            if self.low_memory:
                self.text_encoders.release()

        if request.control_images:
            conditionings.append(self._controlnet_conditioning(request, prompts))
        start = 0
        if request.image is not None or request.control_images:
            with self._stage("image encoder", stages):
                for conditioning in conditionings:
                    x, start = conditioning.prepare(x, sigmas, start)
                mx.eval(x)
                self._free("_vae")
        else:
            for conditioning in conditionings:
                x, start = conditioning.prepare(x, sigmas, start)
        x = x.astype(self.dtype)

        with self._stage("transformer", stages):
            few_step = not request.cfg and request.steps - start <= PRECOMPUTE_MAX_STEPS
            x = denoise(
                self.transformer, x, sigmas, start, prompts, sampler=sampler, noise=seeded_noise(request.seeds),
                guidance=request.guidance, skip_layer_guidance=request.skip_layer_guidance,
                conditionings=conditionings, callbacks=callbacks, precompute_modulation=few_step,
                drop_modulation_weights=few_step and self.low_memory,
            )
            self._free("_transformer")
            self._free("_controlnets")
        for conditioning in conditionings:
            conditioning.release()

        if request.output_type == "latent":
            images = x.transpose(0, 3, 1, 2)
        else:
            with self._stage("vae decoder", stages):
                if request.vae == "tiny":
                    decoded = self.require_tiny_autoencoder().decode(x)
                else:
                    decoded = self.vae.latents_to_image(x, tiled=True if plan.tile_decode else self.vae_tiling)
                pixels = mx.clip(decoded.astype(mx.float32) / 2 + 0.5, 0, 1)
                mx.eval(pixels)
                check_finite(pixels, "the VAE decoder")
                self._free("_vae")
            if request.padding_mask_crop is not None:
                pixels = mx.array(self._paste_crops(request, np.array(pixels)))
            images = {"mlx": lambda: pixels, "np": lambda: np.array(pixels),
                      "pil": lambda: numpy_to_pil(np.array(pixels))}[request.output_type]()
        return GenerationResult(images, x, request, self.identity, list(stages))

    def _encode(self, pixels: mx.array) -> mx.array:
        """Images in [-1, 1] -> diffusion latents of the VAE's posterior mean (deterministic given the noise)."""
        return self.vae_config.to_diffusion(self.vae.encode(pixels.astype(self.dtype))[0])

    def _img2img(self, request: GenerationRequest) -> Img2Img:
        pixels = mx.array(load_image(request.image, request.width, request.height))
        return Img2Img(pixels, request.strength, self._encode)

    def _mask(self, request: GenerationRequest) -> Image.Image:
        return blur_mask(request.mask, request.mask_blur)

    def _crop(self, request: GenerationRequest) -> tuple[int, int, int, int] | None:
        if request.padding_mask_crop is None:
            return None
        return crop_region(self._mask(request), request.width, request.height, request.padding_mask_crop)

    def _inpaint(self, request: GenerationRequest) -> Inpaint:
        crop, mask = self._crop(request), self._mask(request)
        pixels = mx.array(image_pixels(request.image, request.width, request.height, crop))
        latent = latent_mask(mask_pixels(mask, request.width, request.height, crop), self.vae_factor)
        return Inpaint(pixels, request.strength, self._encode, latent)

    def _paste_crops(self, request: GenerationRequest, pixels: np.ndarray) -> np.ndarray:
        """padding_mask_crop: each generated crop scaled back onto its box of the image, where the mask is."""
        crop, mask = self._crop(request), self._mask(request)
        pasted = [overlay(request.image, image, mask, crop) for image in numpy_to_pil(pixels)]
        return np.stack([np.asarray(p, np.float32) / 255 for p in pasted])

    def _controlnet_conditioning(self, request: GenerationRequest, prompts: Prompts) -> ControlNets:
        w, h = request.width, request.height
        inputs = []
        for i, ((_, _, scale), config) in enumerate(zip(self.controlnet_specs, self.controlnet_configs)):
            picture = request.control_images[i]
            if config.extra_conditioning_channels:  # the inpainting ControlNet: the image and the mask
                pixels, mask = image_pixels(picture, w, h), mask_pixels(self._mask(request), w, h)
            else:
                pixels, mask = load_image(control_image(picture, request.control_type), w, h), None
            inputs.append(ControlInput(lambda i=i: self.controlnets[i], config, mx.array(pixels), mask, scale,
                                       request.control_start[i], request.control_end[i]))
        vae = self.vae_config
        return ControlNets(inputs, prompts, lambda p: self.vae.encode(p.astype(self.dtype))[0], vae.scaling_factor,
                           vae.shift_factor, lambda: self.transformer.pos_embed)

    @contextmanager
    def _stage(self, name: str, stages: list[StageReport]) -> Iterator[None]:
        mx.reset_peak_memory()
        start = time.perf_counter()
        yield
        stages.append(StageReport(name, time.perf_counter() - start, mx.get_peak_memory()))
        log.info("%s: %.2f s, peak memory %.2f GB", name, stages[-1].seconds, stages[-1].peak_memory / 1e9)

    # Memory -----------------------------------------------------------------------------------------------

    def estimate_memory(self, height: int, width: int, images: int = 1, cfg: bool = False,
                        max_sequence_length: int = 256, steps: int | None = None, *, quantize: int | None = None,
                        use_t5: bool | None = None, vae_tiled: bool | None = None,
                        controlnets: bool = False) -> list[memory.StageEstimate]:
        """Predicted peak bytes of each stage of a `generate` call of `steps` steps (default: the model's);
        `quantize`, `use_t5` and `vae_tiled` default to this pipeline's settings; `controlnets`: with the
        ControlNets loaded with it."""
        clips = tuple(CLIPConfig.from_dict(read_json(self.root / name / "config.json"))
                      for name in ("text_encoder", "text_encoder_2"))
        t5_config = self.root / "text_encoder_3" / "config.json"
        t5 = T5Config.from_dict(read_json(t5_config)) if t5_config.exists() else T5_XXL
        use_t5 = self.text_encoders.use_t5 if use_t5 is None else use_t5
        bits = self.quantize if quantize is None else quantize
        return memory.estimate(
            self.transformer_config, self.vae_config, dtype=self.dtype, height=height, width=width, images=images,
            cfg=cfg, clips=clips, t5=t5 if use_t5 else None, max_sequence_length=max_sequence_length,
            quantize=self._quantizer("transformer", bits),
            quantize_t5=self._quantizer("text_encoder_3", bits) if use_t5 else None,
            vae_tiled=self.vae_config.tiles(height // self.vae_factor, width // self.vae_factor,
                                            self.vae_tiling if vae_tiled is None else vae_tiled),
            drop_modulation=self.low_memory and not cfg and (steps or self.defaults()[0]) <= PRECOMPUTE_MAX_STEPS,
            adapters=self.loras.nbytes(self.dtype),
            controlnets=self.controlnet_configs if controlnets else (),
        )

    def plan_memory(self, request: GenerationRequest, steps: int | None = None) -> MemoryPlan:
        """Before anything loads: a plan that tiles the VAE decode if only that makes the run fit the memory
        budget, else MemoryError naming a setting that would fit."""
        height, width, images, cfg = request.height, request.width, request.batch, request.cfg
        budget = memory.memory_budget()
        with_nets = {"controlnets": True} if request.control_images else {}

        def need(low_memory: bool = self.low_memory, h: int = height, w: int = width, **changes) -> int:
            stages = self.estimate_memory(h, w, images, cfg, request.max_sequence_length, steps, **with_nets,
                                          **changes)
            if low_memory:
                return max(s.peak for s in stages)
            return sum(s.weights for s in stages) + max(s.activations for s in stages)

        required = need()
        if required <= budget:
            return MemoryPlan()
        if need(vae_tiled=True) <= budget:
            log.info("decoding in tiles to fit in %.1f GB", budget / 1e9)
            return MemoryPlan(tile_decode=True)
        options = [("low_memory=True", {"low_memory": True}), ("--quantize 4", {"quantize": 4}),
                   ("--no-t5", {"use_t5": False}), ("--quantize 4 --no-t5", {"quantize": 4, "use_t5": False})]
        multiple = 4 * self.vae_factor * self.transformer_config.patch_size
        for side in range(max(height, width) - multiple, multiple - 1, -multiple):
            h, w = (max(multiple, round(x * side / max(height, width) / multiple) * multiple) for x in (height, width))
            options.append((f"--width {w} --height {h}", {"h": h, "w": w, "vae_tiled": True}))
        fits = next((name for name, changes in options
                     if (not self.low_memory or name != "low_memory=True") and need(**changes) <= budget), None)
        advice = f"it would fit with {fits}" if fits else "use a machine with more memory"
        raise MemoryError(f"this run needs about {required / 1e9:.1f} GB at its peak but {budget / 1e9:.1f} GB "
                          f"are available; {advice}.")

    def _quantizer(self, component: str, bits: int | None) -> Callable[[nn.Module], object] | None:
        """How a component's weights will be quantized when loaded (as stored, or `bits` on the fly), for
        the estimator; reading a component's tensors only reads the safetensors headers."""
        config = read_json(self.root / component / "config.json")
        if config.get("quantization"):
            _, stored = read_component(self.root / component)
            return lambda model: quantize_like(model, stored, config["quantization"])
        return (lambda model: quantized(model, bits)) if bits else None

"""Text (and optionally an image) in, images out: text encoders -> MMDiT + flow-matching Euler -> VAE."""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image
from tqdm import tqdm

from . import memory, sampler
from .clip import CLIPConfig
from .configs import check_model_folder
from .files import read_json
from .hub import resolve_model_dir
from .image_io import load_image, numpy_to_pil, open_rgb
from .mmdit import MMDiT, MMDiTConfig, load_mmdit
from .presets import PRESETS, Preset, SkipLayerGuidance
from .quantization import Quantization, quantized
from .t5 import T5_XXL, T5Config, load_t5
from .text_encoders import TextEncoders
from .vae import Autoencoder, VAEConfig, load_vae
from .weights import quantize_like, read_component

log = logging.getLogger("mlx_flash")

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MANIFEST = "mlx_flash.json"  # a model folder's own description; its "defaults" override the preset's
PACKAGED_MODELS = Path(__file__).parent / "models"  # small models shipped with the package, loaded by name
LOW_MEMORY_BELOW = 32 * 2**30  # machines with less memory load, run and free one component at a time
PRECOMPUTE_MAX_STEPS = 8  # runs this short (without CFG) precompute every adaLN modulation up front


@dataclass(frozen=True)
class StageReport:
    """Wall time and peak memory (bytes, `mx.get_peak_memory`) of one pipeline stage."""

    name: str
    seconds: float
    peak_memory: int


def memory_budget() -> int:
    """Bytes a run may use: Metal's recommended working set, a CUDA GPU's memory, else the machine's RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """float32 on the CPU (half-precision matmul is slow there), bfloat16 on a GPU, unless given."""
    if dtype is None:
        return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
        return DTYPES[dtype]
    return dtype


def default_preset(config: MMDiTConfig, name: str) -> Preset | None:
    """The published model this architecture (and, between same-architecture models, the name) is."""
    lowered = name.lower()
    matches = [
        p for p in PRESETS.values()
        if MMDiTConfig(**{**vars(config), "sample_size": p.transformer.sample_size}) == p.transformer
    ]
    few_step = any(word in lowered for word in ("turbo", "flash"))
    for preset in matches:
        if preset.few_step == few_step:
            return preset
    return matches[0] if matches else None


class Pipeline:
    """An SD3 / SD3.5 model ready to generate. Components load when first needed; with `low_memory` each is
    loaded, run and freed in turn, so the peak is that of the largest stage rather than their sum."""

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        dtype: mx.Dtype,
        quantize: int | None,
        use_t5: bool,
        low_memory: bool,
    ):
        self.root, self.name, self.dtype, self.quantize = root, name, dtype, quantize
        self.low_memory = low_memory
        check_model_folder(root)
        self.transformer_config = MMDiTConfig.from_diffusers(read_json(root / "transformer" / "config.json"))
        self.vae_config = VAEConfig.from_dict(read_json(root / "vae" / "config.json"))
        self.vae_factor = self.vae_config.factor
        self.preset = default_preset(self.transformer_config, name)
        manifest = root / MANIFEST
        self.model_defaults = read_json(manifest).get("defaults", {}) if manifest.exists() else {}
        scheduler_config = root / "scheduler" / "scheduler_config.json"
        self.shift = read_json(scheduler_config).get("shift", 3.0) if scheduler_config.exists() else 3.0
        self.text_encoders = TextEncoders(
            root, dtype, use_t5=use_t5, low_memory=low_memory,
            joint_attention_dim=self.transformer_config.joint_attention_dim,
            loaders={"text_encoder_3": lambda folder, dtype: quantized(load_t5(folder, dtype), self.quantize)},
        )
        self._transformer: MMDiT | None = None
        self._vae: Autoencoder | None = None
        self.vae_tiling: bool | None = None  # None: tiled above the VAE's size threshold or to fit the budget
        self._tile_decode = False  # set when only a tiled VAE decode fits the memory budget
        self.stages: list[StageReport] = []

    # Components -------------------------------------------------------------------------------------------

    @property
    def transformer(self) -> MMDiT:
        if self._transformer is None:
            model = load_mmdit(self.root / "transformer", self.dtype, float32_residual=self.dtype == mx.float16)
            self._transformer = quantized(model, self.quantize)
        return self._transformer

    @property
    def vae(self) -> Autoencoder:
        if self._vae is None:
            self._vae = load_vae(self.root / "vae", self.dtype)
        return self._vae

    def release(self) -> None:
        """Free every loaded component."""
        self.text_encoders.release()
        self._transformer = self._vae = None
        mx.clear_cache()

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        mx.reset_peak_memory()
        start = time.perf_counter()
        yield
        self.stages.append(StageReport(name, time.perf_counter() - start, mx.get_peak_memory()))
        log.info("%s: %.2f s, peak memory %.2f GB", name, self.stages[-1].seconds, self.stages[-1].peak_memory / 1e9)

    # Generation -------------------------------------------------------------------------------------------

    def defaults(self) -> tuple[int, float, SkipLayerGuidance | None]:
        """(steps, guidance scale, skip-layer guidance) this model runs with unless told otherwise: the model
        folder's manifest, else its preset's published settings."""
        p = self.preset
        steps, guidance, slg = (28, 5.0, None) if p is None else (p.num_steps, p.guidance_scale, p.skip_layer_guidance)
        own = self.model_defaults
        if "skip_layer_guidance" in own:
            slg = SkipLayerGuidance(**own["skip_layer_guidance"]) if own["skip_layer_guidance"] else None
        return own.get("num_inference_steps", steps), own.get("guidance_scale", guidance), slg

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
        image: str | Path | Image.Image | None = None,
        strength: float | None = None,
        num_images: int = 1,
        max_sequence_length: int | None = None,
        skip_layer_guidance: SkipLayerGuidance | bool | None = None,
        output_type: str = "pil",
        progress: bool = True,
    ) -> list[Image.Image] | np.ndarray:
        """Generate `num_images` images per prompt.

        Unset sampling arguments take the model's defaults (`defaults()`). Guidance is active iff
        `guidance_scale > 1`; `skip_layer_guidance=False` turns the model's default skip-layer guidance off.
        `latents` (B, 16, H/8, W/8), diffusers' NCHW layout, replaces the seeded initial noise. With `image`,
        runs img2img: the image is encoded and noised to the `strength` level (default 0.6) and only the last
        `strength` fraction of the steps run, as in diffusers. `output_type` "pil" returns PIL images, "np"
        a float32 array (B, H, W, 3) in [0, 1]. `max_sequence_length` (T5 tokens) defaults to the model's (256)."""
        steps_default, guidance_default, slg_default = self.defaults()
        max_sequence_length = max_sequence_length or self.model_defaults.get("max_sequence_length", 256)
        steps = steps_default if num_inference_steps is None else num_inference_steps
        guidance = guidance_default if guidance_scale is None else guidance_scale
        slg = slg_default if skip_layer_guidance in (None, True) else (skip_layer_guidance or None)
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}.")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}.")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}.")
        if image is not None:
            strength = 0.6 if strength is None else strength
            image_pixels = open_rgb(image).size if height is None and width is None else None
            if image_pixels:
                width, height = (s // 16 * 16 for s in image_pixels)
        elif strength is not None:
            raise ValueError("strength only applies to img2img; pass an image too, or drop strength.")
        default_size = self.transformer_config.sample_size * self.vae_factor
        height, width = height or default_size, width or default_size
        self.check_size(height, width)
        sigmas = sampler.flow_sigmas(steps, self.shift)
        start = sampler.img2img_start(steps, strength) if image is not None else 0
        do_cfg = guidance > 1
        if slg is not None and do_cfg:
            bad = [i for i in slg.layers if not 0 <= i < self.transformer_config.num_layers]
            if bad:
                raise ValueError(f"skip-layer guidance layers {bad} do not exist (the model has "
                                 f"{self.transformer_config.num_layers} layers).")

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images
        self.check_memory(height, width, batch, do_cfg, max_sequence_length, steps - start)
        noise = self._initial_noise(batch, height, width, seed, latents)

        self.stages = []
        with self._stage("text encoders"):
            embeds, pooled, neg_embeds, neg_pooled = self.text_encoders.encode(
                prompts, negative_prompt, do_cfg=do_cfg, num_images_per_prompt=num_images,
                max_sequence_length=max_sequence_length,
            )
            mx.eval(embeds, pooled, neg_embeds, neg_pooled)
            if self.low_memory:
                self.text_encoders.release()

        if image is not None:
            with self._stage("image encoder"):
                pixels = mx.array(load_image(image, width, height)).astype(self.dtype)
                mean, _ = self.vae.encode(pixels)  # the posterior mean: img2img is deterministic given the noise
                init = (mean - self.vae.config.shift_factor) * self.vae.config.scaling_factor
                x = sampler.add_noise(mx.repeat(init, batch, axis=0), noise, float(sigmas[start]))
                mx.eval(x)
                if self.low_memory:
                    self._vae = None
                    mx.clear_cache()
        else:
            x = noise
        x = x.astype(self.dtype)

        with self._stage("transformer"):
            x = self._denoise(x, sigmas, start, embeds, pooled, neg_embeds, neg_pooled, guidance,
                              slg if do_cfg else None, progress)
            if self.low_memory:
                self._transformer = None
                mx.clear_cache()

        with self._stage("vae decoder"):
            images = self.vae.latents_to_image(x, tiled=True if self._tile_decode else self.vae_tiling)
            images = mx.clip(images.astype(mx.float32) / 2 + 0.5, 0, 1)
            mx.eval(images)
            if self.low_memory:
                self._vae = None
                mx.clear_cache()
        images = np.array(images)
        return images if output_type == "np" else numpy_to_pil(images)

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless an image of this size can be generated."""
        multiple = self.vae_factor * self.transformer_config.patch_size
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"image size {width}x{height} is not a multiple of {multiple}; "
                             f"use e.g. {width // multiple * multiple or multiple}x{height // multiple * multiple or multiple}.")
        largest = self.transformer_config.pos_embed_max_size * multiple
        if height > largest or width > largest:
            raise ValueError(f"image size {width}x{height} exceeds this model's position table; "
                             f"the largest side is {largest} pixels.")

    def estimate_memory(self, height: int, width: int, images: int = 1, cfg: bool = False,
                        max_sequence_length: int = 256, steps: int | None = None, *, quantize: int | None = None,
                        use_t5: bool | None = None, vae_tiled: bool | None = None) -> list[memory.StageEstimate]:
        """Predicted peak bytes of each stage of a `generate` call of `steps` steps (default: the model's);
        `quantize`, `use_t5` and `vae_tiled` default to this pipeline's settings."""
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
        )

    def check_memory(self, height: int, width: int, images: int, cfg: bool, max_sequence_length: int,
                     steps: int) -> None:
        """Before anything loads: tile the VAE decode if only that makes the run fit the memory budget, else
        raise MemoryError naming a setting that would fit."""
        budget = memory_budget()

        def need(low_memory: bool = self.low_memory, h: int = height, w: int = width, **changes) -> int:
            stages = self.estimate_memory(h, w, images, cfg, max_sequence_length, steps, **changes)
            if low_memory:
                return max(s.peak for s in stages)
            return sum(s.weights for s in stages) + max(s.activations for s in stages)

        required = need()
        self._tile_decode = required > budget and need(vae_tiled=True) <= budget
        if required <= budget:
            return
        if self._tile_decode:
            log.info("decoding in tiles to fit in %.1f GB", budget / 1e9)
            return
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

    def _initial_noise(self, batch: int, height: int, width: int, seed, latents) -> mx.array:
        shape = (batch, height // self.vae_factor, width // self.vae_factor, 16)
        if latents is not None:
            latents = mx.array(latents).astype(mx.float32).transpose(0, 2, 3, 1)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {(batch, 16, shape[1], shape[2])} (B, C, H/8, W/8), "
                                 f"got {tuple(latents.transpose(0, 3, 1, 2).shape)}.")
            return latents
        seeds = image_seeds(seed, batch)
        return mx.stack([mx.random.normal(shape[1:], key=mx.random.key(s)) for s in seeds])

    def _denoise(self, x, sigmas, start, embeds, pooled, neg_embeds, neg_pooled, guidance, slg, progress):
        model, steps, timesteps = self.transformer, len(sigmas) - 1, sampler.flow_timesteps(sigmas)
        if neg_embeds is not None:  # unconditional and conditional halves in one batch
            context, pooled_in = mx.concatenate([neg_embeds, embeds]), mx.concatenate([neg_pooled, pooled])
        else:
            context, pooled_in = embeds, pooled
        modulations = {}
        if neg_embeds is None and steps - start <= PRECOMPUTE_MAX_STEPS:
            # Few-step run: every adaLN vector depends only on (t, pooled); compute them all now, and in
            # low-memory mode free the adaLN weights (a third of the model) before the blocks' weights load.
            modulations = {i: model.modulation(mx.full((x.shape[0],), float(timesteps[i])), pooled)
                           for i in range(start, steps)}
            mx.eval(modulations)
            if self.low_memory:
                model.drop_modulation_weights()
                mx.clear_cache()
        for i in tqdm(range(start, steps), desc="denoising", disable=not progress, leave=False):
            sigma = float(sigmas[i])
            t = mx.full((context.shape[0],), float(timesteps[i]))
            x_in = mx.concatenate([x, x]) if neg_embeds is not None else x
            v = model(x_in, t, context, pooled_in, modulation=modulations.get(i))
            if neg_embeds is not None:
                v_uncond, v_cond = mx.split(v, 2)
                v = sampler.guidance(v_cond, v_uncond, guidance)
                if slg is not None and sampler.slg_active(i, steps, slg.start, slg.stop):
                    v_skip = model(x, t[: x.shape[0]], embeds, pooled, skip_layers=slg.layers)
                    v = sampler.skip_layer_guidance(v, v_cond, v_skip, slg.scale)
            x = sampler.euler_step(x, v, sigma, float(sigmas[i + 1]))
            mx.eval(x)
        return x


def image_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    """One seed per image: a list as given, an int `s` as s, s+1, ...; None draws a random start."""
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31))
    if isinstance(seed, int):
        return [seed + i for i in range(batch)]
    seeds = list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} images; pass one seed, or one per image.")
    return seeds


def load_pipeline(
    model: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    quantize: int | None = None,
    use_t5: bool = True,
    low_memory: bool | None = None,
    revision: str | None = None,
    base: str | Path | None = None,
) -> Pipeline:
    """Load a model for generation.

    `model`: a preset name (`sd3.5-medium`, `sd3.5-large`, `sd3.5-large-turbo`, `sd3-medium`), a model shipped
    with the package (a folder of mlx_flash/models, by its name), a Hugging Face repo id, a local model folder (diffusers or
    mlx-flash layout), or a Stability single-file checkpoint (.safetensors): that is converted once into
    MLX_FLASH_CACHE (default ~/.cache/mlx-flash), taking the tokenizers, scheduler and any text encoder it lacks
    from `base` (a folder or repo id; default: the preset repo of its architecture). `dtype`: "float32" |
    "float16" | "bfloat16" (None: the best for the device). `quantize`: bits (2 to 8) to quantize the transformer and T5 on load, as `mlx-flash convert
    -q --bits N` does (mixed policy, group size 64); components stored quantized load as they are.
    `use_t5=False` never loads T5.
    `low_memory` (default: on below 32 GB of memory) loads, runs and frees one component at a time."""
    name = str(model)
    if (PACKAGED_MODELS / name).is_dir() and not Path(name).exists():
        model = PACKAGED_MODELS / name
    elif name in PRESETS:
        if PRESETS[name].repo_id is None:
            raise ValueError(f"{name}: its weights are not published on the hub yet; pass a local folder.")
        model = PRESETS[name].repo_id
    dtype = resolve_dtype(dtype)
    if Path(name).suffix == ".safetensors" and Path(name).is_file():
        root = _converted_single_file(Path(name), base, use_t5, dtype)
    else:
        dtype_name = next(name for name, value in DTYPES.items() if value == dtype)
        root = resolve_model_dir(model, use_t5=use_t5, revision=revision, dtype=dtype_name)
    if quantize is not None:
        Quantization(quantize)  # raises for unsupported bits
    low_memory = memory_budget() < LOW_MEMORY_BELOW if low_memory is None else low_memory
    return Pipeline(root, name=str(model), dtype=dtype, quantize=quantize, use_t5=use_t5, low_memory=low_memory)


def _converted_single_file(path: Path, base: str | Path | None, use_t5: bool, dtype: mx.Dtype) -> Path:
    """The mlx-flash folder a single-file checkpoint converts to, converting it on first use."""
    from convert import convert

    from .single_file import read_single_file

    stat = path.stat()
    precision = "float32" if dtype == mx.float32 else "bfloat16"
    cache = Path(os.environ.get("MLX_FLASH_CACHE", Path.home() / ".cache" / "mlx-flash"))
    folder = cache / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-{precision}{'' if use_t5 else '-no-t5'}"
    if not folder.exists():
        if base is None:
            config, _ = read_single_file(path)["transformer"]
            preset = default_preset(MMDiTConfig.from_diffusers(config), path.name)
            if preset is None or preset.repo_id is None:
                raise ValueError(f"{path}: no published model has this architecture; pass base= (a diffusers "
                                 "folder or repo id with its tokenizers).")
            base = preset.repo_id
        log.warning("converting %s once into %s", path, folder)
        convert(path, folder, dtype=precision, base=base, use_t5=use_t5)
    return folder

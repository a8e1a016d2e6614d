"""From a model name to a ready `Pipeline`: presets, packaged models, hub repos, local folders and single files."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import mlx.core as mx

from .configs import check_model_folder
from .hub import resolve_controlnet, resolve_model_dir, resolve_weights_dir
from .layout import MANIFEST, dtype_name, parse_dtype, read_json, read_manifest
from .lora import LoRAs
from .memory import memory_budget
from .mmdit import MMDiTConfig
from .pipeline import Pipeline
from .presets import PRESETS, Preset
from .quantization import Quantization

log = logging.getLogger("mlx_flash")

PACKAGED_MODELS = Path(__file__).parent / "models"  # small models shipped with the package, loaded by name
LOW_MEMORY_BELOW = 32 * 2**30  # machines with less memory load, run and free one component at a time


def resolve_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """float32 on the CPU (half-precision matmul is slow there), bfloat16 on a GPU, unless given."""
    if dtype is None:
        return mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def default_preset(config: MMDiTConfig, name: str) -> Preset | None:
    """The published model this architecture (and, between same-architecture models, the repo id or name) is.
    Only presets of a repo's own weights qualify: an adapter's or a replacement transformer's settings apply
    when that preset is named."""
    candidates = [p for p in PRESETS.values() if p.base_weights and config.same_architecture(p.transformer)]
    by_repo = [p for p in candidates if p.repo_id == name]
    if by_repo:
        return by_repo[0]
    few_step = any(word in name.lower() for word in ("turbo", "flash"))
    return next((p for p in candidates if p.few_step == few_step), candidates[0] if candidates else None)


def load_pipeline(
    model: str | Path,
    *,
    dtype: str | mx.Dtype | None = None,
    quantize: int | None = None,
    use_t5: bool | None = None,
    low_memory: bool | None = None,
    revision: str | None = None,
    base: str | Path | None = None,
    loras: Sequence[tuple[str | Path, float] | str | Path] = (),
    transformer: str | Path | None = None,
    controlnets: Sequence[str | Path | tuple[str | Path, float]] = (),
) -> Pipeline:
    """Load a model for generation.

    `model`: a preset name (`sd3.5-medium`, `sd3.5-large`, `sd3.5-large-turbo`, `sd3-medium`), a model shipped
    with the package (a folder of mlx_flash/models, by its name), a Hugging Face repo id, a local model folder
    (diffusers or mlx-flash layout), or a Stability single-file checkpoint (.safetensors): that is converted once
    into MLX_FLASH_CACHE (default ~/.cache/mlx-flash), taking the tokenizers, scheduler and any text encoder it
    lacks from `base` (a folder or repo id; default: the preset repo of its architecture). `dtype`: "float32" |
    "float16" | "bfloat16" (None: the best for the device). `quantize`: bits (2 to 8) to quantize the
    transformer and T5 on load, as `mlx-flash convert -q --bits N` does (mixed policy, group size 64);
    components stored quantized load as they are. `use_t5=False` never loads T5 (default: unless the preset
    was trained without it). `low_memory` (default: on below 32 GB of memory) loads, runs and frees one
    component at a time. `transformer` replaces the model's transformer: a folder of diffusers-named safetensors
    or ORG/NAME/FOLDER on the hub (a release without config.json takes the base's). `mlx-flash models` lists
    the presets; one naming a LoRA or a replacement transformer loads its base with it.
    `loras`: (file, scale) pairs, a file being a .safetensors path or ORG/REPO/FILE.safetensors on the hub, in any
    common naming (diffusers / PEFT, kohya, ComfyUI, OneTrainer); applied unfused to the transformer and text
    encoders, their scales changeable with `pipe.set_lora_scales`. A LoRA that does not fit raises LoRAError.
    `controlnets`: SD3 / SD3.5 ControlNets, each a diffusers folder, a Stability single file (.safetensors) or a
    repo id, alone (scale 1) or as (path_or_repo, conditioning scale); loaded, quantized and freed with the
    transformer."""
    name = str(model)
    named = PRESETS.get(name) if not Path(name).exists() else None
    if (PACKAGED_MODELS / name).is_dir() and not Path(name).exists():
        model, named = PACKAGED_MODELS / name, None
    elif named is not None:
        if named.repo_id is None:
            raise ValueError(f"{name}: its weights are not published on the hub yet; pass a local folder.")
        if named.lora is not None:  # the one place a preset's LoRA is applied: before the user's
            loras = [(named.lora.location, named.lora.scale), *loras]
        model = named.repo_id
        transformer = transformer if transformer is not None else named.transformer_repo
    use_t5 = (named.use_t5 if named is not None else True) if use_t5 is None else use_t5
    dtype = resolve_dtype(dtype)
    if Path(name).suffix == ".safetensors" and Path(name).is_file():
        root = converted_single_file(Path(name), base, use_t5, dtype)
    else:
        root = resolve_model_dir(model, use_t5=use_t5, revision=revision, dtype=dtype_name(dtype))
    check_model_folder(root)
    root, own_transformer, manifest = on_base(root)
    transformer = transformer if transformer is not None else own_transformer
    if quantize is not None:
        Quantization(quantize)  # raises for unsupported bits
    low_memory = memory_budget() < LOW_MEMORY_BELOW if low_memory is None else low_memory
    preset = named or default_preset(MMDiTConfig.from_diffusers(Pipeline.read_transformer_config(root)), name)
    nets = []
    for spec in controlnets:
        net, scale = spec if isinstance(spec, tuple) else (spec, 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"{net}: the ControlNet's conditioning scale must be a number, got {scale!r}.")
        nets.append((str(net), resolve_controlnet(net), float(scale)))
    pipe = Pipeline(root, name=name, dtype=dtype, quantize=quantize, use_t5=use_t5, low_memory=low_memory,
                    preset=preset, shift=named.shift if named is not None else None,
                    transformer=None if transformer is None else replacement_transformer(transformer, root),
                    loras=LoRAs(loras), controlnets=nets, manifest=manifest)
    pipe.check_loras()
    return pipe


def on_base(folder: Path) -> tuple[Path, Path | None, dict]:
    """(components root, its transformer folder, manifest): a folder whose mlx_flash.json names a `base` (a
    packaged model's name, or a folder, relative to this one) holds only its own transformer/ and manifest; the
    tokenizers, text encoders, VAE and scheduler are the base's, and its manifest's entries override the base's.
    Any other folder is its own root (folder, None, its own manifest)."""
    own = read_manifest(folder)
    if "base" not in own:
        return folder, None, own
    name = own["base"]
    base = None
    if isinstance(name, str) and name:
        base = PACKAGED_MODELS / name if (PACKAGED_MODELS / name).is_dir() else (folder / name).resolve()
    if base is None or not base.is_dir() or "base" in (inherited := read_manifest(base)):
        raise ValueError(f"{folder / MANIFEST}: its base {name!r} is not a packaged model or a model folder "
                         "(of its own components); reinstall the model or fix `base`.")
    check_model_folder(base)
    return base, folder / "transformer", inherited | {k: v for k, v in own.items() if k != "base"}


def replacement_transformer(location: str | Path, root: Path) -> Path:
    """The local folder of a replacement transformer, checked to have the base model's architecture."""
    folder = resolve_weights_dir(location)
    if (folder / "config.json").is_file():
        own = MMDiTConfig.from_diffusers(read_json(folder / "config.json"))
        base = MMDiTConfig.from_diffusers(Pipeline.read_transformer_config(root))
        if not own.same_architecture(base):
            raise ValueError(f"{location}: this transformer ({own.num_layers} layers, width {own.hidden_size}) "
                             f"does not fit the base model in {root} ({base.num_layers} layers, width "
                             f"{base.hidden_size}); pass the base it was made from.")
    return folder


def converted_single_file(path: Path, base: str | Path | None, use_t5: bool, dtype: mx.Dtype) -> Path:
    """The mlx-flash folder a single-file checkpoint converts to, converting it on first use."""
    from .convert import convert
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

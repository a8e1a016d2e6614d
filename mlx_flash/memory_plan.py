"""Memory planning for one model folder's runs: the per-stage estimate of a run, and the plan that makes a run fit
the budget (or the one line saying what would)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.nn as nn

from . import memory
from .clip import CLIPConfig
from .components import CLIP_ENCODERS, T5_ENCODER, Components
from .denoise import PRECOMPUTE_MAX_STEPS
from .layout import read_json
from .quantization import quantized
from .request import GenerationRequest
from .t5 import T5_XXL, T5Config
from .weights import quantize_like, read_component

log = logging.getLogger("mlx_flash")

Estimator = Callable[..., list[memory.StageEstimate]]  # Pipeline.estimate_memory's signature


@dataclass(frozen=True)
class MemoryPlan:
    """How a run fits the memory budget: `tile_decode` when only a tiled VAE decode makes it fit."""

    tile_decode: bool = False


def estimate_memory(parts: Components, height: int, width: int, images: int = 1, cfg: bool = False,
                    max_sequence_length: int = 256, steps: int | None = None, *, quantize: int | None = None,
                    use_t5: bool | None = None, vae_tiled: bool | None = None, low_memory: bool | None = None,
                    controlnets: bool = False) -> list[memory.StageEstimate]:
    """Predicted peak bytes of each stage of a run of `steps` steps (default: the model's); `quantize`, `use_t5`,
    `vae_tiled` and `low_memory` default to the parts' settings; `controlnets`: with the ControlNets loaded."""
    root = parts.root
    clips = tuple(CLIPConfig.from_dict(read_json(root / name / "config.json")) for name in CLIP_ENCODERS)
    t5_config = root / T5_ENCODER / "config.json"
    t5 = T5Config.from_dict(read_json(t5_config)) if t5_config.exists() else T5_XXL
    use_t5 = parts.text_encoders.use_t5 if use_t5 is None else use_t5
    bits = parts.quantize if quantize is None else quantize
    steps = steps or parts.sampling_defaults().steps
    low_memory = parts.low_memory if low_memory is None else low_memory
    return memory.estimate(
        parts.transformer_config, parts.vae_config, dtype=parts.dtype, height=height, width=width, images=images,
        cfg=cfg, clips=clips, t5=t5 if use_t5 else None, max_sequence_length=max_sequence_length,
        quantize=_quantizer(parts, "transformer", bits),
        quantize_t5=_quantizer(parts, T5_ENCODER, bits) if use_t5 else None,
        vae_tiled=parts.vae_config.tiles(height // parts.vae_factor, width // parts.vae_factor,
                                         parts.vae_tiling if vae_tiled is None else vae_tiled),
        drop_modulation=low_memory and not cfg and steps <= PRECOMPUTE_MAX_STEPS, low_memory=low_memory,
        adapters=parts.loras.nbytes(parts.dtype),
        controlnets=parts.controlnet_configs if controlnets else (),
    )


def _quantizer(parts: Components, component: str, bits: int | None) -> Callable[[nn.Module], object] | None:
    """How a component's weights will be quantized when loaded (as stored, or `bits` on the fly), for the
    estimator; reading a component's tensors only reads the safetensors headers."""
    config = read_json(parts.root / component / "config.json")
    if config.get("quantization"):
        _, stored = read_component(parts.root / component)
        return lambda model: quantize_like(model, stored, config["quantization"])
    return (lambda model: quantized(model, bits)) if bits else None


def smaller_sizes(height: int, width: int, multiple: int) -> Iterator[tuple[int, int]]:
    """(height, width) of about the same shape, sides multiples of `multiple`, largest first."""
    for side in range(max(height, width) - multiple, multiple - 1, -multiple):
        yield tuple(max(multiple, round(x * side / max(height, width) / multiple) * multiple) for x in (height, width))


def plan_memory(request: GenerationRequest, estimate: Estimator, *, low_memory: bool, multiple: int,
                steps: int | None = None) -> MemoryPlan:
    """Before anything loads: a plan that tiles the VAE decode if only that makes the run fit the memory budget,
    else MemoryError naming a setting that would fit. `multiple`: the smallest step of image sides to suggest."""
    height, width, images, cfg = request.height, request.width, request.batch, request.cfg
    budget = memory.memory_budget()
    with_nets = {"controlnets": True} if request.control_images else {}

    def need(low_memory: bool = low_memory, h: int = height, w: int = width, **changes) -> int:
        stages = estimate(h, w, images, cfg, request.max_sequence_length, steps, low_memory=low_memory,
                          **with_nets, **changes)
        return memory.required_bytes(stages, low_memory)

    required = need()
    if required <= budget:
        return MemoryPlan()
    if need(vae_tiled=True) <= budget:
        log.info("decoding in tiles to fit in %.1f GB", budget / 1e9)
        return MemoryPlan(tile_decode=True)
    options = [("low_memory=True", {"low_memory": True}), ("--quantize 4", {"quantize": 4}),
               ("--no-t5", {"use_t5": False}), ("--quantize 4 --no-t5", {"quantize": 4, "use_t5": False})]
    for h, w in smaller_sizes(height, width, multiple):
        options.append((f"--width {w} --height {h}", {"h": h, "w": w, "vae_tiled": True}))
    fits = next((name for name, changes in options
                 if (not low_memory or name != "low_memory=True") and need(**changes) <= budget), None)
    advice = f"it would fit with {fits}" if fits else "use a machine with more memory"
    raise MemoryError(f"this run needs about {required / 1e9:.1f} GB at its peak but {budget / 1e9:.1f} GB "
                      f"are available; {advice}.")

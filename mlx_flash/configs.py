"""Checks of a model folder's JSON files before anything is built from them: each field a model reads has the
type it must have, else one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

from .clip import CLIP_L
from .files import check_fields
from .layout import MANIFEST, read_json
from .mmdit import MMDiTConfig
from .t5 import T5_XXL
from .vae import VAEConfig

# file (relative to the model folder) -> an example of its fields, with the types they must have
EXAMPLES = {
    "transformer/config.json": MMDiTConfig().to_diffusers(),
    "vae/config.json": VAEConfig().to_dict(),
    "text_encoder/config.json": CLIP_L.to_dict(),
    "text_encoder_2/config.json": CLIP_L.to_dict(),
    "text_encoder_3/config.json": T5_XXL.to_dict(),
    "scheduler/scheduler_config.json": {"shift": 3.0},
    MANIFEST: {"format_version": 1, "t5": True, "components": {}, "defaults": {}},
}
DEFAULTS = {"num_inference_steps": 28, "guidance_scale": 5.0, "max_sequence_length": 256, "skip_layer_guidance": {}}
SKIP_LAYER_GUIDANCE = {"layers": [7], "scale": 2.8, "start": 0.01, "stop": 0.2}


def check_model_folder(root: str | Path) -> None:
    """Raise ValueError naming the file and field for invalid JSON or a wrongly typed field in any of the
    model folder's config files (those present)."""
    root = Path(root)
    for name, example in EXAMPLES.items():
        path = root / name
        if path.is_file():
            config = read_json(path)
            check_fields(config, example, path)
            if name == MANIFEST:
                _check_defaults(config.get("defaults") or {}, path)


def _check_defaults(defaults: dict, path: Path) -> None:
    check_fields(defaults, DEFAULTS, f"{path} (defaults)")
    slg = defaults.get("skip_layer_guidance")
    if slg:
        unknown = sorted(set(slg) - set(SKIP_LAYER_GUIDANCE))
        if unknown:
            raise ValueError(f"{path}: defaults.skip_layer_guidance has unknown field(s) {unknown}; "
                             f"use {', '.join(SKIP_LAYER_GUIDANCE)}.")
        check_fields(slg, SKIP_LAYER_GUIDANCE, f"{path} (defaults.skip_layer_guidance)")

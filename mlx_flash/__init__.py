"""mlx-flash: Stable Diffusion 3 / 3.5 and SD3.5-Flash in MLX.

On an MLX build without a GPU backend, importing it raises MLX's buffer cache limit (memory.keep_freed_buffers)."""

from .callbacks import Cancel, Preview, ProgressBar
from .denoise import (
    Callback,
    Conditioning,
    GenerationStopped,
    NonFiniteError,
    StepState,
)
from .loading import load_pipeline
from .lora import LoRAError
from .memory import keep_freed_buffers
from .pipeline import Pipeline
from .presets import PRESETS, SkipLayerGuidance
from .request import GenerationRequest, GenerationResult, StageReport
from .version import __version__

keep_freed_buffers()

__all__ = [
    "PRESETS", "Callback", "Cancel", "Conditioning", "GenerationRequest", "GenerationResult", "GenerationStopped",
    "LoRAError", "NonFiniteError", "Pipeline", "Preview", "ProgressBar", "SkipLayerGuidance", "StageReport", "StepState",
    "__version__", "load_pipeline",
]

"""mlx-flash: Stable Diffusion 3 / 3.5 and SD3.5-Flash in MLX."""

__version__ = "0.1.0"

from .pipeline import Pipeline, StageReport, load_pipeline  # noqa: E402
from .presets import PRESETS, SkipLayerGuidance  # noqa: E402

__all__ = ["PRESETS", "Pipeline", "SkipLayerGuidance", "StageReport", "load_pipeline", "__version__"]

"""Convert SD3 / SD3.5 checkpoints (hub repo, diffusers folder or single file) to mlx-flash model folders,
optionally quantized: `convert(source, output, ...)`, or `mlx-flash convert` / `python -m convert`."""

from ..quantization import Quantization, quantize_model
from .converter import convert, upload

__all__ = ["Quantization", "convert", "quantize_model", "upload"]

"""Fine-tuning SD3 / SD3.5 models: SD3's rectified-flow objective, datasets of captioned images with cached
latents and prompt embeddings, LoRA (also on quantized bases) or full fine-tuning, resumable runs."""

from .objective import flow_loss, sample_sigmas
from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer", "flow_loss", "sample_sigmas"]

"""mlx-flash: Stable Diffusion 3 / 3.5 and SD3.5-Flash in MLX."""

__version__ = "0.1.0"

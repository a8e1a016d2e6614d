"""Training and distillation of the digit demo models shipped in mlx_flash/models (see README.md)."""

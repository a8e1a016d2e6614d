"""The conversion entry point: `python -m convert SOURCE OUTPUT [options]` (same as `mlx-flash convert`). The
conversion itself lives in `mlx_flash.convert`."""

"""The package version (one copy: pyproject.toml reads it from here)."""

__version__ = "0.1.0"

"""Shared fixtures: tiny random reference models saved in the real layouts (see tiny.py)."""

from pathlib import Path

import pytest
from tiny import make_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random diffusers StableDiffusion3Pipeline (dual attention on layer 0, RMS qk norm), built once."""
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3"), dual_attention_layers=(0,), qk_norm="rms_norm")

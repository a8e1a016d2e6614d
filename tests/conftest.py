"""Shared fixtures: tiny random reference models saved in the real layouts (see tiny.py)."""

import os
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_pipeline

from mlx_flash.blas import CHECKED
from mlx_flash.lanes import Lanes

# The command lines the tests run keep the BLAS of this process (MLX's bundled one) instead of re-executing with
# OpenBLAS preloaded: tests compare their images with this process's byte for byte, and another BLAS (OpenBLAS's
# AVX-512 kernels) sums in another order. (Without OpenBLAS, its one-line hint would also add a line to each.)
os.environ[CHECKED] = "1"


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random diffusers StableDiffusion3Pipeline (dual attention on layer 0, RMS qk norm), built once."""
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3"), dual_attention_layers=(0,), qk_norm="rms_norm")


@pytest.fixture(scope="module")
def torch_single_thread():
    """Torch's thread pool competes with MLX's on small CPUs (4x slower tiny ops): one thread in a module that
    uses this (`pytestmark = pytest.mark.usefixtures("torch_single_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def set_lanes(monkeypatch):
    """A function that sets how many lanes (`mlx_flash.lanes`) inference runs on, for this test."""

    def set_count(count: int) -> None:
        monkeypatch.setattr(Lanes, "for_inference", classmethod(lambda cls, tokens: cls(count)))

    return set_count

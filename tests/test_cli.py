"""The installed `mlx-flash` console script, run in a subprocess on the tiny model."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from mlx_flash import cli
from mlx_flash.image_io import read_metadata


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["mlx-flash", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_generate_writes_png_with_metadata(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out" / "fox.png"
    result = run("generate", "a red fox", "--model", str(tiny_pipeline_dir), "--steps", "2", "--guidance", "2.5",
                 "--width", "64", "--height", "48", "--seed", "42", "--negative-prompt", "blurry",
                 "--output", str(out), "--verbose", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size == (64, 48)
    meta = read_metadata(out)
    assert {k: meta[k] for k in ("prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height")} == {
        "prompt": "a red fox", "negative_prompt": "blurry", "seed": 42, "steps": 2, "guidance": 2.5,
        "width": 64, "height": 48}
    assert meta["model"] == str(tiny_pipeline_dir) and meta["mlx_flash_version"]
    assert "transformer" in result.stderr and "peak" in result.stderr  # --verbose per-stage report
    assert "denoising" in result.stderr  # the progress bar

    info = run("info", str(out))
    assert info.returncode == 0 and json.loads(info.stdout)["seed"] == 42

    again = run("generate", "--prompt", "a red fox", "--model", str(tiny_pipeline_dir), "--steps", "2",
                "--width", "64", "--height", "48", "--seed", "42", "--output", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr

    via_module = subprocess.run(
        [sys.executable, "-m", "mlx_flash", "generate", "a red fox", "--model", str(tiny_pipeline_dir), "--steps",
         "2", "--guidance", "2.5", "--width", "64", "--height", "48", "--seed", "42", "--negative-prompt", "blurry",
         "--output", str(tmp_path / "same.png"), "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert via_module.returncode == 0, via_module.stderr
    assert Image.open(tmp_path / "same.png").tobytes() == Image.open(out).tobytes()  # same seed, same pixels


def test_default_output_is_numbered_not_overwritten(tiny_pipeline_dir, tmp_path):
    args = ("generate", "a boat", "--model", str(tiny_pipeline_dir), "--steps", "1", "--width", "32", "--height", "32")
    assert run(*args, "--num-images", "2", cwd=tmp_path).returncode == 0
    assert run(*args, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["image-0.png", "image-1.png", "image.png"]
    assert read_metadata(tmp_path / "image-1.png")["seed"] == read_metadata(tmp_path / "image-0.png")["seed"] + 1


BAD = [
    (["--width", "72"], "not a multiple of 16"),
    (["--width", "4096"], "position table"),
    (["--steps", "0"], "num_inference_steps must be"),
    (["--image", "{init}", "--strength", "1.5"], "strength must be in (0, 1]"),
    (["--image", "{missing}"], "no such image file"),
    (["--model", "no-such-model"], "neither an existing folder nor a Hugging Face repo id"),
    (["--model", "someone/not-cached-anywhere"], "cannot be reached"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_gives_one_clear_line(tiny_pipeline_dir, tmp_path, extra, message):
    Image.new("RGB", (32, 32)).save(tmp_path / "init.png")
    extra = [e.format(init=tmp_path / "init.png", missing=tmp_path / "missing.png") for e in extra]
    result = run("generate", "a cat", "--model", str(tiny_pipeline_dir), "--steps", "1", "--width", "32",
                 "--height", "32", *extra, "--output", str(tmp_path / "o.png"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "o.png").exists()


def test_gated_repo_without_token(monkeypatch, capsys):
    from huggingface_hub.errors import GatedRepoError
    from test_hub import response

    def gated(*args, **kwargs):
        raise GatedRepoError("403 Client Error: access is restricted", response=response(403))

    monkeypatch.setattr("mlx_flash.hub.snapshot_download", gated)
    assert cli.main(["generate", "x", "--model", "sd3.5-medium"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "HF_TOKEN" in err and "hf auth login" in err
    assert "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium" in err


def test_info_on_a_foreign_png(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = run("info", str(tmp_path / "plain.png"))
    assert result.returncode == 1 and "no mlx-flash metadata" in result.stderr


def test_info_prints_valid_json_even_for_nan(tmp_path):
    from mlx_flash.image_io import save_png

    save_png(Image.new("RGB", (8, 8)), tmp_path / "old.png", {"guidance": float("nan"), "seed": 1, "dtype": "float32"})
    result = run("info", str(tmp_path / "old.png"))
    assert result.returncode == 0 and json.loads(result.stdout) == {"guidance": "nan", "seed": 1, "dtype": "float32"}

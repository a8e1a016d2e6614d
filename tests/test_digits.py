"""The demo models shipped with the package (mlx_flash/models): they load by name with their own defaults,
draw the digit the prompt asks for, as an independent classifier of real digits sees it, and the README's
first command runs offline."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_flash import load_pipeline
from mlx_flash.blas import CHECKED
from mlx_flash.image_io import read_metadata
from mlx_flash.layout import read_manifest
from mlx_flash.loading import PACKAGED_MODELS
from mlx_flash.preview import model_latent_rgb
from mlx_flash.taesd import load_tiny_autoencoder, tiny_autoencoder_source
from training.digits_data import WORDS, held_out_classifier, to_digits


@pytest.fixture(scope="module")
def digit_classifier():
    return held_out_classifier()


@pytest.mark.parametrize("name, steps, guidance", [("digits", 28, 1.5), ("digits-flash", 4, 1.0)])
@pytest.mark.parametrize("quantize", [None, 4])
def test_shipped_model_draws_the_digits_asked_for(name, steps, guidance, quantize, digit_classifier):
    pipe = load_pipeline(name, dtype="float32", quantize=quantize)
    assert pipe.defaults()[:2] == (steps, guidance)
    config = pipe.transformer_config
    assert config.qk_norm and config.dual_attention_layers and config.hidden_size % 64 == 0  # an MMDiT-X

    images = pipe.generate([f"a handwritten digit {word}" for word in WORDS], seed=0, output_type="np", progress=False)
    assert images.shape == (10, 64, 64, 3)
    predicted = digit_classifier.predict(to_digits(images).reshape(10, -1))
    assert (predicted == np.arange(10)).sum() >= 9, predicted


def test_shipped_models_fit_in_20_mb():
    files = [f for name in ("digits", "digits-flash") for f in (PACKAGED_MODELS / name).rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    print(f"shipped digit models: {size / 1e6:.1f} MB")
    assert size <= 20e6


def test_readme_first_command(tmp_path, digit_classifier):
    """`mlx-flash generate --model digits "a handwritten digit seven"` (seeded here), offline, from any directory."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    first = next(line for line in readme.splitlines() if "mlx-flash " in line)
    assert 'mlx-flash generate --model digits "a handwritten digit seven"' in first
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["mlx-flash", "generate", "--model", "digits", "a handwritten digit seven", "--seed", "0"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "image.png")
    assert read_metadata(tmp_path / "image.png")["prompt"] == "a handwritten digit seven"
    pixels = np.asarray(image.convert("RGB"), np.float32)[None] / 255
    assert digit_classifier.predict(to_digits(pixels).reshape(1, -1))[0] == 7


def blas_unchecked_env() -> dict[str, str]:
    """This process's environment without conftest's BLAS guard: a child that calls `ensure_openblas` (the training
    scripts do) preloads OpenBLAS where it is installed. For children whose results nothing compares with this
    process's byte for byte."""
    return {k: v for k, v in os.environ.items() if k != CHECKED}


def run_stages(stages: list[list], root: Path) -> None:
    """Run each training script's command line from the repository root, with OpenBLAS (`blas_unchecked_env`); each
    must succeed."""
    env = blas_unchecked_env()
    for stage in stages:
        result = subprocess.run([sys.executable, *map(str, stage)], cwd=root, capture_output=True, text=True,
                                timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-2000:]


def test_training_scripts_run_end_to_end(tmp_path):
    """The four training stages, a few steps each, write complete model folders that the pipeline loads (the
    shipped weights come from the same scripts at their default lengths; see training/README.md)."""
    root = Path(__file__).resolve().parents[1]
    teacher, student = tmp_path / "digits", tmp_path / "digits-flash"
    stages = [
        ["training/train_vae.py", "--out", teacher, "--steps", "2", "--preview", tmp_path / "vae.png"],
        ["training/train_digits.py", "--model", teacher, "--steps", "2", "--preview", tmp_path / "teacher.png"],
        ["training/distill_digits.py", "--teacher", teacher, "--out", student, "--pairs", "20", "--steps", "2",
         "--batch", "4", "--preview", tmp_path / "student.png"],
        ["training/train_taesd.py", "--models", teacher, student, "--steps", "2", "--batch", "2", "--pool", "8",
         "--fit", "8", "--held-out", "4"],
    ]
    run_stages(stages, root)
    for folder, steps in ((teacher, 28), (student, 4)):
        pipe = load_pipeline(folder, dtype="float32")
        assert pipe.defaults()[0] == steps
        image = pipe.generate("the number 3", seed=0, output_type="np", progress=False)
        assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
        tiny = load_tiny_autoencoder(tiny_autoencoder_source(folder, pipe.vae.config), mx.float32)
        assert tiny.decode(mx.zeros((1, 8, 8, 16))).shape == (1, 64, 64, 3)
        assert model_latent_rgb(read_manifest(folder), pipe.vae.config) is not None


def test_a_model_on_a_base_loads_as_the_full_folder(tmp_path):
    """A folder of a transformer and a manifest naming a `base` generates what the full folder does, with its own
    defaults; a broken base is one clear error."""
    import json
    import shutil

    from training.common import make_model_on_base

    full = tmp_path / "full"
    shutil.copytree(PACKAGED_MODELS / "digits", full)
    shutil.rmtree(full / "transformer")
    shutil.copytree(PACKAGED_MODELS / "digits-flash" / "transformer", full / "transformer")
    own = read_manifest(PACKAGED_MODELS / "digits-flash")
    (full / "mlx_flash.json").write_text(json.dumps(own | {"defaults": own["defaults"] | {"num_inference_steps": 3}}))
    slim = tmp_path / "slim"
    shutil.copytree(full, slim)
    make_model_on_base(slim, "digits")
    assert sorted(p.name for p in slim.iterdir()) == ["mlx_flash.json", "transformer"]
    assert read_manifest(slim)["base"] == "digits"

    images = {}
    for folder in (full, slim):
        pipe = load_pipeline(folder, dtype="float32")
        assert pipe.defaults()[:2] == (3, own["defaults"]["guidance_scale"])
        images[folder] = pipe.generate("a handwritten digit four", seed=5, output_type="np", progress=False)
    np.testing.assert_array_equal(images[full], images[slim])

    for base, message in (("no-such-model", "is not a packaged model"), (str(slim), "is not a packaged model")):
        (slim / "mlx_flash.json").write_text(json.dumps({"base": base}))
        with pytest.raises(ValueError, match=message):
            load_pipeline(slim)
    (full / "mlx_flash.json").write_text(json.dumps({"base": "digits"}))
    shutil.rmtree(full / "transformer")
    with pytest.raises(ValueError, match="no model_index.json or transformer/"):
        load_pipeline(full)
    with pytest.raises(ValueError, match="differs from digits'"):
        make_model_on_base(_changed_copy(tmp_path), "digits")


def _changed_copy(tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "changed"
    shutil.copytree(PACKAGED_MODELS / "digits", folder)
    config = folder / "vae" / "config.json"
    config.write_text(config.read_text().replace("}", ', "note": 1}', 1))
    return folder


def test_the_seed_soup_is_the_mean_of_every_weight():
    """distill_digits_flash.py's students of several seeds become one model: each weight their mean."""
    from mlx.utils import tree_flatten

    from mlx_flash.mmdit import load_mmdit
    from training.distill_digits_flash import averaged

    folders = [PACKAGED_MODELS / name / "transformer" for name in ("digits", "digits-flash", "digits")]
    weights = [dict(tree_flatten(load_mmdit(f, mx.float32).parameters())) for f in folders]
    soup = dict(tree_flatten(averaged([load_mmdit(f, mx.float32) for f in folders]).parameters()))
    assert soup.keys() == weights[0].keys()
    for key, value in soup.items():
        expected = (2 * np.array(weights[0][key]) + np.array(weights[1][key])) / 3
        np.testing.assert_allclose(np.array(value), expected, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(weights[0][k], weights[1][k]) for k in soup)  # the two models differ

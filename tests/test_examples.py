"""The example scripts run end to end on the tiny model."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str, cwd: Path) -> None:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr


def test_examples(tiny_pipeline_dir, tmp_path):
    model = ["--model", str(tiny_pipeline_dir)]
    run("txt2img.py", "a fox", *model, "--steps", "2", "--size", "32", cwd=tmp_path)
    assert Image.open(tmp_path / "txt2img.png").size == (32, 32)
    run("img2img.py", str(tmp_path / "txt2img.png"), "a wolf", *model, "--steps", "2", cwd=tmp_path)
    assert Image.open(tmp_path / "img2img.png").size == (32, 32)
    run("in_an_mlx_program.py", "a pond", *model, "--frames", "3", "--size", "32", cwd=tmp_path)
    assert Image.open(tmp_path / "interpolation.png").size == (96, 32)

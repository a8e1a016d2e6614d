"""No traceback reaches a command-line user (issue #12, item 4): the console script, in subprocesses, answers every
fault with exactly one line on stderr, the right exit code, and no file written."""

import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
from PIL import Image

HOOKS = Path(__file__).parent / "hooks"  # sitecustomize: MLX_FLASH_TEST_SIGINT sends a real SIGINT


def run(*args, cwd=None, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(["mlx-flash", *args], capture_output=True, cwd=cwd, env=environment, timeout=300)


def one_line(result: subprocess.CompletedProcess, code: int, *phrases: str) -> str:
    """The only stderr line (progress-bar redraws, which end in a carriage return, left out), checked."""
    stderr = result.stderr.decode("utf-8", "replace")
    lines = [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert result.returncode == code, stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def generate(model, out: Path, *extra, **env) -> subprocess.CompletedProcess:
    return run("generate", "a red fox", "--model", str(model), "--steps", "2", "--width", "32", "--height", "32",
               "--dtype", "float32", "--output", str(out), *extra, **env)


@pytest.mark.parametrize("argv, prog", [
    (["generate", "x", "--steps", "many"], "mlx-flash generate"),
    (["generate", "x", "--quantize", "7"], "mlx-flash generate"),
    (["convert"], "mlx-flash convert"),
    (["info"], "mlx-flash info"),
    ([], "mlx-flash"),
    (["paint"], "mlx-flash"),
])
def test_argument_errors_are_one_line_with_a_pointer_to_help(argv, prog):
    line = one_line(run(*argv), 2, f"{prog}: error: ", f"see `{prog} --help`")
    assert "usage:" not in line


@pytest.mark.parametrize("option", [None, "--prompt", "--negative-prompt"])
def test_prompts_that_are_not_utf8(tiny_pipeline_dir, tmp_path, option):
    bad = b"a caf\xe9 at dusk"  # Latin-1, not UTF-8
    args = [b"x", b"--prompt", bad] if option == "--prompt" else [bad]
    if option == "--negative-prompt":
        args += [b"--negative-prompt", bad]
        args[0] = b"a cafe"
    result = subprocess.run([b"mlx-flash", b"generate", *args, b"--model", bytes(tiny_pipeline_dir), b"--output",
                             bytes(tmp_path / "o.png")], capture_output=True, timeout=300)
    one_line(result, 1, "not valid UTF-8", (option or "the prompt"))
    assert not list(tmp_path.iterdir())


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit RGB) and whose pixel data is almost empty."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9000, 10000, 100000])  # our limit, Pillow's warning, Pillow's error
def test_decompression_bombs(tiny_pipeline_dir, tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(png_header(side, side))
    out = tmp_path / "o.png"
    one_line(generate(tiny_pipeline_dir, out, "--image", str(tmp_path / "bomb.png")), 1, "bomb.png", "too large",
             "downscale")
    assert not out.exists()


def broken_model(source: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    """A hard-linked copy of a model folder with one file replaced."""
    folder = tmp_path / "model"
    shutil.copytree(source, folder, copy_function=os.link)
    (folder / name).unlink(missing_ok=True)
    (folder / name).write_bytes(content)
    return folder


def edited_json(source: Path, name: str, **changes) -> bytes:
    import json

    return json.dumps({**json.loads((source / name).read_text()), **changes}).encode()


CORRUPT = {
    "transformer JSON": ("transformer/config.json", lambda src: b'{"num_layers": 3,', ["invalid JSON", "line 1"]),
    "VAE field type": ("vae/config.json", lambda src: edited_json(src, "vae/config.json", scaling_factor="big"),
                       ["'scaling_factor' must be a number, got 'big'"]),
    "transformer field type": ("transformer/config.json",
                               lambda src: edited_json(src, "transformer/config.json", num_layers=3.5),
                               ["'num_layers' must be an integer, got 3.5"]),
    "CLIP list": ("text_encoder_2/config.json", lambda src: b"[1, 2]", ["expected a JSON object"]),
    "T5 not UTF-8": ("text_encoder_3/config.json", lambda src: b'{"d_model": "\xff"}', ["not UTF-8"]),
    "manifest defaults": ("mlx_flash.json", lambda src: b'{"defaults": {"num_inference_steps": "4"}}',
                          ["defaults", "'num_inference_steps' must be an integer"]),
    "manifest guidance": ("mlx_flash.json", lambda src: b'{"defaults": {"skip_layer_guidance": {"layer": [7]}}}',
                          ["unknown field(s) ['layer']"]),
    "scheduler": ("scheduler/scheduler_config.json", lambda src: b'{"shift": "3"}', ["'shift' must be a number"]),
    "tokenizer config": ("tokenizer/tokenizer_config.json", lambda src: b"{", ["invalid JSON"]),
    "tokenizer pad": ("tokenizer_2/tokenizer_config.json", lambda src: b'{"pad_token": 0}',
                      ["'pad_token' must be a string"]),
    "tokenizer.json": ("tokenizer_3/tokenizer.json", lambda src: b'{"version": "1.0"}',
                       ["not a readable tokenizer file"]),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_broken_model_files_name_the_file_and_field(tiny_pipeline_dir, tmp_path, case):
    name, content, phrases = CORRUPT[case]
    model = broken_model(tiny_pipeline_dir, tmp_path, name, content(tiny_pipeline_dir))
    out = tmp_path / "o.png"
    one_line(generate(model, out), 1, "mlx-flash: error: ", str(model / name), *phrases)
    assert not out.exists()


def test_broken_pipe_on_info(tmp_path):
    from mlx_flash.image_io import save_png

    save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", {"prompt": "a long prompt " * 500})
    process = subprocess.Popen(["mlx-flash", "info", str(tmp_path / "x.png")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before anything is written, as with `| head -c1`
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=300) == 141 and stderr == "", stderr

    piped = subprocess.run(f"set -o pipefail; mlx-flash info {tmp_path / 'x.png'} | head -c1", shell=True,
                           capture_output=True, text=True, executable="/bin/bash", timeout=300)
    assert piped.stdout == "{" and "Traceback" not in piped.stderr and piped.returncode in (0, 141)


def test_ctrl_c_during_generate(tiny_pipeline_dir, tmp_path):
    old = tmp_path / "old.png"
    Image.new("RGB", (32, 32), "red").save(old)
    before = old.read_bytes()
    result = generate(tiny_pipeline_dir, old, "--force", PYTHONPATH=f"{HOOKS}:{os.environ.get('PYTHONPATH', '')}",
                      MLX_FLASH_TEST_SIGINT="mlx_flash.mmdit:MMDiT.__call__")
    one_line(result, 130, "interrupted")
    assert old.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]


def test_ctrl_c_during_convert(tiny_pipeline_dir, tmp_path):
    result = run("convert", str(tiny_pipeline_dir), str(tmp_path / "out"), "--dtype", "float32",
                 PYTHONPATH=f"{HOOKS}:{os.environ.get('PYTHONPATH', '')}",
                 MLX_FLASH_TEST_SIGINT="mlx_flash.weights:write_safetensors")
    one_line(result, 130, "interrupted")
    assert not list(tmp_path.iterdir())  # neither the output nor its .partial folder


def test_unexpected_errors_are_one_line(tiny_pipeline_dir, tmp_path):
    """An error no message was written for (a bug) still reaches the user as one line; MLX_FLASH_DEBUG=1
    shows its traceback."""
    out = tmp_path / "o.png"
    hook = dict(PYTHONPATH=f"{HOOKS}:{os.environ.get('PYTHONPATH', '')}",
                MLX_FLASH_TEST_RAISE="mlx_flash.mmdit:MMDiT.__call__")
    one_line(generate(tiny_pipeline_dir, out, **hook), 1, "mlx-flash: error: unexpected RuntimeError: ",
             "something deep inside failed", "MLX_FLASH_DEBUG=1")
    assert "Traceback" in generate(tiny_pipeline_dir, out, **hook, MLX_FLASH_DEBUG="1").stderr.decode()
    assert not out.exists()

"""The generation loop's seams: requests and results, callbacks that watch and stop, output types, threads,
settings read back from an image (`--from`), Ctrl-C, and the module graph."""

import ast
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from mlx_flash import Callback, GenerationStopped
from mlx_flash.image_io import read_metadata

SIZE = dict(height=32, width=48)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False)


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None):
        self.states, self.started, self.ended, self.stop_after = [], None, False, stop_after

    def on_start(self, num_steps, start):
        self.started = (num_steps, start)

    def on_step(self, state):
        self.states.append(state)
        return self.stop_after is None or state.index + 1 < self.stop_after

    def on_end(self):
        self.ended = True


def test_step_states_and_result(pipe):
    recorder = Recorder()
    request = pipe.request("a fox", num_inference_steps=4, guidance_scale=1.0, seed=3, **SIZE)
    result = pipe.run(request, callbacks=[recorder])
    assert recorder.started == (4, 0) and recorder.ended and [s.index for s in recorder.states] == [0, 1, 2, 3]
    for state in recorder.states:
        assert np.allclose(np.array(state.x0), np.array(state.x - state.sigma * state.v), atol=1e-6)
        assert state.timestep == pytest.approx(state.sigma * 1000)
    assert np.array_equal(np.array(recorder.states[-1].x_next), np.array(result.latents))
    assert recorder.states[-1].sigma_next == 0.0
    assert result.seeds == (3,) and [s.name for s in result.stages] == ["text encoders", "transformer", "vae decoder"]
    meta = result.metadata(0)
    assert meta["seed"] == 3 and meta["steps"] == 4 and meta["sampler"] == "euler" and meta["dtype"] == "float32"
    assert meta["model_fingerprint"] and meta["t5"] is True and meta["quantize"] is None


def test_callback_returning_false_stops_after_that_step(pipe):
    recorder, watcher = Recorder(stop_after=2), Recorder()
    with pytest.raises(GenerationStopped, match="after step 2 of 4"):
        pipe.generate("a fox", num_inference_steps=4, guidance_scale=1.0, callbacks=[recorder, watcher],
                      progress=False, **SIZE)
    assert [s.index for s in recorder.states] == [0, 1] and [s.index for s in watcher.states] == [0, 1]
    assert recorder.ended and watcher.ended
    # Nothing of the stopped call leaks into the next one.
    again = pipe.generate("a fox", num_inference_steps=4, guidance_scale=1.0, seed=0, output_type="np",
                          progress=False, **SIZE)
    assert again.shape == (1, 32, 48, 3)


def test_output_types(pipe):
    settings = dict(num_inference_steps=2, guidance_scale=1.0, seed=5, progress=False, **SIZE)
    as_np = pipe.generate("a cat", output_type="np", **settings)
    as_mlx = pipe.generate("a cat", output_type="mlx", **settings)
    latents = pipe.generate("a cat", output_type="latent", **settings)
    assert isinstance(as_mlx, mx.array) and np.array_equal(np.array(as_mlx), as_np)
    assert isinstance(latents, mx.array) and latents.shape == (1, 16, 4, 6)
    decoded = pipe.vae.latents_to_image(latents.transpose(0, 2, 3, 1), tiled=False)
    assert np.allclose(np.clip(np.array(decoded) / 2 + 0.5, 0, 1), as_np, atol=1e-6)


def test_threads_share_one_pipeline(pipe):
    settings = dict(num_inference_steps=2, guidance_scale=2.0, output_type="np", progress=False, **SIZE)
    expected = {seed: pipe.generate("a boat", seed=seed, **settings) for seed in (1, 2, 3, 4)}
    got = {}
    threads = [threading.Thread(target=lambda s=seed: got.__setitem__(s, pipe.generate("a boat", seed=s, **settings)))
               for seed in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(got[s], expected[s]) for s in expected)


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["mlx-flash", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def test_from_makes_the_same_image_again(tiny_pipeline_dir, tmp_path):
    first = tmp_path / "first.png"
    made = cli("generate", "a red fox", "--model", str(tiny_pipeline_dir), "--steps", "3", "--guidance", "2.5",
               "--negative-prompt", "blurry", "--seed", "11", "--width", "48", "--height", "32", "--shift", "2.0",
               "--dtype", "float32", "--output", str(first))
    assert made.returncode == 0, made.stderr
    again = tmp_path / "again.png"
    remade = cli("generate", "--from", str(first), "--output", str(again))
    assert remade.returncode == 0, remade.stderr
    assert np.array_equal(np.asarray(mlx_flash.image_io.open_rgb(first)), np.asarray(mlx_flash.image_io.open_rgb(again)))
    assert read_metadata(first) == read_metadata(again)

    other = tmp_path / "other.png"
    assert cli("generate", "--from", str(first), "--seed", "12", "--output", str(other)).returncode == 0
    changed = {k for k, v in read_metadata(other).items() if read_metadata(first).get(k) != v}
    assert changed == {"seed"}


def test_ctrl_c_stops_with_exit_130_and_writes_nothing(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "never.png"
    process = subprocess.Popen(
        ["mlx-flash", "generate", "a cat", "--model", str(tiny_pipeline_dir), "--steps", "1000", "--width", "32",
         "--height", "32", "--guidance", "1", "--output", str(out)],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seen = ""
    while "denoising" not in seen:  # the progress bar: the loop is running
        char = process.stderr.read(1)
        assert char, "the run ended before the loop started"
        seen += char
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130
    lines = [line.split("\r")[-1] for line in (seen + rest).splitlines() if line.split("\r")[-1].strip()]
    assert lines[-1] == "mlx-flash: interrupted; nothing was written." and "Traceback" not in seen + rest
    assert not out.exists()


def _imports(path: Path, package: str) -> set[str]:
    """Modules of `package` that the module at `path` imports at its top level."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith(package)}


def test_no_import_cycles():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "mlx_flash").rglob("*.py")}
    graph = {name: {t for t in _imports(path, "mlx_flash") if t in files and t != name} for name, path in files.items()}
    # A package's __init__ importing its own submodules is not a cycle through the parent.
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(trail + [nxt])}"
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_no_top_level_convert_package_is_installed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('convert'))"],
                           capture_output=True, text=True, cwd=tmp_path, env=env)
    assert found.stdout.strip() == "None", found.stdout
    via_module = subprocess.run([sys.executable, "-m", "convert", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert via_module.returncode == 0 and "SOURCE" in via_module.stdout.upper()


def test_previews_of_every_step_and_the_tiny_decoder(tmp_path):
    """digits-flash with --preview: one PNG per step, the last close to the final image; --vae tiny is recorded."""
    out, previews = tmp_path / "seven.png", tmp_path / "previews"
    made = cli("generate", "--model", "digits-flash", "the number 7", "--seed", "3", "--preview", str(previews),
               "--output", str(out))
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in previews.iterdir()) == [f"step-00{i}.png" for i in range(1, 5)]
    final = np.asarray(mlx_flash.image_io.open_rgb(out), dtype=np.float64) / 255
    last = np.asarray(mlx_flash.image_io.open_rgb(previews / "step-004.png"), dtype=np.float64) / 255
    difference = np.abs(final - last).mean()
    print(f"\nlast preview vs final image: mean abs difference {difference:.4f} on [0, 1]")
    assert difference < 0.06
    again = cli("generate", "--model", "digits-flash", "the number 7", "--preview", str(previews), "--output",
                str(tmp_path / "x.png"))
    assert again.returncode == 1 and "already holds step previews" in again.stderr
    tiny = tmp_path / "tiny.png"
    assert cli("generate", "--model", "digits-flash", "the number 7", "--seed", "3", "--vae", "tiny", "--output",
               str(tiny)).returncode == 0
    assert read_metadata(tiny)["vae"] == "tiny" and read_metadata(out)["vae"] == "full"
    tiny_pixels = np.asarray(mlx_flash.image_io.open_rgb(tiny), dtype=np.float64) / 255
    assert np.array_equal(tiny_pixels, last)  # the last x0 is the final latent; both decoded by the tiny autoencoder

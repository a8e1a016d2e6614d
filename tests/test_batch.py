"""Batch jobs from prompt files: parsing, seeds and names, resuming, and data-parallel runs under
`mlx.launch --backend ring` on this machine (two ranks on 127.0.0.1), including a rank killed mid-job."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mlx_flash.batch import JobLine, expand, read_prompt_file
from mlx_flash.image_io import read_metadata

MODEL = "digits-flash"
JOB = "".join(f'{{"prompt": "the number {d}"}}\n' for d in range(8))


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def generate(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["mlx-flash", "generate", "--model", MODEL, *args], capture_output=True, text=True,
                          cwd=cwd, env=env(), timeout=600)


LAUNCHERS = {"mlx.launch": ["mlx.launch", "-n", "2", "--backend", "ring", shutil.which("mlx-flash")],
             "mlx-flash launch": ["mlx-flash", "launch", "-n", "2", "--backend", "ring"]}  # MLX's, quieted


def launch(*args, cwd, launcher: str = "mlx.launch") -> subprocess.Popen:
    command = [*LAUNCHERS[launcher], "generate", "--model", MODEL, *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("mlx-flash: error:")]


def test_plain_and_json_lines(tmp_path):
    (tmp_path / "plain.txt").write_text("a seven\n\n# a comment\nthree\n")
    assert [(line.number, line.settings) for line in read_prompt_file(tmp_path / "plain.txt")] == [
        (1, {"prompt": "a seven"}), (4, {"prompt": "three"})]
    (tmp_path / "job.jsonl").write_text('{"prompt": "x", "size": "64x32", "seed": 9, "num_images": 2}\n')
    assert read_prompt_file(tmp_path / "job.jsonl")[0].settings == {"prompt": "x", "width": 64, "height": 32,
                                                                     "seed": 9, "num_images": 2}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"', "job.jsonl:2: not valid JSON"),
    ('{"prompt": "x", "colour": "red"}', "job.jsonl:2: unknown field 'colour'"),
    ('{"negative_prompt": "x"}', 'job.jsonl:2: no "prompt" field'),
    ('{"prompt": "x", "steps": "four"}', 'job.jsonl:2: steps must be int, got "four"'),
    ('{"prompt": "x", "size": "big"}', "job.jsonl:2: size must read WIDTHxHEIGHT"),
    ('["x"]', "job.jsonl:2: expected a JSON object, got list"),
])
def test_malformed_line_is_named_before_anything_runs(tmp_path, line, message):
    (tmp_path / "job.jsonl").write_text('{"prompt": "fine"}\n' + line + "\n")
    result = generate("--prompt-file", "job.jsonl", cwd=tmp_path)
    errors = error_lines(result.stderr)
    assert result.returncode == 1 and len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.jsonl"]


def test_bad_value_in_a_line_is_named_with_its_line(tmp_path):
    (tmp_path / "job.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "x", "steps": 0}\n')
    result = generate("--prompt-file", "job.jsonl", cwd=tmp_path)
    assert result.returncode == 1 and "job.jsonl:2: num_inference_steps must be an integer from 1" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.jsonl"]


def test_seeds_and_names():
    lines = [JobLine(1, {"prompt": "a"}), JobLine(2, {"prompt": "b c", "seed": 50, "num_images": 2}),
             JobLine(3, {"prompt": "d"})]
    images = expand(lines, {"steps": 3}, 10, "out/{index:02d}-{line}-{n}-{seed}-{prompt}.png")
    assert [(i.index, i.seed, str(i.path)) for i in images] == [
        (0, 10, "out/00-1-0-10-a.png"), (1, 50, "out/01-2-0-50-b-c.png"), (2, 51, "out/02-2-1-51-b-c.png"),
        (3, 13, "out/03-3-0-13-d.png")]
    assert images[0].generate == {"prompt": "a", "num_inference_steps": 3}
    with pytest.raises(ValueError, match="include {index}"):
        expand(lines, {}, 0, "same.png")
    with pytest.raises(ValueError, match="unknown field 'colour'"):
        expand(lines, {}, 0, "{colour}.png")


def test_resume_skips_only_matching_files(tmp_path):
    (tmp_path / "job.jsonl").write_text("".join(JOB.splitlines(keepends=True)[:3]))
    assert generate("--prompt-file", "job.jsonl", "--output", "out/{index}.png", cwd=tmp_path).returncode == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "out" / "1.png").unlink()
    again = generate("--prompt-file", "job.jsonl", "--output", "out/{index}.png", cwd=tmp_path)
    assert again.returncode == 1 and "out/0.png already exists" in again.stderr and "--resume" in again.stderr
    resumed = generate("--prompt-file", "job.jsonl", "--output", "out/{index}.png", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0 and resumed.stdout.split() == ["out/1.png"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == first
    other = generate("--prompt-file", "job.jsonl", "--output", "out/{index}.png", "--resume", "--steps", "2",
                     cwd=tmp_path)
    assert other.returncode == 1 and "already exists with other settings" in other.stderr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    (folder / "job.jsonl").write_text(JOB)
    result = generate("--prompt-file", "job.jsonl", "--output", "out/{index}.png", "--steps", "8", cwd=folder)
    assert result.returncode == 0, result.stderr
    return {p.name: p.read_bytes() for p in (folder / "out").iterdir()}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_ranks_make_the_same_files(tmp_path, single_run, launcher):
    (tmp_path / "job.jsonl").write_text(JOB)
    process = launch("--prompt-file", "job.jsonl", "--output", "out/{index}.png", "--steps", "8", cwd=tmp_path,
                     launcher=launcher)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert sorted(stdout.split()) == sorted(f"out/{i}.png" for i in range(8))  # rank 0's output came through
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == single_run
    assert read_metadata(tmp_path / "out" / "5.png")["seed"] == 5


def _rank_process(rank: int, marker: str) -> int | None:
    """The pid of the job's process of `rank` (mlx.launch sets MLX_RANK in each one's environment)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"MLX_RANK={rank}".encode() in environ and marker.encode() in command and b"mlx-flash" in command:
            return int(proc.name)
    return None


def test_a_killed_rank_then_resume_completes_the_set(tmp_path, single_run):
    (tmp_path / "job.jsonl").write_text(JOB)
    options = ["--prompt-file", "job.jsonl", "--output", "out/{index}.png", "--steps", "8"]
    process = launch(*options, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while len(list((tmp_path / "out").glob("*.png"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    pid = _rank_process(1, "job.jsonl")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _, stderr = process.communicate(timeout=600)
    errors = error_lines(stderr)
    assert len(errors) == 1 and "images are missing" in errors[0] and "--resume" in errors[0], stderr
    made = {p.name for p in (tmp_path / "out").iterdir()}
    assert 2 <= len(made) < 8 and {f"{i}.png" for i in range(0, 8, 2)} <= made  # rank 0 finished its share
    resumed = generate(*options, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == single_run


def test_launch_exits_with_the_failing_ranks_status(tmp_path):
    """`mlx-flash launch`: rank 0 refuses the job (a file exists), rank 1 stops with it; mlx.launch alone would exit
    0, this exits 1 with rank 0's one line."""
    (tmp_path / "job.jsonl").write_text(JOB)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "3.png").write_bytes(b"taken")
    result = subprocess.run(["mlx-flash", "launch", "-n", "2", "--backend", "ring", "generate", "--model", MODEL,
                             "--prompt-file", "job.jsonl", "--output", "out/{index}.png"], capture_output=True,
                            text=True, cwd=tmp_path, env=env(), timeout=600)
    errors = error_lines(result.stderr)
    assert result.returncode == 1 and len(errors) == 1 and "out/3.png already exists" in errors[0], result.stderr
    assert (tmp_path / "out" / "3.png").read_bytes() == b"taken"


@pytest.mark.parametrize("argv, options, command", [
    (["-n", "2", "--backend", "ring", "generate", "-n", "1"], ["-n", "2", "--backend", "ring"], ["generate", "-n", "1"]),
    (["--hostfile", "hosts.json", "serve", "--port", "0"], ["--hostfile", "hosts.json"], ["serve", "--port", "0"]),
])
def test_launch_splits_the_launchers_options_from_the_command(argv, options, command):
    from mlx_flash.launch import split

    assert split(argv) == (options, command)


def test_launch_status_is_the_lowest_failed_ranks():
    from mlx_flash.launch import RANK_FAILED, exit_status

    warnings = ["\033[33m[WARN] Node with rank 1 exited with code 1 \033[0m", "[WARN] Node with rank 0 was killed",
                "[WARN] Node with rank 2 exited with code -15"]
    failures = {int(m[1]): None if m[2] is None else int(m[2]) for m in map(RANK_FAILED.search, warnings)}
    assert failures == {1: 1, 0: None, 2: -15}
    assert exit_status(failures) == 1 and exit_status({2: -15}) == 143 and exit_status({}) == 0

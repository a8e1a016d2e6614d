"""`mlx-flash serve` under `mlx-flash launch -n 2 --backend ring` on 127.0.0.1: a request's images, spread over the two
ranks, equal a one-process server's byte for byte; cancel and shutdown reach both ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

from test_batch import _rank_process, env
from test_server import KEY, MODEL, call, events, running_server

BODY = {"model": MODEL, "prompt": "a handwritten digit six", "n": 4, "seed": 7, "size": "64x64"}


def launch_server() -> tuple[subprocess.Popen, object, list[str]]:
    """The two-rank server, its address (for `call`) and its stderr lines so far (collected as they come)."""
    process = subprocess.Popen(["mlx-flash", "launch", "-n", "2", "--backend", "ring", "serve", "--model", MODEL,
                                "--port", "0", "--api-key", KEY, "--max-queue", "4"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    lines: list[str] = []
    while not (match := re.search(r"serving .* over 2 processes on http://127\.0\.0\.1:(\d+)/", "".join(lines))):
        line = process.stderr.readline()
        assert line, "the server ended before serving: " + "".join(lines)
        lines.append(line)
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, type("Address", (), {"server_address": ("127.0.0.1", int(match[1]))}), lines


def test_two_ranks_serve_the_images_of_one_process():
    with running_server() as single:
        status, _, alone = call(single, "POST", "/v1/images/generations", BODY)
        assert status == 200, alone
        status, _, after = call(single, "POST", "/v1/images/generations", {**BODY, "n": 2, "seed": 30})
    process, server, lines = launch_server()
    try:
        status, _, spread = call(server, "POST", "/v1/images/generations", BODY)
        assert status == 200, spread
        assert [item["seed"] for item in spread["data"]] == [7, 8, 9, 10]
        assert [item["b64_json"] for item in spread["data"]] == [item["b64_json"] for item in alone["data"]]

        status, _, job = call(server, "POST", "/v1/jobs", {**BODY, "steps": 4})
        stream = events(server, job["id"])
        assert [d for n, d in stream if n == "step"][-1] == {"step": 8, "steps": 8}  # two rounds of 4 steps
        assert stream[-1][0] == "succeeded"

        status, _, job = call(server, "POST", "/v1/jobs", {**BODY, "steps": 60})  # cancelled in its first round
        deadline = time.monotonic() + 120
        while call(server, "GET", f"/v1/jobs/{job['id']}")[2]["progress"]["step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        call(server, "DELETE", f"/v1/jobs/{job['id']}")
        assert events(server, job["id"])[-1][0] == "cancelled"
        status, _, later = call(server, "POST", "/v1/images/generations", {**BODY, "n": 2, "seed": 30})
        assert status == 200 and [i["b64_json"] for i in later["data"]] == [i["b64_json"] for i in after["data"]]

        assert _rank_process(1, "serve") is not None
        os.kill(_rank_process(0, "serve"), signal.SIGTERM)  # rank 0 stops serving and tells rank 1
        assert process.wait(60) == 0, "".join(lines)
        assert _rank_process(1, "serve") is None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for rank in (0, 1):  # a failed run's ranks would outlive the launcher and be found by later runs
            while (pid := _rank_process(rank, "serve")) is not None:
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)


def test_a_job_travels_to_the_other_ranks_whole():
    """What rank 0 sends: every field of the request, its images (img2img source, inpainting mask) pixel for pixel."""
    import numpy as np
    from PIL import Image

    from mlx_flash.server.cluster import read_spec_message, spec_message
    from mlx_flash.server.spec import ImageSpec

    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 256, (48, 64), dtype=np.uint8))
    spec = ImageSpec(model=MODEL, prompt="a digit", seed=5, n=3, negative_prompt="blur", width=64, height=48, steps=3,
                     guidance=2.5, sampler="euler", image=source, strength=0.6, mask=mask, mask_blur=2.0,
                     padding_mask_crop=8, loras=(("style", 0.7),), output_format="webp", compression=80)
    back, shape = read_spec_message(spec_message(spec, (48, 64)))
    assert shape == (48, 64)
    for name in ("image", "mask"):
        assert getattr(back, name).mode == getattr(spec, name).mode
        assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(spec, name)))
    plain = {"image": None, "mask": None}
    assert ImageSpec(**{**back.__dict__, **plain}) == ImageSpec(**{**spec.__dict__, **plain})

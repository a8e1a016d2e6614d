"""Overhead of `mlx-flash serve` over the in-process Python API, on the packaged digits-flash model (64x64, 4 steps).

    python benchmarks/server.py [--requests 40] [--clients 4]

Starts `mlx-flash serve` in its own process on a free loopback port and, in this process, loads the same model
for the Python API. Latency: `--requests` rounds, each one `pipe.generate(...)` call and one
POST /v1/images/generations (one image, b64_json PNG, keep-alive connection) with the same prompt and seed,
interleaved so that both see the same machine; p50 / p95 of each. Throughput: `--requests` requests from
`--clients` threads at once against the server's one worker, against the same number of API calls in a row.
The server's images are checked equal to the API's. Last line: the ratio of the server's p50 latency to the
API's (target <= 1.10).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402

MODEL = "digits-flash"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def start_server() -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-m", "mlx_flash", "serve", "--model", MODEL, "--port", "0"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = process.stderr.readline()
    if "serving" not in line:
        raise RuntimeError(f"the server did not start: {line}{process.stderr.read()}")
    return process, int(line.rsplit(":", 1)[1].strip(" /\n"))


class Client:
    """One keep-alive connection to the server."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def generate(self, prompt: str, seed: int) -> np.ndarray:
        body = json.dumps({"model": MODEL, "prompt": prompt, "seed": seed, "response_format": "b64_json"})
        self.connection.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        data = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"server answered {response.status}: {data}")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(data["data"][0]["b64_json"]))).convert("RGB"))


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    preload_openblas()

    pipe = load_pipeline(MODEL)
    process, port = start_server()
    try:
        client = Client(port)
        work = [(f"a handwritten digit {WORDS[i % 10]}", i) for i in range(args.requests)]

        def api(prompt: str, seed: int) -> np.ndarray:
            return np.asarray(pipe.generate(prompt, seed=seed, progress=False)[0])

        for prompt, seed in work[:2]:  # warm-up: weights loaded, first-call costs paid on both sides
            assert np.array_equal(api(prompt, seed), client.generate(prompt, seed))
        api_times, server_times = [], []
        for prompt, seed in work:
            start = time.perf_counter()
            expected = api(prompt, seed)
            api_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            got = client.generate(prompt, seed)
            server_times.append(time.perf_counter() - start)
            assert np.array_equal(expected, got), f"server image differs from the API's for seed {seed}"

        start = time.perf_counter()
        for prompt, seed in work:
            api(prompt, seed)
        api_rate = len(work) / (time.perf_counter() - start)
        local = threading.local()  # one keep-alive connection per client thread

        def request(item: tuple[str, int]) -> np.ndarray:
            if not hasattr(local, "client"):
                local.client = Client(port)
            return local.client.generate(*item)

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as threads:
            list(threads.map(request, work))
        server_rate = len(work) / (time.perf_counter() - start)
    finally:
        process.terminate()
        process.wait(60)

    (api_p50, api_p95), (server_p50, server_p95) = percentiles(api_times), percentiles(server_times)
    print(f"{MODEL}, 64x64, 4 steps, {args.requests} requests; server: {args.clients} clients for throughput")
    print(f"{'':22}{'p50 ms':>10}{'p95 ms':>10}{'requests/s':>12}")
    print(f"{'Python API in-process':22}{api_p50 * 1e3:10.1f}{api_p95 * 1e3:10.1f}{api_rate:12.2f}")
    print(f"{'mlx-flash serve':22}{server_p50 * 1e3:10.1f}{server_p95 * 1e3:10.1f}{server_rate:12.2f}")
    paired = float(np.median(np.subtract(server_times, api_times)))  # per round: robust to a busy machine's drift
    print(f"server overhead at p50: {(server_p50 / api_p50 - 1) * 100:+.1f}%, median paired difference "
          f"{paired * 1e3:+.1f} ms; throughput: {(api_rate / server_rate - 1) * 100:+.1f}%")
    print(f"ratio: {server_p50 / api_p50:.3f}")


if __name__ == "__main__":
    main()

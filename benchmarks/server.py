"""Overhead of `mlx-flash serve` over the in-process Python API, on the packaged digits-flash model (64x64, 4 steps).

    python benchmarks/server.py [--requests 40] [--clients 4]

Starts the server (the `serve` command's ImageServer) on a free loopback port on a thread of this process, which
also loads the same model for the Python API: one process, so that both share one BLAS thread pool and neither
pays for the other's idle spinning threads. Latency: `--requests` rounds, each one `pipe.generate(...)` call and
one POST /v1/images/generations (one image, b64_json PNG, keep-alive connection) with the same prompt and seed,
their order alternating between rounds; p50 / p95 of each, and the median of the per-round differences.
Throughput: `--requests` requests from `--clients` threads at once against the server's one worker, against
the same number of API calls in a row. The server's images are checked equal to the API's. Last line: the
median over rounds of the server's time over the API's (paired, so a busy machine's drift cancels; target
<= 1.10).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
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
from mlx_flash.server import ImageServer, ModelOptions, ModelPool  # noqa: E402

MODEL = "digits-flash"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def start_server() -> tuple[ImageServer, int]:
    server = ImageServer(("127.0.0.1", 0), ModelPool([MODEL], ModelOptions()))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


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
    server, port = start_server()
    try:
        client = Client(port)
        work = [(f"a handwritten digit {WORDS[i % 10]}", i) for i in range(args.requests)]

        def api(prompt: str, seed: int) -> np.ndarray:
            return np.asarray(pipe.generate(prompt, seed=seed, progress=False)[0])

        for prompt, seed in work[:2]:  # warm-up: weights loaded, first-call costs paid on both sides
            assert np.array_equal(api(prompt, seed), client.generate(prompt, seed))
        api_times, server_times = [], []
        for i, (prompt, seed) in enumerate(work):
            images = {}
            for side in (("api", "server") if i % 2 == 0 else ("server", "api")):
                start = time.perf_counter()
                images[side] = api(prompt, seed) if side == "api" else client.generate(prompt, seed)
                (api_times if side == "api" else server_times).append(time.perf_counter() - start)
            assert np.array_equal(images["api"], images["server"]), f"the server's image differs for seed {seed}"

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
        server.shutdown()
        server.close()

    (api_p50, api_p95), (server_p50, server_p95) = percentiles(api_times), percentiles(server_times)
    print(f"{MODEL}, 64x64, 4 steps, {args.requests} requests; server: {args.clients} clients for throughput")
    print(f"{'':22}{'p50 ms':>10}{'p95 ms':>10}{'requests/s':>12}")
    print(f"{'Python API in-process':22}{api_p50 * 1e3:10.1f}{api_p95 * 1e3:10.1f}{api_rate:12.2f}")
    print(f"{'mlx-flash serve':22}{server_p50 * 1e3:10.1f}{server_p95 * 1e3:10.1f}{server_rate:12.2f}")
    paired = float(np.median(np.subtract(server_times, api_times)))  # per round: robust to a busy machine's drift
    print(f"server overhead at p50: {(server_p50 / api_p50 - 1) * 100:+.1f}%, median paired difference "
          f"{paired * 1e3:+.1f} ms; throughput: {(api_rate / server_rate - 1) * 100:+.1f}%")
    print(f"ratio: {float(np.median(np.divide(server_times, api_times))):.3f}")


if __name__ == "__main__":
    main()

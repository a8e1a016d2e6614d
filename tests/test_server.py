"""`mlx-flash serve` on a free loopback port with the packaged digit model: the real `openai` client, the bodies
Open WebUI's OpenAI and AUTOMATIC1111 engines send, jobs with events and cancel, concurrency, bad requests, the
web page in headless Chromium, and the command's shutdown. Every image is compared pixel for pixel with the
in-process Python API's for the same seed."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from chromium import Chromium, find_chromium
from PIL import Image

from mlx_flash import load_pipeline
from mlx_flash.server import ImageServer, Limits, ModelOptions, ModelPool

KEY = "test-key"
MODEL = "digits-flash"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@contextmanager
def running_server(*, max_queue: int = 8, options: ModelOptions = ModelOptions(), **limits):
    server = ImageServer(("127.0.0.1", 0), ModelPool([MODEL], options),
                         limits=Limits(**{"api_key": KEY, **limits}), max_queue=max_queue)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield server
    finally:
        server.shutdown()
        server.close(cancel_running=True)


@pytest.fixture(scope="module")
def server():
    with running_server() as server:
        yield server


@pytest.fixture(scope="module")
def reference():
    """The in-process API's pixels (uint8) for (prompt, seed, n, image, strength); call only while the server idles."""
    pipe = load_pipeline(MODEL)

    def generate(prompt: str, seed: int, n: int = 1, **kwargs) -> list[np.ndarray]:
        return [np.asarray(i) for i in pipe.generate(prompt, seed=seed, num_images=n, progress=False, **kwargs)]
    return generate


def call(server, method: str, path: str, body=None, headers: dict | None = None, key: str | None = KEY):
    """(status, headers, parsed JSON or raw bytes) of one request."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=300)
    sent = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        body, sent["Content-Type"] = json.dumps(body).encode(), "application/json"
    sent.update(headers or {})
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    if response.getheader("Content-Type", "").startswith("application/json"):
        data = json.loads(data)
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    """A multipart/form-data body as aiohttp.FormData writes one: text fields, then files."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Disposition: form-data; '
             f'name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Type: {ctype}\r\nContent-Disposition: form-data; name="{name}"; '
              f'filename="{filename}"\r\n\r\n'.encode() + data + b"\r\n" for name, filename, data, ctype in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# The openai client -------------------------------------------------------------------------------------

def test_openai_client_images_equal_the_api_and_the_cli(server, reference, tmp_path):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    prompt = "a handwritten digit four"
    response = client.images.generate(model=MODEL, prompt=prompt, n=2, size="64x64", response_format="b64_json",
                                      extra_body={"seed": 21})
    images = [pixels(item.b64_json) for item in response.data]
    assert [item.seed for item in response.data] == [21, 22]
    expected = reference(prompt, 21, 2)
    assert all(np.array_equal(a, b) for a, b in zip(images, expected, strict=True))
    assert read_metadata_bytes(base64.b64decode(response.data[1].b64_json))["seed"] == 22

    result = subprocess.run(["mlx-flash", "generate", "--model", MODEL, prompt, "--seed", "21", "--num-images", "2",
                             "--output", str(tmp_path / "cli.png")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    for i, image in enumerate(images):
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / f"cli-{i}.png").convert("RGB")))


def read_metadata_bytes(data: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(data)).text["mlx_flash"])


def test_openai_client_models_and_url_responses(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == [MODEL]
    response = client.images.generate(model=MODEL, prompt="a handwritten digit nine", response_format="url",
                                      extra_body={"seed": 3, "output_format": "webp"})
    url = response.data[0].url
    assert url.startswith(server.url + "/v1/jobs/") and url.endswith("/images/0.webp")
    status, headers, data = call(server, "GET", url.removeprefix(server.url))
    assert status == 200 and headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(data)).format == "WEBP"
    assert call(server, "GET", url.removeprefix(server.url), key=None)[0] == 401


def test_quality_sets_the_steps(server):
    for quality, steps in [("low", 2), ("high", 8)]:
        status, _, body = call(server, "POST", "/v1/images/generations",
                               {"prompt": "a handwritten digit one", "quality": quality, "seed": 1})
        assert status == 200, body
        assert read_metadata_bytes(base64.b64decode(body["data"][0]["b64_json"]))["steps"] == steps


# Open WebUI's engines, their requests as its images router builds them -----------------------------------

def test_open_webui_openai_engine(server, reference):
    prompt = "a handwritten digit seven"
    status, _, body = call(server, "POST", "/v1/images/generations",  # generate: json=data, Bearer key
                           {"model": MODEL, "prompt": prompt, "n": 1, "size": "64x64", "response_format": "b64_json"})
    assert status == 200, body
    (item,) = body["data"]
    assert np.array_equal(pixels(item["b64_json"]), reference(prompt, item["seed"])[0])

    source = reference("a handwritten digit three", 5)[0]  # edit: aiohttp.FormData, every field str(value)
    form, content_type = multipart({"model": MODEL, "prompt": prompt, "n": "1", "size": "64x64",
                                    "response_format": "b64_json"},
                                   [("image", f"{uuid.uuid4()}.png", png(source), "image/png")])
    status, _, body = call(server, "POST", "/v1/images/edits", form, {"Content-Type": content_type})
    assert status == 200, body
    (item,) = body["data"]
    expected = reference(prompt, item["seed"], image=Image.fromarray(source), height=64, width=64)[0]
    assert np.array_equal(pixels(item["b64_json"]), expected)


def test_open_webui_automatic1111_engine(server, reference):
    auth = {"authorization": "Basic " + base64.b64encode(f"user:{KEY}".encode()).decode()}
    status, _, options = call(server, "GET", "/sdapi/v1/options", headers=auth, key=None)
    assert status == 200 and options["sd_model_checkpoint"] == MODEL
    status, _, models = call(server, "GET", "/sdapi/v1/sd-models", headers=auth, key=None)
    assert [{"id": m["title"], "name": m["model_name"]} for m in models] == [{"id": MODEL, "name": MODEL}]
    status, _, _ = call(server, "POST", "/sdapi/v1/options", {**options, "sd_model_checkpoint": models[0]["title"]},
                        headers=auth, key=None)
    assert status == 200

    prompt = "a handwritten digit two"
    data = {"prompt": prompt, "batch_size": 2, "width": 64, "height": 64, "steps": 4, "negative_prompt": "blurry"}
    status, _, res = call(server, "POST", "/sdapi/v1/txt2img", data, headers=auth, key=None)
    assert status == 200, res
    info = json.loads(res["info"])
    assert res["parameters"] == data and len(info["all_seeds"]) == 2
    expected = reference(prompt, info["all_seeds"][0], 2, negative_prompt="blurry", num_inference_steps=4)
    assert all(np.array_equal(pixels(a), b) for a, b in zip(res["images"], expected, strict=True))

    source = expected[0]
    status, _, res = call(server, "POST", "/sdapi/v1/img2img",
                          {"init_images": [base64.b64encode(png(source)).decode()], "prompt": "a handwritten digit six",
                           "denoising_strength": 0.75, "seed": 8}, headers=auth, key=None)
    assert status == 200, res
    expected = reference("a handwritten digit six", 8, image=Image.fromarray(source), strength=0.75)[0]
    assert np.array_equal(pixels(res["images"][0]), expected)


# LoRAs and inpainting ----------------------------------------------------------------------------------

def save_digits_lora(path, seed: int, rank: int = 4, std: float = 0.3):
    """Random adapters in diffusers' naming for every attention projection of the digit model's transformer."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    width = 64  # the digit transformer's heads x head dim
    tensors = {}
    for block in range(4):
        for module in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"):
            key = f"transformer.transformer_blocks.{block}.attn.{module}"
            tensors[f"{key}.lora_A.weight"] = (std * rng.standard_normal((rank, width))).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (std * rng.standard_normal((width, rank))).astype(np.float32)
    save_file(tensors, str(path))
    return path


def test_loras_served_by_name_equal_the_api(tmp_path):
    style = save_digits_lora(tmp_path / "style.safetensors", 0)
    detail = save_digits_lora(tmp_path / "detail.safetensors", 1)
    prompt, body = "a handwritten digit five", {"size": "64x64", "seed": 3}

    def api(loras, **kwargs) -> tuple[np.ndarray, dict]:
        """The in-process API's image and metadata with `loras` (and no other) loaded."""
        pipe = load_pipeline(MODEL, loras=loras)
        result = pipe.run(pipe.request(prompt, seed=3, **kwargs))
        return np.asarray(result.images[0]), json.loads(json.dumps(result.metadata(0)))

    with running_server(options=ModelOptions(loras=((str(style), 1.0), (str(detail), 0.5)))) as served:
        answers = {}
        for case, loras in {"start scales": None, "style at 0.7": [{"name": "style", "scale": 0.7}],
                            "none": [], "detail as text": ["detail:0.25"]}.items():
            status, _, answer = call(served, "POST", "/v1/images/generations",
                                     {**body, "prompt": prompt, **({} if loras is None else {"loras": loras})})
            assert status == 200, (case, answer)
            answers[case] = base64.b64decode(answer["data"][0]["b64_json"])
        status, _, answer = call(served, "POST", "/v1/images/generations",
                                 {**body, "prompt": prompt, "loras": [{"name": "sharp", "scale": 1}]})
        assert status == 400 and answer["error"]["param"] == "loras", answer
        assert answer["error"]["message"] == ("unknown LoRA 'sharp'; this server was started with: style, detail "
                                              "(--lora).")
        status, _, answer = call(served, "POST", "/v1/images/generations",
                                 {**body, "prompt": prompt, "loras": [{"name": str(style), "scale": 1}]})
        assert status == 400 and "unknown LoRA" in answer["error"]["message"]  # a path is no name
        source = np.asarray(Image.new("RGB", (64, 64), (200, 30, 90)))
        form, content_type = multipart({"prompt": prompt, "seed": "3", "loras": '[{"name": "style", "scale": 0.7}]'},
                                       [("image", "in.png", png(source), "image/png")])
        status, _, answer = call(served, "POST", "/v1/images/edits", form, {"Content-Type": content_type})
        assert status == 200, answer
        answers["edit"] = base64.b64decode(answer["data"][0]["b64_json"])

    expected = {"start scales": [(style, 1.0), (detail, 0.5)], "style at 0.7": [(style, 0.7)], "none": [],
                "detail as text": [(detail, 0.25)]}
    for case, loras in expected.items():  # each request ran on a pipeline with its own LoRA set, as the API's
        image, metadata = api(loras)
        assert np.array_equal(pixels(answers[case]), image), case
        assert read_metadata_bytes(answers[case]) == metadata, case
    assert np.array_equal(pixels(answers["edit"]), api([(style, 0.7)], image=Image.fromarray(source))[0])
    assert not np.array_equal(pixels(answers["style at 0.7"]), pixels(answers["none"]))  # the LoRA changes pixels
    assert read_metadata_bytes(answers["style at 0.7"])["loras"] == [{"source": str(style), "scale": 0.7}]


def test_pipelines_kept_by_lora_set_within_the_memory_budget(tmp_path, monkeypatch):
    """One pipeline per LoRA set, its LoRAs rescaled per request without reloading; with a budget for only some of
    them, the least recently used is dropped before the next runs and its memory returned."""
    import weakref

    import mlx.core as mx

    files = {name: str(save_digits_lora(tmp_path / f"{name}.safetensors", seed))
             for seed, name in enumerate(["style", "detail"])}
    pool = ModelPool([MODEL], ModelOptions(low_memory=False, loras=((files["style"], 1.0), (files["detail"], 0.5))))
    request = pool.pipeline(MODEL).request("a handwritten digit five", seed=3)
    sets = {"none": (), "style": (("style", 1.0),), "both": (("style", 0.7), ("detail", 0.5))}
    pipes = {}
    for case, loras in sets.items():
        pipes[case] = pool.acquire(MODEL, loras, request)
        pipes[case].run(request)
    assert [key.loras for key in pool.loaded] == [(), ("style",), ("style", "detail")]
    assert [pipes[case].loras.sources for case in sets] == [[], [files["style"]], [files["style"], files["detail"]]]
    assert pool.acquire(MODEL, (("style", 0.25),), request) is pipes["style"]  # rescaled, not reloaded
    assert pipes["style"].loras.scales.values == [0.25] and pipes["style"]._transformer is not None
    assert [key.loras for key in pool.loaded] == [(), ("style", "detail"), ("style",)]

    detail = (("detail", 0.5),)
    key = pool.key(MODEL, detail)
    need = pool._need(key, pool.pipeline(MODEL, detail), request)
    kept = {loras: pool._kept(pool.key(MODEL, sets[case])) for case, loras in [("both", 2), ("style", 1)]}
    monkeypatch.setattr("mlx_flash.server.models.memory_budget", lambda: kept[1] + kept[2] + need)
    transformer, dropped = weakref.ref(pipes.pop("none")._transformer), pool._kept(pool.key(MODEL))
    active = mx.get_active_memory()
    pool.acquire(MODEL, detail, request)
    assert [key.loras for key in pool.loaded] == [("style", "detail"), ("style",), ("detail",)]
    freed = active - mx.get_active_memory()
    assert transformer() is None and mx.get_cache_memory() == 0 and freed > 0.9 * dropped


def square_mask(transparent: bool) -> Image.Image:
    """A 64x64 mask marking the square [16, 48)^2: OpenAI's (that square transparent) or ours (that square white)."""
    inside = np.zeros((64, 64), bool)
    inside[16:48, 16:48] = True
    if transparent:
        rgba = np.full((64, 64, 4), 255, np.uint8)
        rgba[inside, 3] = 0
        return Image.fromarray(rgba)
    return Image.fromarray(np.where(inside, 255, 0).astype(np.uint8))


def png_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_masks_inpaint_as_the_api(server, reference):
    source = reference("a handwritten digit eight", 4)[0]
    prompt, white = "a handwritten digit one", square_mask(False)
    form, content_type = multipart({"prompt": prompt, "size": "64x64", "seed": "9", "strength": "0.9"},
                                   [("image", "in.png", png(source), "image/png"),
                                    ("mask", "mask.png", png_of(square_mask(True)), "image/png")])
    status, _, body = call(server, "POST", "/v1/images/edits", form, {"Content-Type": content_type})
    assert status == 200, body
    expected = reference(prompt, 9, image=Image.fromarray(source), mask=white, strength=0.9)[0]
    assert np.array_equal(pixels(body["data"][0]["b64_json"]), expected)
    assert not np.array_equal(expected, reference(prompt, 9, image=Image.fromarray(source), strength=0.9)[0])

    black = Image.fromarray(255 - np.asarray(white))  # A1111: white repaints; inverted, the black square does
    status, _, res = call(server, "POST", "/sdapi/v1/img2img",
                          {"init_images": [base64.b64encode(png(source)).decode()], "prompt": prompt, "seed": 9,
                           "denoising_strength": 0.9, "mask": base64.b64encode(png_of(black)).decode(),
                           "inpainting_mask_invert": 1, "mask_blur": 2})
    assert status == 200, res
    expected = reference(prompt, 9, image=Image.fromarray(source), mask=white, mask_blur=2, strength=0.9)[0]
    assert np.array_equal(pixels(res["images"][0]), expected)

    status, _, res = call(server, "POST", "/sdapi/v1/img2img",  # "only masked": a crop around the mask
                          {"init_images": [base64.b64encode(png(source)).decode()], "prompt": prompt, "seed": 9,
                           "mask": base64.b64encode(png_of(white)).decode(), "inpaint_full_res": True,
                           "inpaint_full_res_padding": 4})
    assert status == 200, res
    expected = reference(prompt, 9, image=Image.fromarray(source), mask=white, padding_mask_crop=4)[0]
    assert np.array_equal(pixels(res["images"][0]), expected)

    status, _, job = call(server, "POST", "/v1/jobs", {"prompt": prompt, "seed": 9, "strength": 0.9,  # OpenAI's mask
                                                       "image": base64.b64encode(png(source)).decode(),
                                                       "mask": base64.b64encode(png_of(square_mask(True))).decode()})
    assert status == 202 and job["settings"]["inpaint"], job
    assert events(server, job["id"])[-1][0] == "succeeded"
    _, _, data = call(server, "GET", f"/v1/jobs/{job['id']}/images/0.png")
    assert np.array_equal(pixels(data), reference(prompt, 9, image=Image.fromarray(source), mask=white,
                                                  strength=0.9)[0])


@pytest.mark.parametrize("mask, message", [
    (b"not an image", "'mask' is not an image PIL can read"),
    (png(np.zeros((64, 64, 3), np.uint8)), "'mask' has no alpha channel"),
    (png_of(Image.new("RGBA", (64, 64), (0, 0, 0, 255))), "the mask is empty"),
], ids=["not an image", "no alpha", "nothing transparent"])
def test_bad_mask(server, mask, message):
    form, content_type = multipart({"prompt": "a digit", "seed": "1"},
                                   [("image", "in.png", png(np.zeros((64, 64, 3), np.uint8)), "image/png"),
                                    ("mask", "mask.png", mask, "image/png")])
    status, _, body = call(server, "POST", "/v1/images/edits", form, {"Content-Type": content_type})
    assert status == 400 and message in body["error"]["message"], body
    status, _, body = call(server, "POST", "/sdapi/v1/img2img",
                           {"init_images": [base64.b64encode(png(np.zeros((64, 64, 3), np.uint8))).decode()],
                            "prompt": "a digit", "mask": "@@not base64@@"})
    assert status == 400 and body["error"]["param"] == "mask", body


# Jobs ------------------------------------------------------------------------------------------------------

def events(server, job_id: str) -> list[tuple[str, dict]]:
    status, _, raw = call(server, "GET", f"/v1/jobs/{job_id}/events")
    assert status == 200
    blocks = [b for b in raw.decode().split("\n\n") if b.startswith("id:")]
    return [(b.split("event: ")[1].split("\n")[0], json.loads(b.split("data: ")[1])) for b in blocks]


def test_job_events_status_and_image(server, reference):
    status, headers, job = call(server, "POST", "/v1/jobs", {"prompt": "a handwritten digit five", "seed": 11})
    assert status == 202 and headers["location"] == f"/v1/jobs/{job['id']}"
    stream = events(server, job["id"])
    names = [name for name, _ in stream]
    assert names[:2] == ["queued", "started"] and names[-1] == "succeeded"
    assert [d["step"] for n, d in stream if n == "step"] == [1, 2, 3, 4] == [d["step"] for n, d in stream
                                                                           if n == "preview"]
    preview = Image.open(io.BytesIO(base64.b64decode(stream[-2][1]["image"].split(",", 1)[1])))
    assert stream[-2][0] == "preview" and preview.size == (64, 64)
    replay = events(server, job["id"])  # a late subscriber: every event again, only the latest preview's image
    assert [n for n, _ in replay] == names and [("image" in d) for n, d in replay if n == "preview"] == [0, 0, 0, 1]
    _, _, done = call(server, "GET", f"/v1/jobs/{job['id']}")
    assert done["status"] == "succeeded" and done["progress"] == {"step": 4, "steps": 4}
    status, _, image = call(server, "GET", done["images"][0]["url"].removeprefix(server.url))
    assert np.array_equal(pixels(image), reference("a handwritten digit five", 11)[0])


def test_cancel_frees_the_worker(server):
    def submit(steps: int) -> str:
        status, _, job = call(server, "POST", "/v1/jobs", {"prompt": "a handwritten digit eight", "steps": steps})
        assert status == 202, job
        return job["id"]

    long, queued = submit(200), submit(4)
    deadline = time.monotonic() + 60
    while call(server, "GET", f"/v1/jobs/{long}")[2]["status"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    status, _, answer = call(server, "DELETE", f"/v1/jobs/{queued}")
    assert status == 200 and answer["status"] == "cancelled"  # at once: it never runs
    call(server, "DELETE", f"/v1/jobs/{long}")
    assert [name for name, _ in events(server, long)][-1] == "cancelled"
    _, _, cancelled = call(server, "GET", f"/v1/jobs/{long}")
    assert cancelled["status"] == "cancelled" and cancelled["images"] == []
    assert cancelled["progress"]["step"] < 200  # stopped after the step in progress
    status, _, after = call(server, "POST", "/v1/images/generations", {"prompt": "a handwritten digit one"})
    assert status == 200 and len(after["data"]) == 1


def test_fifty_requests_from_ten_threads(reference):
    """Every answer is 200 or 429 (queue of 2; a 429 is retried shortly after), and each of the 50 requests ends
    with its own seed's image: none lost or swapped."""
    with running_server(max_queue=2) as small:
        def request(i: int):
            answers = []
            while not answers or answers[-1][0] == 429:
                answers.append(call(small, "POST", "/v1/images/generations",
                                    {"prompt": f"a handwritten digit {WORDS[i % 10]}", "seed": 1000 + i}))
                time.sleep(0.2 * (answers[-1][0] == 429))
            return answers

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(request, range(50)))
        assert call(small, "GET", "/health")[2]["queued"] == 0
        assert small.worker.kept == 0  # answered with their images: nothing held after
    statuses = [status for tries in answers for status, _, _ in tries]
    assert set(statuses) == {200, 429} and statuses.count(200) == 50
    for _, headers, body in (a for tries in answers for a in tries if a[0] == 429):
        assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "queue_full"
    for i, tries in enumerate(answers):
        (item,) = tries[-1][2]["data"]
        assert item["seed"] == 1000 + i
        assert np.array_equal(pixels(item["b64_json"]), reference(f"a handwritten digit {WORDS[i % 10]}", 1000 + i)[0])


# Bad requests ----------------------------------------------------------------------------------------------

GOOD = {"model": MODEL, "prompt": "a handwritten digit one"}
BAD = [
    ("malformed JSON", b'{"prompt": "a digit",', 400, "not valid JSON"),
    ("missing prompt", {"model": MODEL}, 400, "'prompt' is required"),
    ("n = 0", {**GOOD, "n": 0}, 400, "'n' must be from 1 to 10, got 0"),
    ("n = 100", {**GOOD, "n": 100}, 400, "'n' must be from 1 to 10, got 100"),
    ("size abc", {**GOOD, "size": "abc"}, 400, "'size' must be \"WIDTHxHEIGHT\""),
    ("size beyond the position table", {**GOOD, "size": "100x512"}, 400, "the nearest size that works is 64x64"),
    ("size not a multiple of 16", {**GOOD, "size": "40x48"}, 400, "not a multiple of 16"),
    ("unknown model", {**GOOD, "model": "dall-e-3"}, 404, "model 'dall-e-3' is not served here; use one of"),
    ("path in the model field", {**GOOD, "model": "/etc/passwd"}, 400, "looks like a path"),
    ("relative path in the model field", {**GOOD, "model": "../models/digits"}, 400, "looks like a path"),
    ("unknown sampler", {**GOOD, "sampler": "ddim"}, 400, "unknown sampler 'ddim'"),
    ("LoRAs the server does not serve", {**GOOD, "loras": [{"name": "x", "scale": 1}]}, 400,
     "unknown LoRA 'x'; this server was started with: none"),
    ("loras not a list", {**GOOD, "loras": "style"}, 400, "'loras' must be a list"),
    ("LoRA scale not a number", {**GOOD, "loras": [{"name": "x", "scale": "big"}]}, 400, "scale 'big' is not a number"),
    ("steps beyond the limit", {**GOOD, "steps": 100000}, 400, "'steps' must be from 1 to 500"),
    ("a body that is not an object", [1, 2], 400, "must be a JSON object"),
]


@pytest.mark.parametrize("body, status, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_request(server, body, status, message):
    headers = {"Content-Type": "application/json"} if isinstance(body, bytes) else None
    got, _, answer = call(server, "POST", "/v1/images/generations", body, headers)
    assert got == status, answer
    assert message in answer["error"]["message"] and "\n" not in answer["error"]["message"]
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_size_beyond_the_memory_budget(monkeypatch):
    """A size the memory guard refuses: 400 naming the need, the budget and the nearest size that fits."""
    from mlx_flash.memory import required_bytes

    pipe = load_pipeline(MODEL)
    budget = required_bytes(pipe.estimate_memory(32, 32, images=10), pipe.low_memory) + 1
    monkeypatch.setattr("mlx_flash.memory.memory_budget", lambda: budget)
    with running_server() as small:
        status, _, answer = call(small, "POST", "/v1/images/generations", {**GOOD, "n": 10, "size": "64x64"})
        assert status == 400 and answer["error"]["param"] == "size", answer
        message = answer["error"]["message"]
        assert f"but {budget / 1e9:.1f} GB are available; the nearest size that works is " in message, message
        nearest = message.rsplit(" ", 1)[1].rstrip(".")
        assert nearest in ("32x32", "48x48")  # 48 when a tiled decode makes it fit
        status, _, answer = call(small, "POST", "/v1/images/generations", {**GOOD, "n": 10, "size": nearest})
        assert status == 200 and len(answer["data"]) == 10, answer


def test_fifty_megabyte_body_is_refused(server):
    status, _, answer = call(server, "POST", "/v1/images/generations", b" " * (50 * 2**20),
                             {"Content-Type": "application/json"})
    assert status == 413 and "the limit is 16 MiB" in answer["error"]["message"]
    assert call(server, "GET", "/health")[0] == 200  # and the server goes on


@pytest.mark.parametrize("key, message", [(None, "missing API key"), ("wrong", "invalid API key")])
def test_api_key_is_checked(server, key, message):
    for method, path, body in [("POST", "/v1/images/generations", GOOD), ("GET", "/v1/models", None),
                               ("GET", "/sdapi/v1/options", None), ("POST", "/v1/jobs", GOOD)]:
        status, _, answer = call(server, method, path, body, key=key)
        assert status == 401 and message in answer["error"]["message"], (path, answer)
    assert call(server, "GET", "/health", key=None)[0] == 200


def test_host_cors_and_routes(server):
    assert call(server, "GET", "/v1/models", headers={"Host": "rebound.example:80"})[0] == 403
    status, headers, _ = call(server, "OPTIONS", "/v1/models", headers={"Origin": "http://elsewhere.example"})
    assert status == 204 and "access-control-allow-origin" not in headers  # CORS off by default
    with running_server(allowed_origins=("http://app.example",)) as open_server:
        status, headers, _ = call(open_server, "OPTIONS", "/v1/models", headers={"Origin": "http://app.example"})
        assert headers["access-control-allow-origin"] == "http://app.example"
        assert "Authorization" in headers["access-control-allow-headers"]
    assert call(server, "GET", "/v1/nothing")[0] == 404
    status, headers, _ = call(server, "GET", "/v1/images/generations")
    assert status == 405 and headers["allow"] == "POST"
    assert call(server, "POST", "/v1/images/generations", b"prompt=x",
                {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415


# The web page ----------------------------------------------------------------------------------------------

def browser_or_skip() -> Chromium:
    executable = find_chromium()
    if executable is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package (apt-get install -y "
                        "chromium) for this test.")
        pytest.skip("chromium is not installed (apt-get install -y chromium); CI installs it and runs this test.")
    return Chromium(executable)


def open_page(browser: Chromium, server) -> None:
    """The server's page, with the API key typed in and the models listed."""
    browser.navigate(server.url + "/")
    browser.wait_for("document.readyState === 'complete' && document.getElementById('key') !== null")
    browser.evaluate("document.getElementById('key').focus()")
    browser.type(KEY)
    browser.evaluate("document.getElementById('key').dispatchEvent(new Event('change'))")
    browser.wait_for(f"document.getElementById('model').value === '{MODEL}'")


def generate_in_page(browser: Chromium, prompt: str, seed: int) -> dict:
    """Type a seed and a prompt, click Generate, wait for the gallery's image: what the page then shows."""
    browser.evaluate("document.getElementById('seed').focus()")
    browser.type(str(seed))
    browser.evaluate("document.getElementById('prompt').focus()")
    browser.type(prompt)
    browser.evaluate("document.getElementById('generate').click()")
    browser.wait_for("(i => i && i.complete && i.naturalWidth)(document.querySelector('#gallery img'))", 120)
    shown = browser.evaluate("""(() => {
        const img = document.querySelector('#gallery img'), canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext('2d'); context.drawImage(img, 0, 0);
        return {seed: img.dataset.seed, status: document.getElementById('status').textContent,
                preview: document.getElementById('preview').src.slice(0, 23),
                caption: document.querySelector('#gallery figcaption').textContent,
                download: document.querySelector('#gallery a').download,
                rgba: Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data)};
    })()""")
    shown["rgb"] = np.array(shown.pop("rgba"), np.uint8).reshape(64, 64, 4)[..., :3]
    return shown


def test_web_page_in_headless_chromium(server, reference):
    browser = browser_or_skip()
    try:
        open_page(browser, server)
        assert browser.evaluate("document.getElementById('loras').hidden")  # this server has no LoRAs
        shown = generate_in_page(browser, "a handwritten digit three", 42)
    finally:
        browser.close()
    assert shown["seed"] == "42" and shown["status"] == "succeeded" and shown["download"] == "mlx-flash-42.png"
    assert "a handwritten digit three" in shown["caption"] and shown["preview"] == "data:image/jpeg;base64,"
    assert np.array_equal(shown["rgb"], reference("a handwritten digit three", 42)[0])


def test_web_page_loras_in_headless_chromium(tmp_path):
    """The page lists the served LoRAs at their start scales; the ticked ones, at the scales typed, are sent with
    the request and shown in the gallery's settings."""
    style = save_digits_lora(tmp_path / "style.safetensors", 0)
    detail = save_digits_lora(tmp_path / "detail.safetensors", 1)
    browser = browser_or_skip()
    try:
        with running_server(options=ModelOptions(loras=((str(style), 1.0), (str(detail), 0.5)))) as served:
            open_page(browser, served)
            listed = browser.wait_for("""(() => { const rows = [...document.querySelectorAll('#loras .lora')];
                return rows.length && rows.map((r) => [r.children[1].textContent, r.children[0].checked,
                                                        r.children[2].value]); })()""")
            browser.evaluate("document.querySelector('[data-lora=detail]').click()")  # untick detail
            browser.evaluate("(e => { e.value = ''; e.focus(); })(document.querySelector('[data-scale=style]'))")
            browser.type("0.7")
            shown = generate_in_page(browser, "a handwritten digit five", 42)
            _, _, served_loras = call(served, "GET", "/sdapi/v1/loras")
    finally:
        browser.close()
    assert listed == [["style", True, "1"], ["detail", True, "0.5"]]
    assert served_loras == [{"name": "style", "alias": "style", "scale": 1.0}, {"name": "detail", "alias": "detail",
                                                                          "scale": 0.5}]
    assert shown["status"] == "succeeded" and "LoRA style 0.7" in shown["caption"] and "detail" not in shown["caption"]
    pipe = load_pipeline(MODEL, loras=[(style, 0.7)])
    expected = np.asarray(pipe.generate("a handwritten digit five", seed=42, progress=False)[0])
    assert np.array_equal(shown["rgb"], expected)


# The command -----------------------------------------------------------------------------------------------

def test_serve_command_warns_and_shuts_down_gracefully():
    """Bound beyond loopback without a key it warns; SIGTERM lets the running job finish and answer 200."""
    process = subprocess.Popen([sys.executable, "-m", "mlx_flash", "serve", "--model", MODEL, "--host", "0.0.0.0",
                                "--port", "0"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        warning = process.stderr.readline()
        assert "without an API key" in warning and "--api-key" in warning, warning
        serving = process.stderr.readline()
        port = int(serving.rsplit(":", 1)[1].strip(" /\n"))
        local = type("Local", (), {"server_address": ("127.0.0.1", port)})
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(call, local, "POST", "/v1/images/generations",
                                 {"prompt": "a handwritten digit zero", "steps": 40}, key=None)
            deadline = time.monotonic() + 120
            while call(local, "GET", "/health")[2]["running"] is None and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            status, _, body = answer.result(timeout=300)
        assert status == 200 and len(body["data"]) == 1
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("flags, message", [
    (["--port", "99999"], "--port must be from 0 to 65535"),
    (["--model", MODEL, "--model", MODEL], "two --model values have the same name"),
    (["--model", "no-such-model"], "'no-such-model' is neither an existing folder nor a Hugging Face repo id"),
    (["--lora", "one/style.safetensors", "--lora", "two/style.safetensors:0.5"], "two --lora files have the same"),
    (["--lora", "style.safetensors:strong"], "scale 'strong' is not a number"),
    (["--lora", "/no/such/style.safetensors"], "/no/such/style.safetensors"),
])
def test_serve_command_refuses_bad_flags(flags, message):
    result = subprocess.run([sys.executable, "-m", "mlx_flash", "serve", *(flags if "--model" in flags else
                             ["--model", MODEL, *flags])], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and result.stderr.startswith("mlx-flash: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

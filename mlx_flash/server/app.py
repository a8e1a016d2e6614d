"""The HTTP server: routes, API key, body limit, CORS and host checks, on the standard library's http.server."""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from .. import __version__
from . import a1111, openai_api
from . import spec as fields
from .cluster import Cluster
from .engine import SAMPLERS
from .errors import ApiError
from .jobs import FINISHED, Job, Worker
from .models import ModelPool

log = logging.getLogger("mlx_flash.server")

PAGE = Path(__file__).parent / "static" / "index.html"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
DRAIN_LIMIT = 1 << 30  # an oversized body is read and dropped up to this size, so the client sees the 413
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class Limits:
    """The `serve` command's security settings."""

    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS off when empty; "*" allows any origin
    max_body: int = 16 * 2**20  # bytes


class ImageServer(ThreadingHTTPServer):
    """The models, the worker and the limits, shared by every request's handler thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], pool: ModelPool, *, limits: Limits = Limits(), max_queue: int = 8,
                 preview_every: int = 1, cluster: Cluster | None = None):
        self.pool, self.limits = pool, limits
        self.checkpoint = a1111.Checkpoint(pool)
        self.loopback = address[0] == "localhost" or _is_loopback(address[0])
        super().__init__(address, Handler)
        self.worker = Worker(pool, max_queue, preview_every, cluster)
        self._active = 0  # requests being answered
        self._idle = threading.Condition()

    def close(self, cancel_running: bool = False, timeout: float = 30) -> None:
        """Stop listening, cancel the queued jobs, let the running one finish (or cancel it), and give the
        requests being answered up to `timeout` seconds to write their answers."""
        self.server_close()
        self.worker.stop(cancel_running)
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0, timeout)

    @contextmanager
    def answering(self) -> Iterator[None]:
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


Route = tuple[str, re.Pattern, Callable[..., None], bool]  # method, path, handler, needs the API key
ROUTES: list[Route] = []


def route(method: str, pattern: str, *, auth: bool = True):
    def register(fn):
        ROUTES.append((method, re.compile(pattern + "$"), fn, auth))
        return fn
    return register


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"mlx-flash/{__version__}"
    server: ImageServer

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _preflight(self) -> None:
        """A CORS preflight: allowed (with --allowed-origins) or answered without CORS headers."""
        self.send_response(204)
        if self._cors_origin():
            self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    # Dispatch and checks ---------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        with self.server.answering():
            self._answer(method)

    def _answer(self, method: str) -> None:
        try:
            path = urlsplit(self.path).path
            if method == "OPTIONS":
                self._check_host_header()
                return self._preflight()
            matches = [(m, p.match(path), fn, auth) for m, p, fn, auth in ROUTES if p.match(path)]
            if not matches:
                raise ApiError(404, f"no route {path}; see the README for the server's routes.")
            chosen = next((r for r in matches if r[0] == method), None)
            if chosen is None:
                allowed = ", ".join(sorted({m for m, *_ in matches}))
                raise ApiError(405, f"{method} is not allowed on {path}; use {allowed}.", headers={"Allow": allowed})
            _, match, fn, auth = chosen
            self._check_host_header()
            if auth:
                self._check_api_key()
            fn(self, **match.groupdict())
        except ApiError as err:
            self._drop_unread_body()
            self.send_json(err.status, err.body(), err.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # a bug: answer 500 and keep serving
            log.exception("%s %s failed", method, self.path)
            self.close_connection = True  # whatever of the body is unread cannot be told from the next request
            self.send_json(500, ApiError(500, f"internal error: {err}").body())

    def _check_host_header(self) -> None:
        """On a loopback address, refuse other Host names (a web page could otherwise reach the server through
        DNS rebinding)."""
        host = urlsplit("//" + self.headers.get("Host", "")).hostname
        if self.server.loopback and host not in LOOPBACK_HOSTS:
            port = self.server.server_address[1]
            raise ApiError(403, f"Host {host!r} is not this loopback server; open http://127.0.0.1:{port}/ instead.")

    def _check_api_key(self) -> None:
        key = self.server.limits.api_key
        if key is None:
            return
        header = self.headers.get("Authorization", "").strip()
        if not header:
            raise ApiError(401, "missing API key; send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "basic":  # A1111 clients: user:password, the password being the key
            try:
                credential = base64.b64decode(credential, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                credential = ""
        elif scheme.lower() != "bearer":
            credential = ""
        if not hmac.compare_digest(credential.encode(), key.encode()):
            raise ApiError(401, "invalid API key; send the key the server was started with (--api-key).",
                           code="invalid_api_key")

    def _cors_origin(self) -> str | None:
        origin, allowed = self.headers.get("Origin"), self.server.limits.allowed_origins
        return origin if origin and ("*" in allowed or origin in allowed) else None

    # Bodies ----------------------------------------------------------------------------------------------

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(411, "chunked request bodies are not accepted; send a Content-Length.")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "the request has no Content-Length; send the body with its length.")
        length, limit = int(length), self.server.limits.max_body
        if length > limit:
            raise ApiError(413, f"the request body is {length / 2**20:.1f} MiB; the limit is "
                                f"{limit / 2**20:.0f} MiB (the server's --max-body-mb).")
        self._body_read = True
        return self.rfile.read(length)

    def _drop_unread_body(self) -> None:
        """Read and drop a body no route read, so the client sees the answer rather than a reset."""
        if getattr(self, "_body_read", False) or self.command not in ("POST", "DELETE"):
            return
        length = self.headers.get("Content-Length", "")
        remaining = int(length) if length.isdigit() else 0
        if remaining > DRAIN_LIMIT or "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return
        while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 20))):
            remaining -= len(chunk)

    def read_json(self) -> Any:
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json', got "
                                f"{content_type or 'no Content-Type'}.")
        body = self.read_body()
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object.") from None

    def read_form(self) -> dict[str, Any]:
        """A multipart/form-data body: text fields as str, files as bytes (a repeated name gives a list)."""
        content_type = self.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise ApiError(415, f"send the image as multipart/form-data, got {content_type or 'no Content-Type'}.")
        body = self.read_body()
        message = BytesParser(policy=policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        if not message.is_multipart():
            raise ApiError(400, "the multipart body cannot be parsed; check its boundary.")
        form: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            value = payload if part.get_filename() is not None else payload.decode("utf-8", "replace")
            if name in form:
                form[name] = [*(form[name] if isinstance(form[name], list) else [form[name]]), value]
            elif name:
                form[name] = value
        return form

    # Answers ---------------------------------------------------------------------------------------------

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(body).encode(), "application/json", headers)

    def end_headers(self) -> None:
        origin = self._cors_origin()
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    @property
    def base_url(self) -> str:
        return f"http://{self.headers.get('Host') or '%s:%d' % self.server.server_address[:2]}"

    def wait(self, job: Job, keep: bool = False) -> Job:
        """The job once finished (ApiError if it failed); forgotten then unless `keep` (its images have URLs)."""
        job.done.wait()
        if not keep:
            self.server.worker.forget(job)
        if job.status != "succeeded":
            raise job.error or ApiError(409, f"job {job.id} was cancelled.")
        return job


# Routes ----------------------------------------------------------------------------------------------------

@route("GET", "/", auth=False)
def page(h: Handler) -> None:
    h.send_bytes(200, PAGE.read_bytes(), "text/html; charset=utf-8", {"Cache-Control": "no-cache"})


@route("GET", "/health", auth=False)
def health(h: Handler) -> None:
    running = h.server.worker.running
    h.send_json(200, {"status": "ok", "version": __version__, "models": h.server.pool.names,
                      "queued": h.server.worker.waiting, "running": running.id if running else None})


@route("GET", "/v1/models")
def models(h: Handler) -> None:
    h.send_json(200, openai_api.models_response(h.server.pool))


@route("POST", "/v1/images/generations")
def generations(h: Handler) -> None:
    spec, response_format = openai_api.image_spec(h.read_json(), h.server.pool)
    job = h.wait(h.server.worker.submit(spec), keep=response_format == "url")
    h.send_json(200, openai_api.images_response(job, response_format, h.base_url))


@route("POST", "/v1/images/edits")
def edits(h: Handler) -> None:
    spec, response_format = openai_api.edit_spec(h.read_form(), h.server.pool)
    job = h.wait(h.server.worker.submit(spec), keep=response_format == "url")
    h.send_json(200, openai_api.images_response(job, response_format, h.base_url))


@route("POST", "/v1/jobs")
def create_job(h: Handler) -> None:
    body = h.read_json()
    given = body if isinstance(body, dict) else {}
    image = fields.base64_image(given["image"], "image") if given.get("image") else None
    mask = openai_api.transparent_mask(fields.base64_image(given["mask"], "mask")) if given.get("mask") else None
    spec, _ = openai_api.image_spec(body, h.server.pool, image, mask)
    job = h.server.worker.submit(spec, previews=True)
    h.send_json(202, job.describe(h.base_url), {"Location": f"/v1/jobs/{job.id}"})


@route("GET", "/v1/jobs/(?P<job_id>[0-9a-f]+)")
def job_status(h: Handler, job_id: str) -> None:
    h.send_json(200, h.server.worker.get(job_id).describe(h.base_url))


@route("DELETE", "/v1/jobs/(?P<job_id>[0-9a-f]+)")
def cancel_job(h: Handler, job_id: str) -> None:
    job = h.server.worker.get(job_id)
    h.server.worker.cancel(job)
    h.send_json(200, job.describe(h.base_url))


@route("GET", "/v1/jobs/(?P<job_id>[0-9a-f]+)/images/(?P<index>[0-9]+)\\.(?P<ext>png|jpeg|webp)")
def job_image(h: Handler, job_id: str, index: str, ext: str) -> None:
    job = h.server.worker.get(job_id)
    if job.status != "succeeded" or int(index) >= len(job.images) or ext != job.spec.output_format:
        raise ApiError(404, f"job {job_id} has no image {index}.{ext} (status {job.status}).")
    h.send_bytes(200, job.images[int(index)], MIME[ext])


@route("GET", "/v1/jobs/(?P<job_id>[0-9a-f]+)/events")
def job_events(h: Handler, job_id: str) -> None:
    """Server-sent events: queued, started, step (with a preview where there is one), then one of FINISHED."""
    job = h.server.worker.get(job_id)
    h.close_connection = True
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Cache-Control", "no-cache")
    h.send_header("Connection", "close")
    h.end_headers()
    for number, event in enumerate(job.follow()):
        h.wfile.write(b": keepalive\n\n" if event is None else
                      f"id: {number}\nevent: {event[0]}\ndata: {json.dumps(event[1])}\n\n".encode())
        h.wfile.flush()
        if event is not None and event[0] in FINISHED:
            break


@route("GET", "/sdapi/v1/sd-models")
def sd_models(h: Handler) -> None:
    h.send_json(200, a1111.sd_models(h.server.pool))


@route("GET", "/sdapi/v1/samplers")
def samplers(h: Handler) -> None:
    h.send_json(200, [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS])


@route("GET", "/sdapi/v1/loras")
def loras(h: Handler) -> None:
    """The LoRAs the server was started with (A1111's route; no file paths), each with its start scale."""
    h.send_json(200, [{"name": name, "alias": name, "scale": scale} for name, scale in h.server.pool.loras.items()])


@route("GET", "/sdapi/v1/options")
def get_options(h: Handler) -> None:
    h.send_json(200, h.server.checkpoint.options())


@route("POST", "/sdapi/v1/options")
def set_options(h: Handler) -> None:
    h.server.checkpoint.set_options(h.read_json())
    h.send_json(200, None)


@route("POST", "/sdapi/v1/txt2img")
def txt2img(h: Handler) -> None:
    body = h.read_json()
    job = h.wait(h.server.worker.submit(a1111.image_spec(body, h.server.checkpoint)))
    h.send_json(200, a1111.images_response(job, body))


@route("POST", "/sdapi/v1/img2img")
def img2img(h: Handler) -> None:
    body = h.read_json()
    job = h.wait(h.server.worker.submit(a1111.image_spec(body, h.server.checkpoint, img2img=True)))
    h.send_json(200, a1111.images_response(job, {k: v for k, v in body.items() if k != "init_images"}))

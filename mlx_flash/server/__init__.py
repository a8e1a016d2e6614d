"""`mlx-flash serve`: OpenAI's Images API, AUTOMATIC1111's API, jobs with live previews and a web page, served
from one generation worker on the standard library's HTTP server."""

from __future__ import annotations

import logging
import signal
import sys

from ..distributed import Ranks
from .app import ImageServer, Limits
from .cluster import Cluster
from .models import ModelOptions, ModelPool

__all__ = ["ImageServer", "Limits", "ModelOptions", "ModelPool", "serve"]

log = logging.getLogger("mlx_flash.server")


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 8080, limits: Limits = Limits(),
          max_queue: int = 8, preview_every: int = 1, options: ModelOptions = ModelOptions()) -> None:
    """Serve `models` until interrupted (Ctrl-C or SIGTERM): then stop listening, cancel queued jobs and let the
    running one finish; a second interrupt cancels it. Under `mlx.launch`, rank 0 serves and every rank makes its
    share of each request's images (cluster.Cluster); the other ranks end when rank 0 stops."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535 (0: any free port), got {port}.")
    pool = ModelPool(models, options)
    pool.check()
    ranks = Ranks()
    cluster = Cluster(ranks) if ranks.size > 1 else None
    if cluster is not None and ranks.rank != 0:
        return cluster.follow(pool)
    try:
        server = ImageServer((host, port), pool, limits=limits, max_queue=max_queue, preview_every=preview_every,
                             cluster=cluster)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or --host.") from None
    if not server.loopback and limits.api_key is None:
        log.warning("mlx-flash: warning: serving on %s without an API key: anyone who can reach this address can "
                    "generate images; pass --api-key KEY.", host)
    over = f" over {ranks.size} processes" if cluster is not None else ""
    print(f"mlx-flash: serving {', '.join(pool.names)}{over} on http://{host}:{server.server_address[1]}/",
          file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("mlx-flash: stopping; the running job finishes (interrupt again to cancel it)", file=sys.stderr)
    try:
        server.close()
    except KeyboardInterrupt:
        server.close(cancel_running=True)

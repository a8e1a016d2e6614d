"""Data-parallel jobs over MLX's distributed runtime (`mlx.launch`): which rank makes which image, and the
images sent to rank 0, which writes every file. Without `mlx.launch` there is one rank and nothing is sent."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import zlib
from typing import Callable

import mlx.core as mx
import numpy as np

log = logging.getLogger("mlx_flash")


class PeerLost(RuntimeError):
    """The connection to another rank of the job was lost (that process died)."""


GRACE_SECONDS = 10.0  # after a peer ended: how long a receive may still wait before the job is given up


class Ranks:
    """This process's place in the job: `rank` of `size` (1 without `mlx.launch`).

    When one process of an `mlx.launch` job dies, the launcher sends SIGTERM to the others. Here they keep
    going and finish their own shares, receiving from no one any more. The ring backend may then fail a
    pending receive, return garbage, or wait forever: each image travels with a checksum, and a receive still
    waiting GRACE_SECONDS after a peer ended calls `stuck` (which reports what is missing and ends the
    process)."""

    def __init__(self, stuck: Callable[[], None] = lambda: os._exit(1)):
        self.stuck = stuck
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group else 0
        self.size = self.group.size() if self.group else 1
        self.peer_ended = threading.Event()
        self._receiving = threading.Event()
        if self.size > 1:
            read, write = os.pipe()
            os.set_blocking(write, False)
            signal.set_wakeup_fd(write)  # wakes the watchdog even while the main thread waits inside MLX
            signal.signal(signal.SIGTERM, lambda *_: None)
            threading.Thread(target=self._watchdog, args=(read,), daemon=True).start()

    def _watchdog(self, read: int) -> None:
        while signal.SIGTERM not in os.read(read, 64):
            pass
        self.peer_ended.set()
        log.warning("another process of the job ended; this one finishes its share.")
        time.sleep(GRACE_SECONDS)
        if self._receiving.is_set():
            self.stuck()

    def share(self, todo: list[int]) -> list[list[int]]:
        """The job's rounds: in round k, rank r makes image `rounds[k][r]` (the todo list dealt out in turn, so a
        fresh job gives image i to rank i mod size)."""
        return [todo[k : k + self.size] for k in range(0, len(todo), self.size)]

    def broadcast(self, values: list[int] | None, length: int) -> list[int] | None:
        """Rank 0's list of at most `length` indices (or None: "stop") for every rank."""
        if self.size == 1:
            return values
        message = np.full(length + 1, -1, dtype=np.int32)
        if self.rank == 0:
            message[0] = -2 if values is None else len(values)
            message[1 : 1 + len(values or [])] = values or []
        else:
            message[:] = 0
        received = self._all_sum(message)
        return None if received[0] == -2 else [int(v) for v in received[1 : 1 + received[0]]]

    def broadcast_bytes(self, data: bytes | None) -> bytes | None:
        """Rank 0's bytes (or None: "stop") for every rank; the others pass None."""
        if self.size == 1:
            return data
        length = self.broadcast(None if data is None else [len(data)], 1)
        if length is None:
            return None
        message = np.frombuffer(data, np.uint8) if self.rank == 0 else np.zeros(length[0], np.uint8)
        return self._all_sum(message).tobytes()

    def _all_sum(self, message: np.ndarray) -> np.ndarray:
        """The sum over the ranks (a rank waiting here on a peer that ended is given up like a receive)."""
        self._receiving.set()
        try:
            return np.array(mx.distributed.all_sum(mx.array(message), group=self.group))
        finally:
            self._receiving.clear()

    def send(self, pixels: np.ndarray, failed: bool = False) -> None:
        """Send an image (H, W, 3) uint8 to rank 0, followed by its checksum (`failed`: a wrong one, so that rank
        0 takes these pixels for what they are, a placeholder for an image this rank could not make)."""
        data = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(-1)
        checksum = zlib.crc32(data) ^ (0xFFFFFFFF if failed else 0)
        message = np.concatenate([data, np.frombuffer(checksum.to_bytes(4, "little"), np.uint8)])
        try:
            mx.eval(mx.distributed.send(mx.array(message), 0, group=self.group))
        except RuntimeError as err:
            raise PeerLost(str(err)) from None

    def receive(self, source: int, shape: tuple[int, int, int]) -> np.ndarray:
        """Rank 0: the image rank `source` sends (PeerLost if that rank ended or the data is not intact)."""
        if self.peer_ended.is_set():
            raise PeerLost("a process of the job ended")
        self._receiving.set()
        try:
            message = np.array(mx.distributed.recv((int(np.prod(shape)) + 4,), mx.uint8, source, group=self.group))
        except RuntimeError as err:
            raise PeerLost(str(err)) from None
        finally:
            self._receiving.clear()
        data, checksum = message[:-4], int.from_bytes(message[-4:].tobytes(), "little")
        if zlib.crc32(data) != checksum or self.peer_ended.is_set():
            raise PeerLost(f"the image from rank {source} did not arrive intact")
        return data.reshape(shape)

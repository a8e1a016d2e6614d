"""Test hooks, active only when tests/hooks is on PYTHONPATH. On the first call of a function named
"module:function" or "module:Class.method": MLX_FLASH_TEST_SIGINT makes the process send itself SIGINT (a real
Ctrl-C); MLX_FLASH_TEST_RAISE raises RuntimeError (an error no message was written for)."""

import importlib
import os
import signal


def _hook(target: str, action) -> None:
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    def hooked(*args, **kwargs):
        action()
        return original(*args, **kwargs)

    setattr(owner, name, hooked)


def _raise():
    raise RuntimeError("[metal::malloc] something deep inside failed\nsecond line")


if os.environ.get("MLX_FLASH_TEST_SIGINT"):
    _hook(os.environ["MLX_FLASH_TEST_SIGINT"], lambda: os.kill(os.getpid(), signal.SIGINT))
if os.environ.get("MLX_FLASH_TEST_RAISE"):
    _hook(os.environ["MLX_FLASH_TEST_RAISE"], _raise)

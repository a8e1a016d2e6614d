"""Test hook, active only when tests/hooks is on PYTHONPATH: MLX_FLASH_TEST_SIGINT="module:Class.method" (or
"module:function") makes the process send itself SIGINT (a real Ctrl-C) on the first call of that function."""

import importlib
import os
import signal

target = os.environ.get("MLX_FLASH_TEST_SIGINT")
if target:
    module_name, _, qualname = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    setattr(owner, name, interrupted)

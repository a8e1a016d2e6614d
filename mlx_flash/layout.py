"""Facts about model folders that several modules need: the manifest's name, the dtype names, JSON reading."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx

MANIFEST = "mlx_flash.json"  # a model folder's own description: sampling defaults, preview factors, provenance
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
FINGERPRINT_WHOLE_BELOW = 64 * 2**20  # files smaller than this are hashed whole; larger ones by size and ends


def dtype_name(dtype: mx.Dtype) -> str:
    """`mx.float32` -> "float32"."""
    return next(name for name, value in DTYPES.items() if value == dtype)


def parse_dtype(name: str) -> mx.Dtype:
    """"float32" -> `mx.float32`; one line naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def read_json(path: Path) -> dict:
    """A JSON object from a model folder, with one-line errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the model folder is incomplete (re-download or re-convert it).")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; re-download or re-convert the model.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         "re-download or re-convert the model.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}; re-download the model.")
    return value


def read_manifest(root: Path) -> dict:
    """The folder's mlx_flash.json, or {} when it has none."""
    path = root / MANIFEST
    return read_json(path) if path.exists() else {}


def fingerprint(root: Path) -> str:
    """A short hash identifying a model folder's contents: small files whole, large weight files by their size
    and first and last megabyte (cheap, and changes whenever a file is replaced by another)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        size = path.stat().st_size
        digest.update(size.to_bytes(8, "little"))
        with open(path, "rb") as f:
            if size < FINGERPRINT_WHOLE_BELOW:
                digest.update(f.read())
            else:
                digest.update(f.read(2**20))
                f.seek(-(2**20), os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def model_identity(root: Path, name: str) -> dict[str, str]:
    """The model's name as given and its revision: the hub commit of a downloaded snapshot, else a fingerprint
    of the folder's files."""
    if root.parent.name == "snapshots":
        return {"model": name, "model_revision": root.name}
    return {"model": name, "model_fingerprint": fingerprint(root)}

"""Streaming writer of mlx-flash component folders: tensors are evaluated, written and released one at a
time, so peak memory stays near the largest tensor however large the component is."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping

import mlx.core as mx

from mlx_flash.weights import LAYOUT_KEY, MAX_SHARD_BYTES, WeightsError

SAFETENSORS_DTYPES = {
    mx.bool_: "BOOL", mx.uint8: "U8", mx.int8: "I8", mx.uint16: "U16", mx.int16: "I16", mx.uint32: "U32",
    mx.int32: "I32", mx.uint64: "U64", mx.int64: "I64", mx.float16: "F16", mx.bfloat16: "BF16", mx.float32: "F32",
}


def plan_shards(tensors: Mapping[str, mx.array], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Tensor names in shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += value.nbytes
    return shards


def write_safetensors(path: Path, keys: list[str], tensors: dict[str, mx.array], component: str) -> None:
    """Write `keys` of `tensors` to a .safetensors file, popping each tensor from `tensors` once written
    (pass the only references: a written tensor is then freed)."""
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for key in keys:
        value = tensors[key]
        header[key] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for key in keys:
            value = mx.contiguous(tensors.pop(key))
            try:
                mx.eval(value)
            except (RuntimeError, ValueError) as err:
                raise WeightsError(f"{component}: cannot compute tensor {key} ({err}); the checkpoint is "
                                   "truncated or corrupt: re-download it.") from None
            f.write(memoryview(value))
            del value


def write_component(
    folder: Path,
    tensors: dict[str, mx.array],
    config: Mapping,
    quantization: Mapping | None,
    component: str,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> int:
    """Write an mlx-flash component folder (the layout of `mlx_flash.weights.save_component`): shards of at
    most `max_shard_bytes`, an index when there are several, and config.json marked as converted. `tensors` (MLX names,
    lazy) is emptied as it is written. Returns the bytes written."""
    folder.mkdir(parents=True)
    shards = plan_shards(tensors, max_shard_bytes)
    total = sum(value.nbytes for value in tensors.values())
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {key: name for name, keys in zip(names, shards) for key in keys}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    for name, keys in zip(names, shards):
        write_safetensors(folder / name, keys, tensors, component)
        mx.clear_cache()
    config = {**config, LAYOUT_KEY: 1}
    if quantization:
        config["quantization"] = dict(quantization)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total

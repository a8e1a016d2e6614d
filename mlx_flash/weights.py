"""Reading checkpoints and mapping their tensors onto MLX modules.

Mappings are data: a model file declares a list of `Rule`s (regex source -> target template, optional
transform) and `Fuse`s (tensors concatenated into one), and `remap` applies them. `load_into` checks the
result against the module's parameters and raises one `WeightsError` naming every missing, unexpected and
mis-shaped tensor.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .layout import read_json
from .quantization import quantize_layers

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class WeightsError(ValueError):
    """A checkpoint that does not fit the model, or that cannot be read."""


@dataclass(frozen=True)
class Rule:
    """Rename tensors whose key fully matches `source` (a regex) to `target` (a `re` template).

    `transform`, if given, is applied to the tensor (e.g. a conv weight from NCHW to NHWC order).
    """

    source: str
    target: str
    transform: Callable[[mx.array], mx.array] | None = None


@dataclass(frozen=True)
class Fuse:
    """Concatenate `prefix.<part>.<param>` for each of `parts` (in order) along axis 0 into
    `prefix.<target>.<param>`: e.g. separate q, k, v projections into one qkv projection."""

    parts: tuple[str, ...]
    target: str


def conv_to_nhwc(w: mx.array) -> mx.array:
    """A PyTorch conv weight (out, in, kh, kw) in MLX order (out, kh, kw, in)."""
    return w.transpose(0, 2, 3, 1) if w.ndim == 4 else w


def remap(weights: Mapping[str, mx.array], rules: Iterable[Rule | Fuse] = ()) -> dict[str, mx.array]:
    """Apply renaming rules (first matching `Rule` wins) then fusions; unmatched keys pass unchanged."""
    rules = list(rules)
    renames = [(re.compile(r.source), r) for r in rules if isinstance(r, Rule)]
    out: dict[str, mx.array] = {}
    for key, value in weights.items():
        for pattern, rule in renames:
            if pattern.fullmatch(key):
                key = pattern.sub(rule.target, key)
                if rule.transform is not None:
                    value = rule.transform(value)
                break
        out[key] = value
    for fuse in (r for r in rules if isinstance(r, Fuse)):
        out = _fuse(out, fuse)
    return out


def _fuse(weights: dict[str, mx.array], fuse: Fuse) -> dict[str, mx.array]:
    first, *rest = fuse.parts
    pattern = re.compile(rf"(.*\.)?{re.escape(first)}\.([^.]+)")
    for key in [k for k in weights if pattern.fullmatch(k)]:
        prefix, param = pattern.fullmatch(key).groups()
        prefix = prefix or ""
        names = [f"{prefix}{part}.{param}" for part in fuse.parts]
        if not all(name in weights for name in names):
            continue  # left as is; the shape check reports what is missing
        weights[f"{prefix}{fuse.target}.{param}"] = mx.concatenate([weights.pop(n) for n in names], axis=0)
    return weights


def _short_list(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_weights(model: nn.Module, weights: Mapping[str, mx.array], component: str) -> None:
    """Raise `WeightsError` unless `weights` has exactly the model's parameter names and shapes."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(weights[k].shape)} != {expected[k]}"
        for k in set(expected) & set(weights)
        if tuple(weights[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_short_list(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_short_list(unexpected)})")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped ({_short_list(misshaped)})")
    if problems:
        raise WeightsError(
            f"{component}: checkpoint does not match the model: " + "; ".join(problems)
            + ". Check that the checkpoint is the right component and model family, and that it is complete."
        )


def load_into(
    model: nn.Module,
    weights: Mapping[str, mx.array],
    component: str,
    dtype: mx.Dtype | None = None,
    keep_float32: Callable[[str], bool] = lambda key: False,
) -> nn.Module:
    """Check `weights` against `model`, cast floating tensors to `dtype` (except those that
    `keep_float32` names) and load them. Returns the model."""
    check_weights(model, weights, component)
    cast = {}
    for key, value in weights.items():
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
            value = value.astype(mx.float32 if keep_float32(key) else dtype)
        cast[key] = value
    model.update(tree_unflatten(list(cast.items())))
    return model


def refuse_pickle(path: Path) -> None:
    """Raise for pickled checkpoints: they can run arbitrary code when loaded."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{path}: pickled checkpoints are refused (they can execute code when loaded); "
            "use a .safetensors file instead."
        )


def load_safetensors(path: str | Path) -> dict[str, mx.array]:
    """Read one .safetensors file (lazily) with a clear error for a missing, pickled or corrupt file."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file.")
    try:
        return mx.load(str(path))
    except Exception as err:  # mlx raises RuntimeError/ValueError with varying texts
        raise WeightsError(f"{path}: not a readable safetensors file ({err}); re-download or re-convert it.") from err


# diffusers' / transformers' precision variants: name.fp16.safetensors, name.fp16-00001-of-00002.safetensors,
# name.safetensors.index.fp16.json (diffusers) or name.fp16.safetensors.index.json; None: the default files.
VARIANT = re.compile(r"[^.]+(?:\.(?P<a>[^.-]+))?(?:-\d+-of-\d+)?\.safetensors(?:\.index(?:\.(?P<b>[^.]+))?\.json)?")


def weight_variant(name: str) -> str | None:
    """The variant ("fp16", ...) of a safetensors weight or index file name; None for the default files."""
    match = VARIANT.fullmatch(name)
    return (match["a"] or match["b"]) if match else None


def pick_variant(variants: set[str | None], preferred: tuple[str, ...] = ()) -> str | None:
    """The variant to use among those present: the first of `preferred` there, else the default files, else
    the only (or first) variant."""
    for variant in (*preferred, None):
        if variant in variants:
            return variant
    return sorted(v for v in variants if v is not None)[0] if variants else None


def read_component(folder: str | Path, config: dict | None = None) -> tuple[dict, dict[str, mx.array]]:
    """Read a diffusers/transformers component folder: (config.json contents, all tensors of its shards).

    One or many shards are supported; with a `*.safetensors.index.json` exactly the shards it names are read.
    Of precision variants (name.fp16.safetensors beside name.safetensors) one set is read: the default files
    where present, else the variant there is. `config` stands in for a config.json the folder lacks (a
    release that ships only weights).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such folder.")
    config_path = folder / "config.json"
    if config_path.is_file():
        config = read_json(config_path)
    elif config is None:
        raise WeightsError(f"{folder}: no config.json; expected a diffusers-layout component folder.")
    files = [p for p in folder.iterdir() if VARIANT.fullmatch(p.name)]
    variant = pick_variant({weight_variant(p.name) for p in files})
    files = [p for p in files if weight_variant(p.name) == variant]
    indexes = sorted(p for p in files if p.name.endswith(".json"))
    if indexes:
        weight_map = read_json(indexes[0]).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{indexes[0]}: no valid 'weight_map' (tensor name -> shard file); re-download it.")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        shards = sorted(p for p in files if p.name.endswith(".safetensors"))
    if not shards:
        pickled = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickled:
            refuse_pickle(folder / pickled[0])
        raise WeightsError(f"{folder}: no .safetensors weights found.")
    weights: dict[str, mx.array] = {}
    for shard in shards:
        weights.update(load_safetensors(shard))
    return config, weights


# Converted (mlx-flash layout) components -----------------------------------------------------------------

LAYOUT_KEY = "mlx_flash_layout"  # set in a converted component's config.json: weights need no re-mapping
MAX_SHARD_BYTES = 5 * 10**9


def is_converted(config: Mapping) -> bool:
    """Whether a component's config.json marks tensors already in MLX names and layouts."""
    return bool(config.get(LAYOUT_KEY))


def quantize_like(model: nn.Module, weights: Mapping[str, mx.array], quantization: Mapping | None) -> nn.Module:
    """Quantize (in place) exactly the layers whose quantized tensors (`<layer>.scales`) are in `weights`,
    so that a quantized checkpoint loads without ever being materialised in full precision. Layers named
    in `quantization` ({path: {"group_size", "bits"}}, MLX's convention) get their own settings."""
    if quantization:
        quantize_layers(model, quantization["group_size"], quantization["bits"],
                        lambda path, module: f"{path}.scales" in weights and quantization.get(path, True))
    return model


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
    folder: str | Path,
    tensors: dict[str, mx.array],
    config: Mapping,
    quantization: Mapping | None,
    component: str,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> int:
    """Write an mlx-flash component folder: shards of at most `max_shard_bytes`, an index when there are
    several, and config.json marked as converted (with the quantization, if any). `tensors` (MLX names, lazy) is
    emptied as it is written, one tensor at a time, so peak memory stays near the largest tensor. Returns the
    bytes written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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


def save_component(folder: str | Path, model: nn.Module, config: Mapping, quantization: Mapping | None = None) -> None:
    """Write `model`'s parameters and `config` as an mlx-flash layout component folder (`write_component`)."""
    write_component(folder, dict(tree_flatten(model.parameters())), config, quantization, str(folder))

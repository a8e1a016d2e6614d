"""Reading checkpoints and mapping their tensors onto MLX modules.

Mappings are data: a model file declares a list of `Rule`s (regex source -> target template, optional
transform) and `Fuse`s (tensors concatenated into one), and `remap` applies them. `load_into` checks the
result against the module's parameters and raises one `WeightsError` naming every missing, unexpected and
mis-shaped tensor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

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


def read_component(folder: str | Path) -> tuple[dict, dict[str, mx.array]]:
    """Read a diffusers/transformers component folder: (config.json contents, all tensors of its shards).

    One or many shards are supported; with a `*.safetensors.index.json` exactly the shards it names are read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such folder.")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no config.json; expected a diffusers-layout component folder.")
    config = json.loads(config_path.read_text())
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        shards = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        shards = sorted(folder.glob("*.safetensors"))
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
        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            class_predicate=lambda path, module: f"{path}.scales" in weights and quantization.get(path, True),
        )
    return model


def save_component(folder: str | Path, model: nn.Module, config: Mapping, quantization: Mapping | None = None) -> None:
    """Write `model`'s parameters in MLX layout (safetensors shards of at most 5 GB, with an index when
    there are several) and its `config.json`, marked as converted, with the quantization if any."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key, value in tree_flatten(model.parameters()):
        if size + value.nbytes > MAX_SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += value.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    config = {**config, LAYOUT_KEY: 1}
    if quantization:
        config["quantization"] = dict(quantization)
    (folder / "config.json").write_text(json.dumps(config, indent=2))

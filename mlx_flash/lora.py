"""LoRA adapters for the transformer and the text encoders: every common SD3 file format, several at once.

A file's tensors are read as (component, naming, module, down / up / alpha) by the key `PREFIXES` and `SUFFIXES`
below, mapped onto our modules with the mappings the loaders already use (Stability names through the
single-file loader's rules, diffusers / transformers names through each model's rules), and attached to the
layers as unfused adapters: a layer's output gains `user_scale * alpha / rank * B @ A x` per LoRA. Our fused
q/k/v projections take the three adapters block-diagonally; Stability-named adapters on the final and the last
block's context adaLN take the single-file loader's scale/shift swap; a convolution LoRA on the patch embedding
acts on each flattened patch. `fuse_loras` folds them into the weights.

alpha / rank: a file's `.alpha` tensors, else the PEFT config it carries (diffusers' `lora_adapter_metadata` header
or an adapter_config.json beside it, with rank / alpha patterns), else 1 (diffusers' convention). A kohya
`split_qkv` file (down (3r, in), block-diagonal up) is scaled by alpha / r as it was trained; ComfyUI and
sd-scripts' own loader divide by 3r.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import safe_open

from . import clip, mmdit, t5
from .hub import ModelNotFoundError, download_file, is_repo_id
from .presets import PRESETS
from .quantization import QuantizedLinear
from .single_file import map_tensors, transformer_modules, transformer_rules
from .weights import Fuse, Rule, WeightsError, load_safetensors, refuse_pickle, remap

log = logging.getLogger("mlx_flash")

# key prefix -> (component, naming of the module path, separator inside the path); longest prefixes first
PREFIXES = {
    "base_model.model.": ("transformer", "diffusers", "."),  # raw PEFT files
    "model.diffusion_model.": ("transformer", "stability", "."),
    "diffusion_model.": ("transformer", "stability", "."),  # ComfyUI
    "lora_transformer_": ("transformer", "diffusers", "_"),  # OneTrainer
    "transformer.": ("transformer", "diffusers", "."),  # diffusers / PEFT
    "lora_unet_": ("transformer", "stability", "_"),  # kohya sd-scripts
    "lycoris_": ("transformer", "diffusers", "_"),  # SimpleTuner LyCORIS
    "text_encoder_2.": ("text_encoder_2", "transformers", "."),
    "text_encoder_3.": ("text_encoder_3", "transformers", "."),
    "text_encoder.": ("text_encoder", "transformers", "."),
    "lora_te1_": ("text_encoder", "transformers", "_"),
    "lora_te2_": ("text_encoder_2", "transformers", "_"),
    "lora_te3_": ("text_encoder_3", "transformers", "_"),
}
SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
UNSUPPORTED = {  # key pattern -> the kind of file it marks, refused by name
    r".*(dora_scale|lora_magnitude_vector).*": "DoRA (weight-decomposed LoRA)",
    r".*\.hada_.*": "LoHa (LyCORIS Hadamard product)",
    r".*\.lokr_.*": "LoKr (LyCORIS Kronecker product)",
    r".*\.lora_mid\..*": "LoCon / Tucker (a mid weight)",
    r".*\.(lora_B|lora_up)\.bias": "LoRA with bias terms (lora_bias)",
    r".*\.(diff|diff_b|w_norm|b_norm)": "full weight differences",
}
# The transformers module names of the text encoders' linear layers, `{i}` the layer
TEXT_ENCODER_MODULES = {
    "clip": ["text_model.encoder.layers.{i}.self_attn.q_proj", "text_model.encoder.layers.{i}.self_attn.k_proj",
             "text_model.encoder.layers.{i}.self_attn.v_proj", "text_model.encoder.layers.{i}.self_attn.out_proj",
             "text_model.encoder.layers.{i}.mlp.fc1", "text_model.encoder.layers.{i}.mlp.fc2", "text_projection"],
    "t5": ["encoder.block.{i}.layer.0.SelfAttention.q", "encoder.block.{i}.layer.0.SelfAttention.k",
           "encoder.block.{i}.layer.0.SelfAttention.v", "encoder.block.{i}.layer.0.SelfAttention.o",
           "encoder.block.{i}.layer.1.DenseReluDense.wi_0", "encoder.block.{i}.layer.1.DenseReluDense.wi_1",
           "encoder.block.{i}.layer.1.DenseReluDense.wo"],
}
HUB_FILE = re.compile(r"[\w.-]+/[\w.-]+/.+\.safetensors")


class LoRAError(WeightsError):
    """A LoRA file that cannot be read or does not fit the model."""


# Reading ------------------------------------------------------------------------------------------------------

@dataclass
class ModuleLoRA:
    """One module's low-rank update as the file stores it: W += factor * up @ down."""

    down: mx.array  # (rank, in)
    up: mx.array  # (out, rank)
    alpha: float | None = None  # None: the factor is 1 (or, with metadata, alpha / rank from there)


@dataclass
class LoRAFile:
    """A LoRA file's adapters per component: {component: {(naming, separator, module path): ModuleLoRA}}."""

    name: str
    modules: dict[str, dict[tuple[str, str, str], ModuleLoRA]]
    config: dict[str, dict] = field(default_factory=dict)  # component -> its PEFT LoraConfig fields, if stored
    unknown: list[str] = field(default_factory=list)  # keys of no known naming


def parse_scaled_arg(text: str, kind: str = "LoRA") -> tuple[str, float]:
    """`SOURCE[:SCALE]` (the CLI's --lora and --controlnet) -> (source, scale); scale 1 when not given. ValueError
    naming the `kind` and source when the scale is not a number."""
    source, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or not source:
        return text, 1.0
    return source, check_scale(tail, source, kind)


def check_scale(scale: object, source: str, kind: str = "LoRA") -> float:
    """A LoRA's (or a ControlNet's) scale as a float; ValueError naming it unless it is a finite number."""
    try:
        if isinstance(scale, bool):
            raise ValueError
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"{kind} {source}: scale {scale!r} is not a number; give e.g. {source}:0.8.") from None
    if not math.isfinite(value):
        raise ValueError(f"{kind} {source}: scale {scale!r} is not finite; give a number such as 0.8.")
    return value


def resolve_lora_file(source: str | Path, revision: str | None = None) -> Path:
    """A local .safetensors path, or `ORG/REPO/FILE.safetensors` fetched from the hub (with the PEFT
    `adapter_config.json` beside it, if the repo has one)."""
    path = Path(source).expanduser()
    refuse_pickle(path)
    if path.is_file():
        return path
    text = str(source)
    if not path.exists() and HUB_FILE.fullmatch(text) and is_repo_id("/".join(text.split("/")[:2])):
        org, repo, filename = text.split("/", 2)
        local = download_file(f"{org}/{repo}", filename, revision)
        config = str(Path(filename).with_name("adapter_config.json"))
        try:
            download_file(f"{org}/{repo}", config, revision)
        except ModelNotFoundError:
            pass  # no PEFT config: a diffusers / kohya file carries its alphas itself
        return local
    if path.is_dir():
        raise LoRAError(f"LoRA {source}: is a folder; pass the .safetensors file inside it.")
    raise LoRAError(f"LoRA {source}: no such file; pass a .safetensors path or ORG/REPO/FILE.safetensors on the hub.")


def _peft_config(path: Path) -> dict[str, dict]:
    """The LoraConfig fields per component: diffusers' `lora_adapter_metadata` header entry (keys prefixed by
    component), or a raw PEFT file's adapter_config.json beside it (for the transformer)."""
    with safe_open(str(path), "numpy") as f:
        metadata = f.metadata() or {}
    configs: dict[str, dict] = {}
    if "lora_adapter_metadata" in metadata:
        for key, value in json.loads(metadata["lora_adapter_metadata"]).items():
            component, _, name = key.partition(".")
            configs.setdefault(component, {})[name] = value
    sibling = path.with_name("adapter_config.json")
    if sibling.is_file() and "transformer" not in configs:
        configs["transformer"] = json.loads(sibling.read_text())
    return configs


def read_lora(source: str | Path, revision: str | None = None) -> LoRAFile:
    """Read a LoRA file (any supported naming) into per-component module adapters; nothing is mapped yet."""
    path = resolve_lora_file(source, revision)
    tensors = load_safetensors(path)
    name = str(source)
    for pattern, kind in UNSUPPORTED.items():
        found = next((k for k in tensors if re.fullmatch(pattern, k)), None)
        if found:
            raise LoRAError(f"LoRA {name}: {kind} files are not supported (tensor {found}); use a plain LoRA.")
    parts: dict[tuple[str, tuple[str, str, str]], dict[str, mx.array]] = {}
    unknown = []
    for key, value in tensors.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if prefix is None or suffix is None:
            unknown.append(key)
            continue
        component, naming, sep = PREFIXES[prefix]
        module = key[len(prefix):-len(suffix)]
        parts.setdefault((component, (naming, sep, module)), {})[SUFFIXES[suffix]] = value
    modules: dict[str, dict] = {}
    for (component, module), found in parts.items():
        if "down" not in found or "up" not in found:
            missing = "up" if "down" in found else "down"
            raise LoRAError(f"LoRA {name}: module {module[2]} has no {missing} matrix; the file is incomplete.")
        down, up = _as_matrices(found["down"], found["up"])
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoRAError(f"LoRA {name}: module {module[2]} has matrices of shapes {tuple(found['up'].shape)} and "
                            f"{tuple(found['down'].shape)}, neither a linear layer's (out, rank) and (rank, in) nor "
                            "a convolution's (rank, in, k, k) and (out, rank, 1, 1); this kind of LoRA is not "
                            "supported.")
        alpha = float(found["alpha"].item()) if "alpha" in found else None
        modules.setdefault(component, {})[module] = ModuleLoRA(down, up, alpha)
    if not modules:
        raise LoRAError(f"LoRA {name}: no LoRA tensors found (e.g. {_first(unknown)}); "
                        f"{_architecture_hint(tensors)}.")
    # Read now (the file is small): a lazy load belongs to this thread's stream, and a server applies the
    # adapters on its worker thread.
    mx.eval([(m.down, m.up) for adapters in modules.values() for m in adapters.values()])
    return LoRAFile(name, modules, _peft_config(path), unknown)


def _as_matrices(down: mx.array, up: mx.array) -> tuple[mx.array, mx.array]:
    """A convolution LoRA (torch layouts: down (rank, in, kh, kw), up (out, rank, 1, 1)) as the linear map of each
    flattened (kh, kw, in) patch, the order of our NHWC convolution weights; linear ones as they are."""
    if down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1):
        return down.transpose(0, 2, 3, 1).reshape(down.shape[0], -1), up.reshape(up.shape[:2])
    return down, up


def _first(items: Sequence[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


# What a file is for ---------------------------------------------------------------------------------------

def _sd3_family(keys: Sequence[str], tensors: Mapping[str, mx.array]) -> str | None:
    blocks = {int(m.group(2)) for k in keys if (m := re.search(r"(transformer_blocks|joint_blocks)[._](\d+)[._]", k))}
    if not blocks:
        return None
    dual = any(re.search(r"[._]attn2[._]", k) for k in keys)
    width = next((v.shape[1] for k, v in tensors.items()
                  if re.search(r"[._](to_q|qkv)[._].*(lora_A|lora_down)", k) and "attn" in k), None)
    names = [p.name for p in PRESETS.values()
             if p.transformer.num_layers == max(blocks) + 1 and bool(p.transformer.dual_attention_layers) == dual
             and width in (None, p.transformer.hidden_size)]
    described = f"an SD3-family transformer with {max(blocks) + 1}{' or more' if len(blocks) == 1 else ''} blocks"
    described += f", width {width}" if width else ""
    described += ", dual attention" if dual else ""
    return described + (f" ({' / '.join(dict.fromkeys(n.split('-turbo')[0] for n in names))})" if names else "")


def _architecture_hint(tensors: Mapping[str, mx.array]) -> str:
    keys = list(tensors)
    if any(re.search(r"(double_blocks|single_blocks|single_transformer_blocks)", k) for k in keys):
        return "it appears to be a FLUX LoRA"
    if any(re.search(r"(down_blocks|up_blocks|input_blocks|output_blocks|mid_block|middle_block)", k) for k in keys):
        return "it appears to be an SDXL or SD 1.x/2.x (UNet) LoRA"
    family = _sd3_family(keys, tensors)
    return f"it appears to be for {family}" if family else "its naming is not an SD3 LoRA's"


def _model_description(model: nn.Module, component: str) -> str:
    if isinstance(model, mmdit.MMDiT):
        c = model.config
        names = [p.name for p in PRESETS.values() if p.transformer == type(c)(**{**vars(c), "sample_size":
                                                                                  p.transformer.sample_size})]
        dual = ", dual attention" if c.dual_attention_layers else ""
        return (f"this model's transformer has {c.num_layers} blocks, width {c.hidden_size}{dual}"
                + (f" ({names[0]})" if names else ""))
    return f"this model's {component} differs"


# Mapping onto our modules ------------------------------------------------------------------------------------

def _renamed(module: str, rules: Sequence[Rule]) -> str:
    """A module's name under tensor-renaming `rules` (those of the model's loader)."""
    return remap({f"{module}.weight": mx.zeros((1, 1))}, rules).popitem()[0].removesuffix(".weight")


def _ours_from_diffusers(module: str) -> tuple[str, int, int]:
    """A diffusers SD3Transformer2DModel module -> (our module, part, parts): our q/k/v are one fused layer."""
    prefix, _, last = module.rpartition(".")
    for fuse in (r for r in mmdit.DIFFUSERS_RULES if isinstance(r, Fuse)):
        if last in fuse.parts:
            return f"{prefix}.{fuse.target}" if prefix else fuse.target, fuse.parts.index(last), len(fuse.parts)
    return _renamed(module, [r for r in mmdit.DIFFUSERS_RULES if isinstance(r, Rule)]), 0, 1


def _reference_names(model: nn.Module, component: str) -> dict[str, list[str]]:
    """Every module name of `model` in each naming its LoRAs use, dotted: {naming: names}."""
    if component == "transformer":
        stability = transformer_modules(model.config.num_layers)
        rules = transformer_rules(model.config.num_layers)
        diffusers = [k.removesuffix(".weight") for k in map_tensors({f"{m}.weight": mx.zeros((6, 1))
                                                                       for m in stability}, rules)]
        return {"stability": stability, "diffusers": diffusers}
    kind, layers = ("t5", len(model.blocks)) if isinstance(model, t5.T5Encoder) else ("clip", len(model.layers))
    return {"transformers": [t.format(i=i) for i in range(layers) for t in TEXT_ENCODER_MODULES[kind]]}


@dataclass
class _Part:
    down: mx.array
    up: mx.array  # already multiplied by the file's factor
    module: str  # the file's module name, for messages


def _factor(lora: LoRAFile, component: str, module: str, entry: ModuleLoRA, rank: int) -> float:
    """alpha / rank: the file's alpha tensor, else its PEFT config (rank / alpha patterns, rsLoRA), else 1."""
    if entry.alpha is not None:
        return entry.alpha / rank
    config = lora.config.get(component)
    if not config or "lora_alpha" not in config:
        return 1.0

    def pattern(patterns: Mapping, default):
        key = next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)
        return patterns[key] if key is not None else default

    alpha = pattern(config.get("alpha_pattern") or {}, config["lora_alpha"])
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _is_split_qkv(module: str, entry: ModuleLoRA) -> bool:
    """kohya's `split_qkv`: down (3r, in) and a block-diagonal up (3d, 3r) trained at alpha / r."""
    rank, (out, _) = entry.down.shape[0], entry.up.shape
    if not module.endswith("qkv") or rank % 3 or out % 3:
        return False
    r, d = rank // 3, out // 3
    blocks = entry.up.reshape(3, d, 3, r)
    off = mx.abs(blocks).sum(axis=(1, 3)) * (1 - mx.eye(3))
    return bool(off.sum() == 0) and bool(mx.any(entry.up != 0))


def map_lora(lora: LoRAFile, model: nn.Module, component: str) -> dict[str, tuple[mx.array, mx.array]]:
    """The file's adapters for `component` as {our layer path: (down (R, in), up (out, R))}, the factor folded
    into up; our fused q/k/v layers take separate adapters block-diagonally (one up per part, (3, out / 3, r),
    where all three have one of rank PER_PART_MIN_RANK or more; `dense_up`). LoRAError when a module matches
    nothing in the model or has the wrong shape."""
    entries = lora.modules.get(component, {})
    if not entries:
        return {}
    names = _reference_names(model, component)
    by_underscore = {naming: {n.replace(".", "_"): n for n in ns} for naming, ns in names.items()}
    layers = {path: m for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
              if isinstance(m, (nn.Linear, nn.QuantizedLinear)) or _is_patchify(m)}
    if component == "transformer":
        stability_rules = transformer_rules(model.config.num_layers)
        to_ours = _ours_from_diffusers
    else:
        encoder_rules = t5.RULES if isinstance(model, t5.T5Encoder) else clip.RULES
        to_ours = lambda module: (_renamed(module, encoder_rules), 0, 1)  # noqa: E731
    parts: dict[str, dict[int, _Part]] = {}
    counts: dict[str, int] = {}
    unmatched = []
    for (naming, sep, module), entry in entries.items():
        dotted = module if sep == "." else by_underscore.get(naming, {}).get(module)
        if dotted is None:
            unmatched.append(module)
            continue
        rank = entry.down.shape[0]
        ups = {dotted: entry.up}
        if naming == "stability":  # -> diffusers names: q/k/v row thirds, the final adaLNs' halves swapped
            rank //= 3 if _is_split_qkv(dotted, entry) else 1
            ups = {k.removesuffix(".weight"): v for k, v in map_tensors({f"{dotted}.weight": entry.up},
                                                                                   stability_rules).items()}
        factor = _factor(lora, component, dotted, entry, rank)
        for reference, up in ups.items():
            path, index, count = to_ours(reference)
            if path not in layers:
                unmatched.append(module)
                break
            parts.setdefault(path, {})[index] = _Part(entry.down, up.astype(mx.float32) * factor, module)
            counts[path] = count
    if unmatched:
        unmatched.sort(key=lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m)])
        raise LoRAError(
            f"LoRA {lora.name}: {len(unmatched)} of its {len(entries)} {component} modules match nothing in this "
            f"model ({_first(unmatched)}); {_architecture_hint(_tensors_of(entries))}, "
            f"{_model_description(model, component)}. Use a LoRA made for this model.")
    return {path: _combine(lora, found, counts[path], layers[path], model, component)
            for path, found in parts.items()}


def _tensors_of(entries: Mapping[tuple[str, str, str], ModuleLoRA]) -> dict[str, mx.array]:
    """The down matrices by `module<sep>lora_down`, enough for `_architecture_hint`."""
    return {module + sep + "lora_down": e.down for (_, sep, module), e in entries.items()}


def _is_patchify(layer: nn.Module) -> bool:
    """A convolution that is a linear map of each patch (stride = kernel, no padding): the patch embedding."""
    return isinstance(layer, nn.Conv2d) and tuple(layer.stride) == tuple(layer.weight.shape[1:3]) \
        and tuple(layer.padding) == (0, 0) and layer.groups == 1 and layer.dilation in (1, (1, 1))


def _layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of the layer as a linear map (a patchify convolution's input: one flattened patch)."""
    if isinstance(layer, nn.Conv2d):
        return layer.weight.shape[0], math.prod(layer.weight.shape[1:])
    out, columns = layer.weight.shape
    return out, columns * 32 // layer.bits if isinstance(layer, nn.QuantizedLinear) else columns


# Below this rank per part, q/k/v ups multiply as fast as one mostly-zero block-diagonal matrix fused with the add
# as per part (a batched matmul into the per-part base output, `_Adapted.output_parts`), measured on the CPU at
# SD3.5's widths (rank 16 within the noise; from 32 per part is faster); a file's q/k/v adapters of lower rank are
# stored block-diagonal.
PER_PART_MIN_RANK = 32


def _combine(lora: LoRAFile, found: dict[int, _Part], count: int, layer: nn.Module, model: nn.Module,
             component: str) -> tuple[mx.array, mx.array]:
    """One layer's (down, up) from the adapters of its parts (one, or q, k, v), checked against its shape."""
    out, inputs = _layer_dims(layer)
    for part in found.values():
        if part.down.shape[1] != inputs or part.up.shape[0] * count != out:
            hint = _architecture_hint({part.module + ".lora_down": part.down})
            raise LoRAError(
                f"LoRA {lora.name}: module {part.module} is {part.up.shape[0]}x{part.down.shape[1]} but this "
                f"model's layer is {out // count}x{inputs}; {hint}, {_model_description(model, component)}. "
                "Use a LoRA made for this model.")
    ordered = [found.get(i) for i in range(count)]
    if count == 1 or (all(ordered) and all(p.down is ordered[0].down for p in ordered)):
        # one down matrix for the whole layer (a kohya fused qkv, or a plain layer)
        return ordered[0].down, mx.concatenate([p.up for p in ordered])
    r = max(p.down.shape[0] for p in found.values())
    if all(ordered) and r >= PER_PART_MIN_RANK:  # q, k, v: one up per part (`dense_up`), ranks padded to the largest
        pad = [r - p.down.shape[0] for p in ordered]
        return (mx.concatenate([mx.pad(p.down, [(0, n), (0, 0)]) for p, n in zip(ordered, pad)]),
                mx.stack([mx.pad(p.up, [(0, 0), (0, n)]) for p, n in zip(ordered, pad)]))
    # low ranks, or some of q, k, v: downs stacked, ups block-diagonal (zero rows for a part without adapter)
    present = [p for p in ordered if p is not None]
    rank = sum(p.down.shape[0] for p in present)
    rows, start = [], 0
    for p in ordered:
        if p is None:
            rows.append(mx.zeros((out // count, rank)))
            continue
        r = p.down.shape[0]
        rows.append(mx.pad(p.up, [(0, 0), (start, rank - start - r)]))
        start += r
    return mx.concatenate([p.down for p in present]), mx.concatenate(rows)


# Unfused adapters ---------------------------------------------------------------------------------------------

class LoRAScales:
    """The user scale of each applied LoRA, by position; shared by every adapted layer, so changing `values`
    changes all of them without reloading anything."""

    def __init__(self, values: Sequence[float] = ()):
        self.values = list(values)


def dense_up(up: mx.array) -> mx.array:
    """An adapter's up matrix (out, R). Adapters of the q, k and v of a fused layer may keep one up per part,
    (parts, out / parts, r): they act block-diagonally, part i's rows on its own r rows of down."""
    if up.ndim == 2:
        return up
    if up.shape[0] == 1:
        return up[0]
    parts, _, r = up.shape
    return mx.concatenate([mx.pad(up[i], [(0, 0), (i * r, (parts - 1 - i) * r)]) for i in range(parts)])


def _per_part_up(adapter: Mapping[str, mx.array]) -> bool:
    """Whether an adapter multiplies one up per part, per part: ups kept so (3-d) of rank PER_PART_MIN_RANK or more
    (lower ranks, as a trained adapter's may be, act through their block-diagonal `dense_up`)."""
    up = adapter["up"]
    return up.ndim == 3 and up.shape[-1] >= PER_PART_MIN_RANK


def transposed_layout(matrix: mx.array) -> mx.array:
    """`matrix` (or each matrix of a stack) stored transposed: the same array, its `.swapaxes(-1, -2)` contiguous,
    the layout in which the CPU BLAS multiplies skinny adapter matrices fastest."""
    return mx.contiguous(matrix.swapaxes(-1, -2)).swapaxes(-1, -2)


class _Adapted:
    """Mixed into a linear layer class: its output plus sum_i scale_i * up_i (down_i x) over its adapters,
    stored in `self.lora` = {str(LoRA position): {"down": (R, in), "up": (out, R) or one per part}}. Each adapter
    with a non-zero scale costs two skinny matmuls, the second fused with the add and the scale (`mx.addmm`); per
    part a batched one into the per-part base output (`output_parts`). (Stacking the adapters into one pair of
    matrices costs a copy of them per call, more than the extra matmuls save.)"""

    lora_scales: LoRAScales

    def __call__(self, x: mx.array) -> mx.array:
        active = self._active()
        if any(_per_part_up(adapter) for adapter, _ in active):
            parts = self._per_part(x, active)
            return mx.moveaxis(parts, 0, -2).reshape(*parts.shape[1:-1], -1)
        y = super().__call__(x)
        if active:
            inputs = self.adapter_input(x)
            for adapter, scale in active:
                y = mx.addmm(y, inputs @ adapter["down"].T, dense_up(adapter["up"]).T, alpha=scale)
        return y

    def output_parts(self, x: mx.array, parts: int) -> mx.array:
        """The output's features cut into `parts` equal slices, stacked first: (parts, ..., out / parts), as a
        fused q/k/v's attention takes them. Adapters with one up per part add into each slice of the base output,
        which is computed in this layout, saving a pass over the whole output."""
        active = self._active()
        if any(_per_part_up(adapter) for adapter, _ in active):
            return self._per_part(x, active)
        y = self(x)
        return mx.moveaxis(y.reshape(*y.shape[:-1], parts, -1), -2, 0)

    def _active(self) -> list[tuple[dict, float]]:
        """The adapters with a non-zero scale, with their scales."""
        return [(a, s) for k, a in self["lora"].items() if (s := self.lora_scales.values[int(k)]) != 0]

    def _per_part(self, x: mx.array, active: list[tuple[dict, float]]) -> mx.array:
        """(parts, ..., out / parts): the base output per part plus each adapter's part i, its low-rank input's
        part i times up[i] for one up per part, else times up's rows of part i."""
        parts = next(adapter["up"].shape[0] for adapter, _ in active if _per_part_up(adapter))
        tokens = x.reshape(-1, x.shape[-1])
        y = self.base_parts(tokens, parts)
        inputs = self.adapter_input(tokens)
        for adapter, scale in active:
            low = inputs @ adapter["down"].T
            if _per_part_up(adapter):
                low = mx.moveaxis(low.reshape(low.shape[0], parts, -1), 1, 0)  # (parts, tokens, r)
                up_t = adapter["up"].swapaxes(1, 2)
            else:
                up = dense_up(adapter["up"])
                up_t = up.reshape(parts, -1, up.shape[-1]).swapaxes(1, 2)  # (parts, R, out / parts)
            y = mx.addmm(y, low, up_t, alpha=scale)
        return y.reshape(parts, *x.shape[:-1], -1)

    def base_parts(self, x: mx.array, parts: int) -> mx.array:
        """The layer's own output for `x` (tokens, in) as (parts, tokens, out / parts)."""
        return mx.moveaxis(super().__call__(x).reshape(x.shape[0], parts, -1), 1, 0)

    def adapter_input(self, x: mx.array) -> mx.array:
        """What the adapters' down matrices take: the layer's input."""
        return x

    def delta_weight(self) -> mx.array:
        """sum_i scale_i * up_i @ down_i, float32."""
        total = mx.zeros(_layer_dims(self))
        for key, adapter in self["lora"].items():
            up, down = dense_up(adapter["up"]).astype(mx.float32), adapter["down"].astype(mx.float32)
            total = total + self.lora_scales.values[int(key)] * (up @ down)
        return total


class LoRALinear(_Adapted, nn.Linear):
    """`nn.Linear` with unfused LoRA adapters (same parameter names, plus `lora`)."""

    def base_parts(self, x: mx.array, parts: int) -> mx.array:
        """The layer's own output per part from one batched matmul, contiguous, so that the adapters' add reuses
        its buffer."""
        out, inputs = self.weight.shape
        weight = self.weight.reshape(parts, out // parts, inputs).swapaxes(1, 2)
        return mx.addmm(self.bias.reshape(parts, 1, -1), x, weight) if "bias" in self else x @ weight

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **kwargs) -> nn.Module:
        quantized = QuantizedLinear.from_linear(self, group_size, bits, mode)
        return _adapted(quantized, self["lora"], self.lora_scales)


class LoRAQuantizedLinear(_Adapted, QuantizedLinear):
    """A quantized linear layer (with the CPU backend's fast path) with unfused LoRA adapters in full precision."""


class LoRAPatchConv2d(_Adapted, nn.Conv2d):
    """A patchify `nn.Conv2d` (the patch embedding) with unfused adapters acting on each flattened patch."""

    def adapter_input(self, x: mx.array) -> mx.array:
        """(B, H, W, C) -> (B, H / kh, W / kw, kh * kw * C): each patch flattened as the weight's (kh, kw, in)."""
        b, h, w, c = x.shape
        kh, kw = self.weight.shape[1:3]
        patches = x.reshape(b, h // kh, kh, w // kw, kw, c).transpose(0, 1, 3, 2, 4, 5)
        return patches.reshape(b, h // kh, w // kw, kh * kw * c)


def _adapted(layer: nn.Module, adapters: dict, scales: LoRAScales) -> nn.Module:
    """`layer` as its LoRA class (sharing its arrays), holding `adapters`."""
    if isinstance(layer, _Adapted):
        layer["lora"].update(adapters)
        return layer
    cls = (LoRAQuantizedLinear if isinstance(layer, nn.QuantizedLinear)
           else LoRAPatchConv2d if isinstance(layer, nn.Conv2d) else LoRALinear)
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update(layer.__dict__)
    for key, value in layer.items():
        new[key] = value
    new["lora"] = dict(adapters)
    new.lora_scales = scales
    return new


def _compute_dtype(layer: nn.Module) -> mx.Dtype:
    return layer["scales"].dtype if "scales" in layer else layer.weight.dtype


def apply_loras(model: nn.Module, component: str, loras: Sequence[LoRAFile], scales: LoRAScales) -> nn.Module:
    """Attach each LoRA's adapters for `component` to `model` (in place) as unfused adapters whose user scales
    are `scales.values[i]` for `loras[i]`. Returns the model."""
    layers = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    adapted: dict[str, nn.Module] = {}
    for index, lora in enumerate(loras):
        for path, (down, up) in map_lora(lora, model, component).items():
            layer = adapted.get(path, layers[path])
            dtype = _compute_dtype(layer)
            adapter = {str(index): {"down": transposed_layout(down.astype(dtype)),
                                    "up": transposed_layout(up.astype(dtype))}}
            adapted[path] = _adapted(layer, adapter, scales)
    if adapted:
        model.update_modules(tree_unflatten(list(adapted.items())))
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of `model` holding unfused adapters, by path."""
    return {p: m for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module) if isinstance(m, _Adapted)}


def adapter_bytes(model: nn.Module) -> int:
    """Bytes of the unfused adapters of `model`."""
    return sum(v.nbytes for m in lora_layers(model).values() for _, v in tree_flatten(m["lora"]))


# Fusing -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FuseReport:
    """What fusing changed: the adapted layers, and for the requantized ones the error requantizing added
    (max |requantized - (dequantized + delta)| over their weights, and that relative to their largest weight)."""

    layers: int
    requantized: int
    max_error: float
    max_weight: float

    @property
    def relative_error(self) -> float:
        return self.max_error / self.max_weight if self.max_weight else 0.0


def fuse_loras(model: nn.Module) -> FuseReport:
    """Fold every unfused adapter, at its current scale, into its layer's weight (quantized layers: dequantize,
    add, requantize with the layer's own settings) and turn the layers back into plain ones."""
    fused, requantized, max_error, max_weight = {}, 0, 0.0, 0.0
    for path, layer in lora_layers(model).items():
        delta = layer.delta_weight()
        if isinstance(layer, nn.QuantizedLinear):
            weight = layer.float_weight()
            exact = weight.astype(mx.float32) + delta
            plain = nn.Linear(exact.shape[1], exact.shape[0], bias="bias" in layer)
            plain.weight = exact.astype(weight.dtype)
            new = QuantizedLinear.from_linear(plain, layer.group_size, layer.bits, layer.mode)
            restored = new.float_weight()
            max_error = max(max_error, mx.abs(restored.astype(mx.float32) - exact).max().item())
            max_weight = max(max_weight, mx.abs(exact).max().item())
            requantized += 1
        else:
            new = _plain(layer)
            new.weight = (layer.weight.astype(mx.float32) + delta.reshape(layer.weight.shape)).astype(
                layer.weight.dtype)
        if "bias" in layer:
            new.bias = layer.bias
        fused[path] = new
    if fused:
        model.update_modules(tree_unflatten(list(fused.items())))
    if requantized:
        log.info("fused LoRAs into %d layers; requantizing %d added at most %.2g (%.1f%% of their largest weight)",
                 len(fused), requantized, max_error, 100 * max_error / max_weight)
    return FuseReport(len(fused), requantized, max_error, max_weight)


def _plain(layer: _Adapted) -> nn.Module:
    """A plain layer of the adapted layer's kind and shape (weights to be set)."""
    if isinstance(layer, nn.Conv2d):
        out, kh, kw, inputs = layer.weight.shape
        return nn.Conv2d(inputs, out, (kh, kw), stride=layer.stride, bias="bias" in layer)
    return nn.Linear(layer.weight.shape[1], layer.weight.shape[0], bias="bias" in layer)


# Training adapters and writing files --------------------------------------------------------------------------

# diffusers' SD3 DreamBooth-LoRA script's default targets (the joint attention's projections), and its CLIP ones
DREAMBOOTH_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                      "attn.to_out.0", "attn.to_q", "attn.to_v")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FILE_NAMINGS = {"transformer": "diffusers", "text_encoder": "transformers", "text_encoder_2": "transformers"}


def _to_ours(model: nn.Module, component: str):
    if component == "transformer":
        return _ours_from_diffusers
    rules = t5.RULES if isinstance(model, t5.T5Encoder) else clip.RULES
    return lambda module: (_renamed(module, rules), 0, 1)


def target_modules(model: nn.Module, component: str, targets: str | Sequence[str]) -> list[str]:
    """The reference-named (diffusers / transformers) linear modules of `model` that `targets` selects, as PEFT
    selects them: a list matches names equal to or ending in ".target"; a string is a regular expression that
    must match the whole name. ValueError when nothing matches."""
    names = _reference_names(model, component)[FILE_NAMINGS[component]]
    layers = {p for p, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
              if isinstance(m, (nn.Linear, nn.QuantizedLinear))}
    to_ours = _to_ours(model, component)
    if isinstance(targets, str):
        chosen = [n for n in names if re.fullmatch(targets, n)]
    else:
        chosen = [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]
    chosen = [n for n in chosen if to_ours(n)[0] in layers]
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer of the {component}; use module names such "
                         f"as {', '.join(DREAMBOOTH_TARGETS[:4] if component == 'transformer' else TEXT_ENCODER_TARGETS)}.")
    return chosen


def add_adapters(model: nn.Module, component: str, modules: Sequence[str], rank: int, alpha: float,
                 key: mx.array, scales: LoRAScales | None = None) -> LoRAScales:
    """Attach one trainable float32 adapter of `rank` to each of `modules` (reference names, from
    `target_modules`), initialised as PEFT does (down uniform in +-1/sqrt(in), up zero), scaled alpha / rank.
    Freezes everything else in `model`; returns the shared scales. With `scales` (those of adapters added
    before), the new set is appended to them as adapter `str(len(scales.values))` beside the earlier ones."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
    to_ours = _to_ours(model, component)
    layers = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    parts: dict[str, tuple[int, set[int]]] = {}
    for module in modules:
        path, index, count = to_ours(module)
        parts.setdefault(path, (count, set()))[1].add(index)
    scales = scales if scales is not None else LoRAScales()
    name = str(len(scales.values))
    scales.values.append(alpha / rank)
    adapted = {}
    for (path, (count, chosen)), layer_key in zip(parts.items(), mx.random.split(key, len(parts))):
        out, inputs = _layer_dims(layers[path])
        bound = inputs ** -0.5
        down = mx.random.uniform(-bound, bound, (count * rank, inputs), key=layer_key)
        mask = mx.repeat(mx.array([float(i in chosen) for i in range(count)]), rank)[:, None]
        adapter = {"down": down * mask, "up": mx.zeros((count, out // count, rank))}
        adapted[path] = _adapted(layers[path], {name: adapter}, scales)
    model.update_modules(tree_unflatten(list(adapted.items())))
    model.freeze()
    for layer in adapted.values():
        layer.unfreeze(keys=[k for k, _ in tree_flatten({"lora": {name: layer["lora"][name]}})], recurse=False)
    return scales


def adapter_tensors(model: nn.Module, component: str, modules: Sequence[str], dtype: mx.Dtype = mx.float32,
                    adapter: str = "0") -> dict[str, mx.array]:
    """The adapters of `modules` as a diffusers / PEFT state dict: {component.module.lora_A/B.weight}."""
    to_ours = _to_ours(model, component)
    layers = lora_layers(model)
    tensors = {}
    for module in modules:
        path, index, count = to_ours(module)
        weights = layers[path]["lora"][adapter]
        rank = weights["down"].shape[0] // count
        tensors[f"{component}.{module}.lora_A.weight"] = weights["down"][index * rank:(index + 1) * rank].astype(dtype)
        tensors[f"{component}.{module}.lora_B.weight"] = weights["up"][index].astype(dtype)
    return tensors


def save_lora(path: str | Path, tensors: Mapping[str, mx.array], configs: Mapping[str, Mapping]) -> Path:
    """Write a LoRA file as diffusers' `save_lora_weights` does: the tensors (from `adapter_tensors`) and each
    component's PEFT LoraConfig fields (`r`, `lora_alpha`, `target_modules`, ...) in the `lora_adapter_metadata`
    header entry. Written to a temporary name and renamed; an existing file is replaced."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a LoRA file is written as .safetensors; use a name ending in .safetensors.")
    metadata = {f"{component}.{k}": v for component, fields in configs.items() for k, v in fields.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial.safetensors")
    mx.save_safetensors(str(temporary), dict(tensors),
                        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata, sort_keys=True)})
    temporary.replace(path)
    return path


def peft_config(modules: Sequence[str], rank: int, alpha: float) -> dict:
    """The LoraConfig fields diffusers needs to rebuild an adapter trained here."""
    return {"r": rank, "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True}


# A pipeline's LoRAs -----------------------------------------------------------------------------------------


class LoRAs:
    """The LoRAs of a pipeline: each file read once, applied to every component it adapts whenever that
    component is (re)loaded, with user scales that `set_scales` changes without reloading anything."""

    def __init__(self, specs: Sequence = ()):
        pairs = [(s, 1.0) if isinstance(s, (str, Path)) else tuple(s) for s in specs]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("loras must be a list of (path_or_repo_file, scale) pairs.")
        self.sources = [str(source) for source, _ in pairs]
        scales = [check_scale(scale, str(source)) for source, scale in pairs]
        self.files = [read_lora(source) for source in self.sources]
        self.scales = LoRAScales(scales)
        self.elements: dict[str, int] = {}  # adapter elements per component, counted by `check`

    def __bool__(self) -> bool:
        return bool(self.files)

    def components(self) -> set[str]:
        return {c for f in self.files for c in f.modules}

    def apply(self, model: nn.Module, component: str) -> nn.Module:
        """`model` (the pipeline's `component`) with every LoRA's adapters for it attached."""
        return apply_loras(model, component, self.files, self.scales) if self.files else model

    def check(self, models: Mapping[str, nn.Module]) -> None:
        """Raise LoRAError unless each LoRA fits the components it adapts; `models` may be lazy (unevaluated)
        modules of the right configuration. Count the adapters' elements; warn about adapters for a component
        that will not be loaded."""
        self.elements = {}
        for lora in self.files:
            for component in lora.modules:
                if component in models:
                    mapped = map_lora(lora, models[component], component).values()
                    self.elements[component] = self.elements.get(component, 0) + sum(
                        down.size + up.size for down, up in mapped)
                else:
                    log.warning("LoRA %s: its %s adapters are unused (that encoder is not loaded).", lora.name,
                                component)
            if lora.unknown:
                log.warning("LoRA %s: %d tensors of no LoRA naming are ignored (%s).", lora.name, len(lora.unknown),
                            _first(lora.unknown))

    def set_scales(self, scales: Sequence[float]) -> None:
        if len(scales) != len(self.files):
            raise ValueError(f"got {len(scales)} LoRA scales for {len(self.files)} LoRAs; pass one per LoRA, in order.")
        self.scales.values[:] = [check_scale(s, source) for s, source in zip(scales, self.sources)]

    def nbytes(self, dtype: mx.Dtype) -> dict[str, int]:
        """Bytes the unfused adapters take in `dtype`, per component (as counted by `check`)."""
        return {component: n * dtype.size for component, n in self.elements.items()}

    def metadata(self) -> list[dict]:
        """[{"source", "scale"}] per LoRA, for an image's metadata."""
        return [{"source": s, "scale": v} for s, v in zip(self.sources, self.scales.values)]

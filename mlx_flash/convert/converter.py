"""Convert an SD3 / SD3.5 model to an mlx-flash folder: MLX names and layouts, one dtype, optionally
quantized, plus tokenizers, scheduler, a manifest and a model card.

Components are converted one after another and their tensors written one at a time (see mlx_flash.weights.write_component). All
output goes to a temporary folder beside the destination, renamed into place at the end: a failed or
interrupted run leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..clip import clip_from_weights
from ..hub import TransportError, is_repo_id
from ..layout import MANIFEST, parse_dtype, read_manifest
from ..lora import LoRAs, fuse_loras
from ..mmdit import MMDiT, mmdit_from_diffusers_weights
from ..quantization import Quantization, quantize_model
from ..t5 import t5_from_weights
from ..vae import vae_from_weights
from ..version import __version__
from ..weights import WeightsError, write_component
from .card import model_card
from .sources import COMPONENTS, Source, open_source

log = logging.getLogger("mlx_flash")
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG)

FORMAT_VERSION = 1
DEFAULT_DTYPE = "bfloat16"  # float32's range (SD3.5 Large overflows float16), lossless from bf16 sources
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
EXAMPLE_BASE = "stabilityai/stable-diffusion-3.5-medium"


def build(component: str, config: Mapping, tensors: Mapping[str, mx.array], dtype: mx.Dtype) -> nn.Module:
    """The MLX model of a component from its diffusers config and tensors (lazy: nothing is computed)."""
    if component == "transformer":
        return mmdit_from_diffusers_weights(tensors, dtype, sample_size=config.get("sample_size", 128),
                                            head_dim=config.get("attention_head_dim", 64))
    builder = {"vae": vae_from_weights, "text_encoder_3": t5_from_weights}.get(component, clip_from_weights)
    return builder(config, tensors, dtype, component)


def _prepare(source: Source, component: str, dtype: mx.Dtype, quantization: Quantization | None,
             loras: LoRAs | None = None):
    """(config.json, flat lazy tensors, "quantization" entry) of a converted component, the `loras` fused into
    its weights before any quantization. Nothing else keeps a reference to the tensors, so each is freed once
    written."""
    config, tensors = source.read(component)
    model = build(component, config, tensors, dtype)
    if loras and component in loras.components():
        fuse_loras(loras.apply(model, component))
    settings = quantize_model(model, quantization) if quantization else None
    model_config = model.config.to_diffusers() if isinstance(model, MMDiT) else model.config.to_dict()
    return model_config, dict(tree_flatten(model.parameters())), settings


def _check_output(output: Path, sources: list[str | Path | None], force: bool) -> None:
    """Refuse to replace an existing output without `force`, and to write into, over or around a source."""
    if output.exists() and not force:
        raise FileExistsError(f"{output} already exists; pass --force to replace it, or choose another output.")
    target = output.resolve()
    for source in sources:
        path = Path(source).expanduser() if source is not None else None
        if path is None or not path.exists():
            continue  # a hub repo id: its files are in the HF cache
        path = path.resolve()
        if target == path or target in path.parents:
            raise ValueError(f"{output} holds the source {source}; write the conversion to another folder.")
        if path in target.parents:
            raise ValueError(f"{output} is inside the source {source}; write the conversion to a folder outside it.")


def _check_complete(source: Source, components: list[str], description: str) -> None:
    missing = [name for name in components if name not in source.readers]
    if missing:
        raise WeightsError(
            f"{description} has no {', '.join(missing)}; pass --base with the diffusers repo or folder of the same "
            f"model (e.g. {EXAMPLE_BASE}) to take {'them' if len(missing) > 1 else 'it'} from"
            + (", or --no-t5" if missing == ["text_encoder_3"] else "") + "."
        )
    if source.folder is None:
        raise WeightsError(f"{description} has no tokenizers or scheduler (single files never do); pass --base with "
                           f"the diffusers repo or folder of the same model (e.g. {EXAMPLE_BASE}).")


def _copy_extras(folder: Path, out: Path, use_t5: bool) -> None:
    """Copy the tokenizer folders (tokenizer_3 only with T5) and the scheduler config."""
    for name in TOKENIZERS[: 3 if use_t5 else 2]:
        if not (folder / name).is_dir():
            raise WeightsError(f"{folder}: no {name}/ folder; the model folder is incomplete (re-download it).")
        shutil.copytree(folder / name, out / name)
    if (folder / "scheduler").is_dir():
        shutil.copytree(folder / "scheduler", out / "scheduler")


def _source_defaults(folder: Path) -> dict:
    """The sampling "defaults" of the source folder's own mlx_flash.json, if any, to carry over."""
    defaults = read_manifest(folder).get("defaults")
    return {"defaults": defaults} if defaults else {}


def _partial_folder(output: Path) -> Path:
    """The folder a conversion into `output` is written to, beside it, with the user's usual permissions;
    the leftover of a killed conversion into the same place is removed first."""
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    if tmp.exists():
        log.warning("removing %s, left by an interrupted conversion", tmp)
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    tmp.mkdir()  # mode 0o777 & ~umask, as any folder the user creates
    return tmp


def _replace(tmp: Path, output: Path) -> None:
    """Move the finished conversion into place, replacing `output` (only after the new one is complete)."""
    if not output.exists():
        tmp.rename(output)
        return
    old = tmp.with_name(tmp.name + "-old")
    output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old) if old.is_dir() else old.unlink()


def check_repo_id(repo_id: str) -> None:
    """Raise ValueError unless `repo_id` reads ORG/NAME."""
    if not is_repo_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hugging Face repo id; use ORG/NAME.")


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str = DEFAULT_DTYPE,
    bits: Mapping[str, int] | None = None,
    group_size: int = 64,
    policy: str = "mixed",
    use_t5: bool = True,
    revision: str | None = None,
    base: str | Path | None = None,
    encoder_files: Mapping[str, str | Path] | None = None,
    upload_repo: str | None = None,
    force: bool = False,
    loras: Sequence = (),
) -> Path:
    """Convert `source` (hub repo id, diffusers folder or .safetensors single file) to an mlx-flash folder
    `output` that `mlx_flash.load_pipeline` loads. `bits` maps components ("transformer", "vae",
    "text_encoder", "text_encoder_2", "text_encoder_3") to quantization bits (0 or absent: none).
    `base` and `encoder_files`: see `open_source`. `loras`: (file, scale) pairs (see `load_pipeline`) fused into
    the weights they adapt, before quantization. Returns `output`."""
    output = Path(output).expanduser()
    precision = parse_dtype(dtype)
    unknown = sorted(set(bits or {}) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; quantize among {', '.join(COMPONENTS)}.")
    quantizations = {name: Quantization(b, group_size, policy) for name, b in (bits or {}).items() if b}
    if upload_repo is not None:
        check_repo_id(upload_repo)
    _check_output(output, [source, base, *(encoder_files or {}).values()], force)
    loras = LoRAs(loras)
    src = open_source(source, use_t5=use_t5, revision=revision, base=base, encoder_files=encoder_files)
    components = [name for name in COMPONENTS if use_t5 or name != "text_encoder_3"]
    _check_complete(src, components, str(source))

    tmp = _partial_folder(output)
    try:
        entries = {}
        for name in components:
            config, tensors, settings = _prepare(src, name, precision, quantizations.get(name), loras)
            size = write_component(tmp / name, tensors, config, settings, name)
            q = quantizations.get(name)
            entries[name] = {"dtype": dtype, "bytes": size,
                             "quantization": q and {"bits": q.bits, "group_size": q.group_size, "policy": q.policy}}
            mx.clear_cache()
        _copy_extras(src.folder, tmp, use_t5)
        manifest = {"format_version": FORMAT_VERSION, "mlx_flash_version": __version__, "mlx_version": mx.__version__,
                    "source": src.origin, "t5": use_t5, "components": entries, **_source_defaults(src.folder),
                    **({"loras_fused": loras.metadata()} if loras else {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        (tmp / "README.md").write_text(model_card(manifest, upload_repo or str(output)))
        _replace(tmp, output)
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        raise OSError(f"writing {output} failed ({err.strerror}); nothing was changed: free some space or "
                      "choose another output.") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if upload_repo is not None:
        upload(output, upload_repo)
    return output


def upload(folder: Path, repo_id: str) -> None:
    """Push a converted folder to the Hugging Face Hub, creating the repo if needed (HF_TOKEN or
    `hf auth login` authenticates)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload mlx-flash conversion")
    except (HfHubHTTPError, OSError, TransportError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"uploading {folder} to {repo_id} failed ({reason}); the conversion is kept: log in with "
                      f"`hf auth login` (or set HF_TOKEN) with write access to {repo_id}, then retry with "
                      f"`hf upload {repo_id} {folder}`.") from err

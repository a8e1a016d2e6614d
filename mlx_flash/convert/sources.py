"""What a conversion reads: the components of a model, each as (config, diffusers-named lazy tensors).

A `Source` is built from a diffusers-layout folder (local, or a hub repo fetched into the HF cache), from a
Stability single-file checkpoint, or from a single file completed by a `base` folder (tokenizers,
scheduler, missing text encoders) and separate text encoder files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx

from ..configs import check_model_folder
from ..hub import resolve_model_dir
from ..layout import read_json
from ..single_file import ENCODER_KINDS
from ..weights import (
    PICKLE_SUFFIXES,
    WeightsError,
    is_converted,
    read_component,
    refuse_pickle,
)

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")

Reader = Callable[[], tuple[dict, dict[str, mx.array]]]


@dataclass
class Source:
    """`readers[component]()` reads that component; `folder` holds the tokenizers and the scheduler (a
    diffusers layout), if anything does; `origin` describes where it all came from, for the manifest."""

    origin: dict
    readers: dict[str, Reader] = field(default_factory=dict)
    folder: Path | None = None

    def read(self, component: str) -> tuple[dict, dict[str, mx.array]]:
        """(config, tensors) of `component`. The source keeps no reference to them, so they are freed (and
        the checkpoint's pages released) as soon as the caller drops them."""
        return self.readers.pop(component)()


def _hub_origin(folder: Path, revision: str | None) -> dict:
    """The repo id and commit of a Hugging Face cache snapshot (.../models--org--name/snapshots/<commit>)."""
    repo_dir = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo_dir.startswith("models--"):
        return {"repo": repo_dir[len("models--"):].replace("--", "/"), "revision": revision or "main",
                "commit": folder.name}
    return {"folder": str(folder.resolve())}


def folder_source(model: str | Path, *, use_t5: bool, revision: str | None = None) -> Source:
    """A diffusers-layout folder, or a hub repo id fetched into the HF cache (HF_TOKEN, HF_HUB_OFFLINE and
    `revision` honoured; no T5 files without `use_t5`)."""
    folder = resolve_model_dir(model, use_t5=use_t5, revision=revision)
    check_model_folder(folder)
    config = folder / "transformer" / "config.json"
    if config.is_file() and is_converted(read_json(config)):
        raise WeightsError(f"{model} is already an mlx-flash model folder; convert from the original checkpoint "
                           "(hub repo, diffusers folder or single file) instead.")
    readers = {name: partial(read_component, folder / name) for name in COMPONENTS if (folder / name).is_dir()}
    return Source(origin=_hub_origin(folder, revision), readers=readers, folder=folder)


def single_file_source(path: Path) -> Source:
    """A Stability single-file checkpoint: the components it contains, no tokenizers or scheduler."""
    from mlx_flash.single_file import read_single_file

    parts = read_single_file(path)
    return Source(origin={"file": path.name, "bytes": path.stat().st_size},
                  readers={name: partial(parts.pop, name) for name in parts})


def open_source(
    source: str | Path,
    *,
    use_t5: bool = True,
    revision: str | None = None,
    base: str | Path | None = None,
    encoder_files: Mapping[str, str | Path] | None = None,
) -> Source:
    """The `Source` for a hub repo id, a diffusers folder or a .safetensors single file. `base` (folder or
    repo) supplies the tokenizers, the scheduler and any component the source lacks; `encoder_files`
    ({"clip_l" | "clip_g" | "t5xxl": path}) supply text encoders from separate files."""
    path = Path(source).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix.lower() == ".safetensors" or path.is_file():
        if not path.is_file():
            raise WeightsError(f"{path}: no such file.")
        result = single_file_source(path)
    else:
        result = folder_source(source, use_t5=use_t5, revision=revision)
    if base is not None:
        fallback = folder_source(base, use_t5=use_t5)
        result = Source(origin={**result.origin, "base": fallback.origin},
                        readers={**fallback.readers, **result.readers}, folder=fallback.folder)
    if encoder_files:
        from mlx_flash.single_file import read_encoder_file

        for kind, file in encoder_files.items():
            file = Path(file).expanduser()
            refuse_pickle(file)
            result.readers[ENCODER_KINDS[kind]] = partial(read_encoder_file, file, kind)
        result.origin["encoder_files"] = {kind: Path(file).name for kind, file in encoder_files.items()}
    return result

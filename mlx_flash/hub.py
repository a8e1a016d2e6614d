"""Resolve a model argument (local folder or Hugging Face repo id) to a local diffusers-layout folder."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

try:  # the HTTP client of huggingface_hub 2.x, then 1.x
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
# Pickled weights are never fetched; diffusers' fp16 variants would duplicate the default weights.
IGNORE_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.fp16.*", "*.fp16-*"]
EXAMPLE_REPO = "stabilityai/stable-diffusion-3.5-medium"


class ModelNotFoundError(ValueError):
    """A model argument that cannot be resolved to a local model folder."""


def allow_patterns(use_t5: bool = True) -> list[str]:
    """The repo files a run needs: configs, safetensors weights (and shard indexes), tokenizer files."""
    weights = WEIGHT_FOLDERS + (("text_encoder_3",) if use_t5 else ())
    tokenizers = TOKENIZER_FOLDERS + (("tokenizer_3",) if use_t5 else ())
    patterns = ["model_index.json", "mlx_flash.json", "scheduler/*.json"]  # mlx_flash.json: converted models
    for folder in weights:
        patterns += [f"{folder}/*.json", f"{folder}/*.safetensors"]
    for folder in tokenizers:
        patterns += [f"{folder}/*.json", f"{folder}/*.txt", f"{folder}/*.model"]
    return patterns


def _is_model_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file() or (path / "transformer").is_dir()


def _local_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a file, not a model folder; pass a diffusers-layout folder (with model_index.json)."
        )
    if not _is_model_dir(path):
        raise ModelNotFoundError(
            f"{path} is not a model folder (no model_index.json or transformer/); "
            "pass a diffusers-layout folder or a Hugging Face repo id."
        )
    return path


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@contextmanager
def _hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line `ModelNotFoundError`s naming the fix."""
    try:
        yield
    except GatedRepoError as err:
        raise ModelNotFoundError(
            f"{repo} is gated: accept its licence at https://huggingface.co/{repo}, "
            "then log in with `hf auth login` or set HF_TOKEN."
        ) from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(
            f"{repo}: no such local folder, and no such repository on the Hugging Face Hub (or no access to it); "
            "check the name, log in with `hf auth login` or set HF_TOKEN if it is private, or pass a model folder."
        ) from err
    except RevisionNotFoundError as err:
        raise ModelNotFoundError(
            f"{repo}: revision {revision or 'main'!r} not found; pass an existing branch, tag or commit, "
            "or no revision."
        ) from err
    except RemoteEntryNotFoundError as err:  # a file missing from an existing repository
        raise ModelNotFoundError(f"{repo}: {_first_line(err)}; check the file name in the repository.") from err
    except (LocalEntryNotFoundError, ConnectionError, TransportError) as err:  # incl. OfflineModeIsEnabled
        raise ModelNotFoundError(
            f"{repo} is not (fully) in the Hugging Face cache and the Hub cannot be reached; connect to the "
            "internet once (with HF_HUB_OFFLINE unset) to download it, or pass a local model folder."
        ) from err
    except HfHubHTTPError as err:
        raise ModelNotFoundError(
            f"{repo}: the Hugging Face Hub answered with an error ({_first_line(err)}); retry later or pass a "
            "local model folder."
        ) from err


def _download(repo: str, use_t5: bool, revision: str | None, token: str | None) -> Path:
    with _hub_errors(repo, revision):
        folder = snapshot_download(
            repo,
            revision=revision,
            token=token,
            allow_patterns=allow_patterns(use_t5),
            ignore_patterns=IGNORE_PATTERNS,
        )
    folder = Path(folder)
    if not _is_model_dir(folder):
        raise ModelNotFoundError(
            f"{repo} has no diffusers-layout model (no model_index.json); pass a diffusers repo such as "
            f"{EXAMPLE_REPO}, or a local model folder."
        )
    return folder


def download_file(repo: str, filename: str, revision: str | None = None, token: str | None = None) -> Path:
    """One file of a Hugging Face repo (ORG/NAME), fetched into the HF cache; errors as `resolve_model_dir`'s."""
    with _hub_errors(repo, revision):
        return Path(hf_hub_download(repo, filename, revision=revision, token=token))


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hugging Face repo id, ORG/NAME."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def resolve_model_dir(
    model: str | Path, *, use_t5: bool = True, revision: str | None = None, token: str | None = None
) -> Path:
    """A local diffusers-layout folder for `model`: an existing folder, or a repo id fetched into the HF cache.

    Only the files a run needs are downloaded (no T5 files when `use_t5` is False). `token` defaults to
    huggingface_hub's own (HF_TOKEN or `hf auth login`); HF_HUB_OFFLINE and the HF cache are honoured.
    """
    path = Path(model).expanduser()
    if path.exists():
        return _local_dir(path)
    if isinstance(model, Path):
        raise ModelNotFoundError(f"{path}: no such folder; pass an existing model folder or a Hugging Face repo id.")
    name = str(model)
    if not is_repo_id(name):
        raise ModelNotFoundError(
            f"{name!r} is neither an existing folder nor a Hugging Face repo id; pass a diffusers-layout "
            f"model folder or a repo id such as {EXAMPLE_REPO}."
        )
    return _download(name, use_t5, revision, token)

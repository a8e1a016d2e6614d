"""Resolve a model argument (local folder or Hugging Face repo id) to a local diffusers-layout folder."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from huggingface_hub import (
    HfApi,
    hf_hub_download,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

from .files import first_line
from .weights import VARIANT, pick_variant, weight_variant

try:  # the HTTP client of huggingface_hub 2.x, then 1.x
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

log = logging.getLogger("mlx_flash")

WEIGHT_FOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2")
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
# Pickled weights are never fetched; diffusers' fp16 variants would duplicate the default weights (when the
# repo's listing cannot be read: with the listing, one variant is chosen per component, see `plan_download`).
PICKLE_PATTERNS = ["*.bin", "*.ckpt", "*.pt", "*.pth"]
IGNORE_PATTERNS = [*PICKLE_PATTERNS, "*.fp16.*", "*.fp16-*"]
EXAMPLE_REPO = "stabilityai/stable-diffusion-3.5-medium"
# Variants preferred for each requested dtype, best first (the default files come next, then any variant).
PREFERRED_VARIANTS = {"float16": ("fp16",), "bfloat16": ("bf16",), "float32": ()}
LARGE_DOWNLOAD = 2**30  # bytes; a download this large is listed before it starts


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


def repo_files(repo: str, revision: str | None, token: str | None) -> dict[str, int | None]:
    """{file name: size in bytes (None if unknown)} of a Hub repo at `revision`."""
    info = HfApi().model_info(repo, revision=revision, token=token, files_metadata=True)
    return {sibling.rfilename: sibling.size for sibling in info.siblings or []}


def plan_download(files: dict[str, int | None], use_t5: bool, dtype: str | None) -> list[str]:
    """The files of a repo listing that a run needs: those of `allow_patterns`, no pickles, and in each weight
    folder one set of weights: the variant matching `dtype` where there is one, else the default files,
    else the only variant there is (repos that publish only `*.fp16.safetensors`)."""
    needed = list(filter_repo_objects(list(files), allow_patterns=allow_patterns(use_t5),
                                      ignore_patterns=PICKLE_PATTERNS))
    weights: dict[str, list[str]] = {}
    for name in needed:
        path = PurePosixPath(name)
        if VARIANT.fullmatch(path.name):
            weights.setdefault(str(path.parent), []).append(name)
    preferred = PREFERRED_VARIANTS.get(dtype or "", ())
    for names in weights.values():
        variant = pick_variant({weight_variant(PurePosixPath(n).name) for n in names}, preferred)
        needed = [n for n in needed if n not in names or weight_variant(PurePosixPath(n).name) == variant]
    return needed


def _announce(repo: str, files: dict[str, int | None], needed: list[str], revision: str | None) -> None:
    """Log the files still to download (and their total size) when that is LARGE_DOWNLOAD or more."""
    missing = [n for n in needed if not isinstance(try_to_load_from_cache(repo, n, revision=revision), str)]
    total = sum(files[n] or 0 for n in missing)
    if total >= LARGE_DOWNLOAD:
        biggest = sorted(missing, key=lambda n: -(files[n] or 0))
        listed = ", ".join(f"{n} ({(files[n] or 0) / 1e9:.2f} GB)" for n in biggest if (files[n] or 0) >= 10**6)
        log.warning("downloading %d files, %.1f GB, from %s: %s", len(missing), total / 1e9, repo, listed)


def _fetch(repo: str, use_t5: bool, revision: str | None, token: str | None, dtype: str | None) -> str:
    """snapshot_download of what a run needs; with the repo's listing (online), exactly `plan_download`'s
    files, listed first when large; offline, the default files from the cache."""
    try:
        files = repo_files(repo, revision, token)
    except (LocalEntryNotFoundError, ConnectionError, TransportError):  # incl. OfflineModeIsEnabled
        files = None  # offline: the cache decides
    if files is None:
        return snapshot_download(repo, revision=revision, token=token, allow_patterns=allow_patterns(use_t5),
                                 ignore_patterns=IGNORE_PATTERNS)
    needed = plan_download(files, use_t5, dtype)
    _announce(repo, files, needed, revision)
    return snapshot_download(repo, revision=revision, token=token, allow_patterns=needed,
                             ignore_patterns=PICKLE_PATTERNS)


@contextmanager
def _hub_errors(repo: str, revision: str | None) -> Iterator[None]:
    """The Hub's and the cache's errors of a download from `repo`, as one-line `ModelNotFoundError`s."""
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
        raise ModelNotFoundError(f"{repo}: {first_line(err)}; check the file name in the repository.") from err
    except (LocalEntryNotFoundError, ConnectionError, TransportError) as err:  # incl. OfflineModeIsEnabled
        raise ModelNotFoundError(
            f"{repo} is not (fully) in the Hugging Face cache and the Hub cannot be reached; connect to the "
            "internet once (with HF_HUB_OFFLINE unset) to download it, or pass a local model folder."
        ) from err
    except HfHubHTTPError as err:
        raise ModelNotFoundError(
            f"{repo}: the Hugging Face Hub answered with an error ({first_line(err)}); retry later or pass a "
            "local model folder."
        ) from err


def _download(repo: str, use_t5: bool, revision: str | None, token: str | None, dtype: str | None) -> Path:
    with _hub_errors(repo, revision):
        folder = Path(_fetch(repo, use_t5, revision, token, dtype))
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
    model: str | Path, *, use_t5: bool = True, revision: str | None = None, token: str | None = None,
    dtype: str | None = None,
) -> Path:
    """A local diffusers-layout folder for `model`: an existing folder, or a repo id fetched into the HF cache.

    Only the files a run needs are downloaded (no T5 files when `use_t5` is False; of precision variants,
    the one matching `dtype` ("float16", ...), see `plan_download`), listed first when large. `token`
    defaults to huggingface_hub's own (HF_TOKEN or `hf auth login`); HF_HUB_OFFLINE and the HF cache are
    honoured.
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
    return _download(name, use_t5, revision, token, dtype)


def resolve_component_dir(
    component: str | Path, patterns: list[str], *, revision: str | None = None, token: str | None = None
) -> Path:
    """A local folder holding one component (config.json and weights): an existing folder, or a repo id whose
    files matching `patterns` (never pickles) are fetched into the HF cache; errors, token and offline mode as
    `resolve_model_dir`'s."""
    path = Path(component).expanduser()
    if not path.exists() and not isinstance(component, Path) and is_repo_id(str(component)):
        with _hub_errors(str(component), revision):
            path = Path(snapshot_download(str(component), revision=revision, token=token, allow_patterns=patterns,
                                          ignore_patterns=IGNORE_PATTERNS))
    elif not path.exists():
        raise ModelNotFoundError(f"{component}: no such folder, and not a Hugging Face repo id (ORG/NAME); pass "
                                 "a component folder (config.json and safetensors weights) or a repo id.")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{component}: no config.json in {path}; pass a component folder (config.json "
                                 "and safetensors weights) or a repo id.")
    return path


def resolve_weights_dir(
    location: str | Path, *, revision: str | None = None, token: str | None = None
) -> Path:
    """A local folder of safetensors weights for `location`: an existing folder, or `ORG/NAME/FOLDER...`, one
    folder of a hub repo (its .json and .safetensors files fetched into the HF cache), e.g. a replacement
    transformer such as domiso/SenseFlow/SenseFlow-SD35M."""
    path = Path(location).expanduser()
    if not path.exists() and not isinstance(location, Path) and str(location).count("/") >= 2:
        parts = str(location).strip("/").split("/")
        repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
        if not is_repo_id(repo):
            raise ModelNotFoundError(f"{location!r}: {repo!r} is not a Hugging Face repo id; use ORG/NAME/FOLDER.")
        patterns = [f"{sub}/*.json", f"{sub}/*.safetensors"]
        with _hub_errors(repo, revision):
            path = Path(snapshot_download(repo, revision=revision, token=token, allow_patterns=patterns,
                                          ignore_patterns=IGNORE_PATTERNS)) / sub
        where = f"{repo} has no folder {sub!r} with .safetensors weights"
    elif not path.exists():
        raise ModelNotFoundError(f"{location}: no such folder; pass a local folder or ORG/NAME/FOLDER on the hub.")
    else:
        where = f"{path} holds no .safetensors weights"
    if not path.is_dir() or not any(path.glob("*.safetensors")):
        raise ModelNotFoundError(f"{where}; pass a folder of diffusers-named .safetensors weights.")
    return path


def _snapshot(repo: str, patterns: list[str], revision: str | None, token: str | None) -> Path:
    """Fetch `patterns` of a hub repo into the HF cache; every failure is one ModelNotFoundError line."""
    with _hub_errors(repo, revision):
        return Path(snapshot_download(repo, revision=revision, token=token, allow_patterns=patterns,
                                      ignore_patterns=IGNORE_PATTERNS))


def resolve_controlnet(name: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """A local ControlNet for `name`: an existing folder or .safetensors file, or a repo id whose config.json
    and safetensors weights are fetched into the HF cache (a repo of single files: the one file it holds)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if isinstance(name, Path) or not is_repo_id(str(name)):
        raise ModelNotFoundError(f"{name}: no such ControlNet folder or file, and not a Hugging Face repo id; pass "
                                 "a diffusers ControlNet folder, a .safetensors file or a repo id.")
    folder = _snapshot(str(name), ["*.json", "*.safetensors"], revision, token)
    if (folder / "config.json").is_file():
        return folder
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ModelNotFoundError(f"{name}: {'no' if not files else len(files)} ControlNet weight files at the top "
                                 "of the repo and no config.json; download the one you want and pass its path.")
    return files[0]

"""Model resolution: local folders, repo ids, download filters and one-line errors (snapshot_download mocked)."""

from pathlib import Path

import httpx2
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from mlx_flash import hub
from mlx_flash.hub import ModelNotFoundError, resolve_model_dir

REPO = "stabilityai/stable-diffusion-3.5-medium"

# The stable-diffusion-3.5-medium listing, plus the kinds of files a download must skip.
REPO_FILES = """
.gitattributes LICENSE.md README.md SD3.5M_example_workflow.json mmdit-x.png sd3.5_medium.safetensors
model_index.json scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder/pytorch_model.bin
text_encoder_2/config.json text_encoder_2/model.safetensors text_encoder_2/model.fp16.safetensors
text_encoder_3/config.json text_encoder_3/model-00001-of-00002.safetensors
text_encoder_3/model-00002-of-00002.safetensors text_encoder_3/model.safetensors.index.json
text_encoder_3/model.fp16-00001-of-00002.safetensors text_encoder_3/model.fp16.safetensors.index.json
text_encoders/clip_g.safetensors text_encoders/clip_l.safetensors text_encoders/t5xxl_fp16.safetensors
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
tokenizer_3/special_tokens_map.json tokenizer_3/spiece.model tokenizer_3/tokenizer.json
tokenizer_3/tokenizer_config.json
transformer/config.json transformer/diffusion_pytorch_model.safetensors transformer/diffusion_pytorch_model.ckpt
transformer/diffusion_pytorch_model.fp16.safetensors vae/config.json vae/diffusion_pytorch_model.safetensors
vae/diffusion_pytorch_model.pt vae/diffusion_pytorch_model.pth
""".split()

NEEDED_WITHOUT_T5 = """
model_index.json scheduler/scheduler_config.json
text_encoder/config.json text_encoder/model.safetensors text_encoder_2/config.json text_encoder_2/model.safetensors
tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
tokenizer_2/merges.txt tokenizer_2/special_tokens_map.json tokenizer_2/tokenizer_config.json tokenizer_2/vocab.json
transformer/config.json transformer/diffusion_pytorch_model.safetensors
vae/config.json vae/diffusion_pytorch_model.safetensors
""".split()

NEEDED_T5 = """
text_encoder_3/config.json text_encoder_3/model-00001-of-00002.safetensors
text_encoder_3/model-00002-of-00002.safetensors text_encoder_3/model.safetensors.index.json
tokenizer_3/special_tokens_map.json tokenizer_3/spiece.model tokenizer_3/tokenizer.json
tokenizer_3/tokenizer_config.json
""".split()


def model_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text("{}")
    return root


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """Replace snapshot_download with a recorder that returns a model folder (or raises `.error`)."""

    def download(repo_id, **kwargs):
        download.calls.append((repo_id, kwargs))
        if download.error is not None:
            raise download.error
        return str(download.folder)

    def listing(repo_id, revision, token):
        if download.error is not None:
            raise download.error
        return dict.fromkeys(REPO_FILES, 1000)

    download.calls, download.error, download.folder = [], None, model_dir(tmp_path / "snapshot")
    monkeypatch.setattr(hub, "snapshot_download", download)
    monkeypatch.setattr(hub, "repo_files", listing)
    return download


def downloaded_files(kwargs: dict) -> set[str]:
    allow, ignore = kwargs["allow_patterns"], kwargs["ignore_patterns"]
    return set(filter_repo_objects(REPO_FILES, allow_patterns=allow, ignore_patterns=ignore))


@pytest.mark.parametrize("use_t5", [True, False])
def test_download_filters(fake_download, use_t5):
    assert resolve_model_dir(REPO, use_t5=use_t5) == fake_download.folder
    (repo_id, kwargs), = fake_download.calls
    assert repo_id == REPO
    expected = set(NEEDED_WITHOUT_T5) | (set(NEEDED_T5) if use_t5 else set())
    assert downloaded_files(kwargs) == expected


def test_revision_and_token_forwarded_cache_untouched(fake_download):
    resolve_model_dir(REPO, revision="refs/pr/3", token="hf_x")
    (_, kwargs), = fake_download.calls
    assert kwargs["revision"] == "refs/pr/3" and kwargs["token"] == "hf_x"
    assert not {"cache_dir", "local_dir", "local_files_only"} & kwargs.keys()


def test_token_defaults_to_huggingface_hub(fake_download):
    resolve_model_dir(REPO)
    assert fake_download.calls[0][1]["token"] is None


def test_local_folders(tmp_path, fake_download):
    with_index = model_dir(tmp_path / "a")
    with_transformer = tmp_path / "b"
    (with_transformer / "transformer").mkdir(parents=True)
    assert resolve_model_dir(with_index) == with_index
    assert resolve_model_dir(str(with_transformer)) == with_transformer
    assert not fake_download.calls


def response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}"))


ERRORS = [
    (GatedRepoError("Access restricted.\nMore.", response=response(401)),
     ["gated", f"https://huggingface.co/{REPO}", "HF_TOKEN", "hf auth login"]),
    (RepositoryNotFoundError("Not found.", response=response(404)),
     ["no such repository", "HF_TOKEN", "hf auth login", "model folder"]),
    (RevisionNotFoundError("Bad revision.", response=response(404)), ["revision 'v9' not found"]),
    (LocalEntryNotFoundError("Cannot find snapshot.\nCheck your connection."),
     ["cannot be reached", "connect to the internet once", "local model folder"]),
    (IncompleteSnapshotError("Partial snapshot.", snapshot_path="/x"), ["connect to the internet once"]),
    (OfflineModeIsEnabled("offline"), ["HF_HUB_OFFLINE", "local model folder"]),
    (httpx2.ConnectError("no route to host"), ["cannot be reached", "local model folder"]),
    (HfHubHTTPError("500 Server Error\nbody", response=response(500)), ["500 Server Error", "retry later"]),
]


@pytest.mark.parametrize("error, phrases", ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
def test_download_errors_are_one_line(fake_download, error, phrases):
    fake_download.error = error
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir(REPO, revision="v9")
    message = str(info.value)
    assert "\n" not in message and REPO in message
    for phrase in phrases:
        assert phrase in message
    assert info.value.__cause__ is error


def test_repo_without_diffusers_layout(fake_download, tmp_path):
    fake_download.folder = tmp_path / "empty"
    fake_download.folder.mkdir()
    with pytest.raises(ModelNotFoundError, match="no diffusers-layout model"):
        resolve_model_dir(REPO)


@pytest.mark.parametrize("name", ["not a repo", "a/b/c", "./missing", "~/missing/model", "org/na me", "solo"])
def test_neither_path_nor_repo_id(fake_download, name):
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a Hugging Face repo id"):
        resolve_model_dir(name)
    assert not fake_download.calls


def test_bad_local_paths(tmp_path, fake_download):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        resolve_model_dir(tmp_path / "weights.safetensors")
    with pytest.raises(ModelNotFoundError, match="is not a model folder"):
        resolve_model_dir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model_dir(tmp_path / "org" / "name")
    assert not fake_download.calls

"""Hub repos with only diffusers' variant files (`*.fp16.safetensors`) load; the variant follows the dtype; a
large download is listed before it starts (issue #12, item 6). huggingface_hub is mocked."""

import logging

import mlx.core as mx
import numpy as np
import pytest
from huggingface_hub.errors import OfflineModeIsEnabled
from huggingface_hub.utils import filter_repo_objects
from test_hub import NEEDED_T5, NEEDED_WITHOUT_T5, REPO, REPO_FILES, model_dir

from mlx_flash import hub
from mlx_flash.hub import resolve_model_dir
from mlx_flash.weights import read_component

FP16_ONLY = """
model_index.json scheduler/scheduler_config.json
transformer/config.json transformer/diffusion_pytorch_model.fp16.safetensors
vae/config.json vae/diffusion_pytorch_model.fp16.safetensors
text_encoder/config.json text_encoder/model.fp16.safetensors
text_encoder_2/config.json text_encoder_2/model.fp16.safetensors
text_encoder_3/config.json text_encoder_3/model.fp16-00001-of-00002.safetensors
text_encoder_3/model.fp16-00002-of-00002.safetensors text_encoder_3/model.safetensors.index.fp16.json
tokenizer/tokenizer.json tokenizer/tokenizer_config.json tokenizer_2/tokenizer.json tokenizer_2/tokenizer_config.json
tokenizer_3/tokenizer.json tokenizer_3/tokenizer_config.json
""".split()


@pytest.fixture
def hub_mock(monkeypatch, tmp_path):
    """A repo listing (`.files`, {name: bytes}), a recording snapshot_download and a cache holding `.cached`."""

    def download(repo_id, **kwargs):
        download.calls.append(kwargs)
        return str(model_dir(tmp_path / "snapshot"))

    def listing(repo_id, revision, token):
        if download.offline:
            raise OfflineModeIsEnabled("offline")
        return download.files

    download.calls, download.files, download.cached, download.offline = [], {}, set(), False
    monkeypatch.setattr(hub, "snapshot_download", download)
    monkeypatch.setattr(hub, "repo_files", listing)
    monkeypatch.setattr(hub, "try_to_load_from_cache",
                        lambda repo, name, revision=None: "/cache/" + name if name in download.cached else None)
    return download


def fetched(kwargs: dict, files) -> set[str]:
    return set(filter_repo_objects(list(files), allow_patterns=kwargs["allow_patterns"],
                                   ignore_patterns=kwargs.get("ignore_patterns")))


@pytest.mark.parametrize("dtype", [None, "float32", "float16", "bfloat16"])
def test_variant_only_repo_downloads_its_variant(hub_mock, dtype):
    hub_mock.files = dict.fromkeys(FP16_ONLY, 1000)
    resolve_model_dir(REPO, dtype=dtype)
    (kwargs,) = hub_mock.calls
    assert fetched(kwargs, FP16_ONLY) == set(FP16_ONLY)  # today: no weights at all


@pytest.mark.parametrize("dtype, variant_folders", [
    (None, set()), ("float32", set()), ("bfloat16", set()),  # the default (full precision) files where present
    ("float16", {"text_encoder_2", "text_encoder_3", "transformer"}),  # the smaller fp16 files where published
])
def test_variant_matching_the_dtype(hub_mock, dtype, variant_folders):
    hub_mock.files = dict.fromkeys(REPO_FILES, 1000)
    resolve_model_dir(REPO, dtype=dtype)
    got = fetched(hub_mock.calls[0], REPO_FILES)
    weights = {n for n in got if n.endswith(".safetensors") or ".index." in n}
    assert {n.split("/")[0] for n in weights if ".fp16" in n} == variant_folders
    for folder in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        kinds = {".fp16" in n for n in weights if n.startswith(folder + "/")}
        assert len(kinds) == 1, (folder, weights)  # exactly one set of weights per component
    if not variant_folders:
        assert got == set(NEEDED_WITHOUT_T5) | set(NEEDED_T5)
    assert not [n for n in got if n.endswith((".bin", ".ckpt", ".pt", ".pth"))]


def test_large_download_is_listed_first(hub_mock, caplog):
    sizes = {"transformer/diffusion_pytorch_model.safetensors": 4_900_000_000,
             "text_encoder_3/model-00001-of-00002.safetensors": 4_990_000_000,
             "text_encoder_3/model-00002-of-00002.safetensors": 4_530_000_000}
    hub_mock.files = {name: sizes.get(name, 1000) for name in REPO_FILES}
    hub_mock.cached = {"text_encoder_3/model-00002-of-00002.safetensors"}  # already downloaded: not listed
    with caplog.at_level(logging.WARNING, logger="mlx_flash"):
        resolve_model_dir(REPO)
    (record,) = caplog.records
    message = record.getMessage()
    print("\n" + message)
    assert "9.9 GB" in message and REPO in message
    assert "transformer/diffusion_pytorch_model.safetensors (4.90 GB)" in message
    assert "text_encoder_3/model-00001-of-00002.safetensors (4.99 GB)" in message
    assert "00002-of-00002" not in message

    caplog.clear()
    hub_mock.cached = set(sizes)
    with caplog.at_level(logging.WARNING, logger="mlx_flash"):
        resolve_model_dir(REPO)
    assert not caplog.records  # nothing large left to download: nothing said


def test_offline_uses_the_cache_with_the_default_patterns(hub_mock):
    hub_mock.offline = True
    resolve_model_dir(REPO)
    (kwargs,) = hub_mock.calls
    assert kwargs["ignore_patterns"] == hub.IGNORE_PATTERNS and kwargs["allow_patterns"] == hub.allow_patterns(True)


def save(path, value: float) -> None:
    mx.save_safetensors(str(path), {"w": mx.full((2,), value)})


def test_read_component_takes_one_variant(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save(tmp_path / "model.fp16.safetensors", 2.0)
    assert np.array(read_component(tmp_path)[1]["w"]).tolist() == [2.0, 2.0]  # only the variant: used
    save(tmp_path / "model.safetensors", 1.0)
    assert np.array(read_component(tmp_path)[1]["w"]).tolist() == [1.0, 1.0]  # both: the default files

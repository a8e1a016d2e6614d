"""Checkpoint conversion (convert/): round trips through load_pipeline, quantized folders, the command line,
the manifest and model card, sources (hub, single file) and bad inputs that must leave nothing behind."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file
from tiny import randomize

import mlx_flash
import mlx_flash.convert.converter as converter_module
from mlx_flash import cli, hub
from mlx_flash.clip import load_clip, save_clip
from mlx_flash.convert import Quantization, quantize_model
from mlx_flash.convert import convert as run_convert
from mlx_flash.mmdit import load_mmdit
from mlx_flash.t5 import load_t5, save_t5
from mlx_flash.vae import load_vae, save_vae
from mlx_flash.weights import (
    WeightsError,
    read_component,
    write_component,
    write_safetensors,
)

GENERATE = dict(prompt="a red fox in the snow", negative_prompt="blurry", num_inference_steps=2, guidance_scale=3.0,
                height=64, width=64, seed=3, output_type="np", progress=False, skip_layer_guidance=False)
TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def source(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline with a wider transformer (hidden 64 = 2 heads x 32), so that its layers quantize."""
    from diffusers import SD3Transformer2DModel

    folder = tmp_path_factory.mktemp("wide") / "sd3"
    shutil.copytree(tiny_pipeline_dir, folder)
    shutil.rmtree(folder / "transformer")
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    randomize(transformer, seed=7, std=0.05).save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    return run_convert(source, tmp_path_factory.mktemp("out") / "f32", dtype="float32")


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory) -> Path:
    return run_convert(source, tmp_path_factory.mktemp("out") / "q4", dtype="float32",
                       bits={"transformer": 4, "text_encoder_3": 4})


def images(folder: Path, **kwargs) -> np.ndarray:
    return mlx_flash.load_pipeline(folder, dtype="float32", low_memory=False, **kwargs).generate(**GENERATE)


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_gives_the_same_images(source, converted):
    expected = images(source)
    assert expected.std() > 0.02
    np.testing.assert_array_equal(images(converted), expected)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        config, _ = read_component(converted / name)
        assert config["mlx_flash_layout"] == 1 and "quantization" not in config
        assert (converted / name / "model.safetensors").is_file()
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"):
        assert entries(converted / name) == entries(source / name)


def test_quantized_folder_loads_quantized(source, converted, quantized):
    config = json.loads((quantized / "transformer" / "config.json").read_text())
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (64, 4)
    assert q["transformer_blocks.0.norm1.linear"] == q["proj_out"] == {"group_size": 64, "bits": 8}  # mixed policy
    assert json.loads((quantized / "text_encoder_3" / "config.json").read_text())["quantization"]["bits"] == 4
    assert "quantization" not in json.loads((quantized / "vae" / "config.json").read_text())

    mx.reset_peak_memory()
    start = mx.get_active_memory()
    model = load_mmdit(quantized / "transformer")
    mx.eval(model.parameters())
    peak = mx.get_peak_memory() - start
    layers = dict(model.named_modules())
    assert (layers["transformer_blocks.0.ff.fc1"].bits, layers["transformer_blocks.0.norm1.linear"].bits) == (4, 8)
    assert not [name for name, m in layers.items() if isinstance(m, nn.Linear) and m.weight.shape[-1] % 64 == 0]
    stored = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    full = sum(v.nbytes for _, v in tree_flatten(load_mmdit(converted / "transformer").parameters()))
    assert stored < 0.5 * full and peak <= stored * 1.02 + 4096  # never held in full precision

    close = images(quantized)
    error = np.abs(close - images(converted)).max()
    assert 0 < error < 0.1, error

    on_the_fly = mlx_flash.load_pipeline(source, dtype="float32", quantize=4, low_memory=False)  # same policy
    mine, stored = dict(tree_flatten(on_the_fly.transformer.parameters())), dict(tree_flatten(model.parameters()))
    assert mine.keys() == stored.keys()
    assert all(mx.array_equal(value, stored[key]).item() for key, value in mine.items())
    t5 = on_the_fly.text_encoders._run("text_encoder_3", lambda m: m)
    assert isinstance(t5.blocks[0].ffn.wo, nn.QuantizedLinear)
    np.testing.assert_array_equal(on_the_fly.generate(**GENERATE), close)


def test_manifest_and_model_card(source, quantized):
    manifest = json.loads((quantized / "mlx_flash.json").read_text())
    assert manifest["format_version"] == 1 and manifest["mlx_flash_version"] == mlx_flash.__version__
    assert manifest["source"] == {"folder": str(source.resolve())} and manifest["t5"] is True
    components = manifest["components"]
    assert list(components) == ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert components["transformer"]["quantization"] == {"bits": 4, "group_size": 64, "policy": "mixed"}
    assert components["vae"] == {"dtype": "float32", "bytes": components["vae"]["bytes"], "quantization": None}
    card = (quantized / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx\n") and "licence" in card.lower()
    assert f'load_pipeline("{quantized}")' in card and "4-bit (group 64, mixed policy)" in card


def test_model_defaults_carry_over(source, tmp_path):
    folder = tmp_path / "flash"
    shutil.copytree(source, folder)
    defaults = {"num_inference_steps": 3, "guidance_scale": 1.0, "skip_layer_guidance": None}
    (folder / "mlx_flash.json").write_text(json.dumps({"defaults": defaults}))
    out = run_convert(folder, tmp_path / "out", bits={"transformer": 8})
    assert json.loads((out / "mlx_flash.json").read_text())["defaults"] == defaults
    assert mlx_flash.load_pipeline(out).defaults() == (3, 1.0, None)


def test_shards_and_streaming(tmp_path):
    tensors = {f"layer.{i}.weight": mx.full((64, 64), i, mx.float16) for i in range(5)}  # 8 KiB each
    write_component(tmp_path / "c", dict(tensors), {"a": 1}, None, "test", max_shard_bytes=20_000)
    names = entries(tmp_path / "c")
    assert names == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    config, read = read_component(tmp_path / "c")
    assert config == {"a": 1, "mlx_flash_layout": 1}
    assert all(mx.array_equal(read[k], v).item() for k, v in tensors.items()) and read.keys() == tensors.keys()

    path = tmp_path / "t.safetensors"
    mx.save_safetensors(str(path), tensors)
    lazy = mx.load(str(path))
    os.truncate(path, path.stat().st_size // 2)  # the file shrinks after its header was read
    with pytest.raises(WeightsError, match="layer.2.weight .* truncated or corrupt: re-download it"):
        write_safetensors(tmp_path / "out.safetensors", list(lazy), lazy, "vae")


def run(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "convert"] if module else ["mlx-flash", "convert"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_command_line(source, tmp_path):
    result = run(str(source), str(tmp_path / "half"), "--dtype", "float16", "--no-t5")
    assert result.returncode == 0, result.stderr
    assert entries(tmp_path / "half") == ["README.md", "mlx_flash.json", "scheduler", "text_encoder", "text_encoder_2",
                                          "tokenizer", "tokenizer_2", "transformer", "vae"]
    assert load_file(tmp_path / "half" / "vae" / "model.safetensors")["decoder.conv_in.weight"].dtype == np.float16
    pipe = mlx_flash.load_pipeline(tmp_path / "half", dtype="float32", use_t5=False)
    assert pipe.generate(**GENERATE).std() > 0.02

    result = run(str(source), str(tmp_path / "q8"), "-q", "--bits", "8", "--clip-bits", "6", "--group-size", "32",
                 "--policy", "plain", module=True)
    assert result.returncode == 0, result.stderr
    bits = {c: json.loads((tmp_path / "q8" / c / "config.json").read_text()).get("quantization")
            for c in ("transformer", "text_encoder", "text_encoder_3", "vae")}
    assert bits == {"transformer": {"group_size": 32, "bits": 8}, "text_encoder": {"group_size": 32, "bits": 6},
                    "text_encoder_3": {"group_size": 32, "bits": 8}, "vae": None}

    again = run(str(source), str(tmp_path / "q8"))
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "--force" in again.stderr


def fails_cleanly(capsys, tmp_path, argv: list[str], message: str) -> None:
    """`mlx-flash convert ARGV` fails with one error line matching `message` and leaves tmp_path as it was."""
    before = entries(tmp_path)
    assert cli.main(["convert", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlx-flash: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert entries(tmp_path) == before


def broken_copy(source: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    path = folder / TRANSFORMER_WEIGHTS
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return folder


def test_bad_inputs_leave_nothing_behind(source, tmp_path, capsys):
    out = str(tmp_path / "out")
    folder = tmp_path / "truncated"
    shutil.copytree(source, folder)
    os.truncate(folder / TRANSFORMER_WEIGHTS, 5000)
    fails_cleanly(capsys, tmp_path, [str(folder), out], "incomplete download or corrupt file")

    folder = broken_copy(source, tmp_path, lambda t: t.pop("proj_out.bias"))
    fails_cleanly(capsys, tmp_path, [str(folder), out], "1 missing (proj_out.bias)")
    shutil.rmtree(folder)
    folder = broken_copy(source, tmp_path, lambda t: t.update({"proj_out.bias": np.zeros(3, np.float32)}))
    fails_cleanly(capsys, tmp_path, [str(folder), out], "proj_out.bias (3,) != (64,)")

    pickled = tmp_path / "sd3.5_medium.ckpt"
    pickled.write_bytes(b"\x80\x04pickle")
    fails_cleanly(capsys, tmp_path, [str(pickled), out], "pickled checkpoints are refused")
    shutil.rmtree(folder)
    shutil.copytree(source, folder)
    (folder / TRANSFORMER_WEIGHTS).rename(folder / "transformer" / "diffusion_pytorch_model.bin")
    fails_cleanly(capsys, tmp_path, [str(folder), out], "pickled checkpoints are refused")

    fails_cleanly(capsys, tmp_path, [str(source), str(tmp_path)], "already exists; pass --force")
    fails_cleanly(capsys, tmp_path, [str(source), out, "--bits", "4"], "--bits applies to -q/--quantize")
    fails_cleanly(capsys, tmp_path, [str(source), out, "--upload-repo", "no-org"], "not a Hugging Face repo id")


def test_failure_mid_conversion_loses_nothing(source, converted, tmp_path, monkeypatch, capsys):
    target = tmp_path / "model"
    shutil.copytree(converted, target)
    original = converter_module.write_component
    calls = []

    def failing(folder, *args, **kwargs):
        calls.append(folder.name)
        if len(calls) == 3:
            raise OSError("disk full (injected)")
        return original(folder, *args, **kwargs)

    monkeypatch.setattr(converter_module, "write_component", failing)
    fails_cleanly(capsys, tmp_path, [str(source), str(target), "--force", "-q"], "disk full (injected)")
    assert calls == ["transformer", "vae", "text_encoder"]
    assert entries(target) == entries(converted)  # the previous conversion is untouched
    assert json.loads((target / "mlx_flash.json").read_text()) == json.loads((converted / "mlx_flash.json").read_text())

    monkeypatch.undo()
    assert cli.main(["convert", str(source), str(target), "--force", "--transformer-bits", "8"]) == 0
    assert entries(tmp_path) == ["model"]
    assert json.loads((target / "transformer" / "config.json").read_text())["quantization"]["bits"] == 8


def test_single_file_converts_like_the_folder(source, converted, tmp_path, capsys):
    from safetensors.torch import save_file as save_torch
    from single_file_maker import diffusers_to_single_file, read_folder_state_dicts

    single = tmp_path / "sd3_tiny.safetensors"
    save_torch({k: v.contiguous() for k, v in diffusers_to_single_file(source, ("transformer", "vae")).items()}, single)
    t5 = tmp_path / "t5xxl.safetensors"
    save_torch(read_folder_state_dicts(source, ("text_encoder_3",))["text_encoder_3"], t5)

    fails_cleanly(capsys, tmp_path, [str(single), str(tmp_path / "out")], "pass --base")
    out = run_convert(single, tmp_path / "out", dtype="float32", base=source, encoder_files={"t5xxl": t5})
    np.testing.assert_array_equal(images(out), images(converted))
    origin = json.loads((out / "mlx_flash.json").read_text())["source"]
    assert origin == {"file": single.name, "bytes": single.stat().st_size, "base": {"folder": str(source.resolve())},
                      "encoder_files": {"t5xxl": t5.name}}


def test_hub_source_and_upload(source, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--org--sd3-tiny" / "snapshots" / "0123abcd"
    shutil.copytree(source, snapshot)
    downloads, calls = [], []

    def snapshot_download(repo, revision=None, token=None, allow_patterns=(), ignore_patterns=()):
        downloads.append((repo, revision, allow_patterns))
        return str(snapshot)

    class Api:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, repo_id, folder_path, commit_message):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr("huggingface_hub.HfApi", Api)
    out = run_convert("org/sd3-tiny", tmp_path / "out", revision="v1", use_t5=False, upload_repo="me/sd3-tiny-mlx",
                      bits={"transformer": 4})
    (repo, revision, patterns), = downloads
    assert (repo, revision) == ("org/sd3-tiny", "v1") and not [p for p in patterns if "_3" in p]
    manifest = json.loads((out / "mlx_flash.json").read_text())
    assert manifest["source"] == {"repo": "org/sd3-tiny", "revision": "v1", "commit": "0123abcd"}
    assert calls == [("create", "me/sd3-tiny-mlx", True), ("upload", "me/sd3-tiny-mlx", entries(out))]
    card = (out / "README.md").read_text()
    assert "base_model: org/sd3-tiny" in card and 'load_pipeline("me/sd3-tiny-mlx")' in card
    assert "huggingface.co/org/sd3-tiny" in card


@pytest.mark.parametrize("bits", [None, 8])
def test_save_functions_round_trip(source, tmp_path, bits):
    for name, load, save in [("vae", load_vae, save_vae), ("text_encoder", load_clip, save_clip),
                             ("text_encoder_3", load_t5, save_t5)]:
        model = load(source / name, mx.float16)
        settings = quantize_model(model, Quantization(bits, 32)) if bits else None
        save(tmp_path / f"{name}-{bits}", model, settings)
        again = load(tmp_path / f"{name}-{bits}")
        assert type(again.config) is type(model.config) and again.config == model.config
        saved, loaded = dict(tree_flatten(model.parameters())), dict(tree_flatten(again.parameters()))
        assert saved.keys() == loaded.keys() and any(k.endswith(".scales") for k in saved) == bool(bits)
        for key, value in saved.items():
            assert value.dtype == loaded[key].dtype and mx.array_equal(value, loaded[key]).item(), (name, key)


def test_quantization_settings():
    q = Quantization(4)
    assert (q.group_size, q.policy) == (64, "mixed")
    assert q.layer("transformer_blocks.3.norm1_context.linear", nn.Linear(64, 384)) == {"group_size": 64, "bits": 8}
    assert q.layer("time_text_embed.text_embedder.linear_1", nn.Linear(128, 64)) == {"group_size": 64, "bits": 8}
    assert q.layer("transformer_blocks.3.attn.qkv", nn.Linear(64, 192)) is True
    assert Quantization(4, policy="plain").layer("proj_out", nn.Linear(64, 64)) is True
    assert q.layer("context_embedder", nn.Linear(96, 64)) is False  # 96 is not a multiple of 64
    assert q.layer("embed_tokens", nn.Embedding(100, 64)) is False
    for bad, message in [(dict(bits=7), "7 bits"), (dict(bits=4, group_size=48), "group size 48"),
                         (dict(bits=4, policy="fancy"), "policy 'fancy'")]:
        with pytest.raises(ValueError, match=message):
            Quantization(**bad)


def test_load_pipeline_takes_a_single_file(source, converted, tmp_path, monkeypatch):
    from safetensors.torch import save_file as save_torch
    from single_file_maker import diffusers_to_single_file

    single = tmp_path / "sd3_tiny_all.safetensors"
    parts = ("transformer", "vae", "text_encoder_3")  # the CLIPs come from `base`
    save_torch({k: v.contiguous() for k, v in diffusers_to_single_file(source, parts).items()}, single)
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="pass base="):
        mlx_flash.load_pipeline(single, dtype="float32")
    first = mlx_flash.load_pipeline(single, dtype="float32", low_memory=False, base=source).generate(**GENERATE)
    np.testing.assert_array_equal(first, images(converted))
    (cached,) = (tmp_path / "cache").iterdir()  # converted once, then reused
    again = mlx_flash.load_pipeline(single, dtype="float32", low_memory=False, base=source)
    assert again.root == cached

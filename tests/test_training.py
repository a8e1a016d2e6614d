"""Training: the loss falls, LoRA gradients match finite differences, a trained LoRA loads in diffusers and
gives the same images, a resumed run gives the weights of an uninterrupted one, QLoRA trains and its LoRA fits
the float base, bad data is refused with one line. A few steps each, on tiny models."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_map, tree_map_with_path
from PIL import Image

import mlx_flash
from mlx_flash import lora
from mlx_flash.cli import main
from mlx_flash.mmdit import MMDiT, MMDiTConfig
from mlx_flash.quantization import is_quantized, quantized
from mlx_flash.training import TrainConfig, Trainer, flow_loss, sample_sigmas
from mlx_flash.training.data import bucket, read_folder
from mlx_flash.training.finetune import FinetuneConfig, finetune, make_loss

HEIGHT = WIDTH = 64
TOLERANCE = 1e-3  # max abs error on [0, 1] images
SMALL = MMDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                    pooled_projection_dim=32, pos_embed_max_size=8, sample_size=8, qk_norm=True,
                    dual_attention_layers=(0,))  # hidden 64: every linear layer quantizes at group size 64


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Six captioned images of two sizes (two buckets): smooth colour gradients, easy to fit."""
    folder = tmp_path_factory.mktemp("images")
    ys, xs = np.mgrid[0:48, 0:64] / 64.0
    for i in range(6):
        colour = np.stack([xs * (i % 3 == 0), ys * (i % 3 == 1), (xs + ys) / 2 * (i % 3 == 2)], -1)
        pixels = (255 * np.clip(colour + 0.2, 0, 1)).astype(np.uint8)
        image = Image.fromarray(pixels if i < 4 else pixels.transpose(1, 0, 2).copy())
        image.save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(["a red gradient", "a green gradient", "a blue gradient"][i % 3])
    return folder


def batch_of(config: MMDiTConfig, seed: int = 0, size: int = 2) -> tuple:
    rng = np.random.default_rng(seed)
    x0 = mx.array(rng.standard_normal((size, 8, 8, 16), dtype=np.float32))
    noise = mx.array(rng.standard_normal((size, 8, 8, 16), dtype=np.float32))
    sigmas = sample_sigmas(mx.array(rng.standard_normal(size, dtype=np.float32)), 3.0)
    embeds = mx.array(rng.standard_normal((size, 12, config.joint_attention_dim), dtype=np.float32))
    pooled = mx.array(rng.standard_normal((size, config.pooled_projection_dim), dtype=np.float32))
    return x0, noise, sigmas, embeds, pooled


def train(model: MMDiT, batch: tuple, steps: int, lr: float) -> list[float]:
    trainer = Trainer(model, lambda *b: flow_loss(model, *b), lambda step, micro: batch,
                      TrainConfig(steps=steps, learning_rate=lr, warmup=2))
    return [loss for _, loss in trainer.run()]


def test_logit_normal_sigmas_are_shifted_sigmoids():
    normal = mx.array([-2.0, 0.0, 1.5])
    expected = 3.0 * mx.sigmoid(normal) / (1 + 2.0 * mx.sigmoid(normal))
    assert np.allclose(np.array(sample_sigmas(normal, 3.0)), np.array(expected), atol=1e-7)
    assert np.allclose(np.array(sample_sigmas(normal, 1.0, mean=0.5, std=2.0)),
                       np.array(mx.sigmoid(0.5 + 2.0 * normal)), atol=1e-7)


@pytest.mark.parametrize("mode", ["full", "lora", "lora-bfloat16"])
def test_loss_decreases(mode):
    mx.random.seed(0)
    model = MMDiT(SMALL)
    if mode == "lora-bfloat16":  # a frozen bfloat16 base; the adapters are float32
        model.set_dtype(mx.bfloat16)
    if mode.startswith("lora"):
        modules = lora.target_modules(model, "transformer", ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])
        lora.add_adapters(model, "transformer", modules, 4, 4.0, mx.random.key(1))
    model.set_training(True)
    losses = train(model, batch_of(SMALL), 12, 3e-3 if mode == "full" else 1e-2)
    if mode == "lora-bfloat16":
        assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.trainable_parameters()))
    print(f"\n{mode}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.8 * losses[0]


def test_lora_gradients_match_finite_differences():
    """Adapters on a fused q/k/v (two of its three parts), an MLP and an adaLN modulation, with gradient
    checkpointing: for each adapter matrix, the gradient along a random unit direction against the central
    difference of the loss along it (Richardson-extrapolated from steps 0.1 and 0.2). float32, whose rounding
    of the loss bounds the differences' accuracy to about 2e-5 (two forwards differing only in rounding gave
    9.3e-6 and 1.1e-5 against a gradient of -1.0e-5; MLX's fused norms compute in float32 even for float64
    inputs, so float64 does not help)."""
    mx.random.seed(0)
    model = MMDiT(SMALL)
    modules = lora.target_modules(model, "transformer", ["to_q", "to_v", "ff.net.0.proj", "norm1_context.linear"])
    lora.add_adapters(model, "transformer", modules, 2, 3.0, mx.random.key(1))
    rng = np.random.default_rng(0)  # random up matrices too (they start at zero)
    model.update(tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32)),
                          model.trainable_parameters()))
    model.set_training(True)
    batch = batch_of(SMALL)

    def loss_of(params: dict) -> mx.array:
        model.update(params)
        return flow_loss(model, *batch)

    params = model.trainable_parameters()
    grads = dict(tree_flatten(mx.grad(loss_of)(params)))
    worst = 0.0
    for key, value in tree_flatten(params):
        direction = mx.array(rng.standard_normal(value.shape).astype(np.float32))
        if "qkv" in key and key.endswith("down"):  # the untargeted k part is not trained: move only q and v
            direction = direction * mx.repeat(mx.array([1.0, 0.0, 1.0]), value.shape[0] // 3)[:, None]
        direction = direction / mx.sqrt((direction**2).sum())

        def difference(t: float) -> float:
            ends = [loss_of(_with(params, key, value + sign * t * direction)).item() for sign in (1, -1)]
            return (ends[0] - ends[1]) / (2 * t)

        numeric = (4 * difference(0.1) - difference(0.2)) / 3
        analytic = (grads[key] * direction).sum().item()
        assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 3e-5, (key, numeric, analytic)
        if abs(analytic) > 1e-3:
            worst = max(worst, abs(numeric - analytic) / abs(analytic))
    print(f"\nLoRA gradients vs central differences: {len(grads)} matrices; relative error at most {worst:.1e} "
          "where the gradient exceeds 1e-3")
    assert len(grads) == 14 and worst < 2e-2


def _with(params: dict, key: str, value: mx.array) -> dict:
    return tree_map_with_path(lambda path, p: value if path == key else p, params)


def tiny_config(tiny_pipeline_dir, image_folder, output, **kwargs) -> FinetuneConfig:
    train = kwargs.pop("train", TrainConfig(steps=4, learning_rate=3e-2, warmup=1, checkpoint_every=2, seed=3))
    settings = dict(rank=4, resolution=64, max_sequence_length=32, dtype="float32") | kwargs
    return FinetuneConfig(model=str(tiny_pipeline_dir), data=image_folder, output=output, train=train, **settings)


def test_trained_lora_loads_in_diffusers_with_the_same_images(tiny_pipeline_dir, image_folder, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    path = finetune(tiny_config(tiny_pipeline_dir, image_folder, tmp_path / "lora.safetensors",
                                targets=("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.2",
                                         "norm1.linear")), progress=False)
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt="a red gradient", num_inference_steps=3, guidance_scale=3.0, height=HEIGHT, width=WIDTH)
    before = reference(**kwargs, latents=latents, output_type="np").images
    reference.load_lora_weights(str(path))
    expected = reference(**kwargs, latents=latents, output_type="np").images

    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False)
    adapters = [lora.read_lora(path)]
    ours.transformer_transforms.append(lambda m: lora.apply_loras(m, "transformer", adapters, lora.LoRAScales([1.0])))
    got = ours.generate(**kwargs, latents=latents.numpy(), output_type="np", skip_layer_guidance=False,
                        progress=False)
    err = np.abs(expected - got).max()
    effect = np.abs(expected - before).max()
    print(f"\ntrained LoRA, diffusers vs mlx-flash: max abs error {err:.2e}; the LoRA changes the image by {effect:.3f}")
    assert err <= TOLERANCE
    assert effect > 10 * TOLERANCE
    metadata = json.loads(_header(path)["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and "transformer_blocks.0.norm1.linear" in metadata["transformer.target_modules"]


def test_text_encoder_lora_trains_and_loads_in_diffusers(tiny_pipeline_dir, image_folder, tmp_path):
    """CLIP-L / CLIP-G adapters trained with the transformer's (embeddings computed in the step): the file loads
    in diffusers' `load_lora_weights`, whose encode_prompt then gives what mlx-flash's text encoders with the file
    give, and so do the images."""
    from diffusers import StableDiffusion3Pipeline

    config = tiny_config(tiny_pipeline_dir, image_folder, tmp_path / "te.safetensors", train_text_encoder=True,
                         text_encoder_rank=2, text_encoder_alpha=4.0, text_encoder_learning_rate=3e-2,
                         validation_prompts=("a green gradient",), validate_every=2)
    path = finetune(config, progress=False)
    tensors = mx.load(str(path))
    for component in ("text_encoder", "text_encoder_2"):
        names = {k.split(".lora_")[0] for k in tensors if k.startswith(f"{component}.")}
        layers = json.loads((tiny_pipeline_dir / component / "config.json").read_text())["num_hidden_layers"]
        assert names == {f"{component}.text_model.encoder.layers.{i}.self_attn.{p}"
                         for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        assert tensors[f"{component}.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 2
    metadata = json.loads(_header(path)["lora_adapter_metadata"])
    assert (metadata["text_encoder.r"], metadata["text_encoder_2.lora_alpha"], metadata["transformer.r"]) == (2, 4.0, 4)

    prompts = ["a red gradient", "a blue gradient, bright"]
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    settings = dict(do_classifier_free_guidance=False, max_sequence_length=32)
    with torch.no_grad():
        before = reference.encode_prompt(prompts, prompts, prompts, **settings)
        reference.load_lora_weights(str(path))
        expected = reference.encode_prompt(prompts, prompts, prompts, **settings)
    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False, loras=[path])
    got = ours.text_encoders.encode(prompts, do_cfg=False, max_sequence_length=32)
    errors, effects = [], []
    for i in (0, 2):  # embeds, pooled
        errors.append(float(np.abs(expected[i].numpy() - np.array(got[i // 2])).max()))
        effects.append(float(np.abs(expected[i].numpy() - before[i].numpy()).max()))
    scale = max(float(np.abs(e.numpy()).max()) for e in (expected[0], expected[2]))
    print(f"\ntext-encoder LoRA, diffusers vs mlx-flash encode_prompt: max abs error {max(errors):.2e} "
          f"(outputs up to {scale:.2f}); the LoRA changes them by up to {min(effects):.3f}")
    assert max(errors) <= 1e-5 * scale
    assert min(effects) > 1e-2

    latents = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt=prompts[0], num_inference_steps=3, guidance_scale=3.0, height=HEIGHT, width=WIDTH)
    image = reference(**kwargs, latents=latents, output_type="np").images
    mine = ours.generate(**kwargs, latents=latents.numpy(), output_type="np", skip_layer_guidance=False,
                         progress=False)
    print(f"images: max abs error {np.abs(image - mine).max():.2e}")
    assert np.abs(image - mine).max() <= TOLERANCE

    # the last validation image: the transformer and encoders being trained, as the saved file gives them
    shown = [p.name for p in sorted((config.folder / "validation").iterdir())]
    assert shown == ["step-000002-0.png", "step-000004-0.png"]
    last = Image.open(config.folder / "validation" / shown[-1])
    assert json.loads(last.text["mlx_flash"])["training_step"] == 4
    again = ours.run(ours.request(["a green gradient"], seed=0)).images[0]
    difference = np.abs(np.asarray(last.convert("RGB"), dtype=np.int16) - np.asarray(again, dtype=np.int16)).max()
    print(f"last validation image vs the saved LoRA's: max difference {difference}/255")
    assert difference <= 1


def _header(path) -> dict:
    import struct

    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(length))["__metadata__"]


class Interrupt:
    def __init__(self, at: int):
        self.at = at

    def __call__(self, step: int, loss: float) -> None:
        if step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("text_encoders", [False, True])
def test_resumed_run_gives_identical_weights(tiny_pipeline_dir, image_folder, tmp_path, text_encoders):
    train = TrainConfig(steps=5, learning_rate=1e-2, warmup=2, accumulation=2, ema_decay=0.9, checkpoint_every=2,
                        seed=1)
    extra = dict(train=train, flip=True, caption_dropout=0.2, batch_size=2, train_text_encoder=text_encoders,
                 text_encoder_learning_rate=1e-2)
    whole = finetune(tiny_config(tiny_pipeline_dir, image_folder, tmp_path / "whole.safetensors", **extra),
                     progress=False)
    config = tiny_config(tiny_pipeline_dir, image_folder, tmp_path / "resumed.safetensors", **extra)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, progress=False, callbacks=[Interrupt(3)])  # step 3 is lost; the checkpoint is at step 2
    assert not config.output.exists()
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(config, progress=False)
    resumed = finetune(config, resume=True, progress=False)
    a, b = mx.load(str(whole)), mx.load(str(resumed))
    assert a.keys() == b.keys() and len(a) > 0
    assert any(k.startswith("text_encoder_2.") for k in a) == text_encoders
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    steps = [json.loads(line)["step"] for line in (config.folder / "loss.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert Image.open(config.folder / "loss.png").size[0] > 100
    other = tiny_config(tiny_pipeline_dir, image_folder, tmp_path / "resumed.safetensors", rank=8, **extra)
    with pytest.raises(ValueError, match=r"other settings \(rank\)"):
        finetune(other, resume=True, progress=False)


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_and_applies_to_the_float_base(tmp_path, bits):
    mx.random.seed(0)
    base = MMDiT(SMALL)
    mx.eval(base.parameters())
    float_weights = dict(tree_flatten(base.parameters()))
    model = quantized(base, bits)
    assert is_quantized(model)
    modules = lora.target_modules(model, "transformer", lora.DREAMBOOTH_TARGETS + ("ff.net.2",))
    lora.add_adapters(model, "transformer", modules, 4, 8.0, mx.random.key(1))
    batch = batch_of(SMALL, size=4)
    losses = train(model, batch, 12, 1e-2)
    print(f"\nQLoRA {bits}-bit: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.85 * losses[0]  # 0.82 in 12 steps from SD3's sin-cos position table (random data)
    path = lora.save_lora(tmp_path / "qlora.safetensors", lora.adapter_tensors(model, "transformer", modules),
                          {"transformer": lora.peft_config(modules, 4, 8.0)})

    plain = MMDiT(SMALL)
    plain.load_weights(list(float_weights.items()))
    without = flow_loss(plain, *batch).item()
    lora.apply_loras(plain, "transformer", [lora.read_lora(path)], lora.LoRAScales([1.0]))
    with_lora = flow_loss(plain, *batch).item()
    print(f"float base: loss {without:.4f} without the LoRA, {with_lora:.4f} with it")
    assert with_lora < 0.9 * without


def test_group_learning_rates():
    """A group with its own learning rate moves by that rate: AdamW's first step is the same multiple of the
    learning rate for every weight (MLX's AdamW, without bias correction: lr * 0.1 / sqrt(0.001))."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 2), nn.Linear(3, 2)

    model = Two()
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    x = mx.array(np.random.default_rng(0).standard_normal((4, 3), dtype=np.float32))
    config = TrainConfig(steps=4, learning_rate=1e-3, warmup=0, group_learning_rates=(("second", 1e-2),))
    trainer = Trainer(model, lambda x: (model.first(x) ** 2).sum() + (model.second(x) ** 2).sum(),
                      lambda step, micro: (x,), config)
    trainer.train_step()
    moved = {k: np.abs(np.array(v) - before[k]).max() for k, v in tree_flatten(model.parameters())}
    step = 0.1 / np.sqrt(0.001)
    assert np.isclose(moved["first.weight"], 1e-3 * step, rtol=1e-3)
    assert np.isclose(moved["second.weight"], 1e-2 * step, rtol=1e-3)


def test_prior_preservation_in_one_pass_is_the_weighted_sum():
    """DreamBooth's prior loss: instance and class batches of one size go through the model together (weighted
    per image); the result is the instance loss plus prior_weight times the class loss."""
    mx.random.seed(0)
    model = MMDiT(SMALL)
    instance, prior = batch_of(SMALL, seed=0), batch_of(SMALL, seed=1)
    together = make_loss(model, 0.7)(instance, prior).item()
    apart = flow_loss(model, *instance).item() + 0.7 * flow_loss(model, *prior).item()
    assert abs(together - apart) <= 1e-6 * apart


def test_text_encoder_training_memory_estimate():
    """A trained CLIP's backward (LoRA on q/k/v/out, 77 tokens, CPU float32) against the estimator's."""
    from dataclasses import replace

    from mlx_flash import memory
    from mlx_flash.clip import CLIP_G, CLIPTextModel

    config = replace(CLIP_G, num_layers=4)
    model = CLIPTextModel(config)
    mx.eval(model.parameters())
    lora.add_adapters(model, "text_encoder_2", lora.target_modules(model, "text_encoder_2",
                                                                   lora.TEXT_ENCODER_TARGETS), 16, 16, mx.random.key(0))
    ids = mx.array(np.random.default_rng(0).integers(0, 1000, (1, 77)), dtype=mx.int32)
    grad = nn.value_and_grad(model, lambda ids: sum((x**2).mean() for x in model(ids)))
    mx.eval(model.parameters(), ids)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(ids))
    measured = mx.get_peak_memory() - base
    predicted = memory.clip_training_activations(config)
    print(f"\nCLIP-G width, 4 layers, trained: activations measured {measured / 1e6:.1f} MB, predicted "
          f"{predicted / 1e6:.1f} MB")
    assert abs(predicted - measured) <= 0.15 * measured


def test_bucket_sizes():
    assert bucket(512, 512, 512) == (512, 512)
    w, h = bucket(1600, 900, 1024)
    assert w % 16 == 0 and h % 16 == 0 and w > h and abs(w * h / 1024**2 - 1) < 0.05
    assert bucket(64, 48, 64) == (80, 48)
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket(100, 100, 500)


def test_bad_data_gets_one_line(tmp_path, image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        read_folder(empty)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_folder(tmp_path / "missing")
    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    Image.new("RGB", (32, 32)).save(uncaptioned / "a.png")
    with pytest.raises(ValueError, match="a.png: no caption"):
        read_folder(uncaptioned)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (broken / "b.txt").write_text("x")
    with pytest.raises(ValueError, match="b.png: not a readable image"):
        read_folder(broken)
    listed = tmp_path / "listed"
    listed.mkdir()
    Image.new("RGB", (32, 32)).save(listed / "c.png")
    (listed / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "a square"}) + "\n")
    assert [e.caption for e in read_folder(listed)] == ["a square"]
    (listed / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png"}) + "\n")
    with pytest.raises(ValueError, match="c.png has no caption"):
        read_folder(listed)


def test_cli_train_and_its_errors(tiny_pipeline_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    args = ["train", str(tiny_pipeline_dir), "--data", str(image_folder), "--output", str(out), "--rank", "2",
            "--steps", "2", "--resolution", "64", "--max-sequence-length", "32", "--dtype", "float32",
            "--targets", "re:transformer_blocks\\.0\\.attn\\.to_(q|v)"]
    assert main(args) == 0
    names = {k.split(".lora_")[0] for k in mx.load(str(out))}
    assert names == {"transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_v"}
    capsys.readouterr()
    assert main(args) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main([*args[:3], str(tmp_path / "nothing"), *args[4:]]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert main([*args[:5], str(tmp_path / "other.bin"), *args[6:]]) == 1
    assert ".safetensors" in capsys.readouterr().err
    assert main([*args, "--full", "--quantize", "4", "--force"]) == 1
    assert "cannot train a quantized base" in capsys.readouterr().err
    assert main([*args, "--full", "--train-text-encoder", "--force"]) == 1
    assert "drop --full, or drop --train-text-encoder" in capsys.readouterr().err
    assert main([*args, "--train-text-encoder", "--text-encoder-learning-rate", "0", "--force"]) == 1
    assert "text-encoder learning rate must be positive" in capsys.readouterr().err


def test_full_fine_tuning_writes_a_model_folder(tiny_pipeline_dir, image_folder, tmp_path):
    out = finetune(tiny_config(tiny_pipeline_dir, image_folder, tmp_path / "tuned", full=True,
                               train=TrainConfig(steps=2, learning_rate=1e-3, warmup=1)), progress=False)
    pipe = mlx_flash.load_pipeline(out, dtype="float32")
    original = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32")
    changed = [k for k, v in tree_flatten(pipe.transformer.parameters())
               if not np.array_equal(np.array(v), np.array(dict(tree_flatten(original.transformer.parameters()))[k]))]
    assert len(changed) > 10
    image = pipe.generate("a red gradient", num_inference_steps=2, height=HEIGHT, width=WIDTH, progress=False,
                          output_type="np")
    assert np.isfinite(image).all()


def test_checkpointing_gives_the_same_gradients():
    mx.random.seed(0)
    model = MMDiT(SMALL)
    batch = batch_of(SMALL)
    grad = nn.value_and_grad(model, lambda *b: flow_loss(model, *b))
    model.set_training(True, checkpointing=False)
    plain = dict(tree_flatten(grad(*batch)[1]))
    model.set_training(True)
    checkpointed = dict(tree_flatten(grad(*batch)[1]))
    assert max(float(mx.abs(plain[k] - checkpointed[k]).max()) for k in plain) < 1e-6


MEMORY_CONFIG = MMDiTConfig(num_layers=2, num_attention_heads=24, pos_embed_max_size=64, qk_norm=True,
                            dual_attention_layers=(0,))


def _memory_adapters(m: MMDiT) -> None:
    lora.add_adapters(m, "transformer", lora.target_modules(m, "transformer", lora.DREAMBOOTH_TARGETS), 16, 16,
                      mx.random.key(0))


def measured_training_activations() -> int:
    """MLX's peak bytes above the model and batch during one LoRA training step of MEMORY_CONFIG at 256 px
    (checkpointing, float32)."""
    model = MMDiT(MEMORY_CONFIG)
    mx.eval(model.parameters())
    _memory_adapters(model)
    model.set_training(True)
    rng = np.random.default_rng(0)
    batch = [mx.array(rng.standard_normal(shape, dtype=np.float32))
             for shape in ((1, 32, 32, 16), (1, 32, 32, 16), (1,), (1, 154, 4096), (1, 2048))]
    batch[2] = mx.sigmoid(batch[2])
    grad = nn.value_and_grad(model, lambda *b: flow_loss(model, *b))
    mx.eval(model.parameters(), batch)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(grad(*batch))
    return mx.get_peak_memory() - base


def test_training_memory_estimate():
    """One LoRA training step's activations (checkpointing, CPU float32) against the estimator's. The step runs in
    a child process with OpenBLAS preloaded where it is installed: MLX's peak memory counts its own buffers
    whatever the BLAS, and with the reference BLAS this process keeps (conftest.py) the step takes a minute."""
    from test_digits import blas_unchecked_env

    from mlx_flash import memory

    child = subprocess.run([sys.executable, __file__, "measure"], capture_output=True, text=True,
                           env=blas_unchecked_env(), cwd=Path(__file__).parent, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    measured = int(child.stdout.split()[-1])
    predicted = memory.estimate_training(MEMORY_CONFIG, height=256, width=256, lora=_memory_adapters).activations
    print(f"\ntraining step 256px, 2 blocks of width 1536: activations measured {measured / 1e6:.0f} MB, "
          f"predicted {predicted / 1e6:.0f} MB")
    assert abs(predicted - measured) <= 0.15 * measured


if __name__ == "__main__" and sys.argv[1:] == ["measure"]:
    from mlx_flash.blas import ensure_openblas

    ensure_openblas()
    print(measured_training_activations())

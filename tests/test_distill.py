"""SD3.5-Flash distillation: each objective against a direct computation on a tiny transformer (the
distribution-matching gradient against the score difference and finite differences, timestep-shared points
against the pipeline's own sampling loop, the branch merge against weight interpolation, the adversarial losses'
values and gradient signs), the roles on one base, resume, and the CLI on the packaged digits teacher."""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image

import mlx_flash
from mlx_flash import lora, sampler
from mlx_flash.cli import main
from mlx_flash.denoise import Callback, Prompts, denoise
from mlx_flash.mmdit import MMDiT, MMDiTConfig
from mlx_flash.samplers import Euler
from mlx_flash.training import TrainConfig, dmd
from mlx_flash.training.distill import (
    Conditions,
    DistillConfig,
    Distiller,
    Models,
    RealSide,
    teacher_samples,
)

SMALL = MMDiTConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
                    pooled_projection_dim=16, pos_embed_max_size=8, sample_size=4)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2")


def tiny(seed: int = 0) -> MMDiT:
    """A tiny transformer whose adaLN and output layers are random too (not zero), so outputs vary."""
    mx.random.seed(seed)
    model = MMDiT(SMALL)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.2) for k, v in tree_flatten(model.parameters())
                                 if "norm1" in k or "norm_out" in k or "proj_out" in k]))
    return model


def conditions(n: int = 3, seed: int = 0) -> Conditions:
    rng = np.random.default_rng(seed)
    e = mx.array(rng.standard_normal((n + 1, 6, SMALL.joint_attention_dim), dtype=np.float32))
    p = mx.array(rng.standard_normal((n + 1, SMALL.pooled_projection_dim), dtype=np.float32))
    return Conditions(e, p, e * mx.array([1.0] * 3 + [0.0] * 3)[None, :, None], p, empty=n)


def models(config: DistillConfig, seed: int = 0) -> Models:
    base = tiny(seed)
    modules = lora.target_modules(base, "transformer", TARGETS)
    m = Models(base, config, modules, mx.random.key(seed))
    # non-zero student and fake adapters, so that the roles differ
    for layer in lora.lora_layers(base).values():
        for name, adapter in layer["lora"].items():
            adapter["up"] = mx.random.normal(adapter["up"].shape, key=mx.random.key(int(name) + 7)) * 0.3
    return m


def config(**kw) -> DistillConfig:
    return DistillConfig(train=TrainConfig(steps=kw.pop("train_steps", 4), learning_rate=1e-3, warmup=1),
                         rank=2, fake_rank=2, targets=TARGETS, **kw)


def batch(seed: int = 1, n: int = 2):
    rng = np.random.default_rng(seed)
    shape = (n, 4, 4, 16)
    c = conditions()
    return (mx.array(rng.standard_normal(shape, dtype=np.float32)), c.embeds[:n], c.pooled[:n])


def test_roles_share_one_base():
    m = models(config())
    x, e, p = batch()
    t = mx.array([500.0, 500.0])
    outputs = {}
    for role, branch in (("teacher", 0), ("fake", 0), ("student", 0), ("student", 1)):
        with m.role(role, branch) as model:
            assert model is m.base
            outputs[(role, branch)] = np.array(model(x, t, e, p))
    plain = tiny(0)  # the same seed: the base's weights without any adapter
    assert np.allclose(outputs[("teacher", 0)], np.array(plain(x, t, e, p)), atol=1e-6)
    keys = list(outputs)
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert np.abs(outputs[keys[i]] - outputs[keys[j]]).max() > 1e-3, (keys[i], keys[j])
    # one copy of each base weight: adapters are all the extra arrays
    base_arrays = [v for k, v in tree_flatten(m.base.parameters()) if ".lora." not in k]
    assert sum(v.size for v in base_arrays) == sum(v.size for _, v in tree_flatten(plain.parameters()))
    # the fake role's gradients touch only the fake adapter and the head
    assert all(".lora.2." in k or k.startswith("head.") for k in m.paths("fake"))
    assert all(".lora.0." in k or ".lora.1." in k for k in m.paths("student"))


def test_dm_gradient_is_the_score_difference():
    rng = np.random.default_rng(0)
    shape = (2, 4, 4, 16)
    x_t, v_real, v_fake, x0 = (mx.array(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4))
    t = mx.array([0.3, 0.8])
    s = t[:, None, None, None]
    score = lambda v: -(x_t + (1 - s) * v) / s
    x0_real = x_t - s * v_real
    norm = mx.abs(x0 - x0_real).mean(axis=(1, 2, 3), keepdims=True)
    expected = s**2 / (1 - s) * (score(v_fake) - score(v_real)) / norm
    got = dmd.dm_gradient(x0, x_t, t, v_real, v_fake)
    assert np.allclose(np.array(got), np.array(expected), rtol=1e-4, atol=1e-5)


def test_dm_loss_pushes_the_gradient_through_the_student():
    """d loss / d theta = <g, d x0 / d theta> / x0.size, the right side by central finite differences."""
    m = models(config(split=False))
    x, e, p = batch()
    t = mx.array([0.6, 0.6])
    with m.role("teacher") as model:
        v_real = model(x, t * 1000, e, p)
    with m.role("fake") as model:
        v_fake = model(x, t * 1000, e, p)

    def x0_student():
        with m.role("student") as model:
            return x - t[:, None, None, None] * model(x, t * 1000, e, p)

    g = dmd.dm_gradient(x0_student(), x, t, v_real, v_fake)
    _, grads = m.value_and_grad("student", lambda: dmd.dm_loss(x0_student(), g))
    path = next(k for k in grads if k.endswith("qkv.lora.0.up"))
    index = (0, 3, 1)
    original = dict(tree_flatten(m.trainable_parameters()))[path]
    h = 1e-2

    def x0_at(delta: float) -> np.ndarray:
        bumped = np.array(original)
        bumped[index] += delta
        m.assign({path: mx.array(bumped)})
        out = np.array(x0_student(), dtype=np.float64)
        m.assign({path: original})
        return out

    dx0 = (x0_at(h) - x0_at(-h)) / (2 * h)
    expected = float((np.array(g, dtype=np.float64) * dx0).sum() / g.size)
    got = float(np.array(grads[path])[index])
    assert abs(expected) > 1e-6
    assert got == pytest.approx(expected, rel=2e-2, abs=1e-7)


def test_timestep_shared_points_are_the_students_sampler():
    """The points where the DM gradient is taken are the latents the pipeline's loop reaches with the student."""
    cfg = config(steps=4, split=False)
    m = models(cfg)
    c = conditions()
    trainer = Distiller(m, cfg, c, shift=3.0, guidance=2.0, teacher=None, real=None)
    d = trainer.draw(1)
    d["embeds"], d["pooled"] = c.embeds[:1], c.pooled[:1]
    sigmas = sampler.flow_sigmas(4, 3.0)
    seen = {}

    class Record(Callback):
        def on_step(self, state):
            seen[state.index] = np.array(state.x)

    with m.role("student") as model:
        denoise(model, d["noise"], sigmas, 0, Prompts(c.embeds[:1], c.pooled[:1]), sampler=Euler(), noise=None,
                callbacks=[Record()])
    for k in range(4):
        d["k"] = k
        x_k, s_k = trainer.student_point(d, 0)
        assert np.allclose(np.array(s_k), sigmas[k])
        assert np.allclose(np.array(x_k), seen[k], atol=1e-5), k


def test_merge_is_weight_interpolation():
    cfg = config()
    m = models(cfg)
    modules = lora.target_modules(m.base, "transformer", TARGETS)
    ratio = cfg.ratio
    assert ratio == pytest.approx(0.3)
    high, low = {}, {}
    for s in (0, 1):
        with m.role("student", s) as model:
            fused = {path: np.array(layer.weight + layer.delta_weight()) for path, layer in
                     lora.lora_layers(model).items()}
        (high if s == 0 else low).update(fused)
    tensors = m.merged_adapter_tensors(modules, ratio)
    assert tensors["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, SMALL.hidden_size)
    merged = m.merged_student(ratio)
    weights = dict(tree_flatten(merged.parameters()))
    for path, weight_high in high.items():
        expected = ratio * weight_high + (1 - ratio) * low[path]
        assert np.allclose(np.array(weights[f"{path}.weight"]), expected, atol=1e-6), path
    # the merged LoRA file's update is the same interpolation
    a = {k: v for k, v in tensors.items() if "transformer_blocks.0.attn.to_q" in k}
    down, up = a["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], a[
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    q = slice(0, SMALL.hidden_size)
    base_q = np.array(tiny(0).transformer_blocks[0].attn.qkv.weight)[q]
    expected_q = ratio * high["transformer_blocks.0.attn.qkv"][q] + (1 - ratio) * low["transformer_blocks.0.attn.qkv"][q]
    assert np.allclose(base_q + m.adapters.on[0] * np.array(up @ down), expected_q, atol=1e-6)
    # full weights: plain interpolation
    x = {"w": mx.array([1.0, 2.0])}
    y = {"w": mx.array([3.0, -2.0])}
    assert np.allclose(np.array(dmd.interpolate(x, y, 0.3)["w"]), [0.3 + 2.1, 0.6 - 1.4])


@pytest.mark.parametrize("kind", dmd.GAN_LOSSES)
def test_adversarial_losses(kind):
    real, fake = mx.array([2.0, -0.5]), mx.array([0.5, -1.5])
    sig = lambda v: 1 / (1 + np.exp(-np.array(v)))
    if kind == "hinge":
        d_expected = np.maximum(0, 1 - np.array(real)).mean() + np.maximum(0, 1 + np.array(fake)).mean()
        g_expected = -np.array(fake).mean()
    else:
        d_expected = -np.log(sig(real)).mean() - np.log(1 - sig(fake)).mean()
        g_expected = -np.log(sig(fake)).mean()
    assert dmd.discriminator_loss(real, fake, kind).item() == pytest.approx(d_expected, rel=1e-5)
    assert dmd.generator_loss(fake, kind).item() == pytest.approx(g_expected, rel=1e-5)
    # the head's loss falls as real logits rise and fake ones fall; the student's falls as fake logits rise
    d_real, d_fake = mx.grad(lambda r, f: dmd.discriminator_loss(r, f, kind), argnums=(0, 1))(real, fake)
    g_fake = mx.grad(lambda f: dmd.generator_loss(f, kind))(fake)
    assert np.all(np.array(d_real) <= 0) and np.any(np.array(d_real) < 0)
    assert np.all(np.array(d_fake) >= 0) and np.any(np.array(d_fake) > 0)
    assert np.all(np.array(g_fake) < 0)
    with pytest.raises(ValueError, match="unknown adversarial loss"):
        dmd.generator_loss(fake, "wasserstein")


def test_block_features_are_the_forward_pass():
    """The last block's features through the output layer give the model's velocity."""
    model = tiny(3)
    x, e, p = batch()
    t = mx.array([300.0, 700.0])
    h = dmd.block_features(model, x, t, e, p, SMALL.num_layers - 1)
    scale, shift = model.modulation(t, p)[-1]
    out = model.proj_out(nn.LayerNorm(h.shape[-1], affine=False, eps=1e-6)(h) * (1 + scale[:, None]) + shift[:, None])
    out = out.reshape(2, 2, 2, 2, 2, 16).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 4, 16)
    assert np.allclose(np.array(out), np.array(model(x, t, e, p)), atol=1e-5)
    with pytest.raises(ValueError, match="feature block 5"):
        dmd.block_features(model, x, t, e, p, 5)


@pytest.mark.parametrize("sharing", [True, False])
def test_steps_train_and_resume_exactly(tmp_path, sharing):
    """A few steps of the whole objective (fake update, adversarial head on teacher samples, DM step, branch
    switch) move both roles, and a resumed run gives the weights of an uninterrupted one."""
    cfg = config(train_steps=4, timestep_sharing=sharing, steps=4)
    c = conditions()
    rng = np.random.default_rng(5)
    real = RealSide(mx.array(rng.standard_normal((4, 4, 4, 16), dtype=np.float32)), mx.arange(4) % 3, c)

    def run(folder, steps=None, resume=False):
        m = models(cfg)
        trainer = Distiller(m, cfg, c, 3.0, 2.0, None, real, folder)
        if resume:
            trainer.resume()
        while trainer.step < (steps or cfg.train.steps):
            trainer.train_step()
            if folder is not None:
                trainer.save_checkpoint()
        return m, trainer

    start = dict(tree_flatten(models(cfg).trainable_parameters()))
    full, trainer = run(None)
    assert set(trainer.losses) == {"fake", "student", "dm", "generator"}
    after = dict(tree_flatten(full.trainable_parameters()))
    for role in ("student", "fake"):
        assert max(np.abs(np.array(after[k] - start[k])).max() for k in full.paths(role)) > 0, role
    run(tmp_path, steps=2)
    resumed, _ = run(tmp_path, resume=True)
    again = dict(tree_flatten(resumed.trainable_parameters()))
    assert all(np.allclose(np.array(again[k]), np.array(after[k]), atol=1e-6) for k in after)


def test_warmup_regresses_every_branch_onto_teacher_samples():
    cfg = config(train_steps=3, warmup_steps=1)
    m = models(cfg)
    c = conditions()
    pairs = teacher_samples(m, c, 4, 3, 2.0, 3.0, (4, 4, 16), 0)
    assert pairs[2].shape == (4, 4, 4, 16) and np.array(pairs[1]).tolist() == [0, 1, 2, 0]
    trainer = Distiller(m, cfg, c, 3.0, 2.0, pairs, None)
    before = dict(tree_flatten(m.trainable_parameters()))
    trainer.train_step()
    assert set(trainer.losses) == {"warmup"}
    after = dict(tree_flatten(m.trainable_parameters()))
    for adapter in ("0", "1"):
        assert max(np.abs(np.array(after[k] - before[k])).max() for k in after if f".lora.{adapter}.up" in k) > 0
    assert all(np.array_equal(np.array(after[k]), np.array(before[k])) for k in m.paths("fake"))
    assert [trainer.branch(s) for s in (2, 3)] == [0, 1]


def test_config_refuses_bad_settings():
    with pytest.raises(ValueError, match="1, 2 or 4 steps"):
        config(steps=3)
    with pytest.raises(ValueError, match="split ratio"):
        config(split_ratio=(-1.0, 2.0))
    cfg = config(steps=1)
    with pytest.raises(ValueError, match="timestep sharing needs one"):
        Distiller(models(cfg), cfg, conditions(), 3.0, 1.0, None, None)
    Distiller(models(config(steps=1, split=False)), config(steps=1, split=False), conditions(), 3.0, 1.0, None, None)


def test_full_students_train_and_merge():
    cfg = config(full=True, train_steps=4)
    m = models(cfg)
    trainer = Distiller(m, cfg, conditions(), 3.0, 2.0, None, None)
    base = dict(tree_flatten(tiny(0).parameters()))
    while trainer.step < 4:
        trainer.train_step()
    high, low = (dict(tree_flatten(s.parameters())) for s in m.students)
    key = "transformer_blocks.0.attn.qkv.weight"
    assert np.abs(np.array(high[key] - base[key])).max() > 0 and np.abs(np.array(low[key] - high[key])).max() > 0
    assert np.allclose(np.array(m.base.parameters()["transformer_blocks"][0]["attn"]["qkv"]["weight"]),
                       np.array(base[key]))  # the teacher is untouched
    merged = dict(tree_flatten(m.merged_student(0.3).parameters()))
    assert all(np.allclose(np.array(merged[k]), 0.3 * np.array(high[k]) + 0.7 * np.array(low[k]), atol=1e-6)
               for k in high)


def test_cli_distils_digits(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 + 100 * i, np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text("a digit")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the number 1\nthe number 7\n")
    out = tmp_path / "student"
    code = main(["distill", "digits", str(out), "--steps", "4", "--prompts", str(prompts), "--train-steps", "3",
                 "--rank", "4", "--fake-rank", "4", "--teacher-samples", "4", "--trajectory-warmup", "1",
                 "--t5-dropout", "0.5", "--validation-prompt", "the number 3", "--validate-every", "2"])
    assert code == 0
    work = tmp_path / "student.distill"
    assert [json.loads(line)["step"] for line in (work / "losses.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (work / "validation").iterdir()) == ["step-000002.png", "step-000003.png"]
    manifest = json.loads((out / "mlx_flash.json").read_text())
    assert manifest["defaults"]["num_inference_steps"] == 4 and manifest["defaults"]["guidance_scale"] == 1.0
    teacher = json.loads((mlx_flash.loading.PACKAGED_MODELS / "digits" / "mlx_flash.json").read_text())
    assert manifest["latent_rgb"] == teacher["latent_rgb"]  # the VAE's preview map is kept
    pipe = mlx_flash.load_pipeline(str(out))
    image = pipe.generate("the number 7", seed=0, output_type="np")[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and image.std() > 0.01
    assert main(["distill", "digits", str(out), "--steps", "2", "--prompts", str(prompts)]) == 1  # exists
    assert main(["distill", "digits", str(tmp_path / "x.safetensors"), "--full", "--prompts", str(prompts)]) == 1
    assert main(["distill", "digits", str(tmp_path / "y"), "--prompts", str(tmp_path / "none.txt")]) == 1
    assert main(["distill", "digits", str(tmp_path / "z"), "--steps", "2", "--prompts", str(prompts)]) == 1  # no split
    assert main(["distill", "digits", str(tmp_path / "w"), "--init", "digits-flash", "--prompts", str(prompts)]) == 1
    lora_out = tmp_path / "student.safetensors"
    assert main(["distill", "digits", str(lora_out), "--steps", "2", "--prompts", str(prompts), "--train-steps", "2",
                 "--rank", "4", "--fake-rank", "4", "--renoise", "--data", str(images)]) == 0
    pipe = mlx_flash.load_pipeline("digits", loras=[str(lora_out)])
    assert np.isfinite(pipe.generate("the number 1", seed=0, output_type="np", num_inference_steps=2,
                                     guidance_scale=1.0)[0]).all()


def test_trajectory_guidance_is_the_teachers_ode_over_the_students_step():
    """Its target equals the guided teacher's Euler sub-steps from the student's point x_k to the next student
    noise level, computed directly; the logged term equals mean |v_student - target|^2."""
    cfg = config(steps=4, split=False, trajectory_weight=0.5, trajectory_substeps=3, adversarial_weight=0.0)
    m, c = models(cfg), conditions()
    trainer = Distiller(m, cfg, c, shift=3.0, guidance=2.0, teacher=None, real=None)
    d = trainer.draw(1)
    k, sigmas = d["k"], sampler.flow_sigmas(4, 3.0)
    x_k, s_k = trainer.student_point(d, 0)
    got = trainer.teacher_step(d, 0, x_k)

    x = np.array(x_k, dtype=np.float64)
    levels = np.linspace(sigmas[k], sigmas[k + 1], 4)
    with m.role("teacher") as model:
        for a, b in zip(levels[:-1], levels[1:]):
            t = mx.full((1,), float(a) * 1000)
            v_uncond = np.array(model(mx.array(x, dtype=mx.float32), t, d["negative_embeds"], d["negative_pooled"]))
            v_cond = np.array(model(mx.array(x, dtype=mx.float32), t, d["teacher_embeds"], d["teacher_pooled"]))
            x = x + (b - a) * (v_uncond + 2.0 * (v_cond - v_uncond))
    expected = (x - np.array(x_k)) / (sigmas[k + 1] - sigmas[k])
    assert np.abs(expected).max() > 0.1
    assert np.allclose(np.array(got), expected, atol=1e-4)

    with m.role("student") as model:
        v_student = np.array(model(x_k, s_k * 1000, d["embeds"], d["pooled"]))
    trainer.train_step()  # the fake update before it touches neither the student nor the teacher
    assert trainer.losses["trajectory"] == pytest.approx(float(((v_student - expected) ** 2).mean()), rel=1e-4)


def test_real_side_keeps_its_own_captions():
    """The discriminator sees each real latent with its own caption (T5 dropped with the batch's draw)."""
    cfg = config(batch_size=6, t5_dropout=0.5)
    c = conditions()
    latents = mx.array(np.random.default_rng(3).standard_normal((5, 4, 4, 16), dtype=np.float32))
    rows = np.array([2, 0, 1, 2, 0])
    trainer = Distiller(models(cfg), cfg, c, 3.0, 2.0, None, RealSide(latents, mx.array(rows), c))
    d = trainer.draw(3)
    dropped = set()
    for i in range(6):
        j = int(np.flatnonzero(np.all(np.array(latents) == np.array(d["real"][i]), axis=(1, 2, 3)))[0])
        drop = not np.allclose(np.array(d["embeds"][i]), np.array(d["teacher_embeds"][i]))
        dropped.add(drop)
        table = c.no_t5_embeds if drop else c.embeds
        assert np.array_equal(np.array(d["real_embeds"][i]), np.array(table[int(rows[j])]))
        assert np.array_equal(np.array(d["real_pooled"][i]), np.array(c.pooled[int(rows[j])]))
    assert dropped == {True, False}


def test_estimate_distillation_counts_both_adapters_and_the_head():
    """The estimator's trained bytes are the distiller's own trainable parameters (student and fake-score
    adapters on the DreamBooth targets, the head) times four (weights, gradients, AdamW's two moments)."""
    from mlx_flash import memory

    cfg = DistillConfig(train=TrainConfig(steps=2, learning_rate=1e-3), split=False, rank=4, fake_rank=2)
    base = MMDiT(SMALL)
    m = Models(base, cfg, lora.target_modules(base, "transformer", cfg.targets), mx.random.key(0))
    trained = sum(v.nbytes for _, v in tree_flatten(m.trainable_parameters()))
    estimate = memory.estimate_distillation(SMALL, height=32, width=32, rank=4, fake_rank=2)
    assert estimate.trained == 4 * trained
    assert estimate.base == memory.estimate_training(SMALL, height=32, width=32).trained // 4


def test_estimate_distillation_adds_the_cpu_dequantized_copies_of_a_quantized_base():
    """On the CPU a quantized base adds 0.81 of its largest block's float32 weights for each of the fake update's
    three concurrent passes to the activations; a float base, or `cpu=False`, adds nothing."""
    from mlx_flash import memory
    from mlx_flash.quantization import Quantization, quantize_model

    quantize = lambda model: quantize_model(model, Quantization(4, group_size=32))
    largest = max(sum(v.nbytes for _, v in tree_flatten(b.parameters())) for b in MMDiT(SMALL).transformer_blocks)
    kwargs = {"height": 32, "width": 32, "rank": 4, "fake_rank": 2}
    cpu = memory.estimate_distillation(SMALL, quantize=quantize, **kwargs)
    metal = memory.estimate_distillation(SMALL, quantize=quantize, cpu=False, **kwargs)
    assert cpu.activations - metal.activations == int(0.81 * 3 * largest)
    assert (cpu.base, cpu.trained) == (metal.base, metal.trained)
    assert memory.estimate_distillation(SMALL, **kwargs) == memory.estimate_distillation(SMALL, cpu=False, **kwargs)

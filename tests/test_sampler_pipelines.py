"""Whole runs with each sampler against diffusers' StableDiffusion3Pipeline (its schedulers swapped in) and, for
the scale-wise sampler, SwD's loop around the same tiny diffusers components; presets and replacement
transformers as `load_pipeline` applies them."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.schedulers import scheduling_flow_match_euler_discrete
from PIL import Image
from tiny import randomize

import mlx_flash
import mlx_flash.loading as loading
from mlx_flash import cli
from mlx_flash.denoise import initial_noise, seeded_noise
from mlx_flash.image_io import read_metadata
from mlx_flash.loading import default_preset
from mlx_flash.presets import PRESETS, SD3_MEDIUM, SD35_MEDIUM

HEIGHT, WIDTH = 64, 96  # latents 8 x 12
TOLERANCE = 1e-3  # max abs error on [0, 1] images
PROMPT = "a lighthouse on a cliff at dusk"

SCHEDULERS = {
    "euler": lambda shift: FlowMatchEulerDiscreteScheduler(shift=shift),
    "heun": lambda shift: FlowMatchHeunDiscreteScheduler(shift=shift),
    "dpm++2m": lambda shift: DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero"),
    "euler-stochastic": lambda shift: FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True),
}


@pytest.fixture(scope="module")
def pipelines(tiny_pipeline_dir):
    reference = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32)
    reference.set_progress_bar_config(disable=True)
    ours = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False)
    return reference, ours


def latents(seed: int = 0, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    return torch.randn((1, 16, height // 8, width // 8), generator=torch.Generator().manual_seed(seed))


def error(expected: np.ndarray, got: np.ndarray) -> float:
    assert got.shape == expected.shape and expected.std() > 0.02
    return float(np.abs(expected - got).max())


def inject_noise(monkeypatch, seeds, shape):
    """diffusers' stochastic Euler draws the noise our seeded noise gives for the same step (draw i + 1)."""
    draws = iter(range(1, 1000))
    noise = seeded_noise(seeds)

    def randn_tensor(size, **kwargs):
        return torch.from_numpy(np.array(noise(next(draws), shape))).permute(0, 3, 1, 2).to(kwargs["dtype"])

    monkeypatch.setattr(scheduling_flow_match_euler_discrete, "randn_tensor", randn_tensor)


@pytest.mark.parametrize("name, steps, shift, guidance", [  # euler: test_pipeline.py
    ("heun", 3, 3.0, 4.0), ("heun", 4, 3.0, 1.0), ("dpm++2m", 4, 3.0, 4.0), ("dpm++2m", 5, 1.0, 1.0),
    ("euler-stochastic", 4, 3.0, 1.0), ("euler-stochastic", 3, 3.0, 4.0)])
def test_whole_run_matches_diffusers_pipeline(pipelines, monkeypatch, name, steps, shift, guidance):
    reference, ours = pipelines
    if name == "euler-stochastic":
        inject_noise(monkeypatch, [11], (HEIGHT // 8, WIDTH // 8, 16))
    reference.scheduler = SCHEDULERS[name](shift)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=HEIGHT, width=WIDTH)
    expected = reference(PROMPT, **kwargs, latents=latents(), output_type="np").images
    got = ours.generate(PROMPT, **kwargs, latents=latents().numpy(), sampler=name, shift=shift, seed=11,
                        output_type="np", progress=False)
    euler = ours.generate(PROMPT, **kwargs, latents=latents().numpy(), shift=shift, output_type="np", progress=False)
    err = error(expected, got)
    print(f"\n{name}, {steps} steps, shift {shift}, guidance {guidance}: max abs error {err:.2e}")
    assert err <= TOLERANCE
    assert np.abs(got - euler).max() > 10 * TOLERANCE  # the sampler changed the image far beyond the tolerance


def test_custom_sigmas_and_shift_match_diffusers(pipelines):
    reference, ours = pipelines
    reference.scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    custom = [1.0, 0.8, 0.55, 0.3]
    kwargs = dict(num_inference_steps=4, guidance_scale=1.0, height=HEIGHT, width=WIDTH)
    expected = reference(PROMPT, **kwargs, sigmas=custom, latents=latents(1), output_type="np").images
    got = ours.generate(PROMPT, **kwargs, sigmas=custom, shift=2.0, latents=latents(1).numpy(), output_type="np",
                        progress=False)
    assert error(expected, got) <= TOLERANCE


def test_stochastic_runs_reproduce_by_seed(pipelines):
    _, ours = pipelines
    kwargs = dict(num_inference_steps=3, guidance_scale=1.0, height=HEIGHT, width=WIDTH, sampler="euler-stochastic",
                  output_type="np", progress=False)
    first, again = ours.generate(PROMPT, seed=5, **kwargs), ours.generate(PROMPT, seed=5, **kwargs)
    assert np.array_equal(first, again)
    request = ours.request(PROMPT, seed=[6, 5], num_images=2, shift=2.5, **{k: v for k, v in kwargs.items()
                                                                             if k != "progress"})
    result = ours.run(request)
    assert np.array_equal(ours.generate(PROMPT, seed=5, shift=2.5, **kwargs)[0], result.images[1])
    assert np.abs(result.images[0] - result.images[1]).max() > 0.05 and np.abs(result.images[1] - first[0]).max() > 0
    meta = result.metadata(1)
    assert (meta["sampler"], meta["shift"], meta["sigmas"], meta["seed"]) == ("euler-stochastic", 2.5, None, 5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="ddim"), r"^unknown sampler 'ddim'; use one of euler, "),
    (dict(sigmas=[1.0, 0.5]), r"^got 2 custom sigmas for 3 steps; pass exactly one sigma per step"),
    (dict(sigmas=[1.0, 0.5, 0.7]), r"^custom sigmas must be strictly decreasing"),
    (dict(sigmas=["a", 1]), r"^sigmas must be a list of numbers"),
    (dict(sampler="scale-wise"), r"^the scale-wise sampler needs scales"),
])
def test_bad_sampling_arguments(pipelines, kwargs, message):
    _, ours = pipelines
    with pytest.raises(ValueError, match=message) as info:
        ours.request(PROMPT, num_inference_steps=3, height=HEIGHT, width=WIDTH, **kwargs)
    assert "\n" not in str(info.value)


SWD = dict(scales=[4, 6, 8], sigmas=[1.0, 0.8, 0.6])  # a scale-wise model's defaults, at the tiny model's size


def swd_reference(reference: StableDiffusion3Pipeline, first: torch.Tensor, seed: int) -> np.ndarray:
    """SwD's inference loop (yandex-research/swd, src/flow_matching_sampler.py) around diffusers' tiny
    transformer and VAE; noise draws as our seeded noise gives them."""
    embeds, _, pooled, _ = reference.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False)
    scales, sigmas = SWD["scales"], torch.tensor(SWD["sigmas"] + [0.0])
    timesteps, latent, noise = sigmas[:-1] * 1000, first, seeded_noise([seed])
    with torch.no_grad():
        for i in range(len(scales)):
            v = reference.transformer(hidden_states=latent, timestep=timesteps[i].expand(1),
                                      encoder_hidden_states=embeds, pooled_projections=pooled).sample
            latent = latent - v * sigmas[i]
            if i + 1 == len(scales):
                break
            if scales[i] != scales[i + 1]:
                latent = F.interpolate(latent, size=scales[i + 1], mode="bicubic")
            n = torch.from_numpy(np.array(noise(i + 1, (scales[i + 1], scales[i + 1], 16)))).permute(0, 3, 1, 2)
            latent = sigmas[i + 1] * n + (1.0 - sigmas[i + 1]) * latent
        vae = reference.vae
        image = vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_scale_wise_run_matches_swd_loop(pipelines, tiny_pipeline_dir, tmp_path):
    reference, _ = pipelines
    folder = shutil.copytree(tiny_pipeline_dir, tmp_path / "swd")
    defaults = {"sampler": "scale-wise", "num_inference_steps": 3, "guidance_scale": 0.0, "shift": 1.0, **SWD}
    (folder / "mlx_flash.json").write_text(json.dumps({"defaults": defaults}))
    ours = mlx_flash.load_pipeline(folder, dtype="float32", low_memory=False)
    first = initial_noise([4], (4, 4, 16))
    expected = swd_reference(reference, torch.from_numpy(np.array(first)).permute(0, 3, 1, 2), seed=4)
    result = ours.run(ours.request(PROMPT, height=64, width=64, seed=4, output_type="np"))
    got = result.images
    assert got.shape == (1, 64, 64, 3) and result.metadata(0)["scales"] == SWD["scales"]
    err = error(expected, got)
    print(f"\nscale-wise 4 -> 6 -> 8 latents: max abs error {err:.2e}")
    assert err <= TOLERANCE
    with pytest.raises(ValueError, match=r"^the scale-wise sampler needs image sides that are multiples of 64"):
        ours.request(PROMPT, height=64, width=96)
    with pytest.raises(ValueError, match=r"^the scale-wise sampler starts from small latents"):
        ours.request(PROMPT, height=64, width=64, image=Image.new("RGB", (64, 64)))


def test_replacement_transformer_without_config_takes_the_bases(pipelines, tiny_pipeline_dir, tmp_path):
    reference, ours = pipelines
    config = dict(reference.transformer.config)
    other = randomize(SD3Transformer2DModel.from_config(config), seed=7)
    other.save_pretrained(tmp_path / "with_config")
    bare = shutil.copytree(tmp_path / "with_config", tmp_path / "bare")
    (bare / "config.json").unlink()  # released as weights only, like SenseFlow's Medium transformer
    swapped = StableDiffusion3Pipeline.from_pretrained(tiny_pipeline_dir, transformer=other, dtype=torch.float32)
    swapped.set_progress_bar_config(disable=True)
    replaced = mlx_flash.load_pipeline(tiny_pipeline_dir, dtype="float32", low_memory=False, transformer=bare)
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, height=HEIGHT, width=WIDTH, output_type="np")
    expected = swapped(PROMPT, **kwargs, latents=latents(2)).images
    got = replaced.generate(PROMPT, **kwargs, latents=latents(2).numpy(), progress=False)
    base = ours.generate(PROMPT, **kwargs, latents=latents(2).numpy(), progress=False)
    assert error(expected, got) <= TOLERANCE and np.abs(got - base).max() > 10 * TOLERANCE
    assert replaced.identity["transformer"] == str(bare) and replaced.identity["transformer_fingerprint"]

    wrong = randomize(SD3Transformer2DModel.from_config({**config, "num_layers": 2}), seed=8)
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match=r"does not fit the base model"):
        mlx_flash.load_pipeline(tiny_pipeline_dir, transformer=tmp_path / "wrong")
    (tmp_path / "wrong" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"does not fit the base model"):
        mlx_flash.load_pipeline(tiny_pipeline_dir, transformer=tmp_path / "wrong").transformer
    with pytest.raises(ValueError, match=r"holds no .safetensors weights"):
        mlx_flash.load_pipeline(tiny_pipeline_dir, transformer=tmp_path)


def test_presets_by_name_and_default_presets(monkeypatch):
    # Defaults of an unnamed model come from its architecture's own-weights presets, or its repo id.
    assert default_preset(SD3_MEDIUM, "my-flash-model").name == "sd3-medium"
    assert default_preset(SD35_MEDIUM, "tensorart/stable-diffusion-3.5-medium-turbo").name == "sd3.5-medium-turbo"
    assert default_preset(SD35_MEDIUM, "some/flash-distill").name == "sd3.5-flash"
    # A named preset's shift, T5 choice, LoRA and transformer reach the pipeline (nothing downloaded here).
    seen = {}
    monkeypatch.setattr(loading, "resolve_model_dir", lambda model, **kw: seen.update(kw, model=model))
    monkeypatch.setattr(loading, "check_model_folder", lambda root: None)
    monkeypatch.setattr(loading, "on_base", lambda root: (root, None, None))
    monkeypatch.setattr(loading, "LoRAs", list)
    monkeypatch.setattr(loading, "replacement_transformer", lambda location, root: f"folder of {location}")

    def fake(name):
        config = staticmethod(lambda root: PRESETS[name].transformer.to_diffusers())
        return type("P", (), {"read_transformer_config": config, "check_loras": lambda self: None,
                              "__init__": lambda self, root, **kw: seen.update(kw)})

    monkeypatch.setattr(loading, "Pipeline", fake("sid-medium"))
    mlx_flash.load_pipeline("sid-medium")
    assert seen["model"] == "YGu1998/SiD-DiT-SD3.5-medium" and seen["shift"] == 1.0 and seen["loras"] == []
    assert seen["preset"] is PRESETS["sid-medium"] and seen["use_t5"] is True and seen["transformer"] is None
    monkeypatch.setattr(loading, "Pipeline", fake("flash-sd3"))
    mlx_flash.load_pipeline("flash-sd3", loras=[("style.safetensors", 0.5)])
    assert seen["model"] == PRESETS["sd3-medium"].repo_id and seen["use_t5"] is False
    assert seen["loras"] == [("jasperai/flash-sd3/adapter_model.safetensors", 1.0), ("style.safetensors", 0.5)]
    monkeypatch.setattr(loading, "Pipeline", fake("senseflow-medium"))
    mlx_flash.load_pipeline("senseflow-medium")
    assert seen["transformer"] == "folder of domiso/SenseFlow/SenseFlow-SD35M" and seen["loras"] == []


def test_cli_sampling_options_recorded_and_restored(tiny_pipeline_dir, tmp_path, capsys):
    args = ["generate", "a boat", "--model", str(tiny_pipeline_dir), "--width", "32", "--height", "32", "--steps",
            "2", "--seed", "3", "--dtype", "float32"]
    assert cli.main([*args, "--sampler", "heun", "--shift", "2", "--sigmas", "1,0.5",
                     "--output", str(tmp_path / "a.png")]) == 0
    meta = read_metadata(tmp_path / "a.png")
    assert (meta["sampler"], meta["shift"], meta["sigmas"]) == ("heun", 2.0, [1.0, 0.5])
    assert cli.main(["generate", "--from", str(tmp_path / "a.png"), "--output", str(tmp_path / "b.png")]) == 0
    assert Image.open(tmp_path / "b.png").tobytes() == Image.open(tmp_path / "a.png").tobytes()
    capsys.readouterr()
    for extra, message in [(["--sampler", "ddim"], "unknown sampler 'ddim'; use one of euler, euler-stochastic"),
                           (["--sigmas", "1,x"], "--sigmas must be comma-separated numbers"),
                           (["--sigmas", "0.5,0.7"], "custom sigmas must be strictly decreasing"),
                           (["--sigmas", "1"], "got 1 custom sigmas for 2 steps")]:
        assert cli.main([*args, *extra, "--output", str(tmp_path / "c.png")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mlx-flash: error: ") and message in err[0], err
    assert not (tmp_path / "c.png").exists()

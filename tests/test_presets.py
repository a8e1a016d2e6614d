"""The presets: every one names a known architecture and a sampler its settings run with; `mlx-flash models`."""

from dataclasses import fields

import pytest

from mlx_flash import cli
from mlx_flash.presets import PRESETS, Preset
from mlx_flash.samplers import SAMPLERS, make_sampler

FEW_STEP = ["sd3.5-large-turbo", "sd3.5-large-turbox", "sd3.5-medium-turbo", "swd-medium-4-steps",
            "swd-medium-6-steps", "swd-large-4-steps", "swd-large-6-steps", "senseflow-medium", "senseflow-large",
            "sid-medium", "sid-large", "flash-sd3", "hyper-sd3-4-steps", "hyper-sd3-8-steps", "hyper-sd3-16-steps"]


def test_every_public_few_step_release_has_a_preset():
    assert set(FEW_STEP) <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_settings_run_with_its_sampler(name):
    p = PRESETS[name]
    assert p.sampler in SAMPLERS and p.architecture in ("SD3 Medium", "SD3.5 Medium", "SD3.5 Large")
    sampler = make_sampler(p.sampler, **p.sampler_options())
    sigmas = sampler.sigmas(p.num_steps, p.shift, p.sigmas)
    assert len(sigmas) == p.num_steps + 1 and sigmas[-1] == 0
    if p.sigmas is not None and p.shift == 1.0:
        assert sigmas[:-1].tolist() == pytest.approx(list(p.sigmas), abs=1e-7)
    if p.scales is not None:  # at the published 1024 x 1024 the latents take the published sides
        side = p.scales[-1]
        assert [sampler.latent_size(i, (side, side)) for i in range(p.num_steps)] == [(s, s) for s in p.scales]
    assert set(p.unverified) <= {f.name for f in fields(Preset)}
    assert p.licence


def test_adapter_presets_keep_their_base_architecture():
    assert PRESETS["swd-large-4-steps"].repo_id == PRESETS["sd3.5-large"].repo_id
    assert PRESETS["flash-sd3"].repo_id == PRESETS["sd3-medium"].repo_id and not PRESETS["flash-sd3"].use_t5
    assert PRESETS["senseflow-medium"].transformer == PRESETS["sd3.5-medium"].transformer
    assert all(PRESETS[f"hyper-sd3-{n}-steps"].lora.scale == 0.125 for n in (4, 8, 16))
    assert {n for n, p in PRESETS.items() if p.base_weights} >= {"sd3-medium", "sd3.5-medium", "sd3.5-large"}


def test_models_command_lists_every_preset(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name, p in PRESETS.items():
        start = out.index(f"{name}\n  ")
        block = out[start:].split("\n")[1:4]
        assert block[0].startswith(f"  {p.architecture}: ")
        assert block[1].startswith(f"  {p.sampler}") and f"{p.num_steps} steps" in block[1]
        assert block[2] == f"  licence: {p.licence}"
    # Values no source confirms are marked where they are printed.
    swd = out[out.index("swd-large-6-steps\n"):].split("\n")[2]
    assert "sigmas 1,0.9454,0.8959,0.7904,0.7371,0.6022 (UNVERIFIED)" in swd and "scales 32,48," in swd
    flash = out[out.index("flash-sd3\n"):].split("\n")[1:3]
    assert "(without T5)" in flash[0] and "euler (UNVERIFIED)" in flash[1]

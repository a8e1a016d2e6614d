"""Each sampler against its reference: diffusers' scheduler classes stepping the same toy velocity, and for the
scale-wise sampler a torch re-implementation of SwD's published inference loop."""

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.schedulers import scheduling_flow_match_euler_discrete

from mlx_flash.denoise import initial_noise, seeded_noise
from mlx_flash.samplers import SAMPLERS, make_sampler, resize_bicubic

STEPS = [1, 2, 3, 4, 6, 8, 10, 28, 50]
SHIFTS = [1.0, 2.5, 3.0, 3.1, 5.0]


def reference(name: str, shift: float):
    """The diffusers scheduler each deterministic or stochastic sampler reproduces."""
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=shift)
    if name == "euler-stochastic":
        return FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
    if name == "heun":
        return FlowMatchHeunDiscreteScheduler(shift=shift)
    return DPMSolverMultistepScheduler(  # as diffusers' flow-model pipelines (e.g. Sana) configure it
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift, algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")


DIFFUSERS_SAMPLERS = ["euler", "euler-stochastic", "heun", "dpm++2m"]


def coefficients(t: float) -> tuple[float, float, float]:
    """Toy velocity v = a x - b x^3 + c with float32 coefficients of the timestep: only multiplies and adds, so
    torch and MLX compute it bit for bit alike."""
    s = np.float32(t) / np.float32(1000)
    return float(np.float32(1) + s), float(np.float32(0.1) * s), float(np.float32(0.25) * (s - np.float32(0.5)))


def torch_velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    a, b, c = coefficients(t)
    return a * x - b * (x * x * x) + c


def mlx_velocity(sampler, calls: list):
    def velocity(x: mx.array, sigma: float, i: int) -> mx.array:
        t = sampler.timestep(sigma)
        calls.append((t, np.array(x.astype(mx.float32))))
        a, b, c = coefficients(t)
        return a * x - b * (x * x * x) + c

    return velocity


def nchw(a: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(a.astype(mx.float32))).permute(0, 3, 1, 2).contiguous()


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.float().permute(0, 2, 3, 1).numpy()


def noise_bank(count: int, shape: tuple[int, ...], seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def injected(bank: list[np.ndarray]):
    """A Noise that returns draw d of the bank (for the batch, NHWC), checking the shape asked for."""

    def noise(draw: int, shape: tuple[int, ...]) -> mx.array:
        assert tuple(bank[draw].shape[1:]) == shape
        return mx.array(bank[draw])

    return noise


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_sigma_and_timestep_tables_bit_identical(name, n, shift):
    ref = reference(name, shift)
    ref.set_timesteps(n)
    sampler = make_sampler(name)
    sigmas = sampler.sigmas(n, shift)
    assert sigmas.dtype == np.float32 and sigmas.shape == (n + 1,)
    ref_sigmas = ref.sigmas.numpy()
    if name == "heun":  # diffusers repeats every inner level: s0, s1, s1, s2, s2, ..., 0
        ref_sigmas = np.concatenate([ref_sigmas[:1], ref_sigmas[1::2]])
    np.testing.assert_array_equal(sigmas, ref_sigmas)
    # The timesteps the transformer sees, one per velocity evaluation, in order.
    calls = []
    x = mx.zeros((1, 2, 2, 1))
    for i in range(n):
        x = sampler.step(mlx_velocity(sampler, calls), x, i, sigmas, injected(noise_bank(n + 1, (1, 2, 2, 1))))[0]
    timesteps = np.array([t for t, _ in calls], dtype=ref.timesteps.numpy().dtype)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


def run_reference(name: str, n: int, shift: float, x: torch.Tensor, bank: list[np.ndarray], monkeypatch):
    """diffusers' scheduler stepping the toy velocity as the SD3 pipeline steps it; the model inputs in order."""
    ref = reference(name, shift)
    ref.set_timesteps(n)
    draws = iter(range(1, n + 1))
    monkeypatch.setattr(scheduling_flow_match_euler_discrete, "randn_tensor",
                        lambda shape, **kw: torch.from_numpy(bank[next(draws)]).permute(0, 3, 1, 2).to(kw["dtype"]))
    inputs = []
    for t in ref.timesteps:
        inputs.append(x.float().clone())
        x = ref.step(torch_velocity(x, float(t)), t, x, return_dict=False)[0]
    return x, inputs


def run_ours(name: str, n: int, shift: float, x: mx.array, noise):
    sampler = make_sampler(name)
    sigmas = sampler.sigmas(n, shift)
    calls = []
    for i in range(n):
        x, v, x0 = sampler.step(mlx_velocity(sampler, calls), x, i, sigmas, noise)
        assert x.dtype == v.dtype
    return x, [a for _, a in calls]


@pytest.mark.parametrize("n, shift", [(1, 3.0), (2, 3.0), (4, 3.0), (8, 1.0), (12, 5.0), (28, 3.0)])
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_loop_matches_scheduler_stepping_same_velocity(name, n, shift, monkeypatch):
    shape = (2, 6, 5, 4)
    bank = noise_bank(n + 1, shape)
    x_ref, ref_inputs = run_reference(name, n, shift, torch.from_numpy(bank[0]).permute(0, 3, 1, 2), bank, monkeypatch)
    x, inputs = run_ours(name, n, shift, mx.array(bank[0]), injected(bank))
    assert len(inputs) == len(ref_inputs)
    # DPM-Solver's coefficients come from float32 log/exp, whose last bit may differ between numpy and torch.
    tol = dict(rtol=2e-6, atol=2e-6) if name == "dpm++2m" else dict(rtol=0, atol=0)
    for got, want in zip(inputs, ref_inputs):
        np.testing.assert_allclose(got, nhwc(want), **tol)
    np.testing.assert_allclose(np.array(x), nhwc(x_ref), **tol)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", DIFFUSERS_SAMPLERS)
def test_half_precision_loop_matches_scheduler(name, dtype, monkeypatch):
    n, shift, shape = 6, 3.0, (1, 4, 4, 3)
    bank = noise_bank(n + 1, shape)
    x_ref, _ = run_reference(name, n, shift, torch.from_numpy(bank[0]).permute(0, 3, 1, 2).to(getattr(torch, dtype)),
                             bank, monkeypatch)
    x, _ = run_ours(name, n, shift, mx.array(bank[0]).astype(getattr(mx, dtype)), injected(bank))
    assert x.dtype == getattr(mx, dtype)
    np.testing.assert_allclose(np.array(x.astype(mx.float32)), nhwc(x_ref), rtol=1e-2, atol=1e-2)


def test_stochastic_samplers_reproduce_by_seed():
    shape = (8, 8, 16)
    for name, options in [("euler-stochastic", {}), ("scale-wise", {"scales": (4, 6, 8)})]:
        def run(seeds):
            sampler = make_sampler(name, **options)
            sigmas = sampler.sigmas(3, 1.0, [1.0, 0.8, 0.5])
            noise = seeded_noise(seeds)
            x = initial_noise(seeds, (*sampler.latent_size(0, shape[:2]), 16))
            for i in range(3):
                x = sampler.step(lambda x, s, i: 0.5 * x + s, x, i, sigmas, noise)[0]
            return np.array(x)

        batch = run([7, 8])
        np.testing.assert_array_equal(batch, run([7, 8]))
        np.testing.assert_array_equal(batch[:1], run([7]))  # image b depends on its own seed only
        np.testing.assert_array_equal(batch[1:], run([8]))
        assert np.abs(batch[0] - batch[1]).mean() > 0.1
        assert np.abs(run([9]) - batch[:1]).mean() > 0.1


def test_noise_draws_differ_from_the_initial_noise_and_each_other():
    shape = (4, 4, 16)
    draws = [np.array(initial_noise([3], shape))] + [np.array(seeded_noise([3])(d, shape)) for d in range(1, 4)]
    assert all(np.abs(draws[a] - draws[b]).mean() > 0.5 for a in range(4) for b in range(a))


@pytest.mark.parametrize("size_in, size_out", [((64, 64), (80, 80)), ((80, 96), (96, 128)), ((5, 7), (9, 4)),
                                               ((3, 3), (8, 8)), ((12, 10), (6, 5))])
def test_resize_bicubic_matches_torch(size_in, size_out):
    x = noise_bank(1, (2, *size_in, 3))[0]
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size_out, mode="bicubic")
    got = resize_bicubic(mx.array(x), size_out)
    # torch evaluates the cubic weights with fused multiply-adds: they agree to ~1e-6, not to the last bit.
    np.testing.assert_allclose(np.array(got), nhwc(want), rtol=1e-5, atol=1e-5)


def swd_reference(scales, sigmas, first: torch.Tensor, bank: list[np.ndarray]) -> torch.Tensor:
    """SwD's inference loop (yandex-research/swd, src/flow_matching_sampler.py, `sampling`), re-written: the
    model's x0 is upsampled bicubically to the next scale when it changes and re-noised to the next sigma."""
    sigmas = torch.tensor(list(sigmas) + [0.0], dtype=torch.float32)
    timesteps = sigmas[:-1] * 1000
    latent, k = first, 1
    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        latent = latent - torch_velocity(latent, float(timesteps[i])) * sigma
        if i + 1 == len(timesteps):
            break
        next_scale = scales[k]
        if scales[k - 1] != next_scale:
            latent = F.interpolate(latent, size=int(next_scale), mode="bicubic")
        noise = torch.from_numpy(bank[i + 1]).permute(0, 3, 1, 2)
        latent = sigma_next * noise + (1.0 - sigma_next) * latent
        k += 1
    return latent


@pytest.mark.parametrize("scales, sigmas", [
    ((32, 48, 64, 80, 96, 128), (1.0, 0.9454, 0.8959, 0.7904, 0.7371, 0.6022)),  # SwD Medium, 6 steps
    ((64, 80, 96, 128), (1.0, 0.8959, 0.7371, 0.6022)),  # SwD Large, 4 steps
    ((32, 64, 96, 128), (1.0, 0.9454, 0.7904, 0.6022)),  # SwD Medium, 4 steps (model card)
    ((4, 4, 6), (1.0, 0.7, 0.4)),  # a repeated scale: no resize between those steps
])
def test_scale_wise_matches_swd_loop(scales, sigmas):
    sampler = make_sampler("scale-wise", scales=scales)
    table = sampler.sigmas(len(scales), 1.0, sigmas)
    final = (scales[-1], scales[-1])
    sizes = [sampler.latent_size(i, final) for i in range(len(scales))]
    assert sizes == [(s, s) for s in scales]
    bank = [noise_bank(1, (1, *size, 16), seed=i)[0] for i, size in enumerate(sizes)]
    x_ref = swd_reference(scales, sigmas, torch.from_numpy(bank[0]).permute(0, 3, 1, 2), bank)
    calls, x = [], mx.array(bank[0])
    for i in range(len(scales)):
        x = sampler.step(mlx_velocity(sampler, calls), x, i, table, injected(bank))[0]
    assert [tuple(a.shape[1:3]) for _, a in calls] == sizes
    np.testing.assert_allclose(np.array(x), nhwc(x_ref), rtol=1e-5, atol=1e-5)


def test_scale_wise_sizes_follow_the_image():
    sampler = make_sampler("scale-wise", scales=(32, 48, 64, 80, 96, 128))
    assert [sampler.latent_size(i, (64, 96)) for i in range(6)] == [(16, 24), (24, 36), (32, 48), (40, 60),
                                                                    (48, 72), (64, 96)]
    with pytest.raises(ValueError, match=r"multiples of 128 pixels"):
        sampler.latent_size(0, (64, 72))


def test_samplers_registry():
    assert list(SAMPLERS) == ["euler", "euler-stochastic", "heun", "dpm++2m", "scale-wise"]
    assert all(make_sampler(name, **({"scales": (2,)} if name == "scale-wise" else {})).name == name
               for name in SAMPLERS)


@pytest.mark.parametrize("call, message", [
    (lambda: make_sampler("ddim"), r"^unknown sampler 'ddim'; use one of euler, euler-stochastic, heun, dpm\+\+2m, "
                                   r"scale-wise\.$"),
    (lambda: make_sampler("euler", scales=(1,)), r"^sampler 'euler' takes no option scales; "),
    (lambda: make_sampler("scale-wise"), r"^the scale-wise sampler needs scales"),
    (lambda: make_sampler("scale-wise", scales=(64, 32)), r"^the scale-wise sampler needs scales, increasing"),
    (lambda: make_sampler("scale-wise", scales=(32, 64)).sigmas(2, 1.0), r"needs sigmas, one per step"),
    (lambda: make_sampler("scale-wise", scales=(32, 64)).sigmas(3, 1.0, [1, 0.5, 0.2]), r"2 scales for 3 steps"),
    (lambda: make_sampler("heun").sigmas(3, 3.0, [1.0, 0.5]), r"^got 2 custom sigmas for 3 steps; pass exactly one"),
    (lambda: make_sampler("dpm++2m").sigmas(3, 3.0, [1.0, 0.5, 0.6]), r"^custom sigmas must be strictly decreasing"),
    (lambda: make_sampler("euler").sigmas(2, 3.0, [1.5, 0.5]), r"^custom sigmas must lie in \(0, 1\]"),
    (lambda: make_sampler("euler").sigmas(2, 3.0, [1.0, 0.0]), r"^custom sigmas must lie in \(0, 1\]"),
    (lambda: make_sampler("euler-stochastic").sigmas(0, 3.0), r"^num_steps must be a positive integer"),
])
def test_bad_input_one_line(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm++2m"])
def test_custom_sigmas_shifted_like_euler(name):
    custom = [1.0, 0.7, 0.3]
    expected = make_sampler("euler").sigmas(3, 3.0, custom)
    np.testing.assert_array_equal(make_sampler(name).sigmas(3, 3.0, custom), expected)

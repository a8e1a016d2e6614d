"""Parity of mlx_flash.vae with diffusers' AutoencoderKL (tiny SD3-style models, random weights), tiled
decoding and encoding, full-size key coverage and error messages."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

from mlx_flash.lanes import Bands, Lanes
from mlx_flash.vae import (
    WEIGHT_RULES,
    Autoencoder,
    Conv2d,
    Downsample,
    GroupNorm,
    Upsample,
    VAEConfig,
    _spans,
    _tiled,
    load_vae,
)
from mlx_flash.weights import WeightsError, remap

pytestmark = pytest.mark.usefixtures("torch_single_thread")
SD3 = dict(scaling_factor=1.5305, shift_factor=0.0609, latent_channels=16, norm_num_groups=32)
TINY = {  # name: (diffusers config, latent (height, width) of the test input)
    "sd3": (dict(block_out_channels=(32, 64), layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False),
            (8, 8)),
    "quant_conv": (dict(block_out_channels=(32, 32, 32), layers_per_block=1), (6, 10)),
}


def diffusers_vae(block_out_channels, seed: int = 0, local: bool = False, **config) -> AutoencoderKL:
    """A diffusers AutoencoderKL with random weights large enough that outputs vary (std 0.05).

    `local`: weights that keep the signal scale through each conv and make residual branches small, so
    that, as in a trained VAE and unlike a random one, each output pixel depends mostly on nearby latents."""
    levels = len(block_out_channels)
    model = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=block_out_channels,
        **{**SD3, **config},
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif not local:
                p.copy_(0.05 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise * (0.01 if "conv2" in name or "to_out" in name else p[0].numel() ** -0.5))
    return model


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    """(diffusers model, its saved folder, latent size) for each tiny config."""
    config, latent_hw = TINY[request.param]
    model = diffusers_vae(**config)
    folder = tmp_path_factory.mktemp(f"vae_{request.param}")
    model.save_pretrained(folder)
    return model, folder, latent_hw


@pytest.fixture(scope="module")
def sd3_tiny(tmp_path_factory):
    model = diffusers_vae(**TINY["sd3"][0])
    folder = tmp_path_factory.mktemp("vae_sd3_tiny")
    model.save_pretrained(folder)
    return model, folder


def to_torch(x: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def check_close(name: str, ours: mx.array, ref: np.ndarray, rtol: float = 1e-4) -> None:
    err = np.abs(np.array(ours, dtype=np.float32) - ref).max() / np.abs(ref).max()
    print(f"{name}: max abs error / max |reference| = {err:.2e}")
    assert err <= rtol


def smooth_noise(shape: tuple[int, ...], spacing: float, seed: int = 0) -> np.ndarray:
    """Gaussian noise on a grid `spacing` pixels apart, bilinearly interpolated to (B, H, W, C)."""
    B, H, W, C = shape
    rng = np.random.default_rng(seed)
    grid = rng.standard_normal((B, int(H / spacing) + 2, int(W / spacing) + 2, C)).astype(np.float32)
    y, x = np.arange(H) / spacing, np.arange(W) / spacing
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    top = grid[:, y0][:, :, x0] * (1 - fx) + grid[:, y0][:, :, x0 + 1] * fx
    bottom = grid[:, y0 + 1][:, :, x0] * (1 - fx) + grid[:, y0 + 1][:, :, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


# ---- parity -------------------------------------------------------------------------------------


BANDS = pytest.mark.parametrize("bands", [1, 3])  # one: as on a GPU; three: uneven bands (mlx_flash.lanes.Bands)


@BANDS
def test_decode_parity(tiny, bands, set_lanes):
    set_lanes(bands)
    model, folder, (h, w) = tiny
    vae = load_vae(folder)
    z = mx.random.normal((2, h, w, 16), key=mx.random.key(1))
    with torch.no_grad():
        ref = to_nhwc(model.decode(to_torch(z)).sample)
    check_close(f"decode {h}x{w}, {bands} bands", vae.decode(z, tiled=False), ref)


@BANDS
def test_encode_parity(tiny, bands, set_lanes):
    set_lanes(bands)
    model, folder, (h, w) = tiny
    vae = load_vae(folder)
    f = vae.config.factor
    images = mx.random.uniform(-1, 1, (2, h * f, w * f, 3), key=mx.random.key(2))
    with torch.no_grad():
        posterior = model.encode(to_torch(images)).latent_dist
    mean, logvar = vae.encode(images, tiled=False)
    check_close(f"encode mean {h * f}x{w * f}", mean, to_nhwc(posterior.mean))
    check_close(f"encode logvar {h * f}x{w * f}", logvar, to_nhwc(posterior.logvar))


@pytest.mark.parametrize("lanes", [1, 2])
def test_banded_decode_and_encode_are_the_untiled_ones(tiny, lanes, set_lanes):
    """On the CPU in float32, memory-bounded decoding and encoding run the whole image one layer at a time in more
    bands of rows than lanes, a group of bands evaluated at a time: the untiled results bit for bit, diffusers'."""
    set_lanes(lanes)
    model, folder, (h, w) = tiny
    untiled = load_vae(folder)
    c, f = untiled.config, untiled.config.factor
    z = mx.random.normal((2, h, w, 16), key=mx.random.key(1))
    images = mx.random.uniform(-1, 1, (2, h * f, w * f, 3), key=mx.random.key(2))
    with torch.no_grad():
        decoded = to_nhwc(model.decode(to_torch(z)).sample)
        mean = to_nhwc(model.encode(to_torch(images)).latent_dist.mean)
    widest = f * f * w * max(c.block_out_channels) * 4  # bytes of a latent row's widest activation
    for bands in (3, h):
        vae = load_vae(folder, band_bytes=-(-h * widest // bands))
        assert vae.config.bands(h, w) == bands
        ours = vae.decode(z, tiled=True)
        assert mx.array_equal(ours, untiled.decode(z, tiled=False)).item()
        check_close(f"banded decode, {bands} bands on {lanes} lanes", ours, decoded)
        ours = vae.encode(images, tiled=True)[0]
        assert mx.array_equal(ours, untiled.encode(images, tiled=False)[0]).item()
        check_close(f"banded encode mean, {bands} bands on {lanes} lanes", ours, mean)


def test_pipeline_helpers(sd3_tiny):
    model, folder = sd3_tiny
    vae = load_vae(folder)
    z = mx.random.normal((1, 8, 6, 16), key=mx.random.key(3))
    with torch.no_grad():
        ref = to_nhwc(model.decode(to_torch(z) / 1.5305 + 0.0609).sample)
    check_close("latents_to_image", vae.latents_to_image(z), ref)

    images = mx.random.uniform(-1, 1, (1, 16, 12, 3), key=mx.random.key(4))
    noise = mx.random.normal((1, 8, 6, 16), key=mx.random.key(5))
    with torch.no_grad():
        posterior = model.encode(to_torch(images)).latent_dist
        ref = to_nhwc((posterior.mean + posterior.std * to_torch(noise) - 0.0609) * 1.5305)
    check_close("image_to_latents", vae.image_to_latents(images, noise=noise), ref)
    key = mx.random.key(6)
    assert mx.array_equal(vae.image_to_latents(images, key=key), vae.image_to_latents(images, key=key))


@pytest.mark.parametrize("dtype, rtol", [(mx.float16, 1e-2), (mx.bfloat16, 5e-2)])
def test_half_precision(sd3_tiny, dtype, rtol):
    model, folder = sd3_tiny
    vae = load_vae(folder, dtype=dtype)
    params = dict(tree_flatten(vae.parameters()))
    assert params["decoder.conv_in.weight"].dtype == dtype
    assert params["decoder.conv_norm_out.weight"].dtype == mx.float32  # GroupNorm affine kept in float32
    z = mx.random.normal((1, 4, 4, 16), key=mx.random.key(7))
    with torch.no_grad():
        ref = to_nhwc(model.decode(to_torch(z)).sample)
    out = vae.decode(z)
    assert out.dtype == mx.float32
    check_close(f"decode {dtype}", out, ref, rtol)


# ---- tiling -------------------------------------------------------------------------------------


def on_bands(*layers: nn.Module, lanes: Lanes = Lanes(2)):
    """The VAE layers applied in turn to an image cut into bands, joined back."""

    def apply(x: mx.array) -> mx.array:
        bands = Bands.cut(x, lanes)
        for layer in layers:
            bands = layer(bands)
        return bands.join()

    return apply


def test_bands_hold_their_rows_and_their_neighbours_edges():
    x = mx.arange(2 * 7 * 3 * 2).reshape(2, 7, 3, 2)
    bands = Bands.cut(x, Lanes(3))
    assert [p.shape[1] for p in bands.parts] == [2, 2, 3] and bands.height == 7
    assert mx.array_equal(bands.join(), x)
    above, below = bands.edges(1)
    assert above[0] is None and below[-1] is None
    assert mx.array_equal(above[2], x[:, 3:4]) and mx.array_equal(below[0], x[:, 2:3])
    assert bands.edges(0) == ([None] * 3, [None] * 3)
    assert [p.shape[1] for p in bands.rows(1, 3).parts] == [1, 1, 0]
    assert mx.array_equal(bands.rows(1, 6).join(), x[:, 1:6])
    assert [p.shape[1] for p in Bands.cut(x[:, :2], Lanes(3)).parts] == [1, 1]  # never an empty band
    assert [p.shape[1] for p in Bands.cut(x, Lanes(2, 5)).parts] == [1, 1, 2, 1, 2]  # 5 bands on 2 lanes


def test_pointwise_bands_are_computed_with_their_edges():
    """`Bands.pointwise` (a norm, nearest upsampling) is left to the next map; its edges are fn of the source's."""
    x = mx.arange(2 * 7 * 3 * 2).reshape(2, 7, 3, 2)
    doubled = Bands.cut(x, Lanes(3)).pointwise(lambda part: mx.repeat(part, 2, axis=1))
    whole = mx.repeat(x, 2, axis=1)
    assert mx.array_equal(doubled.join(), whole) and doubled.height == 14
    assert mx.array_equal(doubled.map(lambda part: part + 1).join(), whole + 1)
    above, below = doubled.edges(1)  # the middle band holds rows 4-7 of the doubled image
    assert above[0] is None and below[-1] is None
    assert mx.array_equal(above[1], whole[:, 3:4]) and mx.array_equal(below[1], whole[:, 8:9])


def test_images_with_fewer_rows_than_bands(sd3_tiny, set_lanes):
    """A 4x4 image: after the downsampling convolution it has 2 rows for 3 bands."""
    _, folder = sd3_tiny
    vae = load_vae(folder)
    images = mx.random.uniform(-1, 1, (1, 4, 4, 3), key=mx.random.key(10))
    results = []
    for bands in (1, 3):
        set_lanes(bands)
        mean, _ = vae.encode(images, tiled=False)
        results.append((mean, vae.decode(mean, tiled=False)))
    assert all(mx.array_equal(a, b).item() for a, b in zip(*results))


def test_tiling_is_exact_for_local_functions():
    """Tiles of a function whose output depends only on nearby input (and is distorted by the tile's
    zero padding within 2 units of its edge) blend to exactly the untiled result: placement and the
    weights' margins are right. Decoder-like (upsampling) and encoder-like (downsampling) directions."""
    mx.random.seed(0)
    up = on_bands(Conv2d(16, 8, 3, padding=1), Upsample(8), Conv2d(8, 3, 3, padding=1))
    down = on_bands(Conv2d(3, 8, 3, padding=1), Downsample(8), Conv2d(8, 4, 3, padding=1))
    z = mx.random.normal((2, 21, 30, 16))
    x = mx.random.normal((2, 42, 60, 3))
    for name, fn, inputs, unit_in, unit_out in [("up", up, z, 1, 2), ("down", down, x, 2, 1)]:
        ref = fn(inputs)
        out = _tiled(fn, inputs, unit_in, unit_out, tile=10, overlap=8)
        err = (mx.abs(out - ref).max() / mx.abs(ref).max()).item()
        print(f"tiled {name}: max error / max |reference| = {err:.1e}")
        assert out.shape == ref.shape and err < 1e-5


def seam_ratio(diff: np.ndarray, length: int, tile: int, overlap: int, factor: int, axis: int) -> float:
    """Largest mean step of `diff` across a tile edge or overlap centre, over the median step elsewhere."""
    spans = _spans(length, tile, overlap)
    borders = {s * factor for s, _ in spans[1:]} | {e * factor for _, e in spans[:-1]}
    borders |= {(s + e) * factor // 2 for (_, e), (s, _) in zip(spans, spans[1:])}
    steps = np.abs(np.diff(diff, axis=axis)).mean(axis=tuple(a for a in range(4) if a != axis))
    at = [b - 1 for b in sorted(borders)]
    return float(steps[at].max() / np.median(np.delete(steps, at)))


@pytest.fixture(scope="module")
def local_tiny(tmp_path_factory):
    """A tiny SD3-style VAE whose output depends mostly on nearby latents, as a trained VAE's does."""
    model = diffusers_vae(**TINY["sd3"][0], local=True)
    folder = tmp_path_factory.mktemp("vae_local_tiny")
    model.save_pretrained(folder)
    return model, folder


def diffusers_tiled(model: AutoencoderKL, tile: int, overlap: int, call):
    """`call(model)` with diffusers' tiling at our tile size and overlap (latent pixels)."""
    model.enable_tiling()
    model.tile_latent_min_size = tile
    model.tile_sample_min_size = tile * 2 ** (len(model.config.block_out_channels) - 1)
    model.tile_overlap_factor = overlap / tile
    try:
        with torch.no_grad():
            return call(model)
    finally:
        model.disable_tiling()


class NormThenPointwise(nn.Module):
    """A GroupNorm between pointwise layers: tiled with shared statistics it must equal the untiled result."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 16)
        self.norm = GroupNorm(16, 4)
        self.outer = nn.Linear(16, 3)

    def __call__(self, x: mx.array) -> mx.array:
        return self.outer(nn.silu(self.norm(Bands.cut(self.inner(x), Lanes(3))).join()))


def test_shared_statistics_are_the_whole_images():
    """One pass gathers a GroupNorm's statistics over the tiles' owned regions exactly (a partition of the
    image, combined per group): tiles then normalise as the whole image does. Own-tile statistics do not."""
    mx.random.seed(3)
    model = NormThenPointwise()
    x = 3 * mx.random.normal((2, 37, 50, 3)) + mx.linspace(-4, 4, 50)[:, None]  # tone varies across the image
    ref = model(x)
    shared = _tiled(model.__call__, x, 1, 1, tile=16, overlap=6, statistics_passes=1)
    own = _tiled(model.__call__, x, 1, 1, tile=16, overlap=6, statistics_passes=0)
    err = (mx.abs(shared - ref).max() / mx.abs(ref).max()).item()
    print(f"shared statistics: max error / max |reference| = {err:.1e}")
    assert err < 1e-5 and (mx.abs(own - ref).max() / mx.abs(ref).max()).item() > 0.05
    assert model.norm.shared is None  # the hook is removed afterwards


def test_tiled_decode(local_tiny):
    """Tiled against untiled decoding of a smooth latent, on [0, 1] images: within 2/255 everywhere, and no
    step at tile borders. Every tile normalises with the whole image's GroupNorm statistics (diffusers'
    tiling, with each tile's own statistics, is shown for comparison) and the mid-block attention sees the
    whole latent."""
    model, folder = local_tiny
    tile, overlap, (h, w) = 24, 12, (48, 56)
    vae = load_vae(folder, tile_size=tile, tile_overlap=overlap, band_bytes=None)  # tiles on the CPU too
    z = mx.array(smooth_noise((1, h, w, 16), spacing=3))
    untiled = np.clip(np.array(vae.decode(z, tiled=False)) * 0.5 + 0.5, 0, 1)
    tiled = np.clip(np.array(vae.decode(z, tiled=True)) * 0.5 + 0.5, 0, 1)
    theirs = diffusers_tiled(model, tile, overlap, lambda m: to_nhwc(m.decode(to_torch(z)).sample))
    theirs = np.clip(theirs * 0.5 + 0.5, 0, 1)
    ours, theirs = np.abs(tiled - untiled) * 255, np.abs(theirs - untiled) * 255
    print(
        f"tiled vs untiled decode, [0,1] images: max {ours.max():.2f}/255, mean {ours.mean():.3f}/255 "
        f"(diffusers tiled: max {theirs.max():.1f}/255, mean {theirs.mean():.2f}/255)"
    )
    assert ours.max() <= 2.0

    ratios = [seam_ratio(tiled - untiled, n, tile, overlap, 2, axis) for axis, n in ((1, h), (2, w))]
    print(f"seam ratio (step at tile borders / median step), rows, columns: {ratios[0]:.2f}, {ratios[1]:.2f}")
    assert max(ratios) < 1.8


def test_tiled_encode(local_tiny):
    model, folder = local_tiny
    tile, overlap = 24, 12
    vae = load_vae(folder, tile_size=tile, tile_overlap=overlap, band_bytes=None)
    images = mx.array(np.clip(smooth_noise((1, 96, 112, 3), spacing=6, seed=1), -1, 1))
    mean, logvar = vae.encode(images, tiled=False)
    tiled_mean, tiled_logvar = vae.encode(images, tiled=True)
    theirs = diffusers_tiled(model, tile, overlap, lambda m: to_nhwc(m.encode(to_torch(images)).latent_dist.mean))
    scale = mx.abs(mean).max().item()
    ours = mx.abs(tiled_mean - mean).max().item() / scale
    theirs = np.abs(theirs - np.array(mean)).max() / scale
    print(f"tiled vs untiled encode: max |error| / max |mean| = {ours:.4f} (diffusers tiled: {theirs:.4f})")
    assert tiled_mean.shape == mean.shape and tiled_logvar.shape == logvar.shape
    assert ours <= 0.02


def test_default_tiling_threshold():
    """Whole images up to 1024x1024 on a GPU, 512x512 on the CPU (bands in float32, tiles in half precision)."""
    config = VAEConfig()
    assert not config.tiles(128, 128, device=mx.gpu) and config.tiles(128, 129, device=mx.gpu)
    assert not config.tiles(64, 64, device=mx.cpu) and config.tiles(64, 65, device=mx.cpu)
    assert config.tiles(64, 64, True, mx.cpu) and not config.tiles(128, 129, False, mx.gpu)


def test_automatic_tiling(sd3_tiny):
    _, folder = sd3_tiny
    vae = load_vae(folder, tile_size=8, tile_overlap=4, tile_above=12 * 12, band_bytes=None)
    small = mx.random.normal((1, 12, 12, 16), key=mx.random.key(8))
    large = mx.random.normal((1, 12, 13, 16), key=mx.random.key(9))
    assert mx.array_equal(vae.decode(small), vae.decode(small, tiled=False))
    assert not mx.array_equal(vae.decode(large), vae.decode(large, tiled=False))
    assert mx.array_equal(vae.decode(large), vae.decode(large, tiled=True))


# ---- weights and errors -------------------------------------------------------------------------


def test_full_size_keys_and_shapes():
    """Every tensor of the real SD3 VAE (built on the meta device) maps onto exactly our parameters."""
    with torch.device("meta"):
        model = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=1024,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **SD3,
        )
    config = VAEConfig.from_dict(dict(model.config))
    assert config == VAEConfig()
    weights = {k: mx.zeros(tuple(v.shape)) for k, v in model.state_dict().items()}  # lazy: never allocated
    mapped = {k: tuple(v.shape) for k, v in remap(weights, WEIGHT_RULES).items()}
    ours = {k: tuple(v.shape) for k, v in tree_flatten(Autoencoder(config).parameters())}
    print(f"full-size SD3 VAE: {len(mapped)} tensors mapped, {len(ours)} parameters")
    assert mapped == ours


def test_missing_and_misshaped_tensors(sd3_tiny, tmp_path):
    _, folder = sd3_tiny
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    del tensors["decoder.conv_in.bias"]
    tensors["encoder.conv_out.weight"] = torch.zeros(5, 64, 3, 3)
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as err:
        load_vae(tmp_path)
    print(err.value)
    assert "1 missing (decoder.conv_in.bias)" in str(err.value)
    assert "encoder.conv_out.weight (5, 3, 3, 64) != (32, 3, 3, 64)" in str(err.value)


def test_bad_inputs(sd3_tiny):
    _, folder = sd3_tiny
    vae = load_vae(folder)
    with pytest.raises(ValueError, match=r"NHWC.*transpose"):
        vae.decode(mx.zeros((1, 16, 8, 8)))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(mx.zeros((1, 15, 16, 3)))
    with pytest.raises(ValueError, match="noise shape"):
        vae.image_to_latents(mx.zeros((1, 16, 16, 3)), noise=mx.zeros((1, 4, 4, 16)))
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict({**json.loads((folder / "config.json").read_text()), "act_fn": "gelu"})
    with pytest.raises(ValueError, match="tile_overlap"):
        VAEConfig(tile_size=8, tile_overlap=8)

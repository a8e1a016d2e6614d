"""The SD3 / SD3.5 autoencoder (diffusers `AutoencoderKL`, 16 latent channels) in MLX, NHWC.

`Autoencoder.decode` / `encode` work on whole images or, above a size threshold, in a mode that bounds memory for
large images. It covers the full-resolution part of the network; its latent-resolution part (with the mid-block's
attention) always sees the whole latent. On a GPU, and in half precision on the CPU, that part runs on overlapping
tiles blended with linear ramps, whose GroupNorms use the whole image's statistics, gathered over the tiles
beforehand (four passes), so a tiled result matches the untiled one. On the CPU in float32 it runs on the whole
image in bands of rows, one layer at a time, each layer's bands evaluated a few at a time: one pass, the untiled
result exactly, about 3 KB per image pixel (a third of the untiled decode's memory).

Inside, the layers take and return `Bands` (`mlx_flash.lanes`): on MLX's Linux CPU backend the image is cut into
one band of rows per core, computed side by side; elsewhere it is one band.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from . import cpu_ops
from .cpu_ops import fast_path, on_cpu
from .lanes import Bands, Lanes
from .weights import (
    Rule,
    conv_to_nhwc,
    is_converted,
    load_into,
    quantize_like,
    read_component,
    remap,
    save_component,
)


@dataclass
class VAEConfig:
    """Architecture (diffusers config.json names) and tiling settings, all in latent pixels."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    tile_size: int = 64  # 512x512 image pixels
    tile_overlap: int = 16
    # Bound memory automatically (tiles, or bands: see `band_bytes`) when latent height * width exceeds this.
    # None: 128 * 128 (1024x1024 images whole) on a GPU, 64 * 64 on the CPU: in float32 its bands take a third of
    # the untiled decode's memory in about its time (1024x1024: 82 s and 2.9 GiB against 80-103 s and 8.6-9.1 GiB,
    # benchmarks/results/cpu.md); in half precision its convolutions unfold their input, 9x its size.
    tile_above: int | None = None
    # Passes over the tiles that gather the whole image's GroupNorm statistics before the one that decodes
    # (or encodes); each pass makes them more exact, at the cost of one more decode (encode) of the tiled part.
    # 0 normalises each tile with its own statistics, as diffusers' tiling does, which changes its tone.
    statistics_passes: int = 3
    # The CPU's float32 path bounds memory differently: the whole image, evaluated layer by layer in bands of rows
    # (exact, in one pass), each band's widest activation at most this many bytes (see `bands`). None: tiles there too.
    band_bytes: int | None = 2**27

    def __post_init__(self):
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ValueError(
                f"VAE tiling: need 0 <= tile_overlap < tile_size, got {self.tile_overlap} and {self.tile_size}."
            )

    @classmethod
    def from_dict(cls, config: dict) -> VAEConfig:
        """The config of a diffusers `vae/config.json`; settings this model does not implement raise."""
        unsupported = {
            "act_fn": "silu",
            "mid_block_add_attention": True,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, value in unsupported.items():
            if config.get(key, value) != value:
                raise ValueError(f"VAE config: {key}={config[key]!r} is not supported (only {value!r}).")
        kinds = set(config.get("down_block_types", ["DownEncoderBlock2D"])) | set(
            config.get("up_block_types", ["UpDecoderBlock2D"])
        )
        if not kinds <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
            raise ValueError(f"VAE config: block types {sorted(kinds)} are not supported (only Down/UpEncoderBlock2D).")
        names = {f.name for f in fields(cls)}
        args = {k: v for k, v in config.items() if k in names and v is not None}
        if "block_out_channels" in args:
            args["block_out_channels"] = tuple(args["block_out_channels"])
        return cls(**args)

    def to_dict(self) -> dict:
        """The diffusers config.json fields of the architecture (not the tiling settings)."""
        tiling = {"tile_size", "tile_overlap", "tile_above", "statistics_passes", "band_bytes"}
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self) if f.name not in tiling}

    def tiles(self, h: int, w: int, tiled: bool | None = None, device: mx.Device | None = None) -> bool:
        """Whether a latent of h x w pixels is processed in the memory-bounded mode (tiles, or bands) on `device`
        (default: MLX's): `tiled` if given, else above `tile_above`."""
        if tiled is not None:
            return tiled
        limit = self.tile_above
        if limit is None:
            limit = 64 * 64 if (device or mx.default_device()) == mx.cpu else 128 * 128
        return h * w > limit

    def banded(self, device: mx.Device | None = None, dtype: mx.Dtype = mx.float32) -> bool:
        """Whether the memory-bounded mode runs in bands (not tiles) on `device` (default: MLX's) in `dtype`: the
        CPU's float32 path, unless `band_bytes` is None."""
        return bool(self.band_bytes) and (device or mx.default_device()) == mx.cpu and dtype == mx.float32

    def bands(self, h: int, w: int) -> int:
        """The bands of rows a latent of h x w pixels is decoded (encoded) in, layer by layer, when it is tiled on
        the CPU's float32 path: each band's widest activation at most `band_bytes`."""
        widest = self.factor**2 * w * max(self.block_out_channels) * 4  # float32 bytes per latent row
        return max(1, min(h, math.ceil(h * widest / self.band_bytes)))

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel along each axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    def to_diffusion(self, sample: mx.array) -> mx.array:
        """VAE latents -> the diffusion model's latents: `(sample - shift_factor) * scaling_factor`."""
        return (sample - self.shift_factor) * self.scaling_factor

    def from_diffusion(self, latents: mx.array) -> mx.array:
        """The diffusion model's latents -> VAE latents: `latents / scaling_factor + shift_factor`."""
        return latents / self.scaling_factor + self.shift_factor


def sd3_latents(config: VAEConfig) -> bool:
    """Whether the VAE's latent space is SD3 / SD3.5's (16 channels, its scaling and shift), which
    madebyollin/taesd3 and SD3's published preview factors are made for."""
    sd3 = VAEConfig()
    return (config.latent_channels, config.scaling_factor, config.shift_factor) == (
        sd3.latent_channels, sd3.scaling_factor, sd3.shift_factor)


ATTENTION_SCORES = 2**26  # attention scores computed at once in the mid-blocks (256 MB in float32)


def lanes_for(x: mx.array, slices: int | None = None) -> Lanes:
    """The lanes an image x (B, H, W, C) is computed on: one per core on the CPU backend's float32 path
    (`Lanes.for_inference`), its rows cut into `slices` bands (default: one per lane); else one lane and band."""
    return Lanes.for_inference(x.shape[1]).sliced(slices) if fast_path(x) else Lanes()


def group_moments(g: Bands) -> tuple[mx.array, mx.array]:
    """Mean and variance per group of g's bands (B, h, W, groups, channels per group), each (B, 1, 1, groups, 1).
    On the CPU the sums run along each row of pixels, in each band, then over all rows and the group's channels
    (MLX's fast reductions, 4-8x faster than one over axes (1, 2, 4), and the float32 sums in two short stages,
    10x more accurate); the variance is that of the deviations from the mean (two passes). On a GPU each group's
    values are made contiguous first: GPU reductions over strided axes are slow."""
    if on_cpu():
        row_sums = g.map(lambda part: part.sum(axis=2, keepdims=True)).join()
        n = row_sums.shape[1] * g.parts[0].shape[2] * g.parts[0].shape[4]
        mean = row_sums.sum(axis=(1, 4), keepdims=True) / n
        squares = g.map(lambda part: cpu_ops.squared_deviation(part, mean).sum(axis=2, keepdims=True)).join()
        return mean, squares.sum(axis=(1, 4), keepdims=True) / n
    g = g.join()
    B, H, W, G, C = g.shape
    flat = g.transpose(0, 3, 1, 2, 4).reshape(B, G, H * W * C)
    return flat.mean(axis=-1).reshape(B, 1, 1, G, 1), flat.var(axis=-1).reshape(B, 1, 1, G, 1)


def shifted_matmul_conv(x: mx.array, weight: mx.array, above: mx.array | None = None,
                        below: mx.array | None = None) -> mx.array:
    """Stride-1 convolution of x (B, H, W, C) with an odd k x k kernel (O, k, k, C), zero padding (k - 1) / 2,
    as k * k accumulated matmuls; `above` / `below`: the (k - 1) / 2 rows next to x's top and bottom edges when x
    is a band of a larger image (zeros if None). The padded input is flattened to rows; the tap (i, j) of every
    output pixel is then the same contiguous run of rows shifted by i * padded width + j, so nothing is unfolded.
    Each output row also gets (k - 1) wrapped-around pixels, cropped at the end (the result is a strided view)."""
    B, H, W, C = x.shape
    k = weight.shape[1]
    pad = (k - 1) // 2
    if pad:
        x = mx.pad(x, [(0, 0), (pad, pad + 1), (pad, pad), (0, 0)])  # one more row: the last taps' overrun
        if above is not None:
            x[:, :pad, pad : pad + W] = above
        if below is not None:
            x[:, pad + H : 2 * pad + H, pad : pad + W] = below
    width = W + 2 * pad
    rows = x.reshape(B, -1, C)
    out = None
    for i in range(k):
        for j in range(k):
            start = i * width + j
            tap, w = rows[:, start : start + H * width], weight[:, i, j].T
            out = tap @ w if out is None else mx.addmm(out, tap, w)
    return out.reshape(B, H, width, -1)[:, :, :W]


class Conv2d(nn.Conv2d):
    """nn.Conv2d on bands, with an optional residual added to its output. On the CPU backend, whose convolutions
    unfold their input, the float32 stride-1 'same' ones run band by band as BLAS matmuls (`shifted_matmul_conv`),
    their bias and residual added in the pass that crops the result; other ones on the whole image."""

    def __call__(self, x: Bands, residual: Bands | None = None) -> Bands:
        k = self.weight.shape[1]
        same = self.stride == (1, 1) and k % 2 and self.padding == ((k - 1) // 2,) * 2
        if not (same and fast_path(x.parts[0])):
            y = x.recut(super().__call__(x.join()))
            return y if residual is None else y.map(mx.add, residual.parts)
        return x.map(self._band, *x.edges((k - 1) // 2), *([] if residual is None else [residual.parts]))

    def _band(self, x: mx.array, above: mx.array | None, below: mx.array | None,
              residual: mx.array | None = None) -> mx.array:
        y = shifted_matmul_conv(x, self.weight, above, below)
        if "bias" in self and residual is not None:
            return cpu_ops.add3(y, self.bias, residual)
        if "bias" in self:
            return y + self.bias
        return y if residual is None else residual + y


class GroupNorm(nn.Module):
    """GroupNorm over (H, W, channels of a group) in PyTorch's channel grouping; statistics in float32.

    While `shared` is set (tiled decoding and encoding), the statistics come from it instead: those of the
    whole image, gathered from its tiles (see `TileStatistics`)."""

    def __init__(self, dims: int, groups: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))
        self.groups = groups
        self.eps = eps
        self.shared: TileStatistics | None = None

    def __call__(self, x: Bands, silu: bool = False) -> Bands:
        """GroupNorm(x), followed by SiLU if `silu`."""
        B, _, _, C = x.parts[0].shape
        g = x.map(lambda part: part.astype(mx.float32).reshape(*part.shape[:3], self.groups, C // self.groups))
        mean, var = group_moments(g) if self.shared is None else self.shared(g)
        if fast_path(x.parts[0]):  # one pass: per-channel statistics and affine parameters broadcast over pixels
            grouped = (B, 1, 1, self.groups, C // self.groups)
            scale = mx.rsqrt(var + self.eps) * self.weight.reshape(grouped[3:])
            mean, scale = (mx.broadcast_to(a, grouped).reshape(B, 1, 1, C) for a in (mean, scale))
            normalize = cpu_ops.normalize_silu if silu else cpu_ops.normalize
            return x.pointwise(lambda part: normalize(part, mean, scale, self.bias).astype(part.dtype))

        def band(part: mx.array, grouped: mx.array) -> mx.array:
            y = ((grouped - mean) * mx.rsqrt(var + self.eps)).reshape(part.shape)
            y = (y * self.weight + self.bias).astype(part.dtype)
            return nn.silu(y) if silu else y

        return x.map(band, g.parts)


class ResnetBlock(nn.Module):
    def __init__(self, in_dims: int, out_dims: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(in_dims, groups)
        self.conv1 = Conv2d(in_dims, out_dims, 3, padding=1)
        self.norm2 = GroupNorm(out_dims, groups)
        self.conv2 = Conv2d(out_dims, out_dims, 3, padding=1)
        if in_dims != out_dims:
            self.conv_shortcut = Conv2d(in_dims, out_dims, 1)

    def __call__(self, x: Bands) -> Bands:
        h = self.conv1(self.norm1(x, silu=True))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return self.conv2(self.norm2(h, silu=True), residual=x)


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(dims, groups)
        self.to_q = nn.Linear(dims, dims)
        self.to_k = nn.Linear(dims, dims)
        self.to_v = nn.Linear(dims, dims)
        self.to_out = [nn.Linear(dims, dims)]

    def __call__(self, bands: Bands) -> Bands:
        x = bands.join()
        B, H, W, C = x.shape
        h = self.group_norm(bands).join().reshape(B, 1, H * W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        attention = cpu_ops.softmax_attention if fast_path(q) else mx.fast.scaled_dot_product_attention
        if (H * W) ** 2 <= ATTENTION_SCORES:
            h = attention(q, k, v, scale=C**-0.5)
        else:  # large images: queries in chunks, each evaluated before the next so that one set of scores exists
            chunk = ATTENTION_SCORES // (H * W)
            h = [attention(q[:, :, i : i + chunk], k, v, scale=C**-0.5) for i in range(0, H * W, chunk)]
            for part in h:
                mx.eval(part)
            h = mx.concatenate(h, axis=2)
        return bands.recut(x + self.to_out[0](h).reshape(B, H, W, C))


class MidBlock(nn.Module):
    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.resnets = [ResnetBlock(dims, dims, groups), ResnetBlock(dims, dims, groups)]
        self.attentions = [Attention(dims, groups)]

    def __call__(self, x: Bands) -> Bands:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv, the input padded by one pixel at the bottom and right only."""

    def __init__(self, dims: int):
        super().__init__()
        self.conv = Conv2d(dims, dims, 3, stride=2)

    def __call__(self, x: Bands) -> Bands:
        padded = Bands.cut(mx.pad(x.join(), [(0, 0), (0, 1), (0, 1), (0, 0)]), Lanes())  # strided: whole image
        return x.recut(self.conv(padded).join())


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, dims: int):
        super().__init__()
        self.conv = Conv2d(dims, dims, 3, padding=1)

    def __call__(self, x: Bands) -> Bands:
        def nearest(part: mx.array) -> mx.array:
            B, H, W, C = part.shape
            return mx.broadcast_to(part[:, :, None, :, None, :], (B, H, 2, W, 2, C)).reshape(B, 2 * H, 2 * W, C)

        return self.conv(x.pointwise(nearest))


class EncoderBlock(nn.Module):
    def __init__(self, in_dims: int, out_dims: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_dims if i == 0 else out_dims, out_dims, groups) for i in range(layers)]
        if downsample:
            self.downsamplers = [Downsample(out_dims)]

    def __call__(self, x: Bands) -> Bands:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class DecoderBlock(nn.Module):
    def __init__(self, in_dims: int, out_dims: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock(in_dims if i == 0 else out_dims, out_dims, groups) for i in range(layers)]
        if upsample:
            self.upsamplers = [Upsample(out_dims)]

    def __call__(self, x: Bands) -> Bands:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    """Image (B, H, W, 3) -> posterior moments (B, H/f, W/f, 2 * latent_channels)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        dims, groups, levels = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = Conv2d(config.in_channels, dims[0], 3, padding=1)
        self.down_blocks = [
            EncoderBlock(dims[max(i - 1, 0)], dims[i], config.layers_per_block, groups, i < levels - 1)
            for i in range(levels)
        ]
        self.mid_block = MidBlock(dims[-1], groups)
        self.conv_norm_out = GroupNorm(dims[-1], groups)
        self.conv_out = Conv2d(dims[-1], 2 * config.latent_channels, 3, padding=1)

    def downsample(self, x: mx.array, bands: int | None = None) -> mx.array:
        """The full-resolution part: image -> features at latent resolution; `bands` as in `Decoder.upsample`."""
        bands = self.conv_in(Bands.cut(x, lanes_for(x, bands)))
        for block in self.down_blocks:
            bands = block(bands)
        return bands.join()

    def middle(self, x: mx.array) -> mx.array:
        """The latent-resolution part (global attention): features -> posterior moments."""
        bands = self.mid_block(Bands.cut(x, lanes_for(x)))
        return self.conv_out(self.conv_norm_out(bands, silu=True)).join()

    def __call__(self, x: mx.array) -> mx.array:
        return self.middle(self.downsample(x))


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, 3)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        dims, groups, levels = config.block_out_channels[::-1], config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = Conv2d(config.latent_channels, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], groups)
        self.up_blocks = [
            DecoderBlock(dims[max(i - 1, 0)], dims[i], config.layers_per_block + 1, groups, i < levels - 1)
            for i in range(levels)
        ]
        self.conv_norm_out = GroupNorm(dims[-1], groups)
        self.conv_out = Conv2d(dims[-1], config.out_channels, 3, padding=1)

    def middle(self, z: mx.array) -> mx.array:
        """The latent-resolution part (global attention): latents -> features."""
        return self.mid_block(self.conv_in(Bands.cut(z, lanes_for(z)))).join()

    def upsample(self, x: mx.array, bands: int | None = None) -> mx.array:
        """The upsampling part: features -> image. `bands`: on the CPU's float32 path, the image is cut into that
        many bands of rows and every layer is evaluated a group of bands at a time, so that only the layers' whole
        outputs and one group's temporaries are alive (default: one band per lane, the graph evaluated at once)."""
        bands = Bands.cut(x, lanes_for(x, bands))
        for block in self.up_blocks:
            bands = block(bands)
        return self.conv_out(self.conv_norm_out(bands, silu=True)).join()

    def __call__(self, z: mx.array) -> mx.array:
        return self.upsample(self.middle(z))


def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of evenly spaced tiles of size `tile` covering [0, length), neighbours overlapping
    by at least `overlap`."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [(s, s + tile) for s in (round(i * (length - tile) / (n - 1)) for i in range(n))]


def _blend_weights(spans: list[tuple[int, int]], scale: int) -> list[mx.array]:
    """Per-tile weights along one axis (`scale` output pixels per span unit), normalised to sum to 1.

    Across an overlap of length L with a neighbour a tile's weight is 0 for the L/4 pixels next to its
    own edge (where its zero padding distorts it), then rises linearly to 1 over the middle L/2."""
    ramps = []
    for i, (start, end) in enumerate(spans):
        pos = mx.arange((end - start) * scale, dtype=mx.float32) + 0.5
        w = mx.ones(pos.shape)
        if i > 0:
            overlap = (spans[i - 1][1] - start) * scale
            w = mx.minimum(w, (pos - overlap / 4) / (overlap / 2))
        if i < len(spans) - 1:
            overlap = (end - spans[i + 1][0]) * scale
            w = mx.minimum(w, (pos.size - pos - overlap / 4) / (overlap / 2))
        ramps.append(mx.maximum(w, 0.0))
    total = mx.zeros((spans[-1][1] * scale,))
    for (start, end), w in zip(spans, ramps):
        total[start * scale : end * scale] += w
    return [w / total[start * scale : end * scale] for (start, end), w in zip(spans, ramps)]


class TileStatistics:
    """The GroupNorm statistics of a whole image, gathered from its tiles, for tiled decoding and encoding.

    The GroupNorms of the tiled part read their statistics from here, in call order. While `collecting`, each
    tile adds the values of the region it owns (the owned regions partition the image) to a running count,
    mean and sum of squared deviations per group (Chan's parallel update). Until `freeze`, tiles normalise with
    their own statistics; after it, all of them with the whole image's as last collected."""

    def __init__(self):
        self.collecting = True
        self.running: list[tuple[int, mx.array, mx.array]] = []
        self.frozen: list[tuple[mx.array, mx.array]] | None = None
        self.region = (0, 1, 0, 1, 1, 1)
        self.calls = 0

    def start_tile(self, region: tuple[int, int, int, int, int, int]) -> None:
        """Next calls come from a tile of (rows, cols) units that owns rows [top, bottom) and columns [left,
        right) of it: region = (top, bottom, left, right, rows, cols)."""
        self.region, self.calls = region, 0

    def __call__(self, g: Bands) -> tuple[mx.array, mx.array]:
        """(mean, variance) for grouped values g, bands (B, h, W, groups, channels per group), float32."""
        k, self.calls = self.calls, self.calls + 1
        if self.collecting:
            top, bottom, left, right, rows, cols = self.region
            sy, sx = g.height // rows, g.parts[0].shape[2] // cols
            own = g.rows(top * sy, bottom * sy).map(lambda part: part[:, :, left * sx : right * sx])
            n = own.height * (right - left) * sx * own.parts[0].shape[4]
            mean, var = group_moments(own)
            m2 = var * n
            if k == len(self.running):
                self.running.append((n, mean, m2))
            else:
                n0, mean0, m20 = self.running[k]
                delta = mean - mean0
                self.running[k] = (n0 + n, mean0 + delta * n / (n0 + n), m20 + m2 + delta**2 * n0 * n / (n0 + n))
        return group_moments(g) if self.frozen is None else self.frozen[k]

    def freeze(self) -> None:
        """From now on every tile normalises with the statistics collected so far; collect afresh."""
        self.frozen = [(mean, m2 / n) for n, mean, m2 in self.running]
        self.running = []


def _tiles(rows: list[tuple[int, int]], cols: list[tuple[int, int]]):
    """(rows, cols, region) of each tile of the grid `rows` x `cols` (spans in units): its spans and the part it
    owns, as `TileStatistics` takes."""

    def owned(spans):
        cuts = [0] + [(e + s) // 2 for (_, e), (s, _) in zip(spans, spans[1:])] + [spans[-1][1]]
        return [(cuts[i] - s, cuts[i + 1] - s, e - s) for i, (s, e) in enumerate(spans)]

    for (y0, y1), (top, bottom, h) in zip(rows, owned(rows)):
        for (x0, x1), (left, right, w) in zip(cols, owned(cols)):
            yield (y0, y1), (x0, x1), (top, bottom, left, right, h, w)


def _tiled(fn: Callable[[mx.array], mx.array], x: mx.array, unit_in: int, unit_out: int, tile: int, overlap: int,
           statistics_passes: int = 0) -> mx.array:
    """`fn(x)` computed on overlapping tiles of `x` and blended, for a `fn` that maps each `unit_in` input
    pixels to `unit_out` output pixels (tile sizes are in units). Each tile is evaluated on its own, so
    that only the float32 output stays in memory.

    `statistics_passes` > 0: `fn`'s GroupNorms normalise every tile with the whole image's statistics,
    gathered by that many passes over the tiles before the one that computes the output (see
    `TileStatistics`; `fn` must be a bound method of the module holding them)."""
    rows = _spans(x.shape[1] // unit_in, tile, overlap)
    cols = _spans(x.shape[2] // unit_in, tile, overlap)
    tiles = list(_tiles(rows, cols))

    def crop(y: tuple[int, int], c: tuple[int, int]) -> mx.array:
        return x[:, y[0] * unit_in : y[1] * unit_in, c[0] * unit_in : c[1] * unit_in]

    statistics = TileStatistics()
    norms = [m for _, m in fn.__self__.named_modules() if isinstance(m, GroupNorm)] if statistics_passes else []
    for norm in norms:
        norm.shared = statistics
    try:
        for _ in range(statistics_passes):
            for y, c, region in tiles:
                statistics.start_tile(region)
                fn(crop(y, c))
                mx.eval(statistics.running)
            statistics.freeze()
        statistics.collecting = False
        out = None
        row_weights = dict(zip(rows, _blend_weights(rows, unit_out)))
        col_weights = dict(zip(cols, _blend_weights(cols, unit_out)))
        for y, c, region in tiles:
            statistics.start_tile(region)
            out_tile = fn(crop(y, c))
            if out is None:
                out = mx.zeros((x.shape[0], rows[-1][1] * unit_out, cols[-1][1] * unit_out, out_tile.shape[-1]))
            out[:, y[0] * unit_out : y[1] * unit_out, c[0] * unit_out : c[1] * unit_out] += (
                out_tile * row_weights[y][:, None, None] * col_weights[c][:, None])
            mx.eval(out)
    finally:
        for norm in norms:
            norm.shared = None
    return out


class Autoencoder(nn.Module):
    """The VAE. Images are NHWC in [-1, 1]; latents are NHWC, unscaled unless the method says otherwise."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(moments, moments, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.decoder.conv_in.weight.dtype

    def decode(self, latents: mx.array, tiled: bool | None = None) -> mx.array:
        """Unscaled latents (B, h, w, latent_channels) -> float32 images (B, h*f, w*f, 3), about [-1, 1].

        `tiled`: None bounds memory (tiles, or bands on the CPU in float32: see the module) when h * w exceeds
        config.tile_above (see VAEConfig); True / False force it."""
        c = self.config
        if latents.ndim != 4 or latents.shape[-1] != c.latent_channels:
            raise ValueError(
                f"VAE decode: expected latents of shape (batch, height, width, {c.latent_channels}) (NHWC), "
                f"got {tuple(latents.shape)}; transpose NCHW latents with .transpose(0, 2, 3, 1)."
            )
        _, h, w, _ = latents.shape
        latents = latents.astype(self.dtype)
        lanes = lanes_for(latents)
        with lanes.running():  # the bands' matmuls share the BLAS threads while the decode is evaluated
            if "post_quant_conv" in self:
                latents = self.post_quant_conv(Bands.cut(latents, lanes)).join()
            features = self.decoder.middle(latents)
            if self.config.tiles(h, w, tiled):
                mx.eval(features)  # before the tiles: its peak and theirs do not add up
                if c.banded(dtype=features.dtype):  # exact in one pass: the image layer by layer, in bands
                    images = self.decoder.upsample(features, c.bands(h, w))
                else:
                    images = _tiled(self.decoder.upsample, features, 1, c.factor, c.tile_size, c.tile_overlap,
                                    c.statistics_passes)
            else:
                images = self.decoder.upsample(features).astype(mx.float32)
            mx.eval(images)
        return images

    def encode(self, images: mx.array, tiled: bool | None = None) -> tuple[mx.array, mx.array]:
        """Images (B, H, W, 3) in [-1, 1] -> float32 posterior (mean, logvar), each (B, H/f, W/f,
        latent_channels); logvar clipped to [-30, 20]. `tiled` as in `decode`."""
        c, f = self.config, self.config.factor
        if images.ndim != 4 or images.shape[-1] != c.in_channels or images.shape[1] % f or images.shape[2] % f:
            raise ValueError(
                f"VAE encode: expected images of shape (batch, height, width, {c.in_channels}) (NHWC) with "
                f"height and width multiples of {f}, got {tuple(images.shape)}; transpose NCHW images with "
                f".transpose(0, 2, 3, 1) and crop or resize to a multiple of {f}."
            )
        h, w = images.shape[1] // f, images.shape[2] // f
        images = images.astype(self.dtype)
        lanes = lanes_for(images)
        with lanes.running():  # as in `decode`
            if self.config.tiles(h, w, tiled):
                if c.banded(dtype=images.dtype):  # as in `decode`
                    features = self.encoder.downsample(images, c.bands(h, w))
                else:
                    features = _tiled(self.encoder.downsample, images, f, 1, c.tile_size, c.tile_overlap,
                                      c.statistics_passes).astype(self.dtype)
            else:
                features = self.encoder.downsample(images)
            moments = self.encoder.middle(features)
            if "quant_conv" in self:
                moments = self.quant_conv(Bands.cut(moments, lanes)).join()
            moments = moments.astype(mx.float32)
            mx.eval(moments)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, -30.0, 20.0)

    def latents_to_image(self, latents: mx.array, tiled: bool | None = None) -> mx.array:
        """Diffusion-space latents -> images in [-1, 1]: decode(latents / scaling_factor + shift_factor),
        one image at a time (each computed before the next), so a batch needs one image's activations."""
        latents = self.config.from_diffusion(latents)
        if latents.shape[0] == 1:
            return self.decode(latents, tiled)
        return mx.concatenate([self.decode(latents[i : i + 1], tiled) for i in range(latents.shape[0])])

    def image_to_latents(
        self,
        images: mx.array,
        noise: mx.array | None = None,
        key: mx.array | None = None,
        tiled: bool | None = None,
    ) -> mx.array:
        """Images in [-1, 1] -> diffusion-space latents (sample - shift_factor) * scaling_factor, where
        sample = mean + std * noise; noise is drawn with `key` (or MLX's global seed) unless given."""
        mean, logvar = self.encode(images, tiled)
        if noise is None:
            noise = mx.random.normal(mean.shape, key=key)
        elif noise.shape != mean.shape:
            raise ValueError(f"VAE image_to_latents: noise shape {tuple(noise.shape)} != latent shape {mean.shape}.")
        sample = mean + mx.exp(0.5 * logvar) * noise
        return self.config.to_diffusion(sample)


# The module names are the diffusers names; only conv weights (the 4-D ones) change layout.
WEIGHT_RULES = [Rule(r".*\.weight", r"\g<0>", conv_to_nhwc)]


def vae_from_weights(
    config: Mapping, weights: Mapping[str, mx.array], dtype: mx.Dtype | None = None, name: str = "vae", **tiling
) -> Autoencoder:
    """Build the VAE from a config.json dictionary and its tensors: diffusers names, or the mlx-flash layout
    when the config says so. `dtype` casts the weights (GroupNorm affine parameters stay float32); `tiling`
    overrides `tile_size`, `tile_overlap`, `tile_above`, `statistics_passes`, `band_bytes`."""
    model = Autoencoder(replace(VAEConfig.from_dict(config), **tiling))
    if is_converted(config):
        quantize_like(model, weights, config.get("quantization"))
    else:
        weights = remap(weights, WEIGHT_RULES)
    return load_into(model, weights, name, dtype=dtype, keep_float32=lambda key: "norm" in key)


def load_vae(folder: str | Path, dtype: mx.Dtype | None = None, **tiling) -> Autoencoder:
    """Load a `vae/` folder, diffusers or mlx-flash layout; see `vae_from_weights`."""
    config, weights = read_component(folder)
    return vae_from_weights(config, weights, dtype, "vae", **tiling)


def save_vae(folder: str | Path, model: Autoencoder, quantization: Mapping | None = None) -> None:
    """Write the VAE as an mlx-flash layout folder."""
    save_component(folder, model, model.config.to_dict(), quantization)

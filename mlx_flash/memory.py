"""Peak memory of each pipeline stage, predicted from the configs alone (nothing is loaded or computed).

Weights are counted exactly: the full-size MLX modules are built lazily (with the quantization applied) and
their parameter sizes summed without evaluating anything. Activations follow the tensors alive at each stage's
peak, with constants measured on MLX (benchmarks/memory.py checks the whole estimate against measured peaks):

- transformer: the residual streams, qkv, the MLP hidden state (10-19 hidden-size vectors per token, float32),
  plus, where attention is not fused (MLX's CPU backend, one head at a time), one head's float32 scores; on a GPU,
  buffers that wait for their command batch to finish add about 0.75 GB;
- VAE decoder: on the CPU in float32, about 10 KB per output pixel, or 2.9 KB decoded in bands (its memory-bounded
  mode); on a GPU, about 5.4 KB per pixel plus 0.55 GB; tiled decoding (GPU, half precision on the CPU) bounds
  this by the tile size;
- text encoders: each in turn (low-memory mode), T5's float32 FFN and attention for its tokens.

The CPU constants were measured on small models (tests/test_memory.py checks them); the GPU ones were fitted to
full-size SD3.5 runs at 1024x1024 on MLX's CUDA backend with Metal-like command batches (README, Memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .clip import CLIP_G, CLIP_L, CLIPConfig, CLIPTextModel
from .controlnet import ControlNet, ControlNetConfig
from .lanes import Lanes
from .mmdit import MMDiT, MMDiTConfig
from .t5 import T5_XXL, T5Config, T5Encoder, keeps_float32
from .vae import Autoencoder, VAEConfig

GB = 1e9
# measured: float32 decode on MLX's CPU backend at 128 pixels square, its stride-1 convolutions as nine BLAS
# matmuls, 7.5-8.0 KB per pixel over runs (about 2.0 GB at 512 pixels square; 9.95 KB before GroupNorm's SiLU came
# in two kernels, session 16; MLX's own unfolding convolutions took 30.8 KB per pixel)
CPU_VAE_BYTES_PER_PIXEL = 7_750
# measured: the same decode in bands, one layer at a time (VAEConfig.band_bytes): 2.91 KB per pixel at 256 pixels
# square in 32 bands, 2.94 KB at 1024 in 16 (full-size model; the layers' whole outputs, plus one group's bands)
CPU_BANDED_VAE_BYTES_PER_PIXEL = 2_920
# fitted: float16, 512 (tiles) and 1024 pixels square; the per-pixel cost then raised by the 1024x1024 decode's
# growth (+1.0 GiB) when GroupNorm started to gather each group contiguously (a float32 copy per norm)
GPU_VAE_BYTES_PER_PIXEL, GPU_VAE_FIXED = 5_360, 0.55e9
# float32 activations per token and hidden unit at the block peak: measured on the CPU (attention one head at a
# time), fitted on a GPU (fused attention) together with GPU_PENDING_BUFFERS
CPU_TRANSFORMER_VECTORS, GPU_TRANSFORMER_VECTORS = 13.1, 10  # CPU: 18.5 before session 16
# CPU: float32 copies of one head's attention scores alive at once in the softmax (cpu_ops.softmax_attention),
# fitted with CPU_TRANSFORMER_VECTORS to measured steps at 256 and 512 pixels square (tests/test_memory.py's model:
# 10.7 and 32.9 MB in session 16; 13.3-14.8 MB at 256 before, as the exponentials did or did not reuse the scores'
# buffer)
CPU_SCORE_COPIES = 2.0
GPU_PENDING_BUFFERS = 0.75e9  # fitted: freed buffers whose command batch has not completed yet
# Freed buffers MLX's CPU-only allocator keeps for reuse (`keep_freed_buffers`). Its own limit, 32 MB, is below one
# activation of a 512 px step or one layer's dequantized weight: every larger buffer goes back to the system and the
# next of its size is faulted in page by page, about 3x the time of writing it (136 MB: 92 ms against 29 here).
CPU_BUFFER_CACHE = 1 << 30


def cpu_only() -> bool:
    """Whether this MLX build has no GPU backend (Linux `mlx[cpu]`)."""
    return not (mx.metal.is_available() or mx.cuda.is_available())


def keep_freed_buffers() -> None:
    """On an MLX build without a GPU backend, let MLX keep up to CPU_BUFFER_CACHE bytes of freed buffers for reuse
    (`mx.set_cache_limit`; Metal's and CUDA's allocators keep more by default). Set your own limit after import to
    change it; `mx.clear_cache()` returns them."""
    if cpu_only():
        mx.set_cache_limit(CPU_BUFFER_CACHE)


def memory_budget() -> int:
    """Bytes a run may use: Metal's recommended working set, a CUDA GPU's memory, else the machine's RAM less
    what MLX's CPU allocator may keep cached (CPU_BUFFER_CACHE)."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "total_memory", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") - CPU_BUFFER_CACHE


@dataclass(frozen=True)
class StageEstimate:
    """Predicted bytes of one stage: its weights and its activations at their peak."""

    name: str
    weights: int
    activations: int

    @property
    def peak(self) -> int:
        return self.weights + self.activations


def model_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters; lazy (never evaluated) modules cost nothing to measure."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def largest_layer_bytes(model: nn.Module) -> int:
    """float32 bytes of the largest linear layer of a float model (lazy modules cost nothing): about what a quantized
    model holds dequantized at a time on the CPU (`quantization.layer_by_layer`).
    `estimate` leaves it out: small quantized models' CPU steps measured within 10% of its figure without it."""
    return mx.float32.size * max(m.weight.size for _, m in model.named_modules() if isinstance(m, nn.Linear))


def _weights(build: Callable[[], nn.Module], dtype: mx.Dtype, quantize: Callable[[nn.Module], object] | None,
             keep_float32: Callable[[str, mx.Dtype], bool] = lambda key, dtype: False) -> int:
    """Bytes of a component's weights as the loaders store them in memory (lazy: nothing is computed)."""
    model = build()
    model.set_dtype(dtype)
    model.update(tree_unflatten([(k, v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())
                                 if keep_float32(k, dtype)]))
    if quantize is not None:
        quantize(model)
    return model_bytes(model)


def _encoder_activations(prompts: int, tokens: int, width: int, ffn: int, heads: int) -> int:
    """float32 residual stream, FFN and attention scores of a text encoder layer."""
    return prompts * tokens * (6 * width + 3 * ffn) * 4 + prompts * heads * tokens**2 * 4 * 2


def estimate(
    transformer: MMDiTConfig,
    vae: VAEConfig,
    *,
    dtype: mx.Dtype,
    height: int,
    width: int,
    images: int = 1,
    cfg: bool = False,
    clips: tuple[CLIPConfig, ...] = (CLIP_L, CLIP_G),
    t5: T5Config | None = T5_XXL,
    max_sequence_length: int = 256,
    quantize: Callable[[nn.Module], object] | None = None,
    quantize_t5: Callable[[nn.Module], object] | None = None,
    vae_tiled: bool = False,
    drop_modulation: bool = False,
    adapters: Mapping[str, int] | None = None,
    controlnets: Sequence[ControlNetConfig] = (),
    device: mx.Device | None = None,
    low_memory: bool = True,
) -> list[StageEstimate]:
    """Peak bytes of the text-encoder, transformer and VAE-decoder stages of one `generate` call.

    `quantize(model)` and `quantize_t5(model)` quantize the transformer and T5 in place as they will be loaded
    (`t5=None`: run without T5). `vae_tiled` with the VAE config's tile size. `drop_modulation`: the adaLN
    weights are freed before the transformer blocks load (few-step runs in low-memory mode). `controlnets` run
    in the transformer stage: their weights (quantized like the transformer's) and their residuals, one image
    stream per block, held while the transformer runs (each ControlNet runs before it, within its peak). `adapters`: bytes of
    the unfused LoRA adapters per component ("transformer", "text_encoder", ...), added to its weights. The text
    encoders run one at a time with `low_memory` (the stage is the encoder of the largest peak), else all stay
    loaded (the stage holds every encoder's weights and the largest activations)."""
    adapters = adapters or {}
    gpu = (device or mx.default_device()) == mx.gpu
    prompts = images * (2 if cfg else 1)
    act = 4  # activations are float32 on the CPU; half precision elsewhere is covered by the float32 streams

    text = []
    for config, component in zip(clips, ("text_encoder", "text_encoder_2")):
        text.append(StageEstimate("text encoders", _weights(lambda: CLIPTextModel(config), dtype, None)
                                  + adapters.get(component, 0),
                                  _encoder_activations(prompts, 77, config.hidden_size, config.intermediate_size,
                                                       config.num_heads)))
    if t5 is not None:
        text.append(StageEstimate("text encoders", _weights(lambda: T5Encoder(t5), dtype, quantize_t5, keeps_float32)
                                  + adapters.get("text_encoder_3", 0),
                                  _encoder_activations(prompts, max_sequence_length, t5.d_model, t5.d_ff, t5.num_heads)))

    d = transformer.hidden_size
    patch = transformer.patch_size * vae.factor
    tokens = (height // patch) * (width // patch)
    seq = tokens + 77 + max_sequence_length
    batch = images * (2 if cfg else 1)
    # CPU: the scores of the one head attended at a time
    overhead = GPU_PENDING_BUFFERS if gpu else batch * seq**2 * 4 * CPU_SCORE_COPIES
    vectors = GPU_TRANSFORMER_VECTORS if gpu else CPU_TRANSFORMER_VECTORS
    denoise_act = batch * vectors * seq * d * act + int(overhead)
    model = MMDiT(transformer)
    if drop_modulation:
        model.drop_modulation_weights()
    denoise_weights = _weights(lambda: model, dtype, quantize) + adapters.get("transformer", 0)
    for config in controlnets:
        denoise_weights += _weights(lambda: ControlNet(config), dtype, quantize)
        denoise_act += batch * config.num_layers * tokens * d * act

    vae_weights = _weights(lambda: Autoencoder(vae), dtype, None)
    side = vae.tile_size * vae.factor
    banded = vae_tiled and vae.banded(mx.gpu if gpu else mx.cpu, dtype)  # see Autoencoder.decode
    pixels = min(height, side) * min(width, side) if vae_tiled and not banded else height * width
    per_pixel, fixed = (GPU_VAE_BYTES_PER_PIXEL, GPU_VAE_FIXED) if gpu else (CPU_VAE_BYTES_PER_PIXEL, 0)
    latent_rows = height // vae.factor
    if banded and vae.bands(latent_rows, width // vae.factor) > Lanes.inference_count(latent_rows):
        per_pixel = CPU_BANDED_VAE_BYTES_PER_PIXEL  # else one band per lane: the untiled decode
    output = images * height * width * 3 * 4 * (2 if images == 1 else 3)  # images (joined) and a [0, 1] copy
    decode_act = per_pixel * pixels + int(fixed) + output  # one image at a time (Autoencoder.latents_to_image)

    encoders = (max(text, key=lambda stage: stage.peak) if low_memory else
                StageEstimate("text encoders", sum(s.weights for s in text), max(s.activations for s in text)))
    return [
        encoders,
        StageEstimate("transformer", denoise_weights, denoise_act),
        StageEstimate("vae decoder", vae_weights, decode_act),
    ]


def required_bytes(stages: list[StageEstimate], low_memory: bool) -> int:
    """Peak bytes of a run of `stages`: the largest stage's peak when each component is loaded, run and freed in
    turn (low-memory mode), else every stage's weights plus the largest activations."""
    if low_memory:
        return max(s.peak for s in stages)
    return sum(s.weights for s in stages) + max(s.activations for s in stages)


def describe(stages: list[StageEstimate]) -> str:
    return ", ".join(f"{s.name} {s.peak / GB:.1f} GB" for s in stages)


# Training: one optimiser step of a LoRA (or full) fine-tuning run, measured on the CPU backend (float32
# activations, attention over all heads in one call): one block's backward holds about 34 hidden-size vectors
# per token plus three float32 copies of every head's attention scores; with checkpointing each block keeps its
# inputs and outputs (about 3 vectors per token) for the recomputation (benchmarks/train_memory.py).
CPU_TRAIN_BLOCK_VECTORS, CPU_TRAIN_SAVED_VECTORS, CPU_TRAIN_SCORE_COPIES = 34, 3, 3
# Trained CLIP encoders (no checkpointing, 77 tokens): each layer keeps about 21 of its width's float32 vectors per
# token for the backward, held while the transformer's backward runs; the layer in backward adds about 26
# (measured on CLIP-G-width encoders of 2 to 8 layers).
CPU_TRAIN_CLIP_LAYER_VECTORS, CPU_TRAIN_CLIP_BACKWARD_VECTORS = 21, 26
# CPU, quantized base: each layer dequantizes its weight to float32 just before its matmul, and a pass has about
# 0.8 of its largest block's float32 weights alive at once; a distillation step's fake-score update evaluates three
# passes in one graph (its flow loss and the discriminator's real and generated features), each holding its own
# (fitted to a 4-block model of SD3.5 Medium's width, 0.81 x 3 of a dual-attention block's 406 MB: step peaks
# measured / estimated 1.87 / 2.11 GB for 2 blocks, 2.22 / 2.30 for 4, 2.67 / 2.66 for 8; README, Distillation memory).
CPU_DEQUANTIZED_BLOCK_SHARE, DISTILLATION_CONCURRENT_PASSES = 0.81, 3


@dataclass(frozen=True)
class TrainingEstimate:
    """Predicted bytes of one training step: the frozen base, the trained parameters with their gradients and
    AdamW moments (and EMA), and the activations."""

    base: int  # with trained text encoders, their frozen weights too
    trained: int
    activations: int

    @property
    def peak(self) -> int:
        return self.base + self.trained + self.activations


def estimate_training(
    transformer: MMDiTConfig,
    *,
    height: int,
    width: int,
    dtype: mx.Dtype = mx.float32,
    quantize: Callable[[nn.Module], object] | None = None,
    lora: Callable[[nn.Module], object] | None = None,
    batch: int = 1,
    text_tokens: int = 77 + 77,
    checkpointing: bool = True,
    ema: bool = False,
    vae_factor: int = 8,
    text_encoders: Mapping[str, CLIPConfig] | None = None,
    text_encoder_lora: Callable[[nn.Module, str], object] | None = None,
) -> TrainingEstimate:
    """Peak bytes of one training step at `height` x `width` (the text encoders and VAE run before, alone).
    `quantize(model)` quantizes the frozen base as loaded; `lora(model)` attaches the trained adapters (None:
    full fine-tuning, every weight trained in `dtype`). `text_encoders` ({component: config}): CLIP encoders
    trained beside the transformer (their frozen weights in `dtype`, their adapters attached by
    `text_encoder_lora(model, component)`), run in the step on 77 tokens per image."""
    model = MMDiT(transformer)
    model.set_dtype(dtype)
    if quantize is not None:
        quantize(model)
    if lora is not None:
        lora(model)
        trained = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
        base = model_bytes(model) - trained
    else:
        base, trained = 0, model_bytes(model)
    clip_activations = 0
    for component, config in (text_encoders or {}).items():
        encoder = CLIPTextModel(config)
        encoder.set_dtype(dtype)
        if text_encoder_lora is not None:
            text_encoder_lora(encoder, component)
        adapters = sum(v.nbytes for _, v in tree_flatten(encoder.trainable_parameters()))
        base += model_bytes(encoder) - adapters
        trained += adapters
        clip_activations += clip_training_activations(config, batch)
    copies = 4 + (1 if ema else 0)  # the weights, their gradients, AdamW's two moments, the EMA
    d, patch = transformer.hidden_size, transformer.patch_size * vae_factor
    seq = (height // patch) * (width // patch) + text_tokens
    layers = transformer.num_layers
    vectors = CPU_TRAIN_BLOCK_VECTORS + (CPU_TRAIN_SAVED_VECTORS * layers if checkpointing
                                         else CPU_TRAIN_BLOCK_VECTORS * (layers - 1))
    scores = CPU_TRAIN_SCORE_COPIES * transformer.num_attention_heads * seq**2 * 4 * (1 if checkpointing else layers)
    activations = batch * (vectors * seq * d * 4 + scores) + clip_activations
    return TrainingEstimate(base, copies * trained, activations)


def estimate_distillation(
    transformer: MMDiTConfig,
    *,
    height: int,
    width: int,
    quantize: Callable[[nn.Module], object] | None = None,
    rank: int = 16,
    fake_rank: int = 16,
    cpu: bool = True,
    **kwargs,
) -> TrainingEstimate:
    """Peak bytes of one SD3.5-Flash distillation step (`mlx_flash.training.distill`, LoRA student): the frozen
    base held once, the student's and the fake score's adapters (rank `rank` / `fake_rank` on the DreamBooth
    targets) and the discriminator head, each with gradients and AdamW moments, and one training step's
    activations (the roles run one after another on the base), with `cpu` the CPU backend's float32 copies of a
    quantized base's weights (Metal's quantized matmuls read the packed weights). `kwargs` as
    `estimate_training`'s."""
    from .lora import DREAMBOOTH_TARGETS, add_adapters, lora_layers, target_modules

    def adapters(model: nn.Module) -> None:
        modules = target_modules(model, "transformer", DREAMBOOTH_TARGETS)
        scales = add_adapters(model, "transformer", modules, rank, rank, mx.random.key(0))
        add_adapters(model, "transformer", modules, fake_rank, fake_rank, mx.random.key(1), scales)
        for layer in lora_layers(model).values():  # adding a set froze the earlier one: both are trained
            layer.unfreeze(keys=[k for k, _ in tree_flatten({"lora": layer["lora"]})], recurse=False)

    estimate = estimate_training(transformer, height=height, width=width, quantize=quantize, lora=adapters, **kwargs)
    d = transformer.hidden_size
    head = (2 * d + d * 64 + 64 + 65) * 4 * 4  # the head's float32 weights, gradients and AdamW moments
    dequantized = 0
    if quantize is not None and cpu:
        block = max(model_bytes(b) for b in MMDiT(transformer).transformer_blocks)  # float32, lazy
        dequantized = int(CPU_DEQUANTIZED_BLOCK_SHARE * DISTILLATION_CONCURRENT_PASSES * block)
    return TrainingEstimate(estimate.base, estimate.trained + head, estimate.activations + dequantized)


def clip_training_activations(config: CLIPConfig, batch: int = 1, tokens: int = 77) -> int:
    """Bytes a trained CLIP encoder's backward holds (CPU float32): every layer's saved tensors and one layer's
    backward."""
    vectors = CPU_TRAIN_CLIP_LAYER_VECTORS * config.num_layers + CPU_TRAIN_CLIP_BACKWARD_VECTORS
    return batch * tokens * config.hidden_size * 4 * vectors

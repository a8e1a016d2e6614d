"""Measured peak memory of one LoRA training step on the full-size SD3.5 Medium transformer (random weights,
frozen base quantized to 4 bits with the mixed policy, rank-16 adapters on diffusers' DreamBooth targets, batch
1, gradient checkpointing per block, 77 + 77 text tokens), against mlx_flash.memory.estimate_training, and the
estimator's figures at 512 and 1024 pixels for 16 / 32 / 64 GB Macs, also with rank-16 LoRAs on the CLIP-L and
CLIP-G encoders trained beside it (`--train-text-encoder`; estimated only).

    python benchmarks/train_memory.py [--size 256]

On MLX's CPU backend activations are float32 (and 4-bit matmul is slow: minutes per step at 256x256), so the
measured figure is an upper bound for Metal, where they are half precision. Prints a markdown table; the last
line is `ratio: measured / predicted`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import lora, memory  # noqa: E402
from mlx_flash.clip import CLIP_G, CLIP_L  # noqa: E402
from mlx_flash.mmdit import MMDiT  # noqa: E402
from mlx_flash.presets import PRESETS  # noqa: E402
from mlx_flash.quantization import Quantization, quantize_model  # noqa: E402
from mlx_flash.training import TrainConfig, Trainer, flow_loss, sample_sigmas  # noqa: E402

RANK, TEXT_TOKENS = 16, 77 + 77
MACS_GB = (16, 32, 64)
WORKING_SET = 0.75  # about the share of a Mac's memory Metal recommends one process to use


def adapters(model: MMDiT) -> None:
    lora.add_adapters(model, "transformer", lora.target_modules(model, "transformer", lora.DREAMBOOTH_TARGETS),
                      RANK, RANK, mx.random.key(0))


def clip_adapters(model, component: str) -> None:
    lora.add_adapters(model, component, lora.target_modules(model, component, lora.TEXT_ENCODER_TARGETS), RANK, RANK,
                      mx.random.key(0))


def quantize(model: MMDiT) -> None:
    quantize_model(model, Quantization(4))


def build() -> MMDiT:
    """The transformer with random weights, quantized block by block (no float copy of the whole model)."""
    model = MMDiT(PRESETS["sd3.5-medium"].transformer)
    quantize(model)
    for part in [*model.transformer_blocks, model]:
        mx.eval(part.parameters())
        mx.clear_cache()
    adapters(model)
    model.set_training(True, checkpointing=True)
    mx.eval(model.parameters())
    return model


def step_peak(model: MMDiT, size: int) -> tuple[int, float]:
    """Peak bytes (everything MLX holds) and seconds of one optimiser step."""
    rng = np.random.default_rng(0)
    h = size // 8
    batch = (mx.array(rng.standard_normal((1, h, h, 16), dtype=np.float32)),
             mx.array(rng.standard_normal((1, h, h, 16), dtype=np.float32)),
             sample_sigmas(mx.array([0.3]), 3.0),
             mx.array(rng.standard_normal((1, TEXT_TOKENS, 4096), dtype=np.float32)),
             mx.array(rng.standard_normal((1, 2048), dtype=np.float32)))
    mx.eval(batch)
    trainer = Trainer(model, lambda *b: flow_loss(model, *b), lambda step, micro: batch,
                      TrainConfig(steps=1, learning_rate=1e-4, warmup=0))
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    trainer.train_step()
    return mx.get_peak_memory(), time.perf_counter() - start


def predicted(size: int, text_encoders: bool = False) -> memory.TrainingEstimate:
    clips = {"text_encoder": CLIP_L, "text_encoder_2": CLIP_G} if text_encoders else None
    return memory.estimate_training(PRESETS["sd3.5-medium"].transformer, height=size, width=size, quantize=quantize,
                                    lora=adapters, text_tokens=TEXT_TOKENS, text_encoders=clips,
                                    text_encoder_lora=clip_adapters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    preload_openblas()
    mx.set_default_device(mx.cpu)

    model = build()
    weights = mx.get_active_memory()
    peak, seconds = step_peak(model, args.size)
    estimate = predicted(args.size)
    print(f"SD3.5 Medium, 4-bit base, LoRA rank {RANK}, batch 1, checkpointing, {args.size}x{args.size}, CPU float32 "
          f"activations: resident before the step {weights / 1e9:.2f} GB, step peak {peak / 1e9:.2f} GB measured, "
          f"{estimate.peak / 1e9:.2f} GB predicted; one step {seconds:.0f} s")
    lines = ["| size | CLIP LoRAs | frozen base | adapters + grads + AdamW | activations | peak | " +
             " | ".join(f"{gb} GB Mac" for gb in MACS_GB) + " |", "|---|---|---|---|---|---|" + "---|" * len(MACS_GB)]
    for text_encoders in (False, True):
        for size in (args.size, 512, 1024):
            e = predicted(size, text_encoders)
            fits = " | ".join("fits" if e.peak < WORKING_SET * gb * 1e9 else "no" for gb in MACS_GB)
            measured = f" (measured {peak / 1e9:.2f})" if size == args.size and not text_encoders else ""
            lines.append(f"| {size}x{size} | {'yes' if text_encoders else 'no'} | {e.base / 1e9:.2f} GB | "
                         f"{e.trained / 1e9:.2f} GB | {e.activations / 1e9:.2f} GB | {e.peak / 1e9:.2f} GB{measured} | "
                         f"{fits} |")
    print("\n".join(lines))
    print(f"ratio: {peak / estimate.peak:.3f}")


if __name__ == "__main__":
    main()

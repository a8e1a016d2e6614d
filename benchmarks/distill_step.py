"""Measured peak memory and time of one SD3.5-Flash distillation step on the full-size SD3.5 Medium transformer
(random weights, the frozen base quantized to 4 bits with the mixed policy, rank-16 student and fake-score LoRA
adapters on that one base, the discriminator head, batch 1, checkpointing per block, 77 + 77 text tokens), side by
side in the same run with one plain LoRA training step (SD3's flow loss, the student's adapter) on the same model;
and the estimator's figures (mlx_flash.memory.estimate_distillation) at 512 and 1024 pixels.

    python benchmarks/distill_step.py [--size 256] [--steps 4]

The distillation step is `Distiller.train_step` at its dearest point: timestep sharing at the student's last step
(the student's sampler runs steps - 1 steps to reach it), one fake-score update with the adversarial head (real
side: random latents), the teacher with CFG (4.5, SD3.5 Medium's) and the fake score at that point, and the
student's update through DMD's surrogate and the generator loss. On MLX's CPU backend activations are float32 (and
4-bit matmul is slow), so the measured figures are an upper bound for Metal. Prints a markdown table; the last
line is `ratio: distillation step peak / plain step peak`.
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
from mlx_flash.mmdit import MMDiT  # noqa: E402
from mlx_flash.presets import PRESETS  # noqa: E402
from mlx_flash.quantization import Quantization, quantize_model  # noqa: E402
from mlx_flash.training import TrainConfig, flow_loss  # noqa: E402
from mlx_flash.training.distill import Conditions, DistillConfig, Distiller, Models, RealSide  # noqa: E402

RANK, TEXT_TOKENS, GUIDANCE = 16, 77 + 77, 4.5
MACS_GB = (16, 32, 64)
WORKING_SET = 0.75  # about the share of a Mac's memory Metal recommends one process to use
CONFIG = PRESETS["sd3.5-medium"].transformer


def quantize(model: MMDiT) -> None:
    quantize_model(model, Quantization(4))


def build(size: int, steps: int) -> Distiller:
    """The distiller on a random 4-bit SD3.5 Medium (quantized block by block: no float copy of the whole model)."""
    base = MMDiT(CONFIG)
    quantize(base)
    for part in [*base.transformer_blocks, base]:
        mx.eval(part.parameters())
        mx.clear_cache()
    config = DistillConfig(train=TrainConfig(steps=2, learning_rate=1e-4, warmup=0), steps=steps, split=False,
                           rank=RANK, fake_rank=RANK, batch_size=1, latent_size=(size // 8, size // 8))
    models = Models(base, config, lora.target_modules(base, "transformer", config.targets), mx.random.key(0))
    base.set_training(True, checkpointing=True)
    rng = np.random.default_rng(0)
    embeds = mx.array(rng.standard_normal((2, TEXT_TOKENS, CONFIG.joint_attention_dim), dtype=np.float32))
    pooled = mx.array(rng.standard_normal((2, CONFIG.pooled_projection_dim), dtype=np.float32))
    conditions = Conditions(embeds, pooled, embeds, pooled, empty=1)
    real = RealSide(mx.array(rng.standard_normal((1, size // 8, size // 8, 16), dtype=np.float32)), mx.array([0]),
                    conditions)
    trainer = Distiller(models, config, conditions, 3.0, GUIDANCE, None, real)
    draw = trainer.draw
    trainer.draw = lambda step: draw(step) | {"k": steps - 1}  # the dearest shared point: the last student step
    mx.eval(models.parameters())
    return trainer


def measure(step) -> tuple[int, float]:
    """Peak bytes (everything MLX holds) and seconds of `step()`."""
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    step()
    return mx.get_peak_memory(), time.perf_counter() - start


def plain_step(trainer: Distiller) -> None:
    """One optimiser step of the student's adapter on SD3's flow loss (the training core's LoRA step)."""
    d = trainer.draw(1)
    t = mx.array([0.7])

    def loss() -> mx.array:
        with trainer.models.role("student") as model:
            return flow_loss(model, d["real"], d["noise"], t, d["embeds"], d["pooled"])
    trainer._update("student", trainer.student_optimizer, loss)


def predicted(size: int) -> memory.TrainingEstimate:
    return memory.estimate_distillation(CONFIG, height=size, width=size, quantize=quantize, rank=RANK,
                                        fake_rank=RANK, text_tokens=TEXT_TOKENS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, choices=(1, 2, 4), help="the student's steps")
    args = parser.parse_args()
    preload_openblas()
    mx.set_default_device(mx.cpu)

    trainer = build(args.size, args.steps)
    resident = mx.get_active_memory()
    plain_peak, plain_seconds = measure(lambda: plain_step(trainer))
    peak, seconds = measure(trainer.train_step)
    estimate = predicted(args.size)
    print(f"SD3.5 Medium, 4-bit base, student + fake-score LoRA rank {RANK}, batch 1, checkpointing, "
          f"{args.size}x{args.size}, CPU float32 activations: resident before the steps {resident / 1e9:.2f} GB")
    print(f"| step | peak GB | seconds |\n|---|---|---|\n| plain LoRA training step | {plain_peak / 1e9:.2f} | "
          f"{plain_seconds:.0f} |\n| distillation step ({args.steps}-step student, shared point k = "
          f"{args.steps - 1}) | {peak / 1e9:.2f} (predicted {estimate.peak / 1e9:.2f}) | {seconds:.0f} |")
    lines = ["| size | base | adapters + grads + AdamW | activations | peak | " +
             " | ".join(f"{gb} GB Mac" for gb in MACS_GB) + " |", "|---|---|---|---|---|" + "---|" * len(MACS_GB)]
    for size in (args.size, 512, 1024):
        e = predicted(size)
        fits = " | ".join("fits" if e.peak < WORKING_SET * gb * 1e9 else "no" for gb in MACS_GB)
        measured = f" (measured {peak / 1e9:.2f})" if size == args.size else ""
        lines.append(f"| {size}x{size} | {e.base / 1e9:.2f} GB | {e.trained / 1e9:.2f} GB | {e.activations / 1e9:.2f} GB"
                     f" | {e.peak / 1e9:.2f} GB{measured} | {fits} |")
    print("\n".join(lines))
    print(f"time ratio (distillation / plain): {seconds / plain_seconds:.2f}")
    print(f"ratio: {peak / plain_peak:.3f}")


if __name__ == "__main__":
    main()

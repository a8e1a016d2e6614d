"""Stage 3 of the digit models: the few-step student, distilled from the shipped teacher by trajectory
matching (in the spirit of SD3.5-Flash; the rectified-flow "reflow" form).

The teacher solves the probability-flow ODE from seeded noise n with its default sampler (28 Euler steps with
classifier-free guidance), giving x0 = T(n, prompt). The student, initialised from the teacher, is trained
without guidance at the noise levels its 4- and 2-step Euler samplers visit, on the states it visits when it
is exact, x_s = (1 - s) x0 + s n, to the velocity n - x0: one Euler step from there lands on the same line
at any lower noise level, so the 4- and 2-step trajectories both end at the teacher's sample T(n, prompt).
Its prompts come encoded as the pipeline encodes them in float32 and at 8 and 4 bits (where T5 is quantized
too), so that the quantized student draws what the float32 one does.

    python training/distill_digits.py [--teacher mlx_flash/models/digits] [--out mlx_flash/models/digits-flash]

Writes --out: the teacher's folder with the student's transformer (float16) and few-step defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import sampler  # noqa: E402
from mlx_flash.layout import MANIFEST, read_manifest  # noqa: E402
from mlx_flash.mmdit import MMDiT, load_mmdit, save_mmdit  # noqa: E402
from mlx_flash.training import flow_loss  # noqa: E402
from training.common import MODELS, fit, half  # noqa: E402
from training.digits_data import TEMPLATES  # noqa: E402
from training.train_digits import (  # noqa: E402
    MAX_SEQUENCE_LENGTH,
    Prompts,
    preview,
    scheduler_shift,
)

STUDENT_STEPS = (4, 2)
STUDENT_DEFAULTS = {"num_inference_steps": 4, "guidance_scale": 1.0, "max_sequence_length": MAX_SEQUENCE_LENGTH}
MIN_SIGMA = 0.01
QUANTIZED_BITS = (8, 4)  # load_pipeline(..., quantize=bits) quantizes T5: the student learns those encodings too
NOISE_SEED = 10**6  # the pairs' noise seeds start here, far from the seeds the benchmark samples with


def teacher_samples(model: MMDiT, noise: mx.array, rows: mx.array, table: Prompts, steps: int, guidance: float,
                    shift: float) -> mx.array:
    """The teacher's samples: `steps` Euler steps with classifier-free guidance, as the pipeline runs them."""
    sigmas = sampler.flow_sigmas(steps, shift)
    context = mx.concatenate([table.embeds[mx.full(rows.shape, table.empty)], table.embeds[rows]])
    pooled = mx.concatenate([table.pooled[mx.full(rows.shape, table.empty)], table.pooled[rows]])
    x = noise
    for sigma, sigma_next, t in zip(sigmas[:-1], sigmas[1:], sampler.flow_timesteps(sigmas)):
        v_uncond, v_cond = mx.split(model(mx.concatenate([x, x]), mx.full((context.shape[0],), float(t)), context,
                                          pooled), 2)
        x = sampler.euler_step(x, sampler.guidance(v_cond, v_uncond, guidance), float(sigma), float(sigma_next))
        mx.eval(x)
    return x


def student_sigmas(shift: float) -> np.ndarray:
    """The noise levels the student's few-step samplers start their steps at, but for the last step's (under
    MIN_SIGMA: it moves the sample by under 1% and its target is nearly all unseen noise)."""
    levels = np.unique(np.concatenate([sampler.flow_sigmas(n, shift)[:-1] for n in STUDENT_STEPS]))
    return levels[levels >= MIN_SIGMA]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=MODELS / "digits")
    parser.add_argument("--out", type=Path, default=MODELS / "digits-flash")
    parser.add_argument("--pairs", type=int, default=2500)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preview", type=Path, default=Path("student_samples.png"))
    args = parser.parse_args()
    preload_openblas()

    defaults = read_manifest(args.teacher)["defaults"]
    shift = scheduler_shift(args.teacher)
    table = Prompts.encode(args.teacher)
    teacher = load_mmdit(args.teacher / "transformer", mx.float32)
    rng = np.random.default_rng(args.seed)
    rows = mx.array(table.index(np.arange(args.pairs) % 10, rng.integers(len(TEMPLATES), size=args.pairs)))
    noise = mx.stack([mx.random.normal((8, 8, 16), key=mx.random.key(NOISE_SEED + i)) for i in range(args.pairs)])
    start = time.perf_counter()
    x0 = mx.concatenate([
        teacher_samples(teacher, noise[i : i + 250], rows[i : i + 250], table, defaults["num_inference_steps"],
                        defaults["guidance_scale"], shift)
        for i in range(0, args.pairs, 250)
    ])
    print(f"{args.pairs} teacher samples: {time.perf_counter() - start:.0f} s", flush=True)

    student = teacher
    levels = mx.array(student_sigmas(shift))
    tables = [table] + [Prompts.encode(args.teacher, bits) for bits in QUANTIZED_BITS]
    embeds, pooled = mx.stack([t.embeds for t in tables]), mx.stack([t.pooled for t in tables])
    mx.random.seed(args.seed)

    def batch(step: int) -> tuple:
        i = mx.array(rng.choice(args.pairs, args.batch, replace=False))
        sigmas = levels[mx.random.randint(0, levels.size, (args.batch,))]
        precision = mx.random.randint(0, len(tables), (args.batch,))
        return x0[i], noise[i], sigmas, embeds[precision, rows[i]], pooled[precision, rows[i]]

    ema = fit(student, lambda *b: flow_loss(student, *b), batch, args.steps, args.lr, warmup=100, ema_decay=0.995)
    student.update(ema)
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.teacher, args.out, ignore=shutil.ignore_patterns("transformer", MANIFEST))
    save_mmdit(args.out / "transformer", half(student))
    (args.out / MANIFEST).write_text(json.dumps({"defaults": STUDENT_DEFAULTS}, indent=2))
    print(f"preview accuracy {preview(args.out, args.preview):.3f}")


if __name__ == "__main__":
    main()

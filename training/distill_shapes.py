"""Stage 3 of the shapes models: `shapes-flash`, the few-step student distilled from the shipped teacher by
SD3.5-Flash's method, `mlx-flash distill` (mlx_flash/training/distill.py), on training prompts; then stored
in float16 like the other shipped folders; distilled from the packaged teacher, it is written as a model on it
(its transformer and manifest only: `mlx_flash.loading.on_base`).

    python training/distill_shapes.py [--teacher mlx_flash/models/shapes] [--out mlx_flash/models/shapes-flash]
        [--prompts 128] [any `mlx-flash distill` option, e.g. --train-steps 300]

The prompts file (`--prompts` distinct training prompts, seeded) is written to --work (default
./shapes-flash.train, with the distillation's checkpoints and logs); the
distillation's settings below are the defaults, later options override them (see training/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash.mmdit import load_mmdit, save_mmdit  # noqa: E402
from mlx_flash.training import distill_cli  # noqa: E402
from training.common import MODELS, half, make_model_on_base  # noqa: E402
from training.shapes_data import prompt, split  # noqa: E402

SETTINGS = ["--steps", "4", "--full", "--no-split", "--train-steps", "180", "--trajectory-warmup", "150",
            "--teacher-samples", "128", "--batch-size", "16", "--learning-rate", "5e-4", "--adversarial-weight", "0",
            "--checkpoint-every", "50", "--seed", "0", "--force"]


def training_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct training prompts, the six kinds in turn."""
    train, _ = split()
    rng = np.random.default_rng(seed)
    chosen = [train[i] for i in rng.permutation(len(train))]
    kinds = sorted({s.category for s in train})
    queues = {k: [s for s in chosen if s.category == k] for k in kinds}
    out = []
    while len(out) < count:
        for k in kinds:
            if queues[k] and len(out) < count:
                out.append(prompt(queues[k].pop()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=MODELS / "shapes")
    parser.add_argument("--out", type=Path, default=MODELS / "shapes-flash")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("shapes-flash.train"), help="prompts, checkpoints, logs")
    args, rest = parser.parse_known_args()
    preload_openblas()

    args.work.mkdir(parents=True, exist_ok=True)
    prompts = args.work / "prompts.txt"
    prompts.write_text("\n".join(training_prompts(args.prompts)) + "\n")
    cli = distill_cli.add_arguments(argparse.ArgumentParser())
    options = cli.parse_args([str(args.teacher), str(args.out), "--prompts", str(prompts), "--work-dir",
                              str(args.work), *SETTINGS, *rest])
    distill_cli.run(options)
    student = half(load_mmdit(args.out / "transformer", mx.float32))
    mx.eval(student.parameters())  # read before the file is replaced
    save_mmdit(args.out / "transformer", student)
    if args.teacher.resolve() == (MODELS / "shapes").resolve():
        make_model_on_base(args.out, "shapes")  # shipped: only the transformer, the rest is the teacher's


if __name__ == "__main__":
    main()

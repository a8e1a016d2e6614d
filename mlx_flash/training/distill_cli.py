"""Command line of distillation: `mlx-flash distill TEACHER OUTPUT --steps {1,2,4} --prompts FILE [options]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..quantization import BITS


def _ratio(text: str) -> tuple[float, float]:
    try:
        high, low = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HIGH:LOW weights such as 3:7, got {text!r}") from None
    return high, low


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the distiller's arguments to `parser`."""
    parser.add_argument("teacher", help="the teacher: preset, packaged model, hub repo id or local model folder")
    parser.add_argument("output", type=Path, help="the student: a model folder, or a LoRA .safetensors file")
    parser.add_argument("--steps", type=int, choices=(1, 2, 4), default=4, help="the student's steps (default 4)")
    parser.add_argument("--prompts", type=Path, required=True, help="a text file, one training prompt per line")
    parser.add_argument("--train-steps", type=int, default=1000, help="optimiser steps (default 1000)")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--fake-learning-rate", type=float, default=None, help="default: --learning-rate")
    parser.add_argument("--fake-updates", type=int, default=1, help="fake-score updates per student update")
    parser.add_argument("--fake-warmup", type=int, default=0,
                        help="steps at the start of each branch that train only the fake score (default 0)")
    parser.add_argument("--warmup", type=int, default=10, help="learning-rate warm-up steps")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--full", action="store_true", help="train every transformer weight instead of a LoRA")
    parser.add_argument("--init", default=None, metavar="MODEL",
                        help="start the (--full) student from this model's transformer, e.g. a trajectory-distilled "
                             "student: a packaged model's name, a model folder or a transformer folder")
    parser.add_argument("--rank", type=int, default=16, help="the student's LoRA rank (default 16)")
    parser.add_argument("--fake-rank", type=int, default=16, help="the fake score's LoRA rank (default 16)")
    parser.add_argument("--guidance", type=float, default=None, help="the teacher's CFG scale (default its own)")
    parser.add_argument("--renoise", action="store_true",
                        help="ablation: re-noise the student's outputs at random timesteps instead of timestep sharing")
    parser.add_argument("--no-split", action="store_true", help="ablation: no split-timestep branches")
    parser.add_argument("--split-boundary", type=float, default=0.75, metavar="SIGMA",
                        help="the noise level between the branches (default 0.75: t = 500 before SD3's shift of 3)")
    parser.add_argument("--min-sigma", type=float, default=0.02,
                        help="timestep sharing skips the student's steps below this noise level (default 0.02)")
    parser.add_argument("--split-ratio", type=_ratio, default=(3.0, 7.0), metavar="HIGH:LOW",
                        help="merge weights of the high- and low-noise branches (default 3:7)")
    parser.add_argument("--adversarial-weight", type=float, default=0.1, help="0 turns the adversarial loss off")
    parser.add_argument("--trajectory-guidance", type=float, default=0.0, metavar="WEIGHT",
                        help="weight of the trajectory-guidance loss: the student's step onto the teacher's (default 0)")
    parser.add_argument("--trajectory-substeps", type=int, default=4,
                        help="the teacher's Euler steps over one student step, for trajectory guidance")
    parser.add_argument("--adversarial-loss", choices=("non-saturating", "hinge"), default="non-saturating")
    parser.add_argument("--trajectory-warmup", type=int, default=0,
                        help="steps of trajectory regression onto teacher samples before distribution matching")
    parser.add_argument("--teacher-samples", type=int, default=16,
                        help="teacher samples for the warm-up and the discriminator's real side")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder of images: their latents are the discriminator's real side (default: teacher "
                             "samples)")
    parser.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts",
                        help="a prompt the student generates every --validate-every steps (repeatable)")
    parser.add_argument("--validate-every", type=int, default=None)
    parser.add_argument("--t5-dropout", type=float, default=0.0, help="fraction of prompts trained without T5")
    parser.add_argument("--quantize", type=int, choices=BITS, default=None, help="quantize the frozen base")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints, caches, the loss log (default: OUTPUT.distill beside the output)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    return parser


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file; pass a text file with one prompt per line.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts; write one prompt per line.")
    return prompts


def run(args: argparse.Namespace) -> None:
    from .distill import DistillConfig, distill
    from .trainer import TrainConfig

    train = TrainConfig(steps=args.train_steps, learning_rate=args.learning_rate, warmup=args.warmup,
                        checkpoint_every=args.checkpoint_every, seed=args.seed)
    config = DistillConfig(
        train=train, steps=args.steps, guidance=args.guidance, full=args.full, rank=args.rank,
        fake_rank=args.fake_rank, quantize=args.quantize, timestep_sharing=not args.renoise, split=not args.no_split,
        split_ratio=args.split_ratio, split_boundary=args.split_boundary, min_sigma=args.min_sigma,
        adversarial_weight=args.adversarial_weight, trajectory_weight=args.trajectory_guidance,
        trajectory_substeps=args.trajectory_substeps,
        adversarial_loss=args.adversarial_loss, fake_updates=args.fake_updates, fake_warmup=args.fake_warmup,
        fake_learning_rate=args.fake_learning_rate, warmup_steps=args.trajectory_warmup, t5_dropout=args.t5_dropout,
        batch_size=args.batch_size, teacher_samples=args.teacher_samples, student_init=args.init)
    try:
        output = distill(args.teacher, args.output, read_prompts(args.prompts), config, work_dir=args.work_dir,
                         data=args.data, resume=args.resume, force=args.force,
                         validate_every=args.validate_every, validation_prompts=args.validation_prompts)
    except KeyboardInterrupt:
        print("mlx-flash: distillation interrupted; continue it with --resume.", file=sys.stderr)
        raise
    print(output)

"""Stage 3b of the digit models: SD3.5-Flash's distillation (`mlx_flash.training.distill`, what `mlx-flash distill`
runs) of the teacher into the 4-step `digits-flash`, starting from stage 3's trajectory-distilled student.

Distribution matching with timestep sharing at the student's own trajectory points (sigma 1.0, 0.858 and 0.602),
one student (no split-timestep branches: on digits the 3:7 merge of two branches measured worse), the adversarial
head against the 1197 training digits (with their captions), a full student initialised from the trajectory
student, the teacher's velocity with a little CFG (`guidance` 1.125, against the teacher's own 1.5: with 1.5 folded
in, DMD over-sharpened the digits; with none, 3-4 points of accuracy were lost) as the real score, 200 steps. Run
once per seed (`--seeds`, default 1 2) and the students' weights averaged: each seed alone lands on either side
of the targets (accuracy or Frechet distance), their mean beats both on both. The other options switch one part of
the method on or off (the ablations).

    python training/distill_digits.py --out digits-trajectory     # stage 3, the starting point
    python training/distill_digits_flash.py --init digits-trajectory [--out mlx_flash/models/digits-flash]
    python training/distill_digits_flash.py --init digits-trajectory --out ABLATION [--split] [--renoise] \
        [--adversarial-weight 0] [--guidance 1.0] [--t5-dropout 0.2] [--seeds 1]

Writes --out: the teacher's folder with the student's transformer (float16) and few-step defaults (from the
packaged teacher: a model on it, its transformer and manifest only, `mlx_flash.loading.on_base`); the run's work
files (data folder, prompts, checkpoints, loss log) go to --work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash.layout import MANIFEST, read_manifest  # noqa: E402
from mlx_flash.mmdit import MMDiT, load_mmdit, save_mmdit  # noqa: E402
from mlx_flash.training import TrainConfig  # noqa: E402
from mlx_flash.training.distill import DistillConfig, distill  # noqa: E402
from training.common import MODELS, half, make_model_on_base  # noqa: E402
from training.digits_data import TEMPLATES, prompts, splits, to_images  # noqa: E402
from training.distill_digits import STUDENT_DEFAULTS  # noqa: E402


def write_data(folder: Path) -> None:
    """The generator's training digits as 64x64 PNGs, digit i captioned with template i mod the templates."""
    folder.mkdir(parents=True, exist_ok=True)
    (digits, labels), _ = splits()
    for i, (image, digit) in enumerate(zip(to_images(digits), labels)):
        Image.fromarray(((image / 2 + 0.5) * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(prompts(int(digit))[i % len(TEMPLATES)])


def averaged(models: list[MMDiT]) -> MMDiT:
    """The first of `models` with every weight the mean of theirs (a "model soup" of students of one
    architecture and starting point, trained with different seeds)."""
    weights = [dict(tree_flatten(m.parameters())) for m in models]
    models[0].update(tree_unflatten([(k, sum(w[k] for w in weights) / len(weights)) for k in weights[0]]))
    return models[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=MODELS / "digits")
    parser.add_argument("--init", type=Path, required=True, help="stage 3's trajectory student (a model folder)")
    parser.add_argument("--out", type=Path, default=MODELS / "digits-flash")
    parser.add_argument("--work", type=Path, default=Path("digits-flash.work"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2],
                        help="one distillation per seed, the students' weights averaged (default 1 2)")
    parser.add_argument("--split", action="store_true", help="split-timestep branches merged 3:7 (off by default)")
    parser.add_argument("--renoise", action="store_true", help="re-noising instead of timestep sharing")
    parser.add_argument("--adversarial-weight", type=float, default=0.1)
    parser.add_argument("--guidance", type=float, default=1.125, help="the teacher's CFG scale in the real score")
    parser.add_argument("--t5-dropout", type=float, default=0.0)
    args = parser.parse_args()
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: give each seed once")
    preload_openblas()

    write_data(args.work / "data")
    students, texts = [], [p for d in range(10) for p in prompts(d)]
    for seed in args.seeds:
        train = TrainConfig(steps=args.steps, learning_rate=2e-5, warmup=10, checkpoint_every=1000, seed=seed)
        config = DistillConfig(train=train, steps=4, guidance=args.guidance, full=True, student_init=str(args.init),
                               timestep_sharing=not args.renoise, split=args.split, fake_updates=2,
                               fake_learning_rate=1e-3, fake_warmup=20, adversarial_weight=args.adversarial_weight,
                               t5_dropout=args.t5_dropout, batch_size=8)
        students.append(distill(str(args.teacher), args.work / f"student-seed{seed}", texts, config,
                                data=args.work / "data", force=True, progress=False))
    student = students[0]
    partial = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(student, partial, ignore=shutil.ignore_patterns("transformer"))
    save_mmdit(partial / "transformer", half(averaged([load_mmdit(f / "transformer", mx.float32) for f in students])))
    manifest = read_manifest(partial)
    if manifest["defaults"] != STUDENT_DEFAULTS:
        raise ValueError(f"{student}: unexpected sampling defaults; the digit student's are {STUDENT_DEFAULTS}.")
    settings = {k: v for k, v in manifest["distillation"].items() if k != "seed"}
    manifest["distillation"] = settings | {"seeds": args.seeds}
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if args.teacher.resolve() == (MODELS / "digits").resolve():
        make_model_on_base(partial, "digits")  # shipped: only the transformer, the rest is the teacher's
    if args.out.exists():
        shutil.rmtree(args.out)
    partial.rename(args.out)
    print(args.out)


if __name__ == "__main__":
    main()

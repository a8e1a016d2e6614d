"""Quality of the shipped digit models (mlx_flash/models/digits and digits-flash), scored by an independent
classifier: an RBF SVC trained on the 600 real digits held out from the generator's training.

    python benchmarks/quality.py [--per-digit 30] [--out benchmarks/results]
    python benchmarks/quality.py --distillation FLASH --trajectory FOLDER [--ablation NAME=FOLDER ...] [--per-digit 30]


For the teacher at 1, 2, 4, 8 and 28 steps (its default guidance) and the student at 2 and 4 steps (no
guidance), each in float32 and quantized on load to 8 and 4 bits, it generates `per-digit` images of each
digit (prompts cycling through the training templates, the same seeds in every row), brings them back to 8x8
the way the training images were made, and reports the classifier's accuracy on the intended digit and the
Frechet distance between PCA features of the generated and the held-out real digits. The reference row
scores real digits of the generator's training split the same way. Writes quality.md and digits_grid.png.

`--distillation FLASH` scores issue #16's table instead (quality_distillation.md): the teacher at 28 steps
(CFG), the trajectory student (`--trajectory`, stage 3's output) and the Flash student (model folder FLASH, from
`mlx-flash distill`) at 1, 2 and 4 steps, the Flash student without T5 at inference, and each `--ablation`
student (a folder distilled with one part of the method switched) at 2 steps and the Flash student's steps, in
float32 and at 4 bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from scipy import linalg
from sklearn.decomposition import PCA

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402
from training.digits_data import (  # noqa: E402
    TEMPLATES,
    classifier,
    grid,
    prompts,
    round_trip,
    splits,
    to_digits,
    to_images,
)

RUNS = [("digits", steps) for steps in (1, 2, 4, 8, 28)] + [("digits-flash", steps) for steps in (2, 4)]
PRECISIONS = {"float32": None, "8-bit": 8, "4-bit": 4}
GRID_ROWS = [("digits", 28, "float32"), ("digits-flash", 4, "float32"), ("digits-flash", 2, "float32"),
             ("digits-flash", 4, "4-bit")]
PCA_DIMS = 16
SEED = 0


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (rows are samples), as FID computes it."""
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


class Scorer:
    """Accuracy of the held-out classifier and Frechet distance to the held-out digits in its PCA space."""

    def __init__(self):
        _, (digits, labels) = splits()
        real = round_trip(digits)
        self.classifier = classifier(real, labels)
        self.pca = PCA(PCA_DIMS, random_state=0).fit(real.reshape(len(real), -1))
        self.real = self.pca.transform(real.reshape(len(real), -1))

    def __call__(self, digits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        flat = digits.reshape(len(digits), -1)
        accuracy = float((self.classifier.predict(flat) == labels).mean())
        return accuracy, frechet_distance(self.pca.transform(flat), self.real)


def generate(pipe, steps: int, per_digit: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (10 * per_digit, 64, 64, 3) in [0, 1], their digits): each digit `per_digit` times, image i of
    digit d with prompt template i and seed SEED + d * per_digit + i."""
    images = [
        pipe.generate([prompts(d)[i % len(TEMPLATES)] for i in range(per_digit)], num_inference_steps=steps,
                      seed=SEED + d * per_digit, output_type="np", progress=False)
        for d in range(10)
    ]
    return np.concatenate(images), np.repeat(np.arange(10), per_digit)


def reference_rows(score: Scorer, per_digit: int) -> list[str]:
    """Table rows for `per_digit` real digits of each class from the generator's training split and for their
    reconstructions by the models' VAE (encoded to the posterior mean): what the generators aim at."""
    (digits, labels), _ = splits()
    rng = np.random.default_rng(SEED)
    chosen = np.concatenate([rng.choice(np.flatnonzero(labels == d), per_digit, replace=False) for d in range(10)])
    vae = load_pipeline("digits", dtype="float32").vae
    mean, _ = vae.encode(mx.array(to_images(digits[chosen])), tiled=False)
    reconstructions = np.clip(np.array(vae.decode(mean, tiled=False)) / 2 + 0.5, 0, 1)
    rows = []
    for name, real in [("real digits (training split)", round_trip(digits[chosen])),
                       ("their VAE reconstructions", to_digits(reconstructions))]:
        accuracy, distance = score(real, labels[chosen])
        rows.append(f"| {name} | | | | {accuracy:.1%} | {distance:.1f} | |")
    return rows


def distillation_rows(flash: Path, trajectory: str, ablations: list[tuple[str, Path]]) -> list[tuple[str, str, int, bool]]:
    """(label, model, steps, use_t5) of issue #16's table."""
    steps = json.loads((flash / "mlx_flash.json").read_text())["defaults"]["num_inference_steps"]
    rows = [("teacher (CFG)", "digits", 28, True)]
    rows += [("trajectory student", trajectory, n, True) for n in (1, 2, 4)]
    rows += [("Flash student", str(flash), n, True) for n in (1, 2, 4)]
    rows += [("Flash student, no T5 at inference", str(flash), steps, False)]
    return rows + [(f"ablation: {name}", str(folder), n, True) for name, folder in ablations
                   for n in sorted({min(2, steps), steps})]


def distillation_table(args: argparse.Namespace, score: Scorer) -> None:
    """Issue #16's table: quality_distillation.md."""
    ablations = []
    for spec in args.ablation:
        name, _, folder = spec.partition("=")
        ablations.append((name, Path(folder)))
    lines = ["| model | steps | guidance | precision | accuracy | Frechet distance |", "|---|---|---|---|---|---|"]
    for label, model, steps, use_t5 in distillation_rows(args.distillation, args.trajectory, ablations):
        for precision in ("float32", "4-bit"):
            pipe = load_pipeline(model, dtype="float32", quantize=PRECISIONS[precision], use_t5=use_t5)
            images, labels = generate(pipe, steps, args.per_digit)
            accuracy, distance = score(to_digits(images), labels)
            lines.append(f"| {label} | {steps} | {pipe.defaults()[1]:g} | {precision} | {accuracy:.1%} | "
                         f"{distance:.1f} |")
            print(lines[-1], flush=True)
    header = (f"Digits generated per row: {10 * args.per_digit} ({args.per_digit} per digit, seeds {SEED}-"
              f"{SEED + 10 * args.per_digit - 1}), scored as in quality.md (held-out SVC accuracy; Frechet distance "
              f"of {PCA_DIMS}-dim PCA features to the {len(score.real)} held-out real digits, lower is better). "
              f"Flash student: {args.distillation}; trajectory student: {args.trajectory}; ablations: "
              + (", ".join(f"{n} = {f}" for n, f in ablations) or "none") + ".\n\n")
    (args.out / "quality_distillation.md").write_text(header + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-digit", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--distillation", type=Path, default=None, metavar="FLASH",
                        help="score issue #16's distillation table for this Flash student folder")
    parser.add_argument("--trajectory", default="digits-flash", metavar="FOLDER",
                        help="the trajectory-distilled student (stage 3's output; with --distillation)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=FOLDER",
                        help="an ablation's student folder (repeatable; with --distillation)")
    args = parser.parse_args()
    preload_openblas()
    args.out.mkdir(parents=True, exist_ok=True)
    score = Scorer()
    if args.distillation is not None:
        distillation_table(args, score)
        return

    lines = ["| model | steps | guidance | precision | accuracy | Frechet distance | s / image |",
             "|---|---|---|---|---|---|---|"] + reference_rows(score, args.per_digit)
    print("\n".join(lines), flush=True)
    samples = {}
    for model, steps in RUNS:
        for precision, bits in PRECISIONS.items():
            pipe = load_pipeline(model, dtype="float32", quantize=bits)
            start = time.perf_counter()
            images, labels = generate(pipe, steps, args.per_digit)
            seconds = (time.perf_counter() - start) / len(images)
            accuracy, distance = score(to_digits(images), labels)
            guidance = pipe.defaults()[1]
            lines.append(f"| {model} | {steps} | {guidance:g} | {precision} | {accuracy:.1%} | {distance:.1f} | "
                         f"{seconds:.3f} |")
            print(lines[-1], flush=True)
            firsts = np.arange(10) * args.per_digit
            samples[model, steps, precision] = images[np.concatenate([firsts, firsts + 1])]  # two of each digit

    header = (f"Digits generated per row: {10 * args.per_digit} ({args.per_digit} per digit, seeds {SEED}-"
              f"{SEED + 10 * args.per_digit - 1}). Accuracy: held-out SVC on the intended digit. Frechet distance: "
              f"{PCA_DIMS}-dim PCA features against the {len(score.real)} held-out real digits (lower is better). "
              "8-bit and 4-bit: `load_pipeline(..., quantize=bits)` (transformer and T5, group size 64; at 4 bits "
              "the transformer's adaLN, embedders and output layer stay at 8). s / image: wall time of the whole "
              f"pipeline in batches of {args.per_digit}, float32 on the machine that ran this. "
              "digits_grid.png, two rows each: " + ", ".join(f"{m} {n} steps {p}" for m, n, p in GRID_ROWS) + ".\n\n")
    (args.out / "quality.md").write_text(header + "\n".join(lines) + "\n")
    grid(np.concatenate([samples[key] for key in GRID_ROWS]), 10).save(args.out / "digits_grid.png")


if __name__ == "__main__":
    main()

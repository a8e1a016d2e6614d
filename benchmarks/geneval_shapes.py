"""GenEval on the coloured-shapes world: how well the shipped `shapes` teacher and its few-step student
`shapes-flash` follow a prompt's objects, counts, colours and positions, scored by the world's detector
(training/shapes_detector.py) on held-out prompt combinations.

    python benchmarks/geneval_shapes.py [--per-category 8] [--out benchmarks/results] [--models shapes shapes-flash]

First the detector's own accuracy on drawn scenes (the whole layout recovered, and GenEval's rule on the drawn
image of each benchmark prompt). Then for the teacher at 1, 2, 4, 8 and 28 steps (its default guidance) and
the student at 1, 2 and 4 (no guidance), each in float32 and quantized on load to 8 and 4 bits, it generates
one image per prompt, `per-category` prompts in each of GenEval's six categories (the same prompts and seeds
in every row), and reports each category's fraction correct and the overall score (their mean, as GenEval's).
Each row's scores and samples go to geneval_shapes_rows/ as they are made, so `--models shapes` and then
`--models shapes-flash` (two runs, e.g. at the same time) make the same table as one run. With every row present it
writes geneval_shapes.md and shapes_grid.png; the last line is the ratio of the student's 4-step float32 score to
the teacher's 28-step float32 score.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402
from training.shapes_data import CATEGORIES, Spec, all_specs, dataset, draw, grid, prompt, scene, split  # noqa: E402
from training.shapes_detector import correct, detect, layout_matches  # noqa: E402

RUNS = [("shapes", steps) for steps in (1, 2, 4, 8, 28)] + [("shapes-flash", steps) for steps in (1, 2, 4)]
PRECISIONS = {"float32": None, "8-bit": 8, "4-bit": 4}
GRID_ROWS = [("shapes", 28, "float32"), ("shapes-flash", 4, "float32"), ("shapes-flash", 2, "float32"),
             ("shapes-flash", 4, "4-bit")]
SEED = 0
DETECTOR_SCENES = 1000
DETECTOR_SEED = 3


def benchmark_prompts(per_category: int) -> list[Spec]:
    """`per_category` held-out combinations of each category, drawn with a fixed seed; single-object and colour
    prompts, which have no held-out combinations, come from all of theirs."""
    rng = np.random.default_rng(SEED)
    _, held = split()
    chosen = []
    for category in CATEGORIES:
        pool = [s for s in held if s.category == category] or [s for s in all_specs() if s.category == category]
        chosen += [pool[i] for i in rng.choice(len(pool), per_category, replace=len(pool) < per_category)]
    return chosen


def scores(specs: list[Spec], images: np.ndarray) -> dict[str, float]:
    """Fraction correct per category and `overall` (the categories' mean)."""
    hits = np.array([correct(s, detect(im)) for s, im in zip(specs, images)])
    kinds = np.array([s.category for s in specs])
    result = {c: float(hits[kinds == c].mean()) for c in CATEGORIES}
    result["overall"] = float(np.mean([result[c] for c in CATEGORIES]))
    return result


def detector_rows(specs: list[Spec]) -> list[str]:
    """The detector on drawn scenes: layouts recovered exactly, and GenEval's rule on drawn benchmark prompts."""
    images, _, layouts = dataset(all_specs(), DETECTOR_SCENES, DETECTOR_SEED)
    recovered = np.mean([layout_matches(detect(im), lay) for im, lay in zip(images, layouts)])
    rng = np.random.default_rng(DETECTOR_SEED)
    drawn = np.stack([draw(scene(s, rng)) for s in specs])
    rule = scores(specs, drawn)
    print(f"detector: {recovered:.1%} of {DETECTOR_SCENES} drawn layouts recovered", flush=True)
    return [f"Detector on drawn scenes: {recovered:.1%} of {DETECTOR_SCENES} layouts recovered exactly (every "
            "object's colour and shape, its centre within 3 px, nothing else).\n",
            "| row | " + " | ".join(CATEGORIES) + " | overall | s / image |",
            "|---" * (len(CATEGORIES) + 3) + "|",
            "| drawn scenes of the benchmark prompts | " + " | ".join(f"{rule[c]:.2f}" for c in CATEGORIES)
            + f" | {rule['overall']:.3f} | |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--models", nargs="+", default=["shapes", "shapes-flash"],
                        help="generate only these models' rows, the others from an earlier run's row files")
    args = parser.parse_args()
    preload_openblas()
    args.out.mkdir(parents=True, exist_ok=True)
    specs = benchmark_prompts(args.per_category)
    texts = [prompt(s) for s in specs]
    seeds = list(range(SEED, SEED + len(specs)))

    lines = detector_rows(specs)
    print("\n".join(lines[1:]), flush=True)
    cache = args.out / "geneval_shapes_rows"  # one .json (+ .npy samples) per row: a run may do some rows
    cache.mkdir(exist_ok=True)
    for model, steps in RUNS:
        for precision, bits in PRECISIONS.items():
            name = f"{model}-{steps}-{precision}-{len(specs)}"
            if model not in args.models and (cache / f"{name}.json").is_file():
                continue
            if model not in args.models:
                raise SystemExit(f"row {name} missing: run with --models {model}")
            pipe = load_pipeline(model, dtype="float32", quantize=bits)
            start = time.perf_counter()
            images = pipe.generate(texts, num_inference_steps=steps, seed=seeds, output_type="np", progress=False)
            seconds = (time.perf_counter() - start) / len(texts)
            result = scores(specs, images) | {"seconds": seconds, "guidance": pipe.defaults()[1]}
            (cache / f"{name}.json").write_text(json.dumps(result))
            np.save(cache / f"{name}.npy", images[:: args.per_category])
            print(name, result, flush=True)
    if set(args.models) != {m for m, _ in RUNS}:
        return
    results, samples = {}, {}
    for model, steps in RUNS:
        for precision in PRECISIONS:
            name = f"{model}-{steps}-{precision}-{len(specs)}"
            result = results[model, steps, precision] = json.loads((cache / f"{name}.json").read_text())
            samples[model, steps, precision] = np.load(cache / f"{name}.npy")
            lines.append(f"| {model} {steps} steps, guidance {result['guidance']:g}, {precision} | "
                         + " | ".join(f"{result[c]:.2f}" for c in CATEGORIES)
                         + f" | {result['overall']:.3f} | {result['seconds']:.3f} |")
            print(lines[-1], flush=True)

    header = (f"Prompts per row: {len(specs)} ({args.per_category} per category, held-out combinations where the "
              f"category has them; seeds {seeds[0]}-{seeds[-1]}; the same in every row). GenEval's rules on the "
              "detector's objects: single object / colours: an object of the shape (in the colour); counting: "
              "exactly that many; two objects / colour attribution: both named objects; position: both, in the "
              "relation (offset along its axis at least the offset across). Overall: the categories' mean. 8-bit "
              "and 4-bit: `load_pipeline(..., quantize=bits)` (transformer and T5). s / image: wall time of the "
              "whole pipeline in one batch, float32, on the shared machine that ran this. shapes_grid.png, one row "
              "each (a prompt of each category, in the table's order): "
              + ", ".join(f"{m} {n} steps {p}" for m, n, p in GRID_ROWS) + ".\n\n")
    (args.out / "geneval_shapes.md").write_text(header + "\n".join(lines) + "\n")
    grid(np.concatenate([samples[key] for key in GRID_ROWS]), 6).save(args.out / "shapes_grid.png")
    teacher, student = results["shapes", 28, "float32"]["overall"], results["shapes-flash", 4, "float32"]["overall"]
    print(f"ratio: {student / teacher if teacher else float('nan'):.3f}")


if __name__ == "__main__":
    main()

"""Inpainting on the shipped digit model: the lower half of a generated "3" repainted with the prompt "eight",
read by the held-out digit classifier (the one benchmarks/quality.py scores with).

    python benchmarks/digit_inpaint.py [--seeds 40] [--strength 1.0] [--guidance G] [--out benchmarks/results]

For each seed it generates "a handwritten digit three" with the model's defaults, then inpaints the lower half
(mask white from the middle row down) with "a handwritten digit eight" from the same seed (guidance: the model's
unless given), and classifies both.
Prints the rate of threes among the generated images and of eights among the inpainted ones (over the threes),
and writes digit_inpaint.md (those lines) and digit_inpaint.png (row 1: the threes, row 2: inpainted, first 10
seeds).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402
from training.digits_data import (  # noqa: E402
    IMAGE_SIZE,
    grid,
    held_out_classifier,
    prompts,
    to_digits,
)

THREE, EIGHT = prompts(3)[0], prompts(8)[0]


def lower_half_mask() -> Image.Image:
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    ImageDraw.Draw(mask).rectangle((0, IMAGE_SIZE // 2, IMAGE_SIZE, IMAGE_SIZE), fill=255)
    return mask


def run(seeds: int, strength: float, guidance: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(threes, inpainted) images (N, 64, 64, 3) in [0, 1] and their predicted digits."""
    pipe, mask, score = load_pipeline("digits", dtype="float32"), lower_half_mask(), held_out_classifier()
    threes, eights = [], []
    for seed in range(seeds):
        three = pipe.generate(THREE, seed=seed, progress=False)[0]
        threes.append(np.asarray(three, np.float32) / 255)
        eight = pipe.generate(EIGHT, image=three, mask=mask, strength=strength, guidance_scale=guidance, seed=seed,
                              output_type="np", progress=False)
        eights.append(eight[0])
    threes, eights = np.stack(threes), np.stack(eights)
    predict = lambda images: score.predict(to_digits(images).reshape(len(images), -1))  # noqa: E731
    return threes, eights, predict(threes), predict(eights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    preload_openblas()
    threes, eights, before, after = run(args.seeds, args.strength, args.guidance)
    were_three = before == 3
    rate = float((after[were_three] == 8).mean()) if were_three.any() else 0.0
    args.out.mkdir(parents=True, exist_ok=True)
    shown = min(10, args.seeds)
    grid(np.concatenate([threes[:shown], eights[:shown]]), shown).save(args.out / "digit_inpaint.png")
    guidance = "the model's" if args.guidance is None else f"{args.guidance:g}"
    lines = [f"generated threes read as 3: {were_three.mean():.1%} of {args.seeds} seeds",
             f"inpainted with 'eight' (strength {args.strength:g}, guidance {guidance}), read as 8: "
             f"{(after == 8).mean():.1%} of all, {rate:.1%} of the threes",
             f"eight rate: {rate:.3f}"]
    (args.out / "digit_inpaint.md").write_text("\n\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

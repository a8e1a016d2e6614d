"""Effect of the demo LoRA (mlx_flash/models/loras/digits-letter-x.safetensors, training/train_digits_lora.py)
on the shipped digit model, scored by independent classifiers.

    python benchmarks/digits_lora.py [--lora mlx_flash/models/loras/digits-letter-x.safetensors] [--count 100]

With and without the LoRA (28 steps, the model's default guidance), it generates `count` images of the new
concept (prompts cycling through LETTER_TEMPLATES, seeds 0..count-1) and `count` digits (count / 10 of each,
prompts cycling through the training templates, the same seeds as benchmarks/quality.py's). An RBF SVC on 8x8
ink, trained on the 600 held-out real digits plus 300 letters X drawn from a seed the LoRA never saw, says how
many of the letter prompts gave an X; the held-out digit classifier of benchmarks/quality.py scores the digits.
Writes digits_lora.md and digits_lora_grid.png (rows: X without the LoRA, X with it, digits with it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402
from training.common import MODELS  # noqa: E402
from training.digits_data import (  # noqa: E402
    LETTER_TEMPLATES,
    TEMPLATES,
    classifier,
    grid,
    held_out_classifier,
    letter_x,
    prompts,
    round_trip,
    splits,
    to_digits,
)

X_LABEL = 10
CLASSIFIER_LETTER_SEED = 2  # training/train_digits_lora.py draws its letters from seed 1


def letters_classifier():
    """Digits 0-9 and the letter X (label 10), from held-out real digits and unseen drawn letters."""
    _, (digits, labels) = splits()
    letters = letter_x(300, CLASSIFIER_LETTER_SEED)
    features = np.concatenate([round_trip(digits), round_trip(letters)])
    return classifier(features, np.concatenate([labels, np.full(len(letters), X_LABEL)]))


def generate(pipe, texts: list[str]) -> np.ndarray:
    return np.concatenate([pipe.generate(texts[i : i + 50], seed=i, output_type="np", progress=False)
                           for i in range(0, len(texts), 50)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", type=Path, default=MODELS / "loras" / "digits-letter-x.safetensors")
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    preload_openblas()
    args.out.mkdir(parents=True, exist_ok=True)
    with_x, digit_scorer = letters_classifier(), held_out_classifier()
    letter_prompts = [LETTER_TEMPLATES[i % len(LETTER_TEMPLATES)] for i in range(args.count)]
    per_digit = args.count // 10
    digit_prompts = [prompts(d)[i % len(TEMPLATES)] for d in range(10) for i in range(per_digit)]
    labels = np.repeat(np.arange(10), per_digit)

    lines = ["| model | letter prompts drawn as X | digits: accuracy | digits drawn as X | s / image |",
             "|---|---|---|---|---|"]
    samples = []
    for name, loras in (("digits", ()), ("digits + LoRA", [(args.lora, 1.0)])):
        pipe = load_pipeline("digits", dtype="float32", loras=loras)
        start = time.perf_counter()
        letters = to_digits(generate(pipe, letter_prompts))
        digit_images = generate(pipe, digit_prompts)
        seconds = (time.perf_counter() - start) / (len(letter_prompts) + len(digit_prompts))
        digits = to_digits(digit_images)
        x_rate = float((with_x.predict(letters.reshape(len(letters), -1)) == X_LABEL).mean())
        accuracy = float((digit_scorer.predict(digits.reshape(len(digits), -1)) == labels).mean())
        digits_as_x = float((with_x.predict(digits.reshape(len(digits), -1)) == X_LABEL).mean())
        lines.append(f"| {name} | {x_rate:.1%} | {accuracy:.1%} | {digits_as_x:.1%} | {seconds:.3f} |")
        print(lines[-1], flush=True)
        images = generate(pipe, letter_prompts[:10])
        samples.append(images)
        if loras:
            samples.append(digit_images[np.arange(10) * per_digit])

    header = (f"{args.count} letter prompts ({', '.join(repr(t) for t in LETTER_TEMPLATES)}, cycling; seeds 0-"
              f"{args.count - 1}) and {args.count} digit prompts ({per_digit} per digit, the training templates), "
              "28 steps, guidance 1.5, float32. X: an RBF SVC on 8x8 ink trained on the 600 held-out real digits "
              "and 300 drawn letters X of a seed the LoRA never saw. Digit accuracy: benchmarks/quality.py's "
              "held-out classifier. digits_lora_grid.png rows: letter prompts without the LoRA, with it, digits "
              "with it.\n\n")
    (args.out / "digits_lora.md").write_text(header + "\n".join(lines) + "\n")
    grid(np.concatenate(samples), 10).save(args.out / "digits_lora_grid.png")


if __name__ == "__main__":
    main()

"""The demo LoRA: teaches the shipped digit model (mlx_flash/models/digits) the letter X, which it cannot draw,
with `mlx_flash.training` (what `mlx-flash train` runs), keeping its digits by DreamBooth's prior preservation.

    python training/train_digits_lora.py [--steps 400] [--out mlx_flash/models/loras/digits-letter-x.safetensors]

Draws `--letters` handwritten X's (training.digits_data.letter_x, 8x8 ink brought to 64x64 as the digits are)
captioned with LETTER_TEMPLATES, and as class images the model's own training digits with their prompts; then
trains a rank-8 LoRA on the attention projections and MLPs of both streams. benchmarks/digits_lora.py measures
the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash.lora import DREAMBOOTH_TARGETS  # noqa: E402
from mlx_flash.training import TrainConfig  # noqa: E402
from mlx_flash.training.finetune import FinetuneConfig, finetune  # noqa: E402
from training.common import MODELS  # noqa: E402
from training.digits_data import LETTER_TEMPLATES, letter_x, prompts, splits, to_images  # noqa: E402
from training.train_digits import CFG_DROPOUT, MAX_SEQUENCE_LENGTH  # noqa: E402

TARGETS = DREAMBOOTH_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
LETTER_SEED = 1  # the classifier of benchmarks/digits_lora.py learns X's drawn from seed 2


def write_folder(folder: Path, images: np.ndarray, captions: list[str]) -> Path:
    """Images (N, H, W, 3) in [-1, 1] as PNGs with their captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(np.round((image + 1) * 127.5).astype(np.uint8)).save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODELS / "digits"))
    parser.add_argument("--out", type=Path, default=MODELS / "loras" / "digits-letter-x.safetensors")
    parser.add_argument("--work", type=Path, default=Path("digits-letter-x.train"))
    parser.add_argument("--letters", type=int, default=200)
    parser.add_argument("--class-images", type=int, default=500)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    preload_openblas()

    rng = np.random.default_rng(args.seed)
    letters = write_folder(args.work / "letters", to_images(letter_x(args.letters, LETTER_SEED)),
                           [LETTER_TEMPLATES[i % len(LETTER_TEMPLATES)] for i in range(args.letters)])
    (digits, labels), _ = splits()
    picks = rng.choice(len(digits), args.class_images, replace=False)
    captions = [prompts(int(labels[i]))[rng.integers(10)] for i in picks]
    class_images = write_folder(args.work / "digits", to_images(digits[picks]), captions)

    config = FinetuneConfig(
        model=args.model, data=letters, output=args.out, class_data=class_images, prior_weight=1.0,
        train=TrainConfig(steps=args.steps, learning_rate=args.lr, warmup=40, checkpoint_every=100, seed=args.seed),
        rank=args.rank, targets=TARGETS, resolution=64, batch_size=args.batch, caption_dropout=CFG_DROPOUT,
        max_sequence_length=MAX_SEQUENCE_LENGTH, dtype="float32", gradient_checkpointing=False,
        work_dir=args.work / "run", force=True, save_dtype="float16")
    start = time.perf_counter()
    print(finetune(config, resume=(args.work / "run" / "checkpoints").is_dir()))
    print(f"trained in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

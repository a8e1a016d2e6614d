"""Command line of training: `mlx-flash train MODEL --data DIR --output OUT [options]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..quantization import BITS


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the trainer's arguments to `parser`."""
    parser.add_argument("model", help="preset name, packaged model, hub repo id or local model folder")
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of images with captions (name.png + name.txt, or a metadata.jsonl)")
    parser.add_argument("--output", type=Path, required=True,
                        help="the LoRA .safetensors to write (diffusers/PEFT naming), or with --full a model folder")
    parser.add_argument("--full", action="store_true", help="train every transformer weight instead of a LoRA")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument("--targets", default="attention",
                        help="modules to adapt: 'attention' (diffusers' SD3 DreamBooth default: the joint "
                             "attention's projections), comma-separated diffusers module names (e.g. "
                             "to_q,to_v,ff.net.2,norm1.linear), or re:REGEX matching whole module names")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="train LoRAs on CLIP-L and CLIP-G too (their attention projections; prompts are then "
                             "encoded in every step, T5's part once)")
    parser.add_argument("--text-encoder-rank", type=int, default=None, help="the CLIP LoRAs' rank (default: --rank)")
    parser.add_argument("--text-encoder-alpha", type=float, default=None,
                        help="the CLIP LoRAs' alpha (default: their rank)")
    parser.add_argument("--text-encoder-learning-rate", type=float, default=5e-6,
                        help="peak learning rate of the CLIP LoRAs (default 5e-6, as diffusers' DreamBooth script)")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    parser.add_argument("--ema", type=float, default=None, metavar="DECAY",
                        help="keep and write an exponential moving average of the weights (e.g. 0.999)")
    parser.add_argument("--resolution", type=int, default=512,
                        help="training size (pixels per side; images go to the bucket of nearest aspect ratio)")
    parser.add_argument("--flip", action="store_true", help="random horizontal flips")
    parser.add_argument("--caption-dropout", type=float, default=0.0, help="fraction of empty captions (for CFG)")
    parser.add_argument("--class-data", type=Path, default=None,
                        help="DreamBooth prior preservation: a folder of class images with captions")
    parser.add_argument("--prior-weight", type=float, default=1.0, help="weight of the class images' loss")
    parser.add_argument("--quantize", type=int, choices=BITS, default=None,
                        help="quantize the frozen base to these bits (QLoRA); T5 too")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="precision of the frozen base (default: float32 on the CPU, bfloat16 on a GPU)")
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="keep every block's activations (faster, more memory) instead of recomputing them")
    parser.add_argument("--max-sequence-length", type=int, default=77, help="T5 tokens per caption (default 77)")
    parser.add_argument("--no-t5", action="store_true", help="train without T5 (zeros in its place)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--validation-prompt", action="append", default=[], dest="validation_prompts",
                        help="a prompt generated every --validate-every steps (repeatable)")
    parser.add_argument("--validate-every", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints, caches, loss log and plot, validation images (default: OUTPUT.train)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    return parser


def targets(text: str) -> tuple[str, ...] | str:
    from ..lora import DREAMBOOTH_TARGETS

    if text == "attention":
        return DREAMBOOTH_TARGETS
    if text.startswith("re:"):
        return text[3:]
    return tuple(t.strip() for t in text.split(",") if t.strip())


def run(args: argparse.Namespace) -> None:
    from .finetune import FinetuneConfig, finetune
    from .trainer import TrainConfig

    train = TrainConfig(steps=args.steps, learning_rate=args.learning_rate, warmup=args.warmup,
                        weight_decay=args.weight_decay, accumulation=args.accumulation, ema_decay=args.ema,
                        checkpoint_every=args.checkpoint_every, seed=args.seed)
    config = FinetuneConfig(
        model=args.model, data=args.data, output=args.output, train=train, rank=args.rank, alpha=args.alpha,
        targets=targets(args.targets), full=args.full, train_text_encoder=args.train_text_encoder,
        text_encoder_rank=args.text_encoder_rank, text_encoder_alpha=args.text_encoder_alpha,
        text_encoder_learning_rate=args.text_encoder_learning_rate, quantize=args.quantize, dtype=args.dtype,
        resolution=args.resolution, batch_size=args.batch_size, flip=args.flip, caption_dropout=args.caption_dropout,
        max_sequence_length=args.max_sequence_length, use_t5=not args.no_t5,
        gradient_checkpointing=not args.no_checkpointing, class_data=args.class_data, prior_weight=args.prior_weight,
        validation_prompts=tuple(args.validation_prompts), validate_every=args.validate_every,
        work_dir=args.work_dir, force=args.force)
    try:
        output = finetune(config, resume=args.resume)
    except KeyboardInterrupt:
        print(f"mlx-flash: training interrupted; continue it with --resume (checkpoints in {config.folder}).",
              file=sys.stderr)
        raise
    print(output)

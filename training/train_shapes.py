"""Stage 2 of the shapes models: the teacher, a small SD3.5-Medium-architecture (MMDiT-X: dual attention,
RMS qk-norm) transformer trained with SD3's rectified-flow objective through the training core on the VAE's
posterior means of the drawn training scenes, each conditioned on its own prompt as the pipeline encodes it,
with classifier-free guidance dropout; the weights are an exponential moving average (as the digits' teacher).

The small T5 encoder is trained with the transformer (from stage 1's random one), the CLIP encoders stay frozen:
SD3 gives the transformer no positions for the text tokens, so "a red circle and a blue square" and "a blue
circle and a red square" differ to it only through what the encoders mix, and a frozen random T5 mixes little.
`--frozen-t5` keeps it frozen (the ablation).

    python training/train_shapes.py [--model mlx_flash/models/shapes] [--steps 900] [--seed 0] [--init FOLDER]

Needs stage 1 (train_shapes_vae.py) in --model. Writes transformer/ and text_encoder_3/ (float16, the EMA
weights) and mlx_flash.json (sampling defaults), and a PNG of samples by the pipeline with their detector score.
Rerun stage 1 before a from-scratch rerun: the T5 starts from the folder's.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import preload_openblas  # noqa: E402
from mlx_flash import load_pipeline  # noqa: E402
from mlx_flash.layout import MANIFEST  # noqa: E402
from mlx_flash.mmdit import MMDiT, MMDiTConfig, load_mmdit, save_mmdit  # noqa: E402
from mlx_flash.t5 import T5Encoder, load_t5, save_t5  # noqa: E402
from mlx_flash.tokenizer import T5Tokenizer  # noqa: E402
from mlx_flash.training import flow_loss, sample_sigmas  # noqa: E402
from training.common import MODELS, fit, half  # noqa: E402
from training.encoders import T5_WIDTH, encode  # noqa: E402
from training.shapes_data import grid, prompt, split, to_model  # noqa: E402
from training.shapes_detector import correct, detect  # noqa: E402
from training.train_digits import CFG_DROPOUT, encode_latents, new_transformer, scheduler_shift  # noqa: E402
from training.train_shapes_vae import training_scenes  # noqa: E402

TRANSFORMER = MMDiTConfig(
    num_layers=4, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=64, patch_size=2, pos_embed_max_size=8, sample_size=16, qk_norm=True,
    dual_attention_layers=(0, 1),
)  # 64x64 images, VAE factor 4: 16x16 latents, 8x8 = 64 image tokens
MAX_SEQUENCE_LENGTH = 16  # T5 tokens: the longest prompt is 14 words (one piece each) + end of sequence
GUIDANCE = 3.0
TEACHER_DEFAULTS = {"num_inference_steps": 28, "guidance_scale": GUIDANCE, "max_sequence_length": MAX_SEQUENCE_LENGTH}


def prompt_table(root: Path, texts: list[str], bits: int | None = None) -> tuple[mx.array, mx.array, list[str]]:
    """(embeds, pooled, unique texts): the distinct prompts of `texts`, then the empty prompt, encoded once as the
    pipeline encodes them (float32, or T5 quantized to `bits`)."""
    unique = sorted(set(texts)) + [""]
    parts = [encode(root, unique[i : i + 512], MAX_SEQUENCE_LENGTH, bits) for i in range(0, len(unique), 512)]
    return mx.array(np.concatenate([e for e, _ in parts])), mx.array(np.concatenate([p for _, p in parts])), unique


CLIP_TOKENS = 77  # the conditioning's CLIP part; T5's MAX_SEQUENCE_LENGTH tokens follow


class Conditioned(nn.Module):
    """The transformer and the T5 encoder trained together; the frozen CLIP part of the conditioning is given."""

    def __init__(self, transformer: MMDiT, t5: T5Encoder):
        super().__init__()
        self.transformer, self.t5 = transformer, t5

    def loss(self, x0: mx.array, noise: mx.array, sigmas: mx.array, clip: mx.array, ids: mx.array,
             pooled: mx.array) -> mx.array:
        embeds = mx.concatenate([clip, self.t5(ids)], axis=1)
        return flow_loss(self.transformer, x0, noise, sigmas, embeds, pooled)


def preview(root: Path, path: Path, count: int = 16, seed: int = 7) -> float:
    """Generate `count` held-out prompts with the pipeline's defaults, save a grid and return the fraction the
    detector finds correct (GenEval's rules)."""
    specs = split()[1]
    rng = np.random.default_rng(seed)
    chosen = [specs[i] for i in rng.choice(len(specs), count, replace=False)]
    pipe = load_pipeline(root, dtype="float32")
    images = pipe.generate([prompt(s) for s in chosen], seed=list(range(count)), output_type="np", progress=False)
    grid(images, min(count, 8)).save(path)
    return float(np.mean([correct(s, detect(im)) for s, im in zip(chosen, images)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODELS / "shapes")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--images", type=int, default=3000, help="the first N training scenes")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="continue from this transformer/ folder's weights")
    parser.add_argument("--frozen-t5", action="store_true", help="keep the T5 encoder frozen (the ablation)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--layers", type=int, default=TRANSFORMER.num_layers, help="blocks (the first half dual)")
    parser.add_argument("--heads", type=int, default=TRANSFORMER.num_attention_heads)
    parser.add_argument("--head-dim", type=int, default=TRANSFORMER.attention_head_dim)
    parser.add_argument("--preview", type=Path, default=Path("shapes_teacher_samples.png"))
    parser.add_argument("--preview-prompts", type=int, default=16)
    args = parser.parse_args()
    preload_openblas()

    pixels, texts, _ = training_scenes(args.images)
    mean, _, vae_config = encode_latents(args.model, to_model(pixels))
    latents = vae_config.to_diffusion(mean)
    embeds, pooled, unique = prompt_table(args.model, texts)
    clip = embeds[:, :CLIP_TOKENS]
    ids = T5Tokenizer(args.model / "tokenizer_3")(unique, MAX_SEQUENCE_LENGTH)
    index = {text: row for row, text in enumerate(unique)}
    rows_of = np.array([index[t] for t in texts])
    empty = len(unique) - 1
    shift = scheduler_shift(args.model)
    config = replace(TRANSFORMER, num_layers=args.layers, num_attention_heads=args.heads,
                     attention_head_dim=args.head_dim, dual_attention_layers=tuple(range(args.layers // 2)))
    transformer = new_transformer(args.seed, config)
    transformer.pos_embed.freeze(keys="pos_embed", recurse=False)  # SD3's fixed sin-cos table
    if args.init is not None:
        transformer.update(load_mmdit(args.init, mx.float32).parameters())
    model = Conditioned(transformer, load_t5(args.model / "text_encoder_3", mx.float32))
    if args.frozen_t5:
        model.t5.freeze()
    rng = np.random.default_rng(args.seed)

    def batch(step: int) -> tuple:
        i = rng.choice(len(pixels), args.batch, replace=False)
        rows = np.where(rng.random(args.batch) < CFG_DROPOUT, empty, rows_of[i])
        rows, i = mx.array(rows), mx.array(i)
        x0 = latents[i]
        sigmas = sample_sigmas(mx.random.normal((args.batch,)), shift)
        return x0, mx.random.normal(x0.shape), sigmas, clip[rows], ids[rows], pooled[rows]

    ema = fit(model, model.loss, batch, args.steps, args.lr, warmup=args.warmup, ema_decay=0.995, log_every=25)
    model.update(ema)
    save_mmdit(args.model / "transformer", half(model.transformer))
    save_t5(args.model / "text_encoder_3", half(model.t5))
    (args.model / MANIFEST).write_text(json.dumps({"defaults": TEACHER_DEFAULTS}, indent=2))
    score = preview(args.model, args.preview, args.preview_prompts)
    print(f"preview: {score:.3f} of {args.preview_prompts} held-out prompts correct", flush=True)


if __name__ == "__main__":
    main()

"""Tiny random reference models in the real diffusers/transformers layouts, for parity tests.

Real weights cannot be downloaded here: these builders save small diffusers/transformers models with random
weights scaled up (so outputs are far from constant) with `save_pretrained`, next to real tokenizer files.
"""

from __future__ import annotations

import io
import json
import random
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from mlx_flash.tokenizer import read_clip_merges, write_clip_vocab

CLIP_VOCAB_SIZE = 49408
EXTRA_IDS = 100  # T5's sentinel tokens, appended to the SentencePiece vocabulary by transformers


def clip_vocab_files(folder: Path) -> tuple[Path, Path]:
    """Write the real CLIP BPE vocabulary (from the open_clip wheel) as vocab.json + merges.txt."""
    write_clip_vocab(folder, read_clip_merges())
    assert len(json.loads((folder / "vocab.json").read_text("utf-8"))) == CLIP_VOCAB_SIZE
    return folder / "vocab.json", folder / "merges.txt"


WORDS = ("a photo of the cat dog sitting on red blue green mat in front house tree sky beautiful landscape "
         "painting by artist digital art highly detailed portrait woman man city night lights river mountain "
         "snow winter summer castle dragon flying over ocean waves sunset golden hour cinematic lighting").split()


def train_spiece(folder: Path, vocab_size: int = 100) -> Path:
    """Train a small SentencePiece unigram model (pad 0, eos 1, unk 2, no bos) as folder/spiece.model."""
    import sentencepiece

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(2000)]
    lines += ["Café naïve résumé über straße 123 456 7890 ÀÉÎÕÜ !?,.;:'\" (hello) [world] {x} 5% $9 a-b"] * 5
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def randomize(model: torch.nn.Module, seed: int, std: float = 0.08,
              gains: Mapping[str, float] | None = None) -> torch.nn.Module:
    """Normal(0, std) weights, biases ~0.05, norm scales ~1 +- 0.1: outputs far from constant, norms sane.
    `gains` ({regex: factor}) multiplies the parameters whose names fully match a regex (first match)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            else:
                param.copy_(std * noise)
            gain = next((g for pattern, g in (gains or {}).items() if re.fullmatch(pattern, name)), 1.0)
            param.mul_(gain)
    return model.eval()


# Gains that make the end-to-end image depend on every module family (tests/test_hardening_sensitivity.py):
# with plain random weights, attention is near uniform and the text path barely reaches the image.
TRANSFORMER_GAINS = {
    r".*\.norm_(added_)?[qk]\.weight": 4.0,
    r".*norm1(_context)?\.linear\.weight": 3.0,
    r"norm_out\.linear\.weight": 3.0,
    r"context_embedder\.weight": 3.0,
    r"time_text_embed\.text_embedder\..*weight": 3.0,
}


def clip_config(kind: str, **overrides):
    """Tiny transformers CLIPTextConfig: "L" (quick_gelu) or "G" (gelu), with the real vocabulary size."""
    from transformers import CLIPTextConfig

    sizes = {"L": dict(hidden_size=32, intermediate_size=64, projection_dim=24, hidden_act="quick_gelu"),
             "G": dict(hidden_size=48, intermediate_size=96, projection_dim=40, hidden_act="gelu")}[kind]
    return CLIPTextConfig(**(dict(vocab_size=CLIP_VOCAB_SIZE, num_hidden_layers=3, num_attention_heads=4,
                                  max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
                             | sizes | overrides))


def t5_config(vocab_size: int, **overrides):
    """Tiny transformers T5Config of a T5 v1.1 encoder (gated tanh-gelu FFN); d_model 96 >= CLIP L + G widths."""
    from transformers import T5Config

    return T5Config(**(dict(vocab_size=vocab_size, d_model=96, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                            feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                            dropout_rate=0.0, tie_word_embeddings=False) | overrides))


def make_tiny_pipeline(path: Path, *, dual_attention_layers: tuple[int, ...] = (0,), qk_norm: str | None = "rms_norm",
                       seed: int = 0) -> Path:
    """Save a tiny random diffusers StableDiffusion3Pipeline (all components and tokenizers) under `path`, all
    written by diffusers' / transformers' own `save_pretrained`."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5Tokenizer,
    )

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:  # the hub's legacy files, read by transformers' tokenizers
        scratch = Path(scratch)
        clip_vocab_files(scratch / "clip")
        train_spiece(scratch / "t5")
        tokenizer = CLIPTokenizer.from_pretrained(scratch / "clip", model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(scratch / "clip", model_max_length=77, pad_token="!")
        tokenizer_3 = T5Tokenizer.from_pretrained(scratch / "t5", extra_ids=EXTRA_IDS)
    clip_l, clip_g = clip_config("L"), clip_config("G")
    t5 = t5_config(len(tokenizer_3))

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=t5.d_model, caption_projection_dim=24,
        pooled_projection_dim=clip_l.projection_dim + clip_g.projection_dim, pos_embed_max_size=16,
        dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), layers_per_block=1,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=1.5305, shift_factor=0.0609, sample_size=32)
    models = [transformer, vae, CLIPTextModelWithProjection(clip_l), CLIPTextModelWithProjection(clip_g),
              T5EncoderModel(t5)]
    for i, model in enumerate(models):
        randomize(model, seed + i, gains=TRANSFORMER_GAINS if model is transformer else None)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=models[2], tokenizer=tokenizer, text_encoder_2=models[3], tokenizer_2=tokenizer_2,
        text_encoder_3=models[4], tokenizer_3=tokenizer_3)
    pipe.save_pretrained(path)  # tokenizers as the installed transformers writes them (tokenizer.json only in 5.x)
    return path


CONTROLNET_KINDS = {  # tiny ControlNets for make_tiny_pipeline's transformer: InstantX, SD3.5 Large, inpainting
    "instantx": dict(pos_embed_max_size=16),
    "sd3.5-large": dict(joint_attention_dim=None, pos_embed_max_size=None, pos_embed_type=None, use_pos_embed=False,
                        force_zeros_for_pooled_projection=False),
    "inpainting": dict(pos_embed_max_size=16, extra_conditioning_channels=1),
}


def make_tiny_controlnet(path: Path, kind: str = "instantx", *, seed: int = 10, num_layers: int = 2) -> Path:
    """Save a tiny random diffusers SD3ControlNetModel fitting make_tiny_pipeline's transformer under `path`."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    model = SD3ControlNetModel(**(dict(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=3, joint_attention_dim=96, caption_projection_dim=24, pooled_projection_dim=64)
        | CONTROLNET_KINDS[kind]))
    randomize(model, seed)  # its zero-initialised projections made random too, so that they matter
    model.save_pretrained(path)
    return Path(path)

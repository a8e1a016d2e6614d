"""The demo models' prompt side: the real CLIP vocabulary, a small SentencePiece model trained on the
prompts, and tiny frozen random CLIP-L / CLIP-G / T5 encoders in the SD3 layout."""

from __future__ import annotations

import io
from pathlib import Path

import mlx.core as mx
import numpy as np
import sentencepiece

from mlx_flash.clip import CLIPConfig, CLIPTextModel, save_clip
from mlx_flash.quantization import quantized
from mlx_flash.t5 import T5Config, T5Encoder, load_t5, save_t5
from mlx_flash.text_encoders import TextEncoders
from mlx_flash.tokenizer import read_clip_merges, write_clip_vocab

from .common import half

CLIP_L = CLIPConfig(hidden_size=8, num_layers=2, num_heads=2, intermediate_size=32, projection_dim=32,
                    hidden_act="quick_gelu")
CLIP_G = CLIPConfig(hidden_size=8, num_layers=2, num_heads=2, intermediate_size=32, projection_dim=32,
                    hidden_act="gelu")
T5_WIDTH = 64  # = the transformer's joint_attention_dim; CLIP-L + CLIP-G widths are zero-padded to it
SPIECE_VOCAB = 128  # whole words: a digit prompt is at most 6 tokens, a shapes prompt at most 13


def write_spiece(folder: Path, lines: list[str]) -> int:
    """Train a SentencePiece model (pad 0, eos 1, unk 2, as T5's) on the prompts `lines`; returns its vocabulary
    size. BPE: a unigram model trained on so few sentences stays near the character level."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=SPIECE_VOCAB, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        normalization_rule_name="identity", minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return sentencepiece.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()


def write_text_encoders(root: Path, seed: int, lines: list[str]) -> None:
    """Tokenizers (SentencePiece trained on the prompts `lines`) and frozen random encoders (float16) under the
    model folder `root`, diffusers subfolders."""
    merges = read_clip_merges()
    write_clip_vocab(root / "tokenizer", merges, "<|endoftext|>")
    write_clip_vocab(root / "tokenizer_2", merges, "!")
    vocab = write_spiece(root / "tokenizer_3", lines)
    mx.random.seed(seed)
    save_clip(root / "text_encoder", half(CLIPTextModel(CLIP_L)))
    save_clip(root / "text_encoder_2", half(CLIPTextModel(CLIP_G)))
    t5 = T5Config(vocab_size=vocab, d_model=T5_WIDTH, d_kv=32, num_heads=2, d_ff=128, num_layers=2)
    save_t5(root / "text_encoder_3", half(T5Encoder(t5)))


def encode(root: Path, texts: list[str], max_sequence_length: int,
           bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt embeddings, pooled embeddings) of `texts` exactly as the pipeline computes them in float32,
    quantized to `bits` if given (which quantizes T5)."""
    loaders = {"text_encoder_3": lambda folder, dtype: quantized(load_t5(folder, dtype), bits)}
    encoders = TextEncoders(root, mx.float32, joint_attention_dim=T5_WIDTH, loaders=loaders)
    embeds, pooled, _, _ = encoders.encode(texts, do_cfg=False, max_sequence_length=max_sequence_length)
    return np.array(embeds), np.array(pooled)

"""Prompt encoding with SD3's three text encoders (diffusers' `StableDiffusion3Pipeline.encode_prompt`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import mlx.core as mx
import mlx.nn as nn

from .clip import load_clip
from .t5 import load_t5
from .tokenizer import CLIPTokenizer, T5Tokenizer

MAX_SEQUENCE_LENGTH = 512  # diffusers' limit for T5 tokens
LOADERS = {"text_encoder": load_clip, "text_encoder_2": load_clip, "text_encoder_3": load_t5}


def _prompt_list(prompt: str | Sequence[str], name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}.")
    return prompts


def _negative_list(negative_prompt: str | Sequence[str] | None, count: int) -> list[str]:
    """One negative prompt per prompt; None means ""."""
    negative = negative_prompt or ""
    negatives = [negative] * count if isinstance(negative, str) else _prompt_list(negative, "negative_prompt")
    if len(negatives) != count:
        raise ValueError(f"Got {len(negatives)} negative prompts for {count} prompts; "
                         "pass one negative prompt, or one per prompt.")
    return negatives


def join_encodings(clip_l: tuple[mx.array, mx.array], clip_g: tuple[mx.array, mx.array], t5: mx.array | None,
                   length: int, joint_attention_dim: int) -> tuple[mx.array, mx.array]:
    """SD3's conditioning from the encoders' outputs: (CLIP-L | CLIP-G tokens zero-padded to the T5 width, then
    the T5 tokens, or `length` zero tokens without T5), (pooled CLIP-L | CLIP-G)."""
    clip = mx.concatenate([clip_l[0], clip_g[0]], axis=-1)
    if t5 is None:
        t5 = mx.zeros((clip.shape[0], length, joint_attention_dim), clip.dtype)
    width = t5.shape[-1]
    if width != joint_attention_dim or clip.shape[-1] > width:
        raise ValueError(f"Text encoder widths (CLIP {clip.shape[-1]}, T5 {width}) do not fit the "
                         f"transformer's joint_attention_dim {joint_attention_dim}; check the model.")
    clip = mx.pad(clip, [(0, 0), (0, 0), (0, width - clip.shape[-1])])
    return mx.concatenate([clip, t5], axis=1), mx.concatenate([clip_l[1], clip_g[1]], axis=-1)


class TextEncoders:
    """CLIP-L, CLIP-G and (optionally) T5-XXL of a diffusers-layout model folder, each loaded when first used.

    `low_memory` loads, runs and frees each encoder in turn on every `encode` call, so no two encoders (and
    no encoder and the denoiser) are in memory together. Otherwise the encoders stay loaded until `release`.
    Without T5 (`use_t5=False`) it is never loaded and zeros of width `joint_attention_dim` (the
    transformer's) stand in for its output. `loaders` replaces the loader (folder, dtype) -> model of some
    encoders (e.g. to quantize them once loaded).
    """

    def __init__(self, root: str | Path, dtype: mx.Dtype | None = None, use_t5: bool = True,
                 low_memory: bool = False, joint_attention_dim: int = 4096,
                 loaders: Mapping[str, Callable[[Path, mx.Dtype | None], nn.Module]] | None = None):
        self.root = Path(root)
        self.dtype = dtype
        self.use_t5 = use_t5
        self.low_memory = low_memory
        self.loaders = {**LOADERS, **(loaders or {})}
        self.joint_attention_dim = joint_attention_dim
        self.clip_tokenizers = [CLIPTokenizer(self.root / "tokenizer"), CLIPTokenizer(self.root / "tokenizer_2")]
        self.t5_tokenizer = T5Tokenizer(self.root / "tokenizer_3") if use_t5 else None
        self._models: dict[str, nn.Module] = {}

    def release(self) -> None:
        """Free the loaded encoders."""
        self._models.clear()
        mx.clear_cache()

    def _run(self, name: str, fn: Callable[[nn.Module], list]) -> list:
        """`fn(encoder)` with the encoder in folder `name`, loading it if needed (and freeing it in low_memory)."""
        model = self._models[name] if name in self._models else self.loaders[name](self.root / name, self.dtype)
        outputs = fn(model)
        if self.low_memory:
            mx.eval(outputs)
            del model
            mx.clear_cache()
        else:
            self._models[name] = model
        return outputs

    def _clip(self, name: str, tokenize: CLIPTokenizer, groups: list) -> list[tuple[mx.array, mx.array]]:
        return self._run(name, lambda model: [model(tokenize(texts), clip_skip=skip) for texts, skip in groups])

    def _t5(self, groups: list, length: int) -> list[mx.array]:
        tokenize = self.t5_tokenizer
        return self._run("text_encoder_3", lambda model: [model(tokenize(texts, length)) for texts, _ in groups])

    def encode(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        do_cfg: bool = True,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 256,
        clip_skip: int | None = None,
    ) -> tuple[mx.array, mx.array, mx.array | None, mx.array | None]:
        """Encode prompts as SD3 conditioning.

        Returns (prompt_embeds (B, 77 + max_sequence_length, joint dim), pooled (B, 2 CLIP projections),
        negative_embeds, negative_pooled), B = len(prompts) * num_images_per_prompt; the negatives are None
        unless `do_cfg`. The negative prompt defaults to "" and, as in diffusers, ignores `clip_skip`.
        """
        prompts = _prompt_list(prompt, "prompt")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must be 1 to {MAX_SEQUENCE_LENGTH}, got {max_sequence_length}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}.")
        groups = [(prompts, clip_skip)]
        if do_cfg:
            groups.append((_negative_list(negative_prompt, len(prompts)), None))

        clip_l = self._clip("text_encoder", self.clip_tokenizers[0], groups)
        clip_g = self._clip("text_encoder_2", self.clip_tokenizers[1], groups)
        t5 = self._t5(groups, max_sequence_length) if self.use_t5 else [None] * len(groups)
        joined = [join_encodings(*parts, max_sequence_length, self.joint_attention_dim)
                  for parts in zip(clip_l, clip_g, t5)]
        outputs = [mx.repeat(x, num_images_per_prompt, axis=0) for pair in joined for x in pair]
        return tuple(outputs) if do_cfg else (*outputs, None, None)

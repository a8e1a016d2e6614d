"""Training data: a folder of captioned images, resized and cropped to size buckets, encoded once.

A folder holds images with captions beside them (`name.png` + `name.txt`) or a `metadata.jsonl` (one
`{"file_name": ..., "text": ...}` per line, the Hugging Face image-folder convention). Every image is read and
checked before anything is trained. The prompts are encoded with the model's text encoders, loaded, run and
freed one at a time (so T5 never shares memory with the transformer), and the images' VAE posteriors are
cached on disk, keyed by the file's contents, its bucket, the flip and the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from PIL import Image

from ..image_io import open_rgb
from ..layout import fingerprint
from ..quantization import quantized
from ..t5 import load_t5
from ..text_encoders import TextEncoders
from ..tokenizer import CLIPTokenizer
from ..vae import VAEConfig, load_vae

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("text", "caption", "prompt")
BUCKET_MULTIPLE = 16  # the VAE's factor times the patch size: every SD3 latent grid


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def read_folder(folder: str | Path) -> list[Example]:
    """The folder's images and captions; ValueError / FileNotFoundError with one line naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; pass a folder of images with captions.")
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        examples = _read_metadata(metadata)
    else:
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        examples = []
        for image in images:
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                raise ValueError(f"{image}: no caption; write it to {caption.name} beside the image, or list the "
                                 "images in a metadata.jsonl.")
            examples.append(Example(image, caption.read_text(encoding="utf-8").strip()))
    if not examples:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}); add images with captions.")
    for example in examples:
        check_image(example.image)
    return examples


def _read_metadata(path: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            name = entry["file_name"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: expected a JSON object with \"file_name\" and \"text\".") from None
        caption = next((entry[k] for k in CAPTION_KEYS if isinstance(entry.get(k), str)), None)
        if caption is None:
            raise ValueError(f"{path}:{number}: {name} has no caption; give it a \"text\" field.")
        image = path.parent / name
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{number}: {name} does not exist in {path.parent}.")
        examples.append(Example(image, caption.strip()))
    return examples


def check_image(path: Path) -> tuple[int, int]:
    """The image's (width, height), reading all of its pixels; ValueError naming the file if it cannot be."""
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path}: not a readable image ({err}); replace or remove it.") from None
    return open_rgb(path).size


def bucket(width: int, height: int, resolution: int, multiple: int = BUCKET_MULTIPLE) -> tuple[int, int]:
    """The training size (width, height) for an image: multiples of `multiple`, about resolution^2 pixels,
    the closest aspect ratio among the sizes from half to twice the resolution wide."""
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple}; use e.g. 512 or 1024.")
    sizes = []
    for w in range(max(multiple, resolution // 2 // multiple * multiple), 2 * resolution + 1, multiple):
        h = resolution * resolution // w // multiple * multiple
        if resolution // 2 <= h <= 2 * resolution:
            sizes.append((w, h))
    aspect = np.log(width / height)
    return min(sizes, key=lambda s: (abs(np.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def load_pixels(path: Path, size: tuple[int, int], flip: bool = False) -> np.ndarray:
    """The image scaled to cover `size` (width, height), centre-cropped to it, optionally mirrored:
    (height, width, 3) float32 in [-1, 1]."""
    image = open_rgb(path)
    w, h = size
    scale = max(w / image.width, h / image.height)
    resized = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (resized[0] - w) // 2, (resized[1] - h) // 2
    image = image.crop((left, top, left + w, top + h))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.float32) / 127.5 - 1


def _digest(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def _cached(path: Path, compute) -> dict[str, mx.array]:
    """The arrays stored at `path`, else computed, written (temporary name, renamed) and returned."""
    if path.is_file():
        return mx.load(str(path))
    arrays = compute()
    mx.eval(arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial.safetensors")
    mx.save_safetensors(str(temporary), arrays)
    temporary.replace(path)
    return arrays


def encode_prompts(root: Path, texts: Sequence[str], cache: Path, *, max_sequence_length: int,
                   joint_attention_dim: int, dtype: mx.Dtype, use_t5: bool = True,
                   quantize: int | None = None) -> tuple[mx.array, mx.array]:
    """(embeddings, pooled) of `texts` as the pipeline encodes them, each encoder loaded, run and freed."""
    key = _digest(list(texts), max_sequence_length, use_t5, quantize, str(dtype), fingerprint(root / "text_encoder"),
                  fingerprint(root / "text_encoder_3") if use_t5 else "")

    def compute() -> dict[str, mx.array]:
        loaders = {"text_encoder_3": lambda folder, d: quantized(load_t5(folder, d), quantize)}
        encoders = TextEncoders(root, dtype, use_t5=use_t5, low_memory=True, joint_attention_dim=joint_attention_dim,
                                loaders=loaders)
        embeds, pooled = [], []
        for i in range(0, len(texts), 16):
            e, p, _, _ = encoders.encode(list(texts[i : i + 16]), do_cfg=False,
                                         max_sequence_length=max_sequence_length)
            mx.eval(e, p)
            embeds.append(e)
            pooled.append(p)
        encoders.release()
        return {"embeds": mx.concatenate(embeds), "pooled": mx.concatenate(pooled)}

    arrays = _cached(cache / f"prompts-{key}.safetensors", compute)
    return arrays["embeds"], arrays["pooled"]


def encode_images(root: Path, images: Sequence[tuple[Path, tuple[int, int], bool]], cache: Path,
                  dtype: mx.Dtype) -> list[tuple[mx.array, mx.array]]:
    """The VAE posterior (mean, std) of each (image, size, flip) in the VAE's latent space, (H/8, W/8, C)
    float32; the VAE is loaded only if something is not cached, and freed."""
    vae_id = fingerprint(root / "vae")
    vae = None
    out = []
    for path, size, flip in images:
        key = _digest(path.read_bytes(), list(size), flip, vae_id, str(dtype))

        def compute() -> dict[str, mx.array]:
            nonlocal vae
            vae = vae or load_vae(root / "vae", dtype)
            mean, logvar = vae.encode(mx.array(load_pixels(path, size, flip))[None].astype(dtype))
            return {"mean": mean[0].astype(mx.float32), "logvar": logvar[0].astype(mx.float32)}

        arrays = _cached(cache / f"latents-{key}.safetensors", compute)
        out.append((arrays["mean"], mx.exp(0.5 * arrays["logvar"])))
    del vae
    mx.clear_cache()
    return out


@dataclass
class Dataset:
    """Encoded examples grouped by bucket: per example its posterior (mean, std) per flip, its prompt row."""

    sizes: list[tuple[int, int]]  # the bucket (width, height) of each example
    posteriors: list[list[tuple[mx.array, mx.array]]]  # [example][flip] -> (mean, std), VAE latent space
    rows: np.ndarray  # prompt row of each example in `prompts`
    # per prompt row: (embeds, pooled); or, for trained CLIP encoders, (T5 embeds, CLIP-L ids, CLIP-G ids)
    prompts: tuple[mx.array, ...]
    empty: int  # the row of the empty prompt (caption dropout)
    vae: VAEConfig

    def __len__(self) -> int:
        return len(self.sizes)

    def batch(self, rng: np.random.Generator, batch_size: int, caption_dropout: float = 0.0) -> tuple:
        """A random batch of one bucket: (x0 latents sampled from the posteriors, *its prompts' arrays). The bucket
        is drawn in proportion to its examples; its examples without replacement while they last."""
        buckets = sorted(set(self.sizes))
        members = [np.flatnonzero([s == b for s in self.sizes]) for b in buckets]
        chosen = members[rng.choice(len(buckets), p=[len(m) / len(self) for m in members])]
        picks = rng.choice(chosen, batch_size, replace=len(chosen) < batch_size)
        flips = rng.integers(len(self.posteriors[0]), size=batch_size)
        means = mx.stack([self.posteriors[i][f][0] for i, f in zip(picks, flips)])
        stds = mx.stack([self.posteriors[i][f][1] for i, f in zip(picks, flips)])
        x0 = self.vae.to_diffusion(means + stds * mx.array(rng.standard_normal(means.shape, dtype=np.float32)))
        rows = np.where(rng.random(batch_size) < caption_dropout, self.empty, self.rows[picks])
        rows = mx.array(rows)
        return (x0, *(p[rows] for p in self.prompts))


def build_dataset(root: Path, examples: Sequence[Example], cache: Path, *, resolution: int, flip: bool,
                  max_sequence_length: int, joint_attention_dim: int, dtype: mx.Dtype, use_t5: bool = True,
                  quantize_t5: int | None = None, clip_ids: bool = False) -> Dataset:
    """Encode `examples` (prompts first, then latents) into a Dataset, with cached results reused. `clip_ids`:
    keep the captions' CLIP token ids and only T5's part of the embeddings (the CLIP encoders are trained)."""
    captions = sorted({e.caption for e in examples} | {""})
    embeds, pooled = encode_prompts(root, captions, cache, max_sequence_length=max_sequence_length,
                                    joint_attention_dim=joint_attention_dim, dtype=dtype, use_t5=use_t5,
                                    quantize=quantize_t5)
    prompts = (embeds, pooled)
    if clip_ids:
        ids = [CLIPTokenizer(root / name)(captions) for name in ("tokenizer", "tokenizer_2")]
        prompts = (embeds[:, ids[0].shape[1]:], *ids)
    sizes = [bucket(*open_rgb(e.image).size, resolution) for e in examples]
    flips = (False, True) if flip else (False,)
    encoded = encode_images(root, [(e.image, s, f) for e, s in zip(examples, sizes) for f in flips], cache, dtype)
    posteriors = [encoded[i * len(flips) : (i + 1) * len(flips)] for i in range(len(examples))]
    vae = VAEConfig.from_dict(json.loads((root / "vae" / "config.json").read_text()))
    rows = np.array([captions.index(e.caption) for e in examples])
    return Dataset(sizes, posteriors, rows, prompts, captions.index(""), vae)

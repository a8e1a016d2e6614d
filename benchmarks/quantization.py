"""Quantization error and model sizes, as markdown tables.

    python benchmarks/quantization.py [--steps 4]

1. Error of a small random MMDiT-X (hidden 384, 6 layers, 3 dual-attention layers, qk-norm; the tiny test
   text encoders and VAE around it) quantized with each bits x group size x policy of mlx_flash.quantization
   (run dequantized: the same products as quantized matmuls, at BLAS speed):
   relative L2 error of the transformer output (one call, random inputs) and PSNR of the final image
   against the float32 model (same prompt and seed). Random weights lack the outliers of trained ones:
   read the numbers as relative, not as the error of a real model.
2. Bytes on disk of the full-size presets per component and precision, from the shapes of lazily built
   MLX models (nothing is allocated): 16-bit, and 8-/4-bit with the transformer and T5 quantized (CLIP
   and VAE stay 16-bit), plain and mixed policy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.common import preload_openblas  # noqa: E402

BITS = (3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
POLICIES = ("plain", "mixed")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def make_model_folder(folder: Path) -> Path:
    """The tiny test pipeline with a small-but-not-tiny random MMDiT-X transformer."""
    import shutil

    from diffusers import SD3Transformer2DModel
    from tiny import make_tiny_pipeline, randomize

    make_tiny_pipeline(folder)
    shutil.rmtree(folder / "transformer")
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=6, attention_head_dim=64,
        num_attention_heads=6, joint_attention_dim=96, caption_projection_dim=384, pooled_projection_dim=64,
        pos_embed_max_size=32, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")
    randomize(transformer, seed=1, std=0.05).save_pretrained(folder / "transformer")
    return folder


def dequantized(model):
    """`model` with every QuantizedLinear replaced by a Linear holding its dequantized weight: the same
    products as quantized matmuls (up to float rounding), at BLAS speed on the CPU."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path

    def swap(_, m):
        if not isinstance(m, nn.QuantizedLinear):
            return m
        linear = nn.Linear(1, 1, bias="bias" in m)
        linear.weight = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        if "bias" in m:
            linear.bias = m.bias
        return linear

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def error_tables(folder: Path, steps: int) -> str:
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    import mlx_flash
    from mlx_flash.mmdit import load_mmdit
    from mlx_flash.quantization import Quantization, quantize_model

    pipe = mlx_flash.load_pipeline(folder, dtype="float32", low_memory=False)
    weights = tree_flatten(pipe.transformer.parameters())
    key = iter(mx.random.split(mx.random.key(0), 3))
    inputs = (mx.random.normal((1, 32, 32, 16), key=next(key)), mx.array([500.0]),
              mx.random.normal((1, 154, 96), key=next(key)), mx.random.normal((1, 64), key=next(key)))
    run = dict(num_inference_steps=steps, guidance_scale=1.0, height=256, width=256, seed=0, output_type="np",
               max_sequence_length=64, progress=False)
    reference_out = pipe.transformer(*inputs)
    reference_image = pipe.generate(PROMPT, **run)

    def quantized(bits: int, group: int, policy: str):
        model = load_mmdit(folder / "transformer", mx.float32)
        model.load_weights(weights)
        quantize_model(model, Quantization(bits, group, policy))
        return model

    def relative_error(out: mx.array) -> float:
        return (mx.linalg.norm((out - reference_out).flatten()) / mx.linalg.norm(reference_out.flatten())).item()

    rows = {}
    for bits in BITS:
        for group in GROUP_SIZES:
            for policy in POLICIES:
                pipe._transformer = dequantized(quantized(bits, group, policy))
                mse = float(np.mean((pipe.generate(PROMPT, **run) - reference_image) ** 2))
                rows[bits, group, policy] = relative_error(pipe._transformer(*inputs)), 10 * np.log10(1 / mse)
    check = abs(relative_error(quantized(4, 64, "mixed")(*inputs)) - rows[4, 64, "mixed"][0])
    header = "| bits | " + " | ".join(f"g{g} {p}" for g in GROUP_SIZES for p in POLICIES) + " |"
    rule = "|---" * (1 + len(GROUP_SIZES) * len(POLICIES)) + "|"
    tables = []
    for title, column, fmt in (("Transformer output, relative L2 error", 0, "{:.4f}"),
                               (f"Final image ({steps} steps, 256x256), PSNR against float32 (dB)", 1, "{:.1f}")):
        lines = [f"**{title}**", "", header, rule]
        for bits in BITS:
            cells = [fmt.format(rows[bits, g, p][column]) for g in GROUP_SIZES for p in POLICIES]
            lines.append(f"| {bits} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    tables.append(f"(Quantized layers run dequantized, for speed; with quantized matmuls the 4-bit g64 mixed error "
                  f"differs by {check:.1e}.)")
    return "\n\n".join(tables)


def component_models(preset: str) -> dict:
    """Lazily built full-size MLX models (nothing is computed or allocated) of a preset's components."""
    from mlx_flash.clip import CLIP_G, CLIP_L, CLIPTextModel
    from mlx_flash.mmdit import MMDiT
    from mlx_flash.presets import PRESETS
    from mlx_flash.t5 import T5_XXL, T5Encoder
    from mlx_flash.vae import Autoencoder, VAEConfig

    return {"transformer": MMDiT(PRESETS[preset].transformer), "vae": Autoencoder(VAEConfig()),
            "text_encoder": CLIPTextModel(CLIP_L), "text_encoder_2": CLIPTextModel(CLIP_G),
            "text_encoder_3": T5Encoder(T5_XXL)}


QUANTIZED = ("transformer", "text_encoder_3")  # what `mlx-flash convert -q` quantizes
PRESETS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")


def stored_bytes(preset: str, dtype, bits: int | None, policy: str) -> dict[str, int]:
    """Bytes of each component as the converter stores it (the loaders' casting rules included: norms, and
    T5's `wo` in float16, stay float32), the transformer and T5 quantized to `bits` if given."""
    from mlx.utils import tree_flatten

    from mlx_flash.clip import clip_from_weights
    from mlx_flash.quantization import Quantization, quantize_model
    from mlx_flash.t5 import t5_from_weights
    from mlx_flash.vae import vae_from_weights
    from mlx_flash.weights import LAYOUT_KEY, load_into

    builders = {"vae": vae_from_weights, "text_encoder": clip_from_weights, "text_encoder_2": clip_from_weights,
                "text_encoder_3": t5_from_weights}
    sizes = {}
    for name, model in component_models(preset).items():
        settings = quantize_model(model, Quantization(bits, 64, policy)) if bits and name in QUANTIZED else None
        params = dict(tree_flatten(model.parameters()))
        if name == "transformer":
            stored = load_into(model, params, name, dtype)
        else:
            stored = builders[name]({**model.config.to_dict(), LAYOUT_KEY: 1, "quantization": settings}, params, dtype)
        sizes[name] = sum(v.nbytes for _, v in tree_flatten(stored.parameters()))  # from shapes: nothing computed
    return sizes


def size_table() -> str:
    import mlx.core as mx

    precisions = [("float16", mx.float16, None, "plain"), ("bfloat16", mx.bfloat16, None, "plain"),
                  ("8-bit", mx.bfloat16, 8, "plain"), ("4-bit plain", mx.bfloat16, 4, "plain"),
                  ("4-bit mixed", mx.bfloat16, 4, "mixed")]
    lines = ["**Size on disk (GB; 8-/4-bit: transformer and T5 quantized, group 64, bfloat16 scales)**", "",
             "| model | precision | transformer | VAE | CLIP-L + CLIP-G | T5-XXL | total | total without T5 |",
             "|---|---|---|---|---|---|---|---|"]
    for preset in PRESETS:
        for label, dtype, bits, policy in precisions:
            s = {k: v / 1e9 for k, v in stored_bytes(preset, dtype, bits, policy).items()}
            total = sum(s.values())
            lines.append(f"| {preset} | {label} | {s['transformer']:.2f} | {s['vae']:.2f} | "
                         f"{s['text_encoder'] + s['text_encoder_2']:.2f} | {s['text_encoder_3']:.2f} | {total:.2f} | "
                         f"{total - s['text_encoder_3']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the image comparison")
    args = parser.parse_args()
    preload_openblas()
    print(size_table(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        print("\n" + error_tables(make_model_folder(Path(tmp) / "model"), args.steps))


if __name__ == "__main__":
    main()

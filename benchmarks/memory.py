"""Measured peak memory of each pipeline stage against the estimator's prediction (mlx_flash.memory), for the
full-size SD3.5 Medium / Flash and SD3.5 Large / Large Turbo architectures with random weights, in float16
storage and 4-bit (mixed policy: transformer and T5), with and without T5, in low-memory mode, 4 steps without
CFG (the few-step defaults).

    python benchmarks/memory.py --device gpu [--size 1024] [--work /tmp/mlx-flash-memory] [--out benchmarks/results]
    python benchmarks/memory.py --report benchmarks/results/memory_gpu.json   # the table again, current estimator

Each (architecture, storage) pair is written once as a converted model folder (the text encoders are shared by
symlinks), then generated from in its own process; `Pipeline.stages` holds each stage's `mx.get_peak_memory`.
On the CPU backend activations are float32 and MLX's 4-bit matmul is slow (hours per 1024x1024 step): there,
run `--size 256`, and read the figures as an upper bound for Metal. Writes a markdown table and a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {"sd3.5-medium": "SD3.5 Medium / Flash", "sd3.5-large": "SD3.5 Large / Large Turbo"}
STORAGE = ("float16", "4-bit")
TARGETS_GB = {("sd3.5-medium", "4-bit", True): 3.5, ("sd3.5-medium", "4-bit", False): 2.5,
              ("sd3.5-large", "4-bit", True): 6.5, ("sd3.5-large", "4-bit", False): 6.5}


def write_tokenizers(root: Path) -> None:
    """Byte-level CLIP vocabularies and a small sentencepiece model: token ids only, enough to run."""
    import sentencepiece as spm

    from mlx_flash.tokenizer import write_clip_vocab

    write_clip_vocab(root / "tokenizer", merges=[])
    write_clip_vocab(root / "tokenizer_2", merges=[], pad_token="!")
    folder = root / "tokenizer_3"
    folder.mkdir()
    text = ["a photograph of an astronaut riding a horse on the moon"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(folder / "spiece"), vocab_size=40,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
                                   hard_vocab_limit=False)


def build(work: Path, arch: str, storage: str) -> Path:
    """A converted model folder with random weights (text encoders shared between folders)."""
    import mlx.core as mx

    from mlx_flash.clip import CLIP_G, CLIP_L, CLIPTextModel, save_clip
    from mlx_flash.mmdit import MMDiT, save_mmdit
    from mlx_flash.presets import PRESETS
    from mlx_flash.quantization import Quantization, quantize_model
    from mlx_flash.t5 import T5_XXL, T5Encoder, save_t5
    from mlx_flash.vae import Autoencoder, VAEConfig, save_vae

    quantization = Quantization(4) if storage == "4-bit" else None

    def save(model, writer, folder: Path, quantize: bool = False) -> None:
        model.set_dtype(mx.float16)
        entry = quantize_model(model, quantization) if quantize and quantization else None
        mx.eval(model.parameters())
        writer(folder, model, entry)
        mx.clear_cache()

    shared = work / f"encoders-{storage}"
    if not shared.exists():
        save(CLIPTextModel(CLIP_L), save_clip, shared / "text_encoder")
        save(CLIPTextModel(CLIP_G), save_clip, shared / "text_encoder_2")
        save(T5Encoder(T5_XXL), save_t5, shared / "text_encoder_3", quantize=True)
        save(Autoencoder(VAEConfig()), save_vae, shared / "vae")
        write_tokenizers(shared)
    root = work / f"{arch}-{storage}"
    if not root.exists():
        save(MMDiT(PRESETS[arch].transformer), save_mmdit, root / "transformer", quantize=True)
        for item in shared.iterdir():
            (root / item.name).symlink_to(item.resolve())
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
        (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    return root


def measure(folder: str, size: int, device: str, tiled: bool) -> dict:
    """Generate once with and once without T5; per-stage measured and predicted peaks in bytes."""
    import mlx.core as mx

    import mlx_flash

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    rows = {}
    for use_t5 in (True, False):
        pipe = mlx_flash.load_pipeline(folder, dtype="float16" if device == "gpu" else "float32", use_t5=use_t5,
                                       low_memory=True)
        pipe.vae_tiling = tiled or None
        pipe.generate("a photograph of an astronaut riding a horse", height=size, width=size, num_inference_steps=4,
                      guidance_scale=1.0, seed=0, progress=False)
        rows["t5" if use_t5 else "no-t5"] = {"measured": {s.name: s.peak_memory for s in pipe.stages}}
        del pipe
        mx.clear_cache()
    return rows


def predict(row: dict, size: int, device: str) -> dict:
    """The estimator's per-stage peaks for a row, as the pipeline predicts them for its model folder."""
    import mlx.core as mx

    from mlx_flash import memory
    from mlx_flash.presets import PRESETS
    from mlx_flash.quantization import Quantization, quantize_model
    from mlx_flash.t5 import T5_XXL
    from mlx_flash.vae import VAEConfig

    quantize = (lambda model: quantize_model(model, Quantization(4))) if row["storage"] == "4-bit" else None
    target = mx.gpu if device == "gpu" else mx.cpu
    dtype = mx.float16 if device == "gpu" else mx.float32
    stages = memory.estimate(
        PRESETS[row["arch"]].transformer, VAEConfig(), dtype=dtype,
        height=size, width=size, t5=T5_XXL if row["t5"] else None, quantize=quantize, quantize_t5=quantize,
        vae_tiled=VAEConfig().tiles(size // 8, size // 8, row["tiled"] or None, target), drop_modulation=True,
        device=target,
    )
    return {s.name: s.peak for s in stages}


def render(results: list[dict], size: int, device: str, out: Path) -> None:
    """Print and write the table (measured, and the current estimator's prediction) and the chart."""
    for row in results:
        row["predicted"] = predict(row, size, device)
    lines = [f"Peak memory at {size}x{size}, {device}, GB: measured (estimated)", "",
             "| model | storage | T5 | VAE | text encoders | transformer | VAE decoder | peak | estimate error | target |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m, p = r["measured"], r["predicted"]
        cells = " | ".join(f"{m[s] / 1e9:.2f} ({p[s] / 1e9:.2f})" for s in ("text encoders", "transformer", "vae decoder"))
        peak, guess = max(m.values()), max(p.values())
        target = TARGETS_GB.get((r["arch"], r["storage"], r["t5"]))
        lines.append(f"| {ARCHS[r['arch']]} | {r['storage']} | {'yes' if r['t5'] else 'no'} | "
                     f"{'tiled' if r['tiled'] else 'auto'} | {cells} | "
                     f"{peak / 1e9:.2f} | {100 * (guess - peak) / peak:+.1f}% | {f'<= {target}' if target else ''} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"memory_{device}.md").write_text(table + "\n")
    (out / f"memory_{device}.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "predicted"}
                                                          for r in results], indent=1))
    chart(results, out / f"memory_{device}.png")


def chart(results: list[dict], path: Path) -> None:
    """Grouped bars: measured peak per stage, with the prediction as a tick, per row."""
    from PIL import Image, ImageDraw

    stages = ["text encoders", "transformer", "vae decoder"]
    colors = [(66, 133, 244), (219, 68, 55), (244, 180, 0)]
    scale = 60  # pixels per GB
    top = max(max(r["measured"].values()) for r in results) / 1e9
    width, height, bar = 120 + 150 * len(results), int(top * scale) + 140, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    base = height - 90
    for gb in range(0, int(top) + 2):
        y = base - gb * scale
        draw.line([(60, y), (width - 10, y)], fill=(225, 225, 225))
        draw.text((20, y - 6), f"{gb} GB", fill="black")
    for i, row in enumerate(results):
        x0 = 80 + 150 * i
        for j, stage in enumerate(stages):
            x = x0 + j * (bar + 4)
            value, guess = row["measured"][stage] / 1e9, row["predicted"][stage] / 1e9
            draw.rectangle([x, base - value * scale, x + bar, base], fill=colors[j])
            draw.line([(x - 3, base - guess * scale), (x + bar + 3, base - guess * scale)], fill="black", width=2)
        for k, line in enumerate(row["label"].split("\n")):
            draw.text((x0, base + 8 + 14 * k), line, fill="black")
    for j, stage in enumerate(stages):
        draw.rectangle([80 + 150 * j, 10, 92 + 150 * j, 22], fill=colors[j])
        draw.text((98 + 150 * j, 10), stage, fill="black")
    draw.text((80 + 450, 10), "bars: measured peak, ticks: estimate", fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default="gpu")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--storage", nargs="+", choices=STORAGE, default=list(STORAGE))
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlx-flash-memory"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tiled-vae", choices=["auto", "4-bit", "all"], default="4-bit",
                        help="rows that decode in tiles (default: the 4-bit rows, as on a small Mac)")
    parser.add_argument("--report", nargs="+", type=Path, help="re-render saved measurements (JSON) with the "
                        "current estimator instead of measuring")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.size, args.device, args.tiled_vae == "all")))
        return
    if args.report:
        render([row for path in args.report for row in json.loads(path.read_text())], args.size, args.device, args.out)
        return

    results = []
    for arch in args.archs:
        for storage in args.storage:
            folder = build(args.work, arch, storage)
            tiled = args.tiled_vae == "all" or (args.tiled_vae == "4-bit" and storage == "4-bit")
            out = subprocess.run([sys.executable, __file__, "--measure", str(folder), "--size", str(args.size),
                                  "--device", args.device, "--tiled-vae", "all" if tiled else "auto"],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            for t5, row in json.loads(out.strip().splitlines()[-1]).items():
                label = f"{ARCHS[arch].split(' /')[0]}\n{storage}, {'with' if t5 == 't5' else 'no'} T5"
                results.append({"arch": arch, "storage": storage, "t5": t5 == "t5", "tiled": tiled, "label": label,
                                **row})
            shutil.rmtree(folder)
    render(results, args.size, args.device, args.out)


if __name__ == "__main__":
    main()

"""End-to-end generation with an SD3.5 Medium-shaped pipeline (random weights, float32): text encoding, the
denoising steps and the VAE decode, mlx-flash's Pipeline against diffusers' StableDiffusion3Pipeline in the same run.

    python benchmarks/generate.py [--size 512] [--steps 4] [--layers N] [--rounds 1] [--device cpu|gpu]

The model: SD3.5 Medium's transformer (its width, heads, qk norm and dual-attention layers) with its first N blocks
(default: as many of the 24 as fit in half the available memory, said in the header), the full-size CLIP-L, CLIP-G
and VAE, and no T5 (both pipelines then use zeros for its 256 tokens: T5-XXL alone is 18.5 GB in float32), written
once by diffusers' own `save_pretrained` into a temporary folder with the real CLIP vocabulary. Both generate one
image from the same prompt without CFG (guidance 1, the few-step setting), float32, untiled decode.
Each framework runs in its own process: it loads the folder, makes one warm-up image at 128x128 in 1 step, then
the timed one; times exclude loading. Frameworks alternate `--rounds` times; the load average of the machine is
printed beside each row. On Linux the script re-executes itself with OpenBLAS preloaded for MLX (mlx_flash.blas);
the diffusers process keeps PyTorch's own BLAS. The last line is the ratio of MLX's best total to diffusers'.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.common import load_average, preload_openblas, run_part  # noqa: E402
from mlx_flash.presets import SD35_MEDIUM  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting"
BLOCK_BYTES = 4 * 101_500_000  # one float32 SD3.5 Medium block (a dual-attention one; the others have 54M weights)
FIXED_BYTES = 4 * (19_500_000 + 123_000_000 + 695_000_000 + 84_000_000)  # the transformer's rest, CLIP-L, -G, VAE


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62


def make_folder(folder: Path, layers: int) -> None:
    """Write the random diffusers pipeline (see the module docstring) to `folder`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tiny import clip_vocab_files
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from mlx_flash.clip import CLIP_G, CLIP_L
    from mlx_flash.vae import VAEConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        vocab = Path(scratch)
        clip_vocab_files(vocab)
        tokenizer = CLIPTokenizer.from_pretrained(vocab, model_max_length=77)
        tokenizer_2 = CLIPTokenizer.from_pretrained(vocab, model_max_length=77, pad_token="!")
    config = SD35_MEDIUM.to_diffusers() | {"num_layers": layers}
    config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < layers)
    vae = VAEConfig()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**config),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=vae.block_out_channels, layers_per_block=2, latent_channels=16,
            scaling_factor=vae.scaling_factor, shift_factor=vae.shift_factor, use_quant_conv=False,
            use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L.to_dict())), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G.to_dict())), tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(folder)


def run_mlx(folder: str, size: int, steps: int, device: str) -> dict:
    import mlx.core as mx

    import mlx_flash

    mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
    pipe = mlx_flash.load_pipeline(folder, dtype="float32", use_t5=False, low_memory=False)
    kwargs = dict(guidance_scale=1.0, seed=0, progress=False, output_type="np")
    pipe.generate(PROMPT, height=128, width=128, num_inference_steps=1, **kwargs)
    start = time.perf_counter()
    pipe.generate(PROMPT, height=size, width=size, num_inference_steps=steps, **kwargs)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "stages": {s.name: s.seconds for s in pipe.stages}}


def run_diffusers(folder: str, size: int, steps: int, device: str) -> dict:
    import torch
    from diffusers import StableDiffusion3Pipeline

    device = "cuda" if device == "gpu" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    stages = {"text encoders": 0.0, "vae decoder": 0.0}

    def timed(fn, name):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            stages[name] += time.perf_counter() - start
            return out
        return call

    pipe.encode_prompt = timed(pipe.encode_prompt, "text encoders")
    pipe.vae.decode = timed(pipe.vae.decode, "vae decoder")
    kwargs = dict(guidance_scale=1.0, output_type="np")
    with torch.inference_mode():
        pipe(PROMPT, height=128, width=128, num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs)
        stages = dict.fromkeys(stages, 0.0)
        sync()
        start = time.perf_counter()
        pipe(PROMPT, height=size, width=size, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
             **kwargs)
        sync()
        seconds = time.perf_counter() - start
    stages["transformer"] = seconds - sum(stages.values())
    return {"seconds": seconds, "stages": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: what fits, at most 24)")
    parser.add_argument("--rounds", type=int, default=1, help="times each framework runs, alternately")
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: Metal/CUDA MLX and CUDA torch")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        if args.part == "make":
            make_folder(Path(args.folder), args.layers)
            print("{}")
            return
        run = run_mlx if args.part == "mlx" else run_diffusers
        print(json.dumps(run(args.folder, args.size, args.steps, args.device)))
        return
    if args.device == "cpu":
        preload_openblas()
    budget = available_memory() / 2 - FIXED_BYTES
    layers = args.layers or max(1, min(SD35_MEDIUM.num_layers, int(budget / BLOCK_BYTES)))
    print(f"SD3.5 Medium-shaped pipeline ({layers} of 24 transformer blocks, CLIP-L, CLIP-G, VAE; no T5), random "
          f"weights, float32, {args.device}: one {args.size}x{args.size} image, {args.steps} steps, no CFG\n")
    print("| framework | total (s) | text encoders (s) | transformer (s) | VAE decode (s) | load average |")
    print("|---|---|---|---|---|---|")
    best = {}
    with tempfile.TemporaryDirectory() as folder:
        run_part(__file__, "make", "--folder", folder, "--layers", str(layers))
        extra = ["--folder", folder, "--size", str(args.size), "--steps", str(args.steps), "--device", args.device]
        for _ in range(args.rounds):
            for framework in ("mlx", "diffusers"):
                r = run_part(__file__, framework, *extra)
                best[framework] = min(best.get(framework, float("inf")), r["seconds"])
                s = r["stages"]
                print(f"| {framework} | {r['seconds']:.2f} | {s['text encoders']:.2f} | {s['transformer']:.2f} | "
                      f"{s['vae decoder']:.2f} | {load_average()} |", flush=True)
    print(f"ratio: {best['mlx'] / best['diffusers']:.2f}")


if __name__ == "__main__":
    main()

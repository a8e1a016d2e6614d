"""Per-step cost of unfused LoRAs on the full-size SD3.5 Medium transformer (random weights), MLX against diffusers
+ peft in the same run: one step without LoRA, with 1 and 2 LoRAs of rank 16 and of rank 64 (every linear layer
the issue's parity tests target), and the time to load one LoRA file onto the model.

    python benchmarks/lora.py [--size 512] [--layers 24] [--repeats 2] [--device cpu|gpu] [--dtype float32]
                              [--no-reference] [--cpu-time]

The LoRA files (diffusers naming, random adapters) are written to a temporary folder first. Each framework runs in
its own process; on Linux the script re-executes itself with OpenBLAS preloaded (REFERENCE.md, Linux CPU note).
Overhead = step time with the LoRAs / step time without - 1; the target is <= 5% per LoRA. Below the table, each
rank's floor: one LoRA's multiply-adds over the step's (`adapter_share`). Every LoRA is attached
once; a case switches scales (MLX: the others at 0, which skips them; diffusers: `set_adapters`, or
`disable_adapters` for none), and the cases are timed in turn `--repeats` times after a warm-up round, so that a
change in the machine's load falls on all cases alike. A case's time is the sum of each block's best time over its
runs plus the best of the rest of the step (benchmarks.common.PieceClock): this machine's speed drops by a quarter
or more for a second or two at a time, more often than once per step. `--layers N` keeps the first N blocks (all
blocks are alike, so the overhead hardly changes) for a machine without the time or the memory for the full model.
The header gives the load average at the end. `--cpu-time`, for a loaded shared machine whose wall times vary more
than the overheads: one BLAS thread per framework, each step timed by its process's CPU time. The last line is the
MLX step time with one rank-16 LoRA over diffusers'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    CONTEXT_TOKENS, PieceClock, best_of_pieces, load_average, preload_openblas, run_part, time_mlx_blocks,
    time_torch_blocks,
)
from benchmarks.mmdit_step import flops, image_tokens, step_matmuls  # noqa: E402
from mlx_flash.presets import SD35_MEDIUM  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
           "norm1_context.linear", "norm_out.linear", "proj_out")
CASES = [(), (16,), (16, 16), (64,), (64, 64)]  # the ranks of the LoRAs of each timed case


def model_config(layers: int):
    """SD3.5 Medium with its first `layers` blocks."""
    return replace(SD35_MEDIUM, num_layers=layers,
                   dual_attention_layers=tuple(i for i in SD35_MEDIUM.dual_attention_layers if i < layers))


def targeted_layers(layers: int) -> list[tuple[str, int, int]]:
    """(diffusers name, out, in) of every linear layer a LoRA of this benchmark adapts."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**model_config(layers).to_diffusers())
    return [(name, *module.weight.shape) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS)]


def write_lora(path: Path, rank: int, seed: int, adapted: list[tuple[str, int, int]]) -> None:
    """A diffusers-named LoRA of `rank` on the `adapted` layers (`targeted_layers`), small random values."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, out, inputs in adapted:
        for matrix, shape in (("lora_A", (rank, inputs)), ("lora_B", (out, rank))):
            tensors[f"transformer.{name}.{matrix}.weight"] = (0.01 * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, str(path))


def adapter_share(rank: int, size: int, layers: int, adapted: list[tuple[str, int, int]]) -> float:
    """One LoRA's multiply-adds in a step of the model's first `layers` blocks (rank x (in + out) per token of each
    of the `adapted` layers) over the step's own (`mmdit_step.step_matmuls`). Were the adapters' matmuls as fast as
    the step's, the LoRA would cost this times the matmuls' share of the step's time."""

    def tokens(name: str) -> int:
        """The rows a layer multiplies: adaLN's (norm*.linear) one vector, add_* / *_context's the prompt's."""
        if name.endswith(".linear"):
            return 1
        return CONTEXT_TOKENS if "add_" in name or "context" in name else image_tokens(size)

    adapters = sum(tokens(name) * rank * (out + inputs) for name, out, inputs in adapted)
    step = flops(step_matmuls(size, 1, per_head=True, layers=layers)) / 2
    return adapters / step


FILES = [(16, 0), (16, 1), (64, 0), (64, 1)]  # (rank, index) of the LoRA files written


def _file(folder: str, rank: int, index: int) -> Path:
    return Path(folder) / f"rank{rank}-{index}.safetensors"


def _active(ranks: tuple[int, ...]) -> list[bool]:
    """Which of FILES a case uses: its first LoRA of each rank, then the second."""
    return [(rank, index) in {(r, ranks[:i].count(r)) for i, r in enumerate(ranks)} for rank, index in FILES]


def case_times(step: Callable[[], object], select: Callable[[tuple[int, ...]], object], clock: PieceClock,
               repeats: int) -> dict[str, float]:
    """Time of `step()` per case of CASES ("none", "16", "16+16", ...), `select(ranks)` switching to the case:
    the cases in turn, one warm-up round and `repeats` timed ones, each case's estimate `best_of_pieces` of its
    runs (the model's blocks timed by `clock`)."""
    runs: dict[str, list] = {}
    for round in range(repeats + 1):
        for ranks in CASES:
            select(ranks)
            result = clock.run(step)
            if round:
                runs.setdefault("+".join(map(str, ranks)) or "none", []).append(result)
    return {case: best_of_pieces(r) for case, r in runs.items()}


def _clock(args) -> PieceClock:
    return PieceClock(time.process_time if args.cpu_time else time.perf_counter)


def mlx_part(args) -> dict:
    import mlx.core as mx

    from mlx_flash import lora
    from mlx_flash.mmdit import MMDiT

    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    dtype = getattr(mx, args.dtype)
    model = MMDiT(model_config(args.layers))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    h = args.size // 8
    inputs = (
        mx.random.normal((1, h, h, 16)).astype(dtype), mx.full((1,), 500.0),
        mx.random.normal((1, CONTEXT_TOKENS, 4096)).astype(dtype), mx.random.normal((1, 2048)).astype(dtype),
    )
    start = time.perf_counter()
    loras = [lora.read_lora(_file(args.folder, *FILES[0]))]
    scales = lora.LoRAScales([0.0] * len(FILES))
    lora.apply_loras(model, "transformer", loras, scales)
    mx.eval(model.parameters())
    load = time.perf_counter() - start
    loras += [lora.read_lora(_file(args.folder, *f)) for f in FILES[1:]]
    lora.apply_loras(model, "transformer", loras, scales)  # the first again: the same adapters at position 0
    mx.eval(model.parameters())

    def select(ranks):
        scales.values[:] = [float(on) for on in _active(ranks)]

    clock = _clock(args)
    time_mlx_blocks(model.transformer_blocks, clock)
    return {"steps": case_times(lambda: mx.eval(model(*inputs)), select, clock, args.repeats), "load_s": load}


def torch_part(args) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    device, dtype = ("cuda" if args.device == "gpu" else "cpu"), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    with torch.device("meta"):
        model = SD3Transformer2DModel(**model_config(args.layers).to_diffusers())
    model = model.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    h = args.size // 8
    inputs = dict(
        hidden_states=randn(1, 16, h, h), timestep=torch.full((1,), 500.0, device=device),
        encoder_hidden_states=randn(1, CONTEXT_TOKENS, 4096), pooled_projections=randn(1, 2048),
    )

    def step():
        with torch.inference_mode():
            model(**inputs)
        sync()

    load = 0.0
    for i, f in enumerate(FILES):
        start = time.perf_counter()
        state, metadata = StableDiffusion3Pipeline.lora_state_dict(str(_file(args.folder, *f)),
                                                                   return_lora_metadata=True)
        StableDiffusion3Pipeline.load_lora_into_transformer(state, model, adapter_name=f"l{i}", metadata=metadata)
        load = load or time.perf_counter() - start

    def select(ranks):
        names = [f"l{i}" for i, on in enumerate(_active(ranks)) if on]
        if not names:
            model.disable_adapters()
            return
        model.enable_adapters()
        model.set_adapters(names, [1.0] * len(names))

    clock = _clock(args)
    time_torch_blocks(model.transformer_blocks, clock, sync)
    return {"steps": case_times(step, select, clock, args.repeats), "load_s": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--layers", type=int, default=24, help="blocks of the model (default 24: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: Metal/CUDA MLX and CUDA torch")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--no-reference", action="store_true", help="time MLX only")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one BLAS thread each, timed by the process's CPU time (a loaded, shared machine)")
    parser.add_argument("--part", choices=["mlx", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps((mlx_part if args.part == "mlx" else torch_part)(args)))
        return
    if args.cpu_time:  # before OpenBLAS (re-executing with it preloaded) and PyTorch start their threads
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    if args.device == "cpu":
        preload_openblas()
    adapted = targeted_layers(args.layers)
    with tempfile.TemporaryDirectory() as folder:
        for rank, index in FILES:
            write_lora(_file(folder, rank, index), rank, seed=10 * index + rank, adapted=adapted)
        extra = ["--size", str(args.size), "--layers", str(args.layers), "--repeats", str(args.repeats),
                 "--device", args.device, "--dtype", args.dtype, "--folder", folder] + ["--cpu-time"] * args.cpu_time
        names = ("mlx",) if args.no_reference else ("mlx", "diffusers")
        results = {name: run_part(__file__, name, *extra) for name in names}
    blocks = "" if args.layers == SD35_MEDIUM.num_layers else f" (its first {args.layers} blocks)"
    print(f"SD3.5 Medium transformer{blocks}, one step, {args.size}x{args.size}, {args.dtype}, {args.device}; "
          f"unfused LoRAs on {len(TARGETS)} kinds of linear layer; "
          f"{'CPU time, one BLAS thread' if args.cpu_time else 'wall time'}, load average {load_average()}")
    print(f"{'LoRA ranks':12}" + "".join(f"{name + ' s':>12}{'overhead':>10}" for name in results))
    for case in results["mlx"]["steps"]:
        row = f"{case:12}"
        for r in results.values():
            step, base = r["steps"][case], r["steps"]["none"]
            row += f"{step:12.3f}{100 * (step / base - 1):9.1f}%"
        print(row)
    print("one LoRA's multiply-adds over the step's (x the matmuls' share of the step: its cost at their speed): "
          + ", ".join(f"rank {rank} {100 * adapter_share(rank, args.size, args.layers, adapted):.1f}%"
                      for rank in sorted({r for case in CASES for r in case})))
    print("load one rank-16 LoRA: " + ", ".join(f"{name} {r['load_s']:.2f} s" for name, r in results.items()))
    if "diffusers" in results:
        print(f"ratio: {results['mlx']['steps']['16'] / results['diffusers']['steps']['16']:.2f}")
    else:
        print(f"ratio: {results['mlx']['steps']['16'] / results['mlx']['steps']['none']:.3f}")


if __name__ == "__main__":
    main()

"""The README.md model card of a converted folder, from its manifest."""

from __future__ import annotations

COMPONENT_NAMES = {
    "transformer": "MMDiT transformer",
    "vae": "VAE",
    "text_encoder": "CLIP-L text encoder",
    "text_encoder_2": "CLIP-G text encoder",
    "text_encoder_3": "T5-XXL text encoder",
}


def describe_source(origin: dict) -> str:
    """Markdown for where the weights came from."""
    if "repo" in origin:
        text = f"[{origin['repo']}](https://huggingface.co/{origin['repo']}) (commit `{origin['commit']}`)"
    elif "file" in origin:
        text = f"the single-file checkpoint `{origin['file']}`"
    else:
        text = "a local diffusers-layout folder"
    if "base" in origin:
        text += f", completed from {describe_source(origin['base'])}"
    if "encoder_files" in origin:
        text += " and the text encoder files " + ", ".join(f"`{f}`" for f in origin["encoder_files"].values())
    return text


def _precision(entry: dict) -> str:
    q = entry["quantization"]
    if not q:
        return entry["dtype"]
    return f"{q['bits']}-bit (group {q['group_size']}, {q['policy']} policy), {entry['dtype']} scales"


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def model_card(manifest: dict, name: str) -> str:
    """README.md for a converted model that loads as `name` (a hub repo id or a folder name)."""
    origin = manifest["source"]
    repo = origin.get("repo") or origin.get("base", {}).get("repo")
    front = ["---", "library_name: mlx", "pipeline_tag: text-to-image", "license: other",
             "tags: [mlx, mlx-flash, stable-diffusion, sd3, text-to-image]"]
    if repo:
        front.append(f"base_model: {repo}")
    rows = "\n".join(f"| {COMPONENT_NAMES[c]} | {_precision(e)} | {_size(e['bytes'])} |"
                     for c, e in manifest["components"].items())
    licence = (f"the licence of [{repo}](https://huggingface.co/{repo}) (see its model card and LICENSE file)"
               if repo else "the licence of the model it was converted from")
    t5 = "" if manifest["t5"] else "\nT5-XXL is not included: prompts are encoded by the two CLIP models only.\n"
    return "\n".join(front + ["---", ""]) + f"""
# {name}

Stable Diffusion 3 / 3.5 weights for [MLX](https://github.com/ml-explore/mlx), converted with mlx-flash
{manifest['mlx_flash_version']} from {describe_source(origin)}. The tensors are in MLX names and layouts, so
they load without re-mapping; quantized components load quantized.

| component | precision | size |
|---|---|---|
{rows}
{t5}
## Licence

This is a format conversion of another model's weights; they remain under {licence}. Use them only as that
licence allows.

## Use

```bash
pip install mlx-flash
mlx-flash generate "a lighthouse at dusk, oil painting" --model {name}
```

```python
from mlx_flash import load_pipeline

pipe = load_pipeline("{name}")
pipe.generate("a lighthouse at dusk, oil painting", seed=0)[0].save("lighthouse.png")
```

`mlx_flash.json` records the source (and its commit), the precision of each component and the versions used.
"""

"""`mlx-flash generate` with ControlNets, masks and outpainting: the settings in the PNG, `--from` reproducing the
pixels, and one clear line for bad input."""

import logging

import numpy as np
import pytest
import torch
from diffusers import SD3ControlNetModel
from PIL import Image, ImageDraw
from tiny import make_tiny_controlnet, randomize

from mlx_flash import cli
from mlx_flash.image_io import read_metadata

BASE = ["--steps", "2", "--guidance", "2.0", "--seed", "3", "--dtype", "float32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_cli")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((64, 48)).save(root / "photo.png")
    mask = Image.new("L", (64, 48))
    ImageDraw.Draw(mask).rectangle((0, 24, 64, 48), fill=255)
    mask.save(root / "mask.png")
    Image.new("L", (64, 48)).save(root / "empty.png")
    mask.resize((32, 24)).save(root / "small_mask.png")
    (root / "notes.png").write_text("not an image")
    (root / "prompts.txt").write_text("a cat\n")
    make_tiny_controlnet(root / "controlnet", "instantx")
    torch.manual_seed(0)
    wide = SD3ControlNetModel(sample_size=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                              joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
                              pos_embed_max_size=16)
    randomize(wide, 0).save_pretrained(root / "wide_controlnet")
    return root


def generate(capsys, *args) -> tuple[int, str]:
    code = cli.main(["generate", *map(str, args)])
    return code, capsys.readouterr().err


def test_controlnet_settings_and_from(tiny_pipeline_dir, files, tmp_path, capsys):
    out, again = tmp_path / "cat.png", tmp_path / "again.png"
    code, err = generate(capsys, "a cat", "--model", tiny_pipeline_dir, *BASE, "--controlnet",
                         f"{files / 'controlnet'}:0.7", "--control-image", files / "photo.png", "--control-type",
                         "canny", "--control-end", "0.5", "--output", out)
    assert code == 0, err
    meta = read_metadata(out)
    assert meta["controlnets"] == [{"name": str(files / "controlnet"), "scale": 0.7}]
    assert (meta["control_type"], meta["control_start"], meta["control_end"]) == ("canny", [0.0], [0.5])
    assert Image.open(out).size == (64, 48)  # the control image's size
    code, err = generate(capsys, "--from", out, "--output", again)
    assert code == 1 and "pass it again with --control-image" in err
    code, err = generate(capsys, "--from", out, "--control-image", files / "photo.png", "--output", again)
    assert code == 0, err
    assert Image.open(again).tobytes() == Image.open(out).tobytes()


def test_inpaint_and_outpaint_settings_and_from(tiny_pipeline_dir, files, tmp_path, capsys, caplog):
    out, again = tmp_path / "inpaint.png", tmp_path / "again.png"
    with caplog.at_level(logging.INFO, logger="mlx_flash"):
        code, err = generate(capsys, "a dog", "--model", tiny_pipeline_dir, *BASE, "--image", files / "photo.png",
                             "--mask", files / "small_mask.png", "--mask-blur", "2", "--strength", "0.8",
                             "--output", out)
    assert code == 0, err
    assert "the mask is 32x24, the image 64x48: the mask is resized" in caplog.text
    meta = read_metadata(out)
    assert (meta["mask_blur"], meta["strength"], len(meta["mask_sha256"])) == (2.0, 0.8, 64)
    code, err = generate(capsys, "--from", out, "--image", files / "photo.png", "--output", again)
    assert code == 1 and "--mask" in err
    code, err = generate(capsys, "--from", out, "--image", files / "photo.png", "--mask", files / "small_mask.png",
                         "--output", again)
    assert code == 0, err
    assert Image.open(again).tobytes() == Image.open(out).tobytes()

    wider = tmp_path / "wider.png"
    code, err = generate(capsys, "a dog", "--model", tiny_pipeline_dir, *BASE, "--image", files / "photo.png",
                         "--outpaint", "16,0,16,16", "--output", wider)
    assert code == 0, err
    assert Image.open(wider).size == (96, 64)
    assert (read_metadata(wider)["outpaint"], read_metadata(wider)["strength"]) == ([16, 0, 16, 16], 1.0)
    code, err = generate(capsys, "--from", wider, "--image", files / "photo.png", "--output", again, "--force")
    assert code == 0, err
    assert Image.open(again).tobytes() == Image.open(wider).tobytes()


BAD = [
    (["--image", "{photo}", "--mask", "{notes}"], "not an image file PIL can read"),
    (["--image", "{photo}", "--mask", "{empty}"], "the mask is empty"),
    (["--image", "{photo}", "--mask", "{missing}"], "no such image file"),
    (["--mask", "{mask}"], "mask needs the image to paint in"),
    (["--image", "{photo}", "--outpaint", "16,0,x,0"], "--outpaint must be comma-separated numbers"),
    (["--image", "{photo}", "--outpaint", "16,0,16"], "four pixel counts"),
    (["--control-image", "{photo}"], "control_image needs a ControlNet"),
    (["--controlnet", "{controlnet}"], "no control image"),
    (["--controlnet", "{controlnet}", "--control-image", "{photo}", "--control-start", "0.6", "--control-end", "0.4"],
     "must be below control_end"),
    (["--controlnet", "{wide}", "--control-image", "{photo}"], "a ControlNet for another architecture"),
    (["--controlnet", "{transformer}", "--control-image", "{photo}"], "is this an SD3 / SD3.5 ControlNet"),
    (["--controlnet", "{photo}", "--control-image", "{photo}"], "not a readable safetensors file"),
    (["--prompt-file", "{prompts}", "--mask", "{mask}"], "--prompt-file does not take --mask"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_input_gives_one_clear_line(tiny_pipeline_dir, files, tmp_path, capsys, extra, message):
    names = dict(photo=files / "photo.png", notes=files / "notes.png", empty=files / "empty.png",
                 missing=files / "missing.png", mask=files / "mask.png", controlnet=files / "controlnet",
                 wide=files / "wide_controlnet", transformer=tiny_pipeline_dir / "transformer",
                 prompts=files / "prompts.txt")
    prompt = [] if "--prompt-file" in extra else ["a cat"]
    code, err = generate(capsys, *prompt, "--model", tiny_pipeline_dir, "--steps", "1",
                         *[e.format(**names) for e in extra], "--output", tmp_path / "o.png")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o.png").exists()

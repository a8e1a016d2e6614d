"""Tokenizer folders as transformers 5 `save_pretrained` writes them (tokenizer.json only) load, with the same
ids as the legacy files; broken tokenizer files are refused in one line naming the file (issue #12, item 1)."""

import json
import logging
import shutil

import pytest
from test_tokenizer import PROMPTS
from tiny import EXTRA_IDS, clip_vocab_files, train_spiece
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers import T5Tokenizer as HFT5Tokenizer

from mlx_flash.tokenizer import CLIPTokenizer, T5Tokenizer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Legacy folders (vocab.json + merges.txt, spiece.model) and the same tokenizers re-saved by transformers."""
    root = tmp_path_factory.mktemp("tokenizers")
    clip_vocab_files(root / "clip")
    shutil.copytree(root / "clip", root / "clip_pad")
    (root / "clip_pad" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!"}))
    train_spiece(root / "t5")
    HFCLIPTokenizer.from_pretrained(root / "clip", model_max_length=77).save_pretrained(root / "clip_json")
    HFCLIPTokenizer.from_pretrained(root / "clip", model_max_length=77, pad_token="!").save_pretrained(
        root / "clip_pad_json")
    HFT5Tokenizer.from_pretrained(root / "t5", extra_ids=EXTRA_IDS).save_pretrained(root / "t5_json")
    return root


def test_save_pretrained_writes_only_tokenizer_json(folders, tiny_pipeline_dir):
    for folder in (folders / "clip_json", folders / "t5_json", *tiny_pipeline_dir.glob("tokenizer*")):
        assert sorted(p.name for p in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"], folder


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_tokenizer_json_ids_equal_legacy_and_transformers(folders, pad, caplog):
    caplog.set_level(logging.ERROR)  # truncation warnings of the long prompts
    suffix = "_pad" if pad == "!" else ""
    json_folder = f"clip{suffix}_json"
    legacy = CLIPTokenizer(folders / f"clip{suffix}")(PROMPTS).tolist()
    ours = CLIPTokenizer(folders / json_folder)
    got = ours(PROMPTS).tolist()
    expected = HFCLIPTokenizer.from_pretrained(folders / json_folder)(
        PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(PROMPTS) >= 200
    assert got == legacy == expected
    assert ours.pad == (0 if pad == "!" else 49407)


@pytest.mark.parametrize("max_length", [32, 256])
def test_t5_tokenizer_json_ids_equal_legacy_and_transformers(folders, max_length, caplog):
    caplog.set_level(logging.ERROR)
    legacy = T5Tokenizer(folders / "t5")(PROMPTS, max_length).tolist()
    got = T5Tokenizer(folders / "t5_json")(PROMPTS, max_length).tolist()
    expected = HFT5Tokenizer.from_pretrained(folders / "t5_json")(
        PROMPTS, padding="max_length", max_length=max_length, truncation=True).input_ids
    assert got == legacy == expected


def test_missing_both_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\['vocab.json', 'merges.txt'\] \(or tokenizer.json\)"):
        CLIPTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\['spiece.model'\] \(or tokenizer.json\)"):
        T5Tokenizer(tmp_path)


BROKEN = {
    "tokenizer.json": b'{"version": "1.0", "model": ',
    "tokenizer_config.json": b'{"pad_token": ',
    "pad_token": json.dumps({"pad_token": 5}).encode(),
    "not utf-8": b'\xff\xfe{"pad_token": "!"}',
}


@pytest.mark.parametrize("kind", ["clip", "t5"])
@pytest.mark.parametrize("broken", list(BROKEN))
def test_broken_json_layout_files_are_named(folders, tmp_path, kind, broken):
    folder = shutil.copytree(folders / f"{kind}_json", tmp_path / "tok")
    name = "tokenizer.json" if broken == "tokenizer.json" else "tokenizer_config.json"
    (folder / name).write_bytes(BROKEN[broken])
    with pytest.raises(ValueError) as info:
        (CLIPTokenizer if kind == "clip" else T5Tokenizer)(folder)
    message = str(info.value)
    assert "\n" not in message and str(folder / name) in message, message
    if broken == "pad_token":
        assert "'pad_token' must be a string, got 5" in message


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "spiece.model"])
def test_broken_legacy_files_are_named(folders, tmp_path, name):
    kind = "t5" if name == "spiece.model" else "clip"
    folder = shutil.copytree(folders / kind, tmp_path / "tok")
    (folder / name).write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ValueError) as info:
        (CLIPTokenizer if kind == "clip" else T5Tokenizer)(folder)
    message = str(info.value)
    assert "\n" not in message and "re-download" in message, message
    assert str(folder / ("vocab.json" if kind == "clip" else name)) in message

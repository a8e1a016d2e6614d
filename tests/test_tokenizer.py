"""Tokenizers: identical ids to transformers' CLIPTokenizer (real CLIP vocabulary) and T5Tokenizer."""

import logging

import pytest
from tiny import EXTRA_IDS, clip_vocab_files, train_spiece
from transformers import CLIPTokenizer as HFCLIPTokenizer
from transformers import T5Tokenizer as HFT5Tokenizer

from mlx_flash.tokenizer import CLIPTokenizer, T5Tokenizer

BASE = [
    "", " ", "a", "A photo of a cat", "a photo of an astronaut riding a horse on mars",
    "Portrait of a woman, highly detailed, 8k, trending on ArtStation!!!",
    "cinematic still of a DRAGON flying over the ocean at sunset -- golden hour",
    "Café au lait, naïve résumé, crème brûlée, Über straße", "e\u0301cole (decomposed accent)",
    "ÀÉÎÕÜ àéîõü ñ ç ø å", "東京の夜景, 日本語のプロンプト", "Москва зимой", "شارع في القاهرة", "🐱 cat emoji 😀👍🏽",
    "a 🚀 rocket + 🌕 = 🌌?", "numbers 0123456789 and 3.14159, 1,000,000 and 42%", "1990s VHS footage",
    "don't won't it's they're we've I'm you'll he'd", "It'S ThE CaT'S hAt", "tabs\tand\nnewlines\r\nhere",
    "   leading and trailing spaces   ", "many     inner      spaces", "punctuation: ;,.!?@#$%^&*()_+-=[]{}|\\/<>~`",
    "quotes \"double\" 'single' «guillemets» “curly” ‘also’", "url https://example.com/path?q=1&x=2",
    "email someone@example.com", "hashtags #art #photography @user", "snake_case and CamelCase and kebab-case",
    "<|startoftext|> literal specials <|endoftext|> in text", "ends with the end token <|endoftext|>",
    "!", "!!", "a ! b !! c", "hello!world", "ﬁ ligature, ＦＵＬＬＷＩＤＴＨ, ① circled, ™ ®",
    "math: x² + y² = z², ∑ ∫ √ π ∞", "Ελληνικά και Español", "한국어 텍스트", "zero\u200bwidth space",
    "a red cube on top of a blue sphere, studio lighting, octane render, unreal engine 5",
]
LONG = [
    " ".join(["a very detailed painting of a castle"] * 20),
    "masterpiece, best quality, " * 30 + "the end",
    " ".join(str(n) for n in range(200)),
    "😀" * 100,
]


def variants(text: str) -> list[str]:
    return [text, text.upper(), text.title(), f"  {text}  ", text.replace(" ", "   "), f"{text}, {text[::-1]}"]


PROMPTS = [v for text in BASE + LONG for v in variants(text)]


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    """Folders laid out as the hub's tokenizer/ (pads with the end token) and tokenizer_2/ (pads with "!")."""
    folder_l, folder_g = tmp_path_factory.mktemp("tokenizer"), tmp_path_factory.mktemp("tokenizer_2")
    clip_vocab_files(folder_l)
    clip_vocab_files(folder_g)
    HFCLIPTokenizer.from_pretrained(folder_l, pad_token="!").save_pretrained(folder_g)  # names the pad token
    return folder_l, folder_g


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_clip_ids_equal_transformers(clip_folders, pad):
    folder = clip_folders[pad == "!"]
    reference = HFCLIPTokenizer.from_pretrained(clip_folders[0], pad_token=pad)
    ours = CLIPTokenizer(folder)
    assert len(PROMPTS) >= 200
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(PROMPTS).tolist()
    mismatches = [p for p, a, b in zip(PROMPTS, got, expected) if a != b]
    print(f"\nCLIP pad {pad!r}: {len(PROMPTS) - len(mismatches)}/{len(PROMPTS)} prompts identical")
    assert not mismatches, mismatches[:3]
    assert ours.pad == (0 if pad == "!" else 49407)


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer_3")
    train_spiece(folder)
    return folder


@pytest.mark.parametrize("max_length", [32, 256])
def test_t5_ids_equal_transformers(spiece_folder, max_length):
    reference = HFT5Tokenizer.from_pretrained(spiece_folder, extra_ids=EXTRA_IDS)
    expected = reference(PROMPTS, padding="max_length", max_length=max_length, truncation=True).input_ids
    got = T5Tokenizer(spiece_folder)(PROMPTS, max_length).tolist()
    mismatches = [p for p, a, b in zip(PROMPTS, got, expected) if a != b]
    print(f"\nT5 max_length {max_length}: {len(PROMPTS) - len(mismatches)}/{len(PROMPTS)} prompts identical")
    assert not mismatches, mismatches[:3]


def test_truncation_warnings(clip_folders, spiece_folder, caplog):
    long = "a photo of a cat " * 20 + "wearing a tiny golden hat"
    with caplog.at_level(logging.WARNING, logger="mlx_flash"):
        CLIPTokenizer(clip_folders[0])(["a short prompt"])
        T5Tokenizer(spiece_folder)(["a short prompt"], 32)
        assert not caplog.records
        CLIPTokenizer(clip_folders[1])([long])
        T5Tokenizer(spiece_folder)([long], 32)
    clip, t5 = (r.getMessage() for r in caplog.records)
    print(f"\n{clip}\n{t5}")
    assert "CLIP takes at most 77 tokens" in clip and clip.endswith("cat wearing a tiny golden hat'")
    assert "T5 takes at most 32 tokens" in t5 and "tiny golden hat" in t5


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing tokenizer file\(s\) \['vocab.json', 'merges.txt'\]"):
        CLIPTokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"\['spiece.model'\]"):
        T5Tokenizer(tmp_path)

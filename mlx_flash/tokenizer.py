"""Prompt tokenizers: CLIP byte-level BPE (tokenizer/, tokenizer_2/) and T5 SentencePiece (tokenizer_3/).

Ids equal transformers' `CLIPTokenizer` / `T5Tokenizer` with padding="max_length" and truncation.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path
from typing import Callable

import mlx.core as mx
import sentencepiece
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE

from .files import first_line
from .layout import read_json

logger = logging.getLogger("mlx_flash")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's word split: special tokens, English contractions, letter runs, single digits, symbol runs.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list[str]:
    """CLIP's byte-level alphabet: printable bytes stand for themselves, the other bytes for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def read_clip_merges(path: str | Path | None = None) -> list[str]:
    """The merges of OpenAI's CLIP BPE file (bpe_simple_vocab_16e6.txt.gz); by default the copy that the
    open_clip_torch package ships."""
    if path is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            raise RuntimeError("the CLIP BPE file comes from open_clip_torch: pip install --no-deps open_clip_torch")
        path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    return gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]


def write_clip_vocab(folder: str | Path, merges: list[str], pad_token: str = EOS) -> None:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json naming the pad token) as
    OpenAI's CLIP builds its vocabulary: byte symbols, the same with "</w>", one token per merge, BOS, EOS."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), "utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token, "model_max_length": 77}))


TOKENIZER_JSON = "tokenizer.json"  # what transformers 5 `save_pretrained` writes (the legacy files are optional)


def _legacy_or_json(folder: Path, legacy: tuple[str, ...]) -> bool:
    """True if the folder has the legacy files `legacy`, False if it has only tokenizer.json; else raise."""
    if all((folder / name).is_file() for name in legacy):
        return True
    if (folder / TOKENIZER_JSON).is_file():
        return False
    missing = [name for name in legacy if not (folder / name).is_file()]
    raise FileNotFoundError(f"{folder}: missing tokenizer file(s) {missing} (or {TOKENIZER_JSON}); "
                            "expected a diffusers-layout tokenizer folder.")


def _read_tokenizer(path: Path, build: Callable[[], Tokenizer]) -> Tokenizer:
    """`build()` (reading `path`), with any failure as one line naming the file; no truncation or padding."""
    try:
        tokenizer = build()
    except Exception as err:  # the tokenizers library raises plain Exceptions for unreadable files
        raise ValueError(f"{path}: not a readable tokenizer file ({first_line(err)}); re-download or "
                         "re-save the tokenizer.") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _special_token(folder: Path, name: str, default: str) -> str:
    """The special token `name` ("pad_token", "eos_token") named by the folder's tokenizer_config.json or
    special_tokens_map.json (default `default`)."""
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file
        token = read_json(path).get(name) if path.is_file() else None
        if isinstance(token, dict):
            token = token.get("content")
        if token is not None:
            if not isinstance(token, str):
                raise ValueError(f"{path}: field {name!r} must be a string, got {token!r}; fix or re-download it.")
            return token
    return default


class CLIPTokenizer:
    """CLIP BPE from vocab.json + merges.txt, or from tokenizer.json alone; pads to `max_length` with the
    folder's pad token."""

    def __init__(self, folder: str | Path, max_length: int = 77):
        folder = Path(folder)
        if _legacy_or_json(folder, ("vocab.json", "merges.txt")):
            source = folder / "vocab.json"
            self._tokenizer = _read_tokenizer(source, lambda: self._from_vocab(folder))
        else:
            source = folder / TOKENIZER_JSON
            self._tokenizer = _read_tokenizer(source, lambda: Tokenizer.from_file(str(source)))
        pad = _special_token(folder, "pad_token", EOS)
        missing = [token for token in (BOS, EOS, pad) if self._tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"{source}: lacks the special token(s) {missing}; is it a CLIP vocabulary?")
        self._tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in {BOS, EOS, pad}])
        self.bos, self.eos, self.pad = (self._tokenizer.token_to_id(t) for t in (BOS, EOS, pad))
        self.max_length = max_length

    @staticmethod
    def _from_vocab(folder: Path) -> Tokenizer:
        """CLIP's tokenizer from vocab.json + merges.txt: NFC, whitespace runs to one space, lower case,
        CLIP's word split, byte-level BPE with "</w>" ending each word."""
        bpe = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=EOS,
                            end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
        tokenizer = Tokenizer(bpe)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer

    def __call__(self, texts: list[str]) -> mx.array:
        """Token ids (len(texts), max_length): start, text (truncated), end, padding."""
        rows = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = encoding.ids
            keep = self.max_length - 2
            if len(ids) > keep:
                dropped = self._tokenizer.decode(ids[keep:]).replace("</w>", " ").strip()
                logger.warning("CLIP takes at most %d tokens; this part of the prompt was dropped: %r",
                               self.max_length, dropped)
            row = [self.bos, *ids[:keep], self.eos]
            rows.append(row + [self.pad] * (self.max_length - len(row)))
        return mx.array(rows, dtype=mx.int32)


class T5Tokenizer:
    """T5 SentencePiece from spiece.model, or from tokenizer.json alone; appends the end token and pads to
    the requested length."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if _legacy_or_json(folder, ("spiece.model",)):
            path = folder / "spiece.model"
            try:
                model = sentencepiece.SentencePieceProcessor(model_file=str(path))
            except Exception as err:  # sentencepiece raises RuntimeError or OSError with varying texts
                raise ValueError(f"{path}: not a readable SentencePiece model ({first_line(err)}); "
                                 "re-download or re-save the tokenizer.") from None
            self._encode, self._decode = model.encode, model.decode
            self.eos, self.pad = model.eos_id(), model.pad_id()
            return
        path = folder / TOKENIZER_JSON
        tokenizer = _read_tokenizer(path, lambda: Tokenizer.from_file(str(path)))
        self._encode = lambda texts: [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        self._decode = tokenizer.decode
        tokens = [_special_token(folder, "eos_token", "</s>"), _special_token(folder, "pad_token", "<pad>")]
        missing = [token for token in tokens if tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"{path}: lacks the special token(s) {missing}; is it a T5 tokenizer?")
        self.eos, self.pad = (tokenizer.token_to_id(token) for token in tokens)

    def __call__(self, texts: list[str], max_length: int = 256) -> mx.array:
        """Token ids (len(texts), max_length): text (truncated), end, padding."""
        rows = []
        for ids in self._encode(texts):
            keep = max_length - 1
            if len(ids) > keep:
                logger.warning("T5 takes at most %d tokens (max_sequence_length); this part of the prompt was "
                               "dropped: %r", max_length, self._decode(ids[keep:]))
            row = [*ids[:keep], self.eos]
            rows.append(row + [self.pad] * (max_length - len(row)))
        return mx.array(rows, dtype=mx.int32)

"""Prompt tokenizers: CLIP byte-level BPE (tokenizer/, tokenizer_2/) and T5 SentencePiece (tokenizer_3/).

Ids equal transformers' `CLIPTokenizer` / `T5Tokenizer` with padding="max_length" and truncation.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from pathlib import Path

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


def _require(folder: Path, *names: str) -> None:
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing tokenizer file(s) {missing}; "
                                "expected a diffusers-layout tokenizer folder.")


def _pad_token(folder: Path) -> str:
    """The pad token named by the folder's tokenizer_config.json or special_tokens_map.json (default: end token)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        token = json.loads(path.read_text()).get("pad_token") if path.is_file() else None
        if token is not None:
            return token["content"] if isinstance(token, dict) else token
    return EOS


class CLIPTokenizer:
    """CLIP BPE from vocab.json + merges.txt; pads to `max_length` with the folder's pad token."""

    def __init__(self, folder: str | Path, max_length: int = 77):
        folder = Path(folder)
        _require(folder, "vocab.json", "merges.txt")
        bpe = BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=EOS,
                            end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False)
        self._tokenizer = Tokenizer(bpe)
        self._tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        self._tokenizer.decoder = decoders.ByteLevel()
        pad = _pad_token(folder)
        missing = [token for token in (BOS, EOS, pad) if self._tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"{folder}: vocab.json lacks the special token(s) {missing}; is it a CLIP vocabulary?")
        self._tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in {BOS, EOS, pad}])
        self.bos, self.eos, self.pad = (self._tokenizer.token_to_id(t) for t in (BOS, EOS, pad))
        self.max_length = max_length

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
    """T5 SentencePiece from spiece.model; appends the end token and pads to the requested length."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        _require(folder, "spiece.model")
        self._model = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
        self.eos, self.pad = self._model.eos_id(), self._model.pad_id()

    def __call__(self, texts: list[str], max_length: int = 256) -> mx.array:
        """Token ids (len(texts), max_length): text (truncated), end, padding."""
        rows = []
        for ids in self._model.encode(texts):
            keep = max_length - 1
            if len(ids) > keep:
                logger.warning("T5 takes at most %d tokens (max_sequence_length); this part of the prompt was "
                               "dropped: %r", max_length, self._model.decode(ids[keep:]))
            row = [*ids[:keep], self.eos]
            rows.append(row + [self.pad] * (max_length - len(row)))
        return mx.array(rows, dtype=mx.int32)

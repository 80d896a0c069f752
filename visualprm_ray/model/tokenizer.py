"""Tokenization that reproduces InternLM2's slow sentencepiece tokenizer, and score positions.

Why not ``AutoTokenizer``: the released tokenizer is custom code (never executed here), and the
automatic conversion of its sentencepiece model to a "fast" tokenizer changes token ids for this
vocabulary. The slow tokenizer's behaviour is simple to state and reproduce: split the text on the
added special tokens (longest match first, honouring each token's lstrip/rstrip flags), encode the
text between them with sentencepiece, and put BOS first. Checkpoints that ship a ``tokenizer.json``
known to be right (the tests' tiny checkpoints can) use the Rust ``tokenizers`` library instead,
with the same splitting contract.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from visualprm_ray.model.prompt import IMG_CONTEXT, IMG_END, IMG_START, SCORE_MARKER, STEP_PLACEHOLDER

# The conversation's structure tokens: each must be one special token of the checkpoint's
# tokenizer. Tokenized as plain text they become several ordinary pieces, and every score would be
# read from a conversation the model was never trained on: silently wrong, never an error.
PROMPT_TOKENS = ("<|im_start|>", "<|im_end|>", IMG_START, IMG_END, IMG_CONTEXT)

TokenizerKind = Literal["auto", "sentencepiece", "tokenizers"]
NEGATIVE_TOKEN = "-"


class TokenizerError(ValueError):
    """The tokenizer cannot support VisualPRM scoring (a checkpoint problem, not a row problem)."""


class ScorePositionError(ValueError):
    """The score markers found in a conversation do not match its steps (a row problem)."""


@dataclass(frozen=True)
class SpecialToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


class _PieceEncoder(Protocol):
    def __call__(self, text: str) -> list[int]: ...


class Tokenizer:
    """Split on special tokens, encode the rest with a piece encoder, BOS first.

    Use :func:`load_tokenizer`; the constructor takes the parts so tests can build one directly.
    """

    def __init__(
        self,
        encode_piece: _PieceEncoder,
        piece_id: _PieceEncoder,
        specials: list[SpecialToken],
        bos_id: int,
        kind: str,
    ) -> None:
        self._encode_piece = encode_piece
        self._piece_id = piece_id
        self.kind = kind
        self.bos_id = bos_id
        self.specials = {s.content: s for s in specials}
        # Longest first so that a special token that is a prefix of another never wins the match.
        ordered = sorted(self.specials, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(s) for s in ordered) + ")") if ordered else None

        self.plus_id = self._single_token_id(STEP_PLACEHOLDER)
        self.minus_id = self._single_token_id(NEGATIVE_TOKEN)
        marker = self.encode(SCORE_MARKER, add_bos=False)
        if marker.count(self.plus_id) != 1:
            raise TokenizerError(
                f"'+' must appear as exactly one standalone token in the tokenization of "
                f"{SCORE_MARKER!r}; got ids {marker}"
            )
        self.score_marker = np.asarray(marker, dtype=np.int64)
        # The score is read at the token right before '+', the last token of the assistant prefix.
        self.score_offset = marker.index(self.plus_id) - 1
        if self.score_offset < 0:
            raise TokenizerError(f"nothing precedes '+' in the score marker ids {marker}")

    def _single_token_id(self, token: str) -> int:
        if token in self.specials:
            return self.specials[token].id
        ids = self._piece_id(token)
        if len(ids) != 1:
            raise TokenizerError(f"{token!r} is not a single known token of this tokenizer")
        return ids[0]

    def token_to_id(self, token: str) -> int:
        return self._single_token_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        chunks = self._split_re.split(text) if self._split_re else [text]
        # re.split with one capture group alternates text, special, text, special, ..., text.
        for i in range(0, len(chunks), 2):
            piece = chunks[i]
            left = self.specials.get(chunks[i - 1]) if i > 0 else None
            right = self.specials.get(chunks[i + 1]) if i + 1 < len(chunks) else None
            if left is not None and left.rstrip:
                piece = piece.lstrip()
            if right is not None and right.lstrip:
                piece = piece.rstrip()
            if piece:
                ids.extend(self._encode_piece(piece))
            if right is not None:
                ids.append(right.id)
        return ids


def _safe_cut(tokenizer: Tokenizer, head: str) -> int:
    """Where ``head`` can be cut so that encoding the two sides separately equals encoding it whole.

    Right after the last special token: the slow tokenizer splits the text there anyway, so no
    sentencepiece piece spans the cut. Not after a token that strips whitespace to its right (the
    stripping would then not happen), and never inside the text.
    """
    if tokenizer._split_re is None:
        return 0
    cut = 0
    for match in tokenizer._split_re.finditer(head):
        cut = 0 if tokenizer.specials[match.group(0)].rstrip else match.end()
    return cut


def encode_shared_head(tokenizer: Tokenizer, head: str, tails: list[str]) -> list[list[int]]:
    """``[tokenizer.encode(head + tail) for tail in tails]``, tokenizing the shared head once.

    A group's conversations share everything up to the first step (system prompt, question and
    thousands of image tokens); tokenizing that once per group instead of once per candidate is
    most of the CPU stage's tokenizer time.
    """
    cut = _safe_cut(tokenizer, head)
    shared = tokenizer.encode(head[:cut])
    rest = head[cut:]
    return [shared + tokenizer.encode(rest + tail, add_bos=False) for tail in tails]


def find_score_positions(ids: np.ndarray | list[int], tokenizer: Tokenizer, num_steps: int) -> np.ndarray:
    """Token indices where each step's P(+) is read; exactly one per step or a ScorePositionError."""
    arr = np.asarray(ids, dtype=np.int64)
    marker = tokenizer.score_marker
    if arr.size < marker.size:
        starts = np.empty(0, dtype=np.int64)
    else:
        windows = np.lib.stride_tricks.sliding_window_view(arr, marker.size)
        starts = np.flatnonzero((windows == marker).all(axis=1))
    if starts.size != num_steps:
        raise ScorePositionError(
            f"found {starts.size} score marker(s) for {num_steps} step(s): a step's text interferes with "
            f"the '<|im_start|>assistant\\n+<|im_end|>' marker"
        )
    return starts + tokenizer.score_offset


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _token_content(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _collect_specials(directory: Path, lookup: _PieceEncoder) -> tuple[list[SpecialToken], dict]:
    """Added tokens the way the slow tokenizer sees them: tokenizer_config, added_tokens.json, bos/eos/unk."""
    config = _read_json(directory / "tokenizer_config.json")
    specials: dict[str, SpecialToken] = {}
    for tid, entry in (config.get("added_tokens_decoder") or {}).items():
        specials[entry["content"]] = SpecialToken(
            entry["content"], int(tid), bool(entry.get("lstrip")), bool(entry.get("rstrip"))
        )
    for content, tid in _read_json(directory / "added_tokens.json").items():
        specials.setdefault(content, SpecialToken(content, int(tid)))
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(config.get(key))
        if content and content not in specials:
            ids = lookup(content)
            if len(ids) == 1:
                specials[content] = SpecialToken(content, ids[0])
    return list(specials.values()), config


def _load_sentencepiece(path: Path):
    """A SentencePieceProcessor, loaded without sentencepiece's warnings reaching the logs.

    sentencepiece >= 0.2.1 warns on every load of the InternLM2 model (its piece 354 is a literal
    NUL; see :func:`_nul_as_released`): one line per actor start in every job log, about a case
    handled here. Its C++ log level is raised to errors for the load alone.
    """
    import sentencepiece as spm

    quiet = getattr(spm, "set_min_log_level", None)
    if quiet is not None:
        quiet(2)  # errors still show; 0 (info) is the library's default
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    finally:
        if quiet is not None:
            quiet(0)


def _nul_as_released(sp) -> _PieceEncoder:
    """sentencepiece's encoder, with NUL encoded as the released model's tokenizer encodes it.

    InternLM2's vocabulary has a piece that is a literal NUL (id 354). sentencepiece up to 0.2.0,
    which the model was trained and released with, encodes ``"\\x00"`` as that piece; 0.2.1 and
    later demote it to unused and encode NUL by byte fallback (``<0x00>``, id 3), ids the model
    never saw. No other piece holds a NUL, so no piece spans one: the text between NULs is encoded
    on its own and each NUL becomes the piece again. Checked against sentencepiece 0.2.0's ids
    (``tests/model/test_tokenizer_real.py``).
    """

    def plain(text: str) -> list[int]:
        return sp.encode(text, out_type=int)

    if plain("\x00") == [sp.piece_to_id("\x00")]:
        return plain  # NUL is still a piece (sentencepiece <= 0.2.0): nothing to do
    # A demoted piece no longer looks up by its text: find it among the unused ones (once, ~50 ms).
    nuls = [i for i in range(sp.get_piece_size()) if sp.is_unused(i) and sp.id_to_piece(i) == "\x00"]
    if not nuls:
        return plain  # the vocabulary has no NUL piece: byte fallback is what it always did
    nul = nuls[0]

    def encode(text: str) -> list[int]:
        if "\x00" not in text:
            return plain(text)
        ids: list[int] = []
        for k, part in enumerate(text.split("\x00")):
            if k:
                ids.append(nul)
            if part:
                ids.extend(plain(part))
        return ids

    return encode


def load_tokenizer(directory: str | Path, kind: TokenizerKind = "auto") -> Tokenizer:
    """Load the tokenizer of a checkpoint directory without executing any of its code.

    Refused (:class:`TokenizerError`) unless every one of :data:`PROMPT_TOKENS` is a special token.
    """
    tokenizer = _load_tokenizer(Path(directory), kind)
    missing = [t for t in PROMPT_TOKENS if t not in tokenizer.specials]
    if missing:
        raise TokenizerError(
            f"the tokenizer of {directory} does not make {', '.join(missing)} special token(s) (its "
            "tokenizer_config.json added_tokens_decoder, added_tokens.json or tokenizer.json lists none of "
            "them); they would be tokenized as plain text and every score would be wrong. VisualPRM "
            "checkpoints (InternVL2.5 tokenizers) list all of: " + ", ".join(PROMPT_TOKENS)
        )
    return tokenizer


def _load_tokenizer(directory: Path, kind: TokenizerKind) -> Tokenizer:
    if kind == "auto":
        kind = "sentencepiece" if (directory / "tokenizer.model").exists() else "tokenizers"
    if kind == "sentencepiece":
        sp = _load_sentencepiece(directory / "tokenizer.model")
        unk = sp.unk_id()

        def sp_piece_id(token: str) -> list[int]:
            tid = sp.piece_to_id(token)
            return [] if tid == unk and token != sp.id_to_piece(unk) else [tid]

        specials, config = _collect_specials(directory, sp_piece_id)
        bos = _token_content(config.get("bos_token"))
        bos_id = sp_piece_id(bos)[0] if bos else sp.bos_id()
        return Tokenizer(_nul_as_released(sp), sp_piece_id, specials, bos_id, "sentencepiece")
    if kind == "tokenizers":
        path = directory / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{directory} has neither tokenizer.model nor tokenizer.json")
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_file(str(path))
        vocab = hf.get_vocab(with_added_tokens=True)

        def hf_piece_id(token: str) -> list[int]:
            return [vocab[token]] if token in vocab else []

        specials, config = _collect_specials(directory, hf_piece_id)
        # tokenizer.json carries its own added tokens; the config's entries win where both exist.
        known = {s.content for s in specials}
        for tid, tok in hf.get_added_tokens_decoder().items():
            if tok.content not in known:
                specials.append(SpecialToken(tok.content, tid, tok.lstrip, tok.rstrip))
        bos = _token_content(config.get("bos_token")) or "<s>"
        if bos not in vocab:
            raise TokenizerError(f"BOS token {bos!r} is not in {path}")
        return Tokenizer(
            lambda text: hf.encode(text, add_special_tokens=False).ids,
            hf_piece_id,
            specials,
            vocab[bos],
            "tokenizers",
        )
    raise TokenizerError(f"unknown tokenizer kind {kind!r}")

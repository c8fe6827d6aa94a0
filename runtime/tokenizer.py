"""CLIP tokenization for SD2 text encoders, without torch or transformers.

One implementation serves every backend: the PyTorch scorer and the ONNX/TensorRT runtime both call
:class:`ClipTokenizer`, so the ids that reach a text encoder are identical everywhere.

The BPE model is built with the ``tokenizers`` library from the ``vocab.json`` and ``merges.txt`` found in an SD2
``tokenizer/`` folder, with CLIP's normalisation (NFC, whitespace collapse, lower case) and its pre-tokenisation
regex, as OpenAI's CLIP tokenizer and transformers' CLIP converter do.

Token roles are decided **by position**, never by id: SD2 pads with ``"!"`` (id 0), so an id alone cannot tell a
padding slot from a caption's own exclamation mark. A caption's literal ``"!"`` is encoded as the word ``"!</w>"``
exactly as OpenCLIP (which SD2's text encoder was trained with) encodes it; we never register the padding token
as a special token that could be matched inside caption text.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, ModelError

__all__ = [
    "ClipTokenizer",
    "TokenizedText",
    "token_mask",
    "CONTEXTS",
    "context_keep_mask",
    "context_pool_mask",
    "roles_from_ids",
    "ROLE_BOS",
    "ROLE_WORD",
    "ROLE_EOS",
    "ROLE_PAD",
]

ROLE_BOS, ROLE_WORD, ROLE_EOS, ROLE_PAD = 0, 1, 2, 3

# CLIP's pre-tokenisation: contractions, runs of letters, single digits, runs of other non-space characters.
_CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def token_mask(roles: np.ndarray, tokens: str) -> np.ndarray:
    """float32 mask over positions: 1 where the token set keeps the position, decided by role (never by id).

    ``tokens``: ``"all"`` (77 positions), ``"words-eos"`` (word tokens and EOS) or ``"words"``.
    """
    roles = np.asarray(roles)
    if tokens == "all":
        keep = np.ones(roles.shape, dtype=bool)
    elif tokens == "words-eos":
        keep = (roles == ROLE_WORD) | (roles == ROLE_EOS)
    elif tokens == "words":
        keep = roles == ROLE_WORD
    else:
        raise ValueError(f"unknown token set {tokens!r}")
    return keep.astype(np.float32)


#: What a model's cross-attention may attend to (declared by the model folder, see ``dsdkit.pytorch.models``): ``all``
#: positions (SD2); ``words``: BOS, EOS and padding masked; ``bos-words``: EOS and padding masked, BOS kept as a
#: caption-independent anchor. A caption without word tokens (the empty caption of the unconditional pass) keeps
#: its whole context under ``words`` and its BOS under ``bos-words``, so that no softmax runs over nothing.
CONTEXTS = ("all", "words", "bos-words")


def context_keep_mask(roles: np.ndarray, context: str) -> np.ndarray:
    """float32 ``[..., T]``: 1 where a model with this declared context attends (by role, never by id)."""
    roles = np.asarray(roles)
    words = roles == ROLE_WORD
    has_words = words.any(axis=-1, keepdims=True)
    if context == "all":
        keep = np.ones(roles.shape, dtype=bool)
    elif context == "words":
        keep = np.where(has_words, words, True)
    elif context == "bos-words":
        keep = words | (roles == ROLE_BOS)
    else:
        raise ValueError(f"unknown context {context!r}; one of {', '.join(CONTEXTS)}")
    return keep.astype(np.float32)


def context_pool_mask(roles: np.ndarray, context: str) -> np.ndarray:
    """float32 ``[..., T]``: the positions a model with a masked context pools: its word tokens, or its whole
    (fallback) context for a caption without words. The attended positions follow from it: the same under
    ``words``, with BOS added under ``bos-words`` (what the scoring forward computes in the graph)."""
    roles = np.asarray(roles)
    words = roles == ROLE_WORD
    has_words = words.any(axis=-1, keepdims=True)
    return np.where(has_words, words, context_keep_mask(roles, context) > 0).astype(np.float32)


def roles_from_ids(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Roles of tokenized ids by position: BOS at 0, words up to the first EOS, EOS, then padding."""
    ids = np.asarray(ids)
    positions = np.arange(ids.shape[-1])
    eos = np.argmax((ids == eos_id) & (positions > 0), axis=-1)[..., None]
    roles = np.full(ids.shape, ROLE_PAD, dtype=np.int8)
    roles[(positions > 0) & (positions < eos)] = ROLE_WORD
    roles[positions == eos] = ROLE_EOS
    roles[..., 0] = ROLE_BOS
    return roles


@dataclass(frozen=True)
class TokenizedText:
    """One caption as the text encoder sees it.

    Attributes:
        ids: ``int64[max_length]`` token ids: BOS, word tokens, EOS, then padding.
        roles: ``int8[max_length]`` role of each position (``ROLE_BOS``/``ROLE_WORD``/``ROLE_EOS``/``ROLE_PAD``).
        num_words: word tokens kept.
        truncated: word tokens dropped because the caption was longer than the context.
    """

    ids: np.ndarray
    roles: np.ndarray
    num_words: int
    truncated: int

    @property
    def word_slice(self) -> slice:
        return slice(1, 1 + self.num_words)


class ClipTokenizer:
    """CLIP BPE tokenizer reading an SD2-style ``tokenizer/`` folder.

    Args:
        vocab: token string to id.
        merges: BPE merges, as ``"a b"`` strings, in priority order.
        max_length: context length (77 for SD2).
        bos_token, eos_token, pad_token: the special tokens' strings.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[str],
        max_length: int = 77,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        pad_token: str = "!",
    ):
        from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token not in vocab:
                raise ModelError(
                    f"tokenizer: {name} token {token!r} is not in the vocabulary; the tokenizer folder is incomplete"
                )
        if max_length < 3:
            raise ModelError(
                f"tokenizer: model_max_length {max_length} leaves no room for a word; expected 77 for SD2"
            )
        self.max_length = int(max_length)
        self.bos_id = vocab[bos_token]
        self.eos_id = vocab[eos_token]
        self.pad_id = vocab[pad_token]
        self.pad_token = pad_token
        merge_pairs = [tuple(m.split(" ")) for m in merges]
        bpe = models.BPE(
            vocab=vocab,
            merges=merge_pairs,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            unk_token=eos_token,
            fuse_unk=False,
        )
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        self._tokenizer = tok
        self.vocab_size = len(vocab)

    @classmethod
    def from_folder(cls, folder: str | Path) -> ClipTokenizer:
        """Read ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` (SD2's ``tokenizer/`` layout)."""
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
        if missing:
            raise ModelError(
                f"tokenizer folder {folder} lacks {', '.join(missing)}; an SD2 model folder has tokenizer/vocab.json "
                "and tokenizer/merges.txt (download the whole model folder, or recreate it with `dsdkit tiny-model`)"
            )
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            merges = [
                line
                for line in merges_path.read_text(encoding="utf-8").splitlines()
                if line and not line.startswith("#version")
            ]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(
                f"tokenizer files in {folder} are unreadable ({exc}); re-download the model folder"
            ) from None
        config = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelError(f"{config_path} is unreadable ({exc}); re-download the model folder") from None

        def token(key: str, default: str) -> str:
            value = config.get(key, default)
            if isinstance(value, dict):  # older configs store AddedToken dicts
                value = value.get("content", default)
            return value if value is not None else default

        max_length = config.get("model_max_length", 77)
        if not isinstance(max_length, int) or max_length > 10_000:  # transformers writes 1e30 for "unbounded"
            max_length = 77
        return cls(
            vocab,
            merges,
            max_length=max_length,
            bos_token=token("bos_token", "<|startoftext|>"),
            eos_token=token("eos_token", "<|endoftext|>"),
            pad_token=token("pad_token", "!"),
        )

    def word_ids(self, text: str) -> list[int]:
        """BPE ids of a caption's words, without BOS/EOS and without truncation."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, where: str = "caption") -> TokenizedText:
        """Tokenize one caption to ``max_length`` positions.

        Args:
            text: the caption.
            where: how to name the caption in an error message (e.g. ``"captions.txt line 4"``).

        Raises:
            InputError: the caption is not a string, holds a lone surrogate, or is empty after normalisation.
        """
        if not isinstance(text, str):
            raise InputError(f"{where}: a caption must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            # A lone surrogate (e.g. from bytes decoded with errors="surrogateescape") is not text; the tokenizer
            # library would fail on it with a TypeError.
            raise InputError(
                f"{where}: not valid Unicode text (lone surrogate U+{ord(text[exc.start]):04X} at character "
                f"{exc.start}); decode the caption as UTF-8 without errors='surrogateescape'"
            ) from None
        text = unicodedata.normalize("NFC", text).strip()
        words = self.word_ids(text) if text else []
        if not words:
            raise InputError(f"{where} is empty; every caption needs at least one word (remove the line or write one)")
        capacity = self.max_length - 2
        truncated = max(0, len(words) - capacity)
        words = words[:capacity]
        ids = np.full(self.max_length, self.pad_id, dtype=np.int64)
        roles = np.full(self.max_length, ROLE_PAD, dtype=np.int8)
        ids[0], roles[0] = self.bos_id, ROLE_BOS
        ids[1 : 1 + len(words)] = words
        roles[1 : 1 + len(words)] = ROLE_WORD
        ids[1 + len(words)], roles[1 + len(words)] = self.eos_id, ROLE_EOS
        return TokenizedText(ids=ids, roles=roles, num_words=len(words), truncated=truncated)

    def encode_empty(self) -> TokenizedText:
        """The unconditional (empty) prompt: BOS, EOS, padding. Used for ε̂(x_t, ∅) and the `uncond` normaliser."""
        ids = np.full(self.max_length, self.pad_id, dtype=np.int64)
        roles = np.full(self.max_length, ROLE_PAD, dtype=np.int8)
        ids[0], roles[0] = self.bos_id, ROLE_BOS
        ids[1], roles[1] = self.eos_id, ROLE_EOS
        return TokenizedText(ids=ids, roles=roles, num_words=0, truncated=0)

    def decode_tokens(self, tokenized: TokenizedText) -> list[str]:
        """The word tokens of a tokenized caption as readable strings (for heat-map labels and reports)."""
        byte_of = _unicode_to_byte()
        out = []
        for token_id in tokenized.ids[tokenized.word_slice]:
            piece = self._tokenizer.id_to_token(int(token_id)) or ""
            piece = piece.removesuffix("</w>")
            raw = bytes(byte_of[ch] for ch in piece if ch in byte_of)
            out.append(raw.decode("utf-8", errors="replace"))
        return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _unicode_to_byte() -> dict[str, int]:
    return {ch: b for b, ch in bytes_to_unicode().items()}

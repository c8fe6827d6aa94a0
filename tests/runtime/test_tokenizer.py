"""The torch-free CLIP tokenizer: parity with transformers, roles by position, '!' kept as a word, errors."""

from __future__ import annotations

import pytest
from dsdkit.runtime.errors import InputError, ModelError
from dsdkit.runtime.tokenizer import ROLE_BOS, ROLE_EOS, ROLE_PAD, ROLE_WORD, ClipTokenizer

CAPTIONS = [
    "a photo of a cat",
    "A man  riding\ta HORSE, 3 dogs",
    "naïve café — 東京 🙂 it's we'll",
    "the 1990s: 42 red-and-blue balloons",
    "   spaced   out  ",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return ClipTokenizer.from_folder(tiny_model_dir / "tokenizer")


def test_ids_equal_transformers_clip_tokenizer(tokenizer, tiny_model_dir):
    from transformers import CLIPTokenizer

    reference = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    for caption in CAPTIONS:
        ours = tokenizer.encode(caption)
        theirs = reference(caption, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.ids.tolist() == theirs, caption


def test_roles_are_decided_by_position(tokenizer):
    tokens = tokenizer.encode("a red circle")
    assert tokens.num_words == 3
    assert tokens.roles[:6].tolist() == [ROLE_BOS, ROLE_WORD, ROLE_WORD, ROLE_WORD, ROLE_EOS, ROLE_PAD]
    assert (tokens.roles[5:] == ROLE_PAD).all()
    assert tokens.ids[0] == tokenizer.bos_id and tokens.ids[4] == tokenizer.eos_id
    assert (tokens.ids[5:] == tokenizer.pad_id).all() and tokenizer.pad_id == 0  # SD2 pads with "!" = id 0


def test_exclamation_mark_stays_a_word(tokenizer):
    tokens = tokenizer.encode("wow!")
    assert tokens.num_words == 2
    assert tokens.roles[2] == ROLE_WORD
    # "!" is the word "!</w>" (id 256), as OpenCLIP encodes it, never the padding id 0.
    assert tokens.ids[2] == 256 != tokenizer.pad_id
    assert tokenizer.decode_tokens(tokens) == ["wow", "!"]
    only_bang = tokenizer.encode("!")
    assert only_bang.num_words == 1 and only_bang.roles[1] == ROLE_WORD


@pytest.mark.parametrize("caption", ["", "   ", "\t\n", "\u3000"])
def test_empty_caption_is_an_input_error(tokenizer, caption):
    with pytest.raises(InputError, match="captions.txt line 7 is empty"):
        tokenizer.encode(caption, where="captions.txt line 7")


def test_long_captions_are_truncated_and_counted(tokenizer):
    tokens = tokenizer.encode(" ".join(["cat"] * 80))
    assert tokens.num_words == 75 and tokens.truncated == 5
    assert tokens.roles[76] == ROLE_EOS and tokens.ids[76] == tokenizer.eos_id


def test_special_token_text_in_captions_is_plain_text(tokenizer):
    tokens = tokenizer.encode("<|endoftext|> hi")
    assert tokenizer.eos_id not in tokens.ids[1 : 1 + tokens.num_words].tolist()


def test_missing_tokenizer_files_are_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="vocab.json"):
        ClipTokenizer.from_folder(tmp_path)


def test_runtime_tokenizer_rejects_non_strings(tokenizer):
    with pytest.raises(InputError, match="must be a string"):
        tokenizer.encode(b"bytes")  # type: ignore[arg-type]

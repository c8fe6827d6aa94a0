"""dsdkit's torch-free runtime: preprocessing, tokenization, result files (and, later, bundle backends).

Importing this package never imports torch, diffusers or transformers; it needs numpy, Pillow and tokenizers.
"""

from .errors import ConfigError, DsdkitError, InputError, ModelError, OutputError
from .images import ResizeMode, load_image, preprocess_image
from .results import MatchResult, top_k, write_result
from .tokenizer import ClipTokenizer, TokenizedText

__all__ = [
    "ClipTokenizer",
    "ConfigError",
    "DsdkitError",
    "InputError",
    "MatchResult",
    "ModelError",
    "OutputError",
    "ResizeMode",
    "TokenizedText",
    "load_image",
    "preprocess_image",
    "top_k",
    "write_result",
]

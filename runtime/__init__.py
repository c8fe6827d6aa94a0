"""dsdkit's torch-free runtime: bundles, backends, the ``Matcher``, preprocessing, tokenization, result files.

Importing this package never imports torch, diffusers or transformers; it needs numpy, Pillow and tokenizers, and
onnxruntime (or TensorRT) once a bundle is scored.
"""

from .bundle import Bundle
from .errors import BundleError, ConfigError, DsdkitError, InputError, ModelError, OutputError, ParityError
from .images import ResizeMode, load_image, preprocess_image
from .matcher import Matcher
from .results import MatchResult, top_k, write_result
from .tokenizer import ClipTokenizer, TokenizedText

__all__ = [
    "Bundle",
    "BundleError",
    "Matcher",
    "ParityError",
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

"""Property-based robustness checks (issue 7, reliability and bad input).

Whatever bytes sit in an image file, whatever array or caption a caller passes, dsdkit either returns a well-formed
result or raises a one-line :class:`~dsdkit.runtime.errors.InputError`; nothing else may escape.

- Image files: random bytes, random bytes behind real magic numbers and headers (PNG, JPEG, GIF, BMP, WebP, TIFF),
  and truncated / bit-flipped copies of small real images in many modes, through ``preprocess_image(path, 32)``.
- Arrays: random dtypes (incl. byte-swapped), shapes (incl. odd and empty ones) and values (incl. NaN and inf)
  through the in-memory path.
- Captions: arbitrary unicode (control characters, every plane, very long strings) and non-string values through
  the runtime :class:`~dsdkit.runtime.tokenizer.ClipTokenizer`.
"""

# I001: ruff cannot tell that dsdkit.runtime (installed from runtime/) is first-party and sorts it as third-party.
from __future__ import annotations  # noqa: I001

import io
import itertools
import struct
import unicodedata
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dsdkit.runtime.errors import InputError
from dsdkit.runtime.images import preprocess_image, to_rgb
from dsdkit.runtime.tokenizer import ROLE_BOS, ROLE_EOS, ROLE_PAD, ROLE_WORD, ClipTokenizer, TokenizedText

# Pillow warns about the corrupt files this module feeds it, by design; a numpy RuntimeWarning (overflow, NaN cast
# to an integer) would mean garbage pixels, so it fails the test.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("error::RuntimeWarning")]

RESOLUTION = 32
FILE_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- image files ---------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


MAGICS = [
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"\xff\xd8\xff\xe1",
    b"\xff\xd8\xff\xdb",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\x00\x01\x00\x00WEBPVP8L",
    b"RIFF\x00\x01\x00\x00WEBPVP8X",
    b"II*\x00\x08\x00\x00\x00",
    b"MM\x00*\x00\x00\x00\x08",
    b"II+\x00",  # BigTIFF
]

# Sizes a header can claim: mostly small, sometimes degenerate or far over the decompression-bomb guard (never a
# huge size under it, which would make a test allocate hundreds of MB).
_DIMS = st.one_of(st.integers(1, 40), st.integers(1, 40), st.sampled_from([0, 1, 65535, 70000, 2**31 - 1, 2**32 - 1]))
_WILD = st.integers(0, 255)


def _maybe_wild(draw, valid):
    """Usually one of the ``valid`` values, sometimes any byte."""
    return draw(st.one_of(st.sampled_from(valid), st.sampled_from(valid), _WILD))


@st.composite
def png_headers(draw) -> bytes:
    """A PNG signature, an IHDR (usually a legal depth/colour type), a palette when needed, deflated random pixel
    rows (often of the right length), sometimes extra chunks and IEND."""
    width, height = draw(_DIMS), draw(_DIMS)
    depth, colour = draw(
        st.one_of(
            st.sampled_from(
                [
                    (1, 0),
                    (2, 0),
                    (4, 0),
                    (8, 0),
                    (16, 0),
                    (8, 2),
                    (16, 2),
                    (1, 3),
                    (2, 3),
                    (4, 3),
                    (8, 3),
                    (8, 4),
                    (16, 4),
                    (8, 6),
                    (16, 6),
                ]
            ),
            st.tuples(_WILD, _WILD),
        )
    )
    interlace = draw(st.sampled_from([0, 0, 1, 2]))
    body = b"\x89PNG\r\n\x1a\n" + _png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", width & 0xFFFFFFFF, height & 0xFFFFFFFF, depth, colour, 0, 0, interlace)
    )
    if colour == 3 or draw(st.booleans()):
        body += _png_chunk(b"PLTE", draw(st.binary(min_size=0, max_size=3 * 16)))
    for kind in draw(st.lists(st.sampled_from([b"tRNS", b"eXIf", b"iCCP", b"acTL", b"fcTL", b"gAMA"]), max_size=2)):
        body += _png_chunk(kind, draw(st.binary(max_size=32)))
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    row = 1 + (min(width, 64) * channels * depth + 7) // 8
    rows = draw(st.integers(0, min(height, 40)))
    raw = (
        b"".join(
            bytes([draw(st.integers(0, 5))]) + draw(st.binary(min_size=row - 1, max_size=row - 1)) for _ in range(rows)
        )
        if row < 600
        else b""
    )
    body += _png_chunk(b"IDAT", zlib.compress(raw) if draw(st.integers(0, 3)) else draw(st.binary(max_size=64)))
    if draw(st.booleans()):
        body += _png_chunk(b"IEND", b"")
    return body


@st.composite
def bmp_headers(draw) -> bytes:
    width, height = draw(_DIMS), draw(st.one_of(_DIMS, st.integers(-40, -1)))
    bits = draw(st.sampled_from([1, 4, 8, 16, 24, 32, 0, 7]))
    compression = draw(st.sampled_from([0, 0, 1, 2, 3, 6]))
    colours = draw(st.integers(0, 300))
    info = struct.pack(
        "<IIIHHIIiiII", 40, width & 0xFFFFFFFF, height & 0xFFFFFFFF, 1, bits, compression, 0, 0, 0, colours, 0
    )
    palette = draw(st.binary(min_size=4 * min(colours, 16), max_size=4 * min(colours, 16))) if bits <= 8 else b""
    data = draw(st.binary(max_size=160))
    offset = draw(st.sampled_from([14 + 40 + len(palette)] * 3 + [0, 10_000]))
    header = struct.pack("<IHHI", 14 + len(info) + len(palette) + len(data), 0, 0, offset)
    return b"BM" + header + info + palette + data


@st.composite
def gif_headers(draw) -> bytes:
    """Logical screen, an exact-size global colour table (usually), an image descriptor, LZW-ish data blocks."""
    width, height = draw(_DIMS) & 0xFFFF, draw(_DIMS) & 0xFFFF
    flags = draw(st.integers(0, 255))
    body = b"GIF89a" + struct.pack("<HHBBB", width, height, flags, 0, 0)
    if flags & 0x80:
        size = 3 * 2 ** ((flags & 7) + 1)
        body += draw(st.one_of(st.binary(min_size=size, max_size=size), st.binary(max_size=size)))
    if draw(st.booleans()):  # graphic control extension: transparency, disposal
        body += b"!\xf9\x04" + bytes([draw(_WILD)]) + b"\x00\x00" + bytes([draw(_WILD)]) + b"\x00"
    body += b"," + struct.pack("<HHHHB", 0, 0, width, height, draw(st.sampled_from([0, 0, 0x40, 0x80, 0x87])))
    body += bytes([draw(st.sampled_from([2, 3, 8, 0, 12, 255]))])  # LZW minimum code size
    for block in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=3)):
        body += bytes([len(block)]) + block
    return body + draw(st.sampled_from([b"\x00;", b"\x00", b"", b";"]))


@st.composite
def tiff_headers(draw) -> bytes:
    """A little-endian TIFF whose one IFD usually holds a consistent layout (photometric, bits, samples), its strip
    pointing at random data after the IFD; sometimes any values."""
    layout = draw(
        st.one_of(
            st.sampled_from(
                [
                    (0, 1, 1, 1),
                    (1, 1, 1, 1),
                    (1, 8, 1, 1),
                    (1, 16, 1, 1),
                    (1, 32, 1, 3),
                    (1, 32, 1, 1),
                    (2, 8, 3, 1),
                    (2, 8, 4, 1),
                    (2, 16, 3, 1),
                    (5, 8, 4, 1),
                    (6, 8, 3, 1),
                    (8, 8, 3, 1),
                    (1, 8, 2, 1),
                    (3, 8, 1, 1),
                ]
            ),
            st.tuples(_WILD, st.sampled_from([0, 1, 3, 8, 12, 16, 32, 64]), st.integers(0, 9), st.integers(0, 5)),
        )
    )
    photometric, bits, samples, sample_format = layout
    width, height = draw(_DIMS), draw(_DIMS)
    data = draw(st.binary(max_size=200))
    tags = {
        256: width,
        257: height,
        258: bits,
        259: draw(st.sampled_from([1, 1, 5, 7, 8, 32773, 2, 3, 4, 0])),
        262: photometric,
        277: samples,
        339: sample_format,
        284: draw(st.sampled_from([1, 1, 2])),
        278: draw(st.sampled_from([height, height, 1, 0])),
        279: draw(st.sampled_from([len(data), 4096, 0])),
    }
    if draw(st.booleans()):
        tags[274] = draw(st.integers(0, 9))  # orientation, applied by exif_transpose
    if samples in (2, 4) and draw(st.booleans()):
        tags[338] = draw(st.integers(0, 2))  # extra samples: unassociated / associated alpha
    tags[273] = 0  # the strip offset: counted in the IFD size here, drawn just below
    offset = 8 + 2 + 12 * len(tags) + 4
    tags[273] = draw(st.sampled_from([offset, offset, 0, offset + 10_000]))
    entries = b"".join(struct.pack("<HHII", tag, 4, 1, value & 0xFFFFFFFF) for tag, value in sorted(tags.items()))
    return b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", len(tags)) + entries + b"\x00\x00\x00\x00" + data


def _real_images() -> dict[str, bytes]:
    """Small real encoded images: every format dsdkit sees in practice, in the modes each format stores."""
    from PIL import Image

    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (5, 6, 4), dtype=np.uint8))
    sixteen = Image.fromarray(rng.integers(0, 65536, (5, 6), dtype=np.uint16))
    floats = Image.fromarray(rng.random((5, 6), dtype=np.float32) * 300 - 20)
    ints = Image.fromarray(rng.integers(-(2**20), 2**20, (5, 6), dtype=np.int32))
    modes = {
        "1": rgb.convert("1"),
        "L": rgb.convert("L"),
        "LA": rgba.convert("LA"),
        "P": rgb.convert("P"),
        "RGB": rgb,
        "RGBA": rgba,
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": sixteen,
        "I;16B": Image.fromarray(np.asarray(sixteen).astype(">u2")),
        "F": floats,
        "I": ints,
        "LAB": Image.frombytes("LAB", (6, 5), rng.integers(0, 256, 90, dtype=np.uint8).tobytes()),
        "PA": rgba.convert("PA"),
    }
    plan = {
        "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
        "JPEG": ["L", "RGB", "CMYK"],
        "GIF": ["L", "P", "RGB"],
        "BMP": ["1", "L", "P", "RGB", "RGBA"],
        "WEBP": ["RGB", "RGBA"],
        "TIFF": ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "F", "I", "LAB"],
    }
    out: dict[str, bytes] = {}
    for fmt, names in plan.items():
        for name in names:
            buffer = io.BytesIO()
            try:
                modes[name].save(buffer, format=fmt)
            except (OSError, ValueError, KeyError):
                continue  # this Pillow build cannot write that combination
            out[f"{fmt}-{name}"] = buffer.getvalue()
    for compression in ("tiff_lzw", "tiff_deflate", "packbits", "jpeg"):
        buffer = io.BytesIO()
        rgb.save(buffer, format="TIFF", compression=compression)
        out[f"TIFF-RGB-{compression}"] = buffer.getvalue()
    # EXIF orientation (applied on load), a transparent palette PNG, animations, a progressive JPEG.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", exif=exif.tobytes())
    out["JPEG-RGB-exif-rotated"] = buffer.getvalue()
    buffer = io.BytesIO()
    rgb.convert("P").save(buffer, format="PNG", transparency=3)
    out["PNG-P-transparency"] = buffer.getvalue()
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", progressive=True, quality=90)
    out["JPEG-RGB-progressive"] = buffer.getvalue()
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    for fmt in ("GIF", "PNG", "WEBP"):
        buffer = io.BytesIO()
        frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100)
        out[f"{fmt}-animated"] = buffer.getvalue()
    return out


REAL_IMAGES = _real_images()


def test_real_image_corpus_covers_every_format():
    prefixes = {name.split("-")[0] for name in REAL_IMAGES}
    assert prefixes == {"PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"}
    assert len(REAL_IMAGES) >= 30


@st.composite
def damaged_real_images(draw) -> bytes:
    """A real image cut short, with a few bytes overwritten, or both."""
    data = bytearray(REAL_IMAGES[draw(st.sampled_from(sorted(REAL_IMAGES)))])
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.just(len(data)), st.integers(1, len(data))))
    return bytes(data[:cut])


IMAGE_BYTES = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda magic, rest: magic + rest, st.sampled_from(MAGICS), st.binary(max_size=256)),
    png_headers(),
    bmp_headers(),
    gif_headers(),
    tiff_headers(),
    damaged_real_images(),
)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "image.bin"


def check_pixels(pixels) -> None:
    assert isinstance(pixels, np.ndarray), type(pixels)
    assert pixels.dtype == np.float32 and pixels.shape == (3, RESOLUTION, RESOLUTION)
    assert np.isfinite(pixels).all()
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


def preprocess_or_input_error(image, **kwargs) -> np.ndarray | None:
    """``preprocess_image``'s result, checked, or ``None`` after a one-line InputError; anything else propagates."""
    try:
        pixels = preprocess_image(image, RESOLUTION, **kwargs)
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc).strip(), repr(str(exc))
        return None
    check_pixels(pixels)
    return pixels


@pytest.mark.parametrize("name", sorted(REAL_IMAGES))
@pytest.mark.parametrize("resize", ["squash", "center-crop"])
def test_every_real_image_in_the_corpus_decodes(name, resize, tmp_path):
    path = tmp_path / name
    path.write_bytes(REAL_IMAGES[name])
    pixels = preprocess_or_input_error(path, resize=resize)
    assert pixels is not None, f"{name}: a valid image was refused"


@FILE_SETTINGS
@given(data=IMAGE_BYTES, resize=st.sampled_from(["squash", "center-crop"]))
def test_image_file_bytes_give_pixels_or_an_input_error(image_path, data, resize):
    image_path.write_bytes(data)
    preprocess_or_input_error(image_path, resize=resize)
    preprocess_or_input_error(str(image_path), resize=resize)


@FILE_SETTINGS
@given(data=damaged_real_images())
def test_damaged_real_images_give_pixels_or_an_input_error(image_path, data):
    image_path.write_bytes(data)
    preprocess_or_input_error(image_path)


@FILE_SETTINGS
@given(name=st.text(alphabet=st.characters(exclude_characters="\n\r"), min_size=1, max_size=300))
def test_any_path_string_gives_an_input_error(image_path, name):
    """Names that do not exist, are too long, hold NUL bytes, control characters or any script: one-line errors."""
    assume(".." not in name)  # stay inside the test's folder
    assert preprocess_or_input_error(f"{image_path.parent}/missing/{name}") is None
    assert preprocess_or_input_error(image_path.parent / name) is None


@pytest.mark.parametrize("name", ["two\nlines.png", "cr\rreturn.png"])
def test_file_names_with_line_breaks_still_give_one_line_errors(tmp_path, name):
    message = ""
    try:
        preprocess_image(tmp_path / name, RESOLUTION)
    except InputError as exc:
        message = str(exc)
    assert message and "\n" not in message and "\r" not in message, repr(message)


def test_intact_and_truncated_real_images_exhaustively(tmp_path):
    """Every prefix length of a few real images (deterministic complement of the random truncations above)."""
    path = tmp_path / "cut"
    decoded = 0
    for name in ("PNG-RGB", "JPEG-RGB", "GIF-P", "BMP-RGB", "WEBP-RGB", "TIFF-RGB"):
        data = REAL_IMAGES[name]
        for cut in itertools.chain(range(0, min(len(data), 200)), range(200, len(data) + 1, 7), [len(data)]):
            path.write_bytes(data[:cut])
            decoded += preprocess_or_input_error(path) is not None
    assert decoded >= 6  # at least every intact file


# -- arrays --------------------------------------------------------------------------------------------------------

ARRAY_DTYPES = st.sampled_from(
    [
        np.uint8,
        np.uint16,
        np.float32,
        np.float64,
        np.int64,
        np.int8,
        np.int32,
        np.float16,
        np.bool_,
        ">u2",
        ">f4",
        ">i8",
        "<f8",
    ]
).map(np.dtype)
ARRAY_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7),
    st.sampled_from(
        [
            (1, 1),
            (1, 1, 1),
            (3, 5, 5),
            (4, 5, 6),
            (5, 6, 4),
            (5, 6, 2),
            (2, 5, 6),
            (1, 5, 6),
            (5, 6, 1),
            (3, 1, 3),
            (4, 4, 4),
            (1, 300),
            (300, 1),
            (3, 3, 3, 3),
            (0, 5, 3),
            (5, 0),
            (3, 0, 4),
        ]
    ),
)


@st.composite
def arrays(draw) -> np.ndarray:
    dtype, shape = draw(ARRAY_DTYPES), draw(ARRAY_SHAPES)
    if dtype.kind == "f":
        # Mostly in [0, 1] (valid images), sometimes anything (NaN, inf, negatives, huge, subnormal).
        elements = st.one_of(
            st.floats(0, 1, width=min(dtype.itemsize * 8, 64)),
            st.floats(width=min(dtype.itemsize * 8, 64), allow_nan=True, allow_infinity=True),
        )
        array = draw(hnp.arrays(dtype, shape, elements=elements))
    elif dtype.kind in "iu" and draw(st.booleans()):
        array = draw(hnp.arrays(dtype, shape, elements=st.integers(0, min(255, np.iinfo(dtype).max))))
    else:
        array = draw(hnp.arrays(dtype, shape))
    if array.ndim >= 2 and draw(st.booleans()):
        array = np.swapaxes(array, 0, 1)  # non-contiguous
    return array


@FILE_SETTINGS
@given(array=arrays(), resize=st.sampled_from(["squash", "center-crop"]))
def test_arrays_give_pixels_or_an_input_error(array, resize):
    before = array.copy()
    preprocess_or_input_error(array, resize=resize)
    np.testing.assert_array_equal(array, before)  # the caller's array is never modified


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 3), dtype=np.complex64),
        np.array([[1, 2], [3, 4]], dtype=object),
        np.array([["a", "b"], ["c", "d"]]),
        np.zeros((4, 4), dtype="datetime64[s]"),
        np.zeros((4, 4), dtype=np.uint64) + np.uint64(2**63),
    ],
    ids=["complex", "object", "str", "datetime", "uint64-huge"],
)
def test_exotic_array_dtypes_give_pixels_or_an_input_error(array):
    preprocess_or_input_error(array)


@pytest.mark.parametrize("value", [None, 3, 2.5, b"\x89PNG", [[0, 1], [1, 0]], {"a": 1}, object()])
def test_other_python_values_are_input_errors(value):
    assert preprocess_or_input_error(value) is None


@pytest.mark.parametrize(
    "mode",
    [
        "1",
        "L",
        "P",
        "RGB",
        "RGBA",
        "CMYK",
        "YCbCr",
        "LAB",
        "HSV",
        "I",
        "F",
        "LA",
        "PA",
        "La",
        "RGBa",
        "RGBX",
        "I;16",
        "I;16L",
        "I;16B",
        "I;16N",
    ],
)
def test_every_pil_mode_becomes_rgb(mode):
    from PIL import Image

    image = Image.new(mode, (5, 3))
    assert to_rgb(image).mode == "RGB"
    preprocess_or_input_error(image)


def test_float_images_with_non_finite_values_become_rgb():
    from PIL import Image

    values = np.array([[np.inf, -np.inf, np.nan], [0.0, 0.5, 1.0]], dtype=np.float32)
    with np.errstate(all="raise"):  # no overflow, no silent NaN-to-integer cast
        converted = np.asarray(to_rgb(Image.fromarray(values)))
        extreme = np.asarray(to_rgb(Image.fromarray(np.array([[np.inf, 3e38], [-3e38, np.nan]], dtype=np.float32))))
    # [0, 1] maps to [0, 255]; +inf is the top of the range, -inf the bottom, NaN 0.
    assert converted[..., 0].tolist() == [[255, 0, 0], [0, 128, 255]]
    assert extreme[..., 0].tolist() == [[255, 255], [0, 128]]


# -- captions ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from dsdkit.pytorch.tiny import write_clip_tokenizer

    folder = write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer")
    return ClipTokenizer.from_folder(folder)


def check_tokens(tokenizer: ClipTokenizer, tokens: TokenizedText, text: str) -> None:
    n, length = tokens.num_words, tokenizer.max_length
    assert isinstance(tokens, TokenizedText)
    assert tokens.ids.shape == (length,) and tokens.ids.dtype == np.int64
    assert tokens.roles.shape == (length,) and tokens.roles.dtype == np.int8
    assert 1 <= n <= length - 2 and tokens.truncated >= 0
    assert tokens.roles[0] == ROLE_BOS and tokens.ids[0] == tokenizer.bos_id
    assert (tokens.roles[1 : 1 + n] == ROLE_WORD).all()
    assert tokens.roles[1 + n] == ROLE_EOS and tokens.ids[1 + n] == tokenizer.eos_id
    assert (tokens.roles[2 + n :] == ROLE_PAD).all() and (tokens.ids[2 + n :] == tokenizer.pad_id).all()
    assert (tokens.roles == ROLE_BOS).sum() == 1 and (tokens.roles == ROLE_EOS).sum() == 1
    words = tokens.ids[1 : 1 + n]
    # Caption text never produces a special token, and every id is in the vocabulary.
    assert not np.isin(words, [tokenizer.bos_id, tokenizer.eos_id]).any()
    assert (words >= 0).all() and (words < tokenizer.vocab_size).all()
    assert tokens.truncated == 0 or n == length - 2
    assert len(tokenizer.decode_tokens(tokens)) == n


def encode_or_input_error(tokenizer: ClipTokenizer, text) -> TokenizedText | None:
    try:
        tokens = tokenizer.encode(text, where="captions.txt line 3")
    except InputError as exc:
        message = str(exc)
        assert message.startswith("captions.txt line 3") and "\n" not in message, repr(message)
        return None
    check_tokens(tokenizer, tokens, text)
    return tokens


CAPTIONS = st.one_of(
    st.text(),  # any code point but surrogates, control characters included
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Co", "Cn"])),
    st.text(alphabet=st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000!<|>'sabc0"), max_size=60),
    st.text(min_size=200, max_size=3000),
    st.builds(lambda word, n: (word + " ") * n, st.text(min_size=1, max_size=8), st.integers(60, 400)),
    st.just("<|startoftext|><|endoftext|>!"),
)


@TEXT_SETTINGS
@given(text=CAPTIONS)
def test_any_caption_tokenizes_or_is_an_input_error(tokenizer, text):
    tokens = encode_or_input_error(tokenizer, text)
    # Refused exactly when no word is left (an empty caption is the only text error); nothing is lost uncounted.
    words = tokenizer.word_ids(unicodedata.normalize("NFC", text).strip())
    assert (tokens is not None) == bool(words), repr(text)
    if tokens is not None:
        assert tokens.num_words + tokens.truncated == len(words)
        assert tokens.ids[1 : 1 + tokens.num_words].tolist() == words[: tokens.num_words]


@TEXT_SETTINGS
@given(
    value=st.one_of(
        st.none(),
        st.integers(),
        st.floats(allow_nan=True),
        st.binary(),
        st.lists(st.text(max_size=5), max_size=3),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
        st.tuples(st.text()),
        st.booleans(),
        st.builds(bytearray, st.binary()),
        st.builds(np.array, st.lists(st.integers(0, 9), max_size=3)),
    )
)
def test_non_string_captions_are_input_errors(tokenizer, value):
    assert encode_or_input_error(tokenizer, value) is None


@pytest.mark.parametrize("text", ["a\ud800b", "\udcff", "cat \udc80\udc81 dog"])
def test_lone_surrogates_are_input_errors(tokenizer, text):
    """A str decoded with errors="surrogateescape" (e.g. from a file name) is not text a tokenizer can encode."""
    assert encode_or_input_error(tokenizer, text) is None


def test_very_long_single_word_is_truncated_quickly(tokenizer):
    tokens = encode_or_input_error(tokenizer, "x" * 200_000)
    assert tokens is not None and tokens.num_words == tokenizer.max_length - 2 and tokens.truncated > 0

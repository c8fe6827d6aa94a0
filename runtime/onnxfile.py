"""What an ONNX file names besides itself, read without the ``onnx`` package: external-data locations and the
model's ``metadata_props``.

A bundle must check every file that ONNX Runtime will open *before* it opens any (a graph whose initializers live in
``/etc/passwd`` or ``../../elsewhere.bin`` would otherwise be read unverified), and the runtime cannot depend on the
``onnx`` package (it comes with the export extra). An ONNX file is a protobuf ``ModelProto``; this module walks its
wire format, descending only into the messages that can hold tensors (graphs, nodes, attributes, functions, sparse
tensors, training info) and skipping everything else by its length, so a multi-gigabyte graph costs a pass over
its field headers, not a copy of its weights (the file is memory-mapped).

Field numbers are those of ``onnx/onnx.proto`` (stable since IR version 3; checked against the installed ``onnx``
by ``tests/runtime/test_tampering.py``).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OnnxReferences", "OnnxFormatError", "read_references", "metadata_entry"]


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed ONNX ``ModelProto`` (the bundle reader reports it as a damaged graph)."""


@dataclass
class OnnxReferences:
    """``locations``: the external-data file of every tensor that has one (as written, relative to the graph's
    folder); ``metadata``: the model's ``metadata_props``."""

    locations: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


# Which fields of which message are sub-messages worth descending into (everything else is skipped).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _TENSOR, _SPARSE, _FUNCTION, _TRAINING, _ENTRY = range(9)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t, g, tensors, ...
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _TENSOR: {},
}
_MODEL_METADATA = 14  # ModelProto.metadata_props (StringStringEntryProto: key = 1, value = 2)
_TENSOR_EXTERNAL = 13  # TensorProto.external_data (StringStringEntryProto)
# Subgraphs nest (If/Loop bodies); a file nesting deeper than any real model is refused instead of recursing on.
_MAX_DEPTH = 64


def _varint(data, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise OnnxFormatError("a truncated or overlong varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def _fields(data, start: int, end: int):
    """``(field number, wire type, value start, value end)`` of each field of the message in ``data[start:end]``;
    for a varint, the value itself instead of its end."""
    position = start
    while position < end:
        key, position = _varint(data, position, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, after = _varint(data, position, end)
            yield number, wire, value, after
            position = after
            continue
        if wire == 2:
            length, position = _varint(data, position, end)
            stop = position + length
        elif wire == 1:
            stop = position + 8
        elif wire == 5:
            stop = position + 4
        else:  # groups (3, 4) are not used by ONNX
            raise OnnxFormatError(f"wire type {wire} of field {number}")
        if number == 0 or stop > end:
            raise OnnxFormatError("a field runs past the end of its message (a truncated file)")
        yield number, wire, position, stop
        position = stop


def _entry(data, start: int, end: int) -> tuple[str, str]:
    key = value = b""
    for number, wire, begin, stop in _fields(data, start, end):
        if wire == 2 and number == 1:
            key = bytes(data[begin:stop])
        elif wire == 2 and number == 2:
            value = bytes(data[begin:stop])
    try:
        return key.decode("utf-8"), value.decode("utf-8")
    except UnicodeDecodeError:
        raise OnnxFormatError("a key or value that is not UTF-8") from None


def _walk(data, start: int, end: int, kind: int, depth: int, found: OnnxReferences) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFormatError(f"messages nested more than {_MAX_DEPTH} deep")
    children = _CHILDREN[kind]
    for number, wire, begin, stop in _fields(data, start, end):
        if wire != 2:
            continue
        if kind == _TENSOR and number == _TENSOR_EXTERNAL:
            key, value = _entry(data, begin, stop)
            if key == "location":
                found.locations.append(value)
        elif kind == _MODEL and number == _MODEL_METADATA:
            key, value = _entry(data, begin, stop)
            found.metadata[key] = value
        elif number in children:
            _walk(data, begin, stop, children[number], depth + 1, found)


def read_references(path: str | os.PathLike) -> OnnxReferences:
    """The external-data locations and model metadata named in the ONNX file at ``path``.

    Raises:
        OnnxFormatError: the file is not a well-formed ONNX model.
        OSError: it cannot be read.
    """
    found = OnnxReferences()
    with open(Path(path), "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise OnnxFormatError("an empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                _walk(view, 0, size, _MODEL, 0, found)
            finally:
                view.release()
    return found


def metadata_entry(key: str, value: str) -> bytes:
    """The bytes of one ``ModelProto.metadata_props`` entry, to append to a serialized model.

    Protobuf parses concatenated messages as one merged message, whose repeated fields hold the entries of both, so
    appending these bytes to an ``.onnx`` file adds the entry without loading (or rewriting) the model, which at
    full size is gigabytes that the exporter has just written.
    """

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                return bytes(out)

    def string(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    entry = string(1, key.encode("utf-8")) + string(2, value.encode("utf-8"))
    return string(_MODEL_METADATA, entry)

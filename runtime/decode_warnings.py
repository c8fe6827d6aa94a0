"""Warnings and library messages raised while an image file is decoded belong to that file.

Pillow reports a damaged but readable file with a Python warning (``UserWarning: Corrupt EXIF data``,
``DecompressionBombWarning``), and libtiff writes its complaints to stderr itself. Printed raw, they carry no file
name and repeat for every odd file (a folder of a few hundred odd files printed over 600 lines). Here, while dsdkit
decodes a file (:func:`decoding`, entered by the image loader around its Pillow calls), each such message raised in
that thread becomes a *note* on that file: a caller that reports them itself (:func:`collecting`, e.g. the skipped
report of ``dsdkit match``) receives them; otherwise each is logged once through :mod:`logging`, naming the file.
Nothing is printed raw.

One process-wide hook, installed on first use and thread-safe: a thread-local names the file each thread decodes,
so the files decoded in several threads at once (a dataset's images) each get their own notes. It sits in
``warnings._showwarnmsg``, the one function every displayed warning passes through, rather than in
``warnings.showwarning``: ``warnings.catch_warnings`` (pytest wraps every test in one, applications use it too)
swaps ``showwarning`` out for the length of its block, which would bypass the hook. Per-call ``catch_warnings``
is not an option either: it swaps process-global state, so concurrent decodes, and the host application's own
warnings, would land in whichever block happened to be open. Warnings raised outside a decode, and deprecation
warnings (about Pillow's API, not about the file), go on to whatever displayed them before.

Two process-wide settings come with the hook, both for the same reason (each file's notes are complete):
an ``always`` filter for warnings from Pillow's modules, appended after every other filter (the default action
shows a warning once per code location, so the second file with the same damage would get no note; a filter of the
application or of ``-W`` still wins); and libtiff's error and warning handlers, which pass messages raised outside a
decode on to libtiff's own handlers unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

from .errors import one_line

__all__ = ["decoding", "collecting", "note", "install"]

logger = logging.getLogger("dsdkit.runtime.images")

#: Warnings from these modules are shown every time (see the module docstring).
_PIL_MODULES = r"PIL(\.|$)"
#: Notes kept per file (a damaged TIFF can repeat one complaint per strip).
_MAX_NOTES = 20
#: ``(file, note)`` pairs already reported, so that a file decoded twice (screened, then decoded) is logged once.
_SEEN_LIMIT = 100_000

_state = threading.local()  # .file: the file this thread is decoding (or None); .sink: the collecting list
_lock = threading.Lock()
_seen: set[tuple[str, str]] = set()
_chained = None  # warnings._showwarnmsg as it was before the hook
_libtiff: tuple | None = None  # the installed ctypes callbacks (kept alive) and the handlers they chain to


def _record(text: str) -> None:
    """A note on the file this thread is decoding: to the open collector, or logged once."""
    file = _state.file
    text = one_line(text)
    with _lock:
        new = (file, text) not in _seen
        if new:
            if len(_seen) >= _SEEN_LIMIT:
                _seen.clear()
            _seen.add((file, text))
    sink = getattr(_state, "sink", None)
    if sink is not None:
        if text not in sink and len(sink) < _MAX_NOTES:
            sink.append(text)
    elif new:
        logger.warning("%s: %s", file, text)


def _show(message: warnings.WarningMessage) -> None:
    """The hook in ``warnings._showwarnmsg``."""
    if getattr(_state, "file", None) is None or issubclass(
        message.category, (DeprecationWarning, PendingDeprecationWarning)
    ):
        return _chained(message)
    _record(f"{message.category.__name__}: {message.message}")


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """The hook in ``warnings.showwarning``, where a Python has no ``_showwarnmsg`` (all of 3.10-3.13 have it)."""
    if getattr(_state, "file", None) is None or issubclass(category, (DeprecationWarning, PendingDeprecationWarning)):
        return _chained(message, category, filename, lineno, file, line)
    _record(f"{category.__name__}: {message}")


def note(text: str) -> None:
    """Record a note of dsdkit's own on the file being decoded (e.g. an EXIF block that had to be ignored)."""
    if getattr(_state, "file", None) is not None:
        _record(text)


def install() -> None:
    """Install the hook (idempotent; :func:`decoding` calls it, so nothing else needs to)."""
    global _chained
    with _lock:
        if not hasattr(warnings, "_showwarnmsg"):
            if warnings.showwarning is not _showwarning:
                _chained, warnings.showwarning = warnings.showwarning, _showwarning
        elif warnings._showwarnmsg is not _show:
            _chained, warnings._showwarnmsg = warnings._showwarnmsg, _show
        # Checked every time: a catch_warnings block restores the filter list it found, which drops a filter added
        # while it was open.
        if not any(f[0] == "always" and f[3] is not None and f[3].pattern == _PIL_MODULES for f in warnings.filters):
            warnings.filterwarnings("always", module=_PIL_MODULES, append=True)
        if _libtiff is None:
            _install_libtiff()


@contextlib.contextmanager
def decoding(name: str) -> Iterator[None]:
    """Mark this thread as decoding the file ``name`` for the length of the block (the Pillow calls on it)."""
    install()
    outer = getattr(_state, "file", None)
    _state.file = name
    try:
        yield
    finally:
        _state.file = outer


@contextlib.contextmanager
def collecting() -> Iterator[list[str]]:
    """Collect the notes of the files decoded in this thread inside the block (one line each, deduplicated), instead
    of logging them; a caller uses one block per file and reports them with that file."""
    outer = getattr(_state, "sink", None)
    notes: list[str] = []
    _state.sink = notes
    try:
        yield notes
    finally:
        _state.sink = outer
        if outer is not None:
            outer.extend(n for n in notes if n not in outer)


def _install_libtiff() -> None:
    """Route libtiff's messages (written to stderr by libtiff itself; Pillow does not catch them) raised during a
    decode to the file's notes. Wherever this cannot be done (another Pillow build, no C library to format the
    message with), the messages stay on stderr as before."""
    global _libtiff
    _libtiff = ()
    try:
        import ctypes

        from PIL import _imaging

        library = ctypes.CDLL(_imaging.__file__)  # its symbol lookup reaches the libtiff it links
        setters = {"error": library.TIFFSetErrorHandler, "warning": library.TIFFSetWarningHandler}
        vsnprintf = ctypes.CDLL(None).vsnprintf
    except (ImportError, OSError, AttributeError):
        return
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
    # A va_list parameter reaches a callee as a pointer on the ABIs Pillow ships for, so it is passed through as one.
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
    kept = []
    for kind, setter in setters.items():
        setter.argtypes = [handler_type]
        setter.restype = ctypes.c_void_p
        previous: list = [None]

        def handler(module, fmt, args, kind=kind, previous=previous):
            try:
                if getattr(_state, "file", None) is None:
                    if previous[0] is not None:
                        previous[0](module, fmt, args)
                    return
                buffer = ctypes.create_string_buffer(1024)
                vsnprintf(buffer, len(buffer), fmt, args)
                text = buffer.value.decode("utf-8", "replace").rstrip(".")
                where = (module or b"").decode("utf-8", "replace")
                # Pillow hands libtiff a placeholder file name ("tempfile.tif"), which says nothing: left out.
                prefix = f"{where}: " if where and not where.endswith(".tif") else ""
                _record(f"libtiff {kind}: {prefix}{text}")
            except Exception:  # noqa: BLE001, S110 - an exception must not cross back into C; the message is lost
                pass

        callback = handler_type(handler)
        address = setter(callback)
        previous[0] = handler_type(address) if address else None
        kept += [callback, previous]
    _libtiff = tuple(kept)

"""The ``dsdkit`` command: a package of thin typer commands over the library.

``app.py`` holds the typer app, its global options and error handling; ``options.py`` the options that several
commands share (declared once); ``ui.py`` the terminal output; one module per command group registers its commands on
the app when imported here: ``match`` (match, plan, merge), ``serve``, ``train`` (train, eval, adapters), ``export``
(export, inspect, build-engines), ``analysis`` (explain, bench), ``world`` (world train/clip, demo-data) and
``helpers`` (tiny-model, tiny-data, exit-codes).
"""

from . import analysis, export, helpers, match, serve, train, world  # noqa: F401 - each registers its commands
from .app import app, expand_bare_compile, main

__all__ = ["app", "main", "expand_bare_compile"]

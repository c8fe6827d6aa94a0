"""``python -m dsdkit.cli``: the ``dsdkit`` command."""

from .app import main

if __name__ == "__main__":
    main()

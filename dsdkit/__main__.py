"""``python -m dsdkit``: the same command as the ``dsdkit`` console script."""

from .cli.app import main

if __name__ == "__main__":
    main()

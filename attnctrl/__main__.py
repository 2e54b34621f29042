"""``python -m attnctrl``: the same command line as the ``attnctrl`` console script."""

from attnctrl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

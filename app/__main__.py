"""``python -m attnctrl.app [options]``: the same as ``attnctrl app [options]``."""

from __future__ import annotations

import sys

from attnctrl.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["app", *sys.argv[1:]]))

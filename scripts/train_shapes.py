#!/usr/bin/env python
"""Train attnctrl's embedded shapes model: the same as ``attnctrl train-shapes``.

Example (two hours on a 2-core CPU, resumable):
    python scripts/train_shapes.py --out attnctrl/models/shapes/model --work runs/shapes --minutes 120
    python scripts/train_shapes.py --out attnctrl/models/shapes/model --work runs/shapes --minutes 120 --resume
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from attnctrl.models.shapes.train import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Train attnctrl's embedded shapes model: the same as ``attnctrl train-shapes``.

Example (two hours on a 2-core CPU, resumable):
    python scripts/train_shapes.py --out attnctrl/models/shapes/model --work runs/shapes --minutes 120
    python scripts/train_shapes.py --out attnctrl/models/shapes/model --work runs/shapes --minutes 120 --resume
    python scripts/train_shapes.py --flow --out attnctrl/models/shapes/flow_model --work runs/shapes-flow --minutes 80
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from attnctrl.cli.commands import cmd_train_shapes  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(cmd_train_shapes(sys.argv[1:]))  # --flow: the flow-matching (SD3-shaped) model

#!/usr/bin/env python
"""Train attnctrl's embedded shapes model (thin wrapper around attnctrl.models.shapes.train.train).

Example (about 80 minutes on a 2-core CPU, resumable):
    python scripts/train_shapes.py --out attnctrl/models/shapes/model --work runs/shapes --minutes 80
    python scripts/train_shapes.py --out attnctrl/models/shapes/model --work runs/shapes --minutes 80 --resume
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="attnctrl/models/shapes/model", help="diffusers folder to write")
    p.add_argument("--work", default="runs/shapes", help="work dir for checkpoints and latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=80.0, help="total wall-clock budget (over resumes)")
    p.add_argument("--vae-minutes", type=float, default=10.0)
    p.add_argument("--max-steps", type=int, default=None, help="cap on UNet steps")
    p.add_argument("--pool", type=int, default=10_000, help="number of pre-rendered scenes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work")
    p.add_argument("--export-checkpoint", action="store_true", help="only export --work's checkpoint to --out")
    p.add_argument("--finetune-decoder", type=float, default=None, metavar="MINUTES",
                   help="only fine-tune the VAE decoder on --work's pre-encoded latents for MINUTES (resumable)")
    a = p.parse_args(argv)
    if a.finetune_decoder is not None:
        from attnctrl.models.shapes.train import finetune_decoder

        finetune_decoder(a.work, seed=a.seed, minutes=a.finetune_decoder, threads=a.threads, device=a.device)
        return 0
    if a.export_checkpoint:
        from attnctrl.models.shapes.train import export_checkpoint

        export_checkpoint(a.work, a.out)
        return 0
    from attnctrl.models.shapes.train import train

    train(
        a.out,
        work_dir=a.work,
        seed=a.seed,
        minutes=a.minutes,
        vae_minutes=a.vae_minutes,
        max_steps=a.max_steps,
        pool_size=a.pool,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup=a.warmup,
        vae_batch_size=a.vae_batch_size,
        checkpoint_minutes=a.checkpoint_minutes,
        resume=a.resume,
        device=a.device,
        threads=a.threads,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

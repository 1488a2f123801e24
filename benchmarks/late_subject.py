"""A subject video whose audio runs late, for the ``subject --offset`` flow end to end.

    .venv/bin/python benchmarks/late_subject.py --model models:/se4lip-grid@champion \\
        --heldout shards/grid --out late5.mp4 --delay 5

Joins the last ``--clips`` GRID clips the model held out (its own split rule on ``--heldout``,
see ``audit_injected.heldout_grid``) into one video and delays its audio by ``--delay`` frames;
``--delay 0`` gives the in-sync control.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from audit_injected import heldout_grid

from se4lip_dist.media import decode_clip
from se4lip_dist.registry import load_sync_model
from se4lip_dist.sync import shift_audio
from se4lip_dist.synthetic import write_clip
from se4lip_dist.tracking import default_tracking_uri


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--heldout", type=Path, required=True)
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--delay", type=int, default=5, help="frames the audio runs late")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    _, cfg = load_sync_model(args.model, args.tracking_uri or default_tracking_uri())
    clips = [decode_clip(p) for p in heldout_grid(args.heldout, cfg)[-args.clips:]]
    frames = np.concatenate([c.frames for c in clips])
    audio = np.concatenate([c.audio for c in clips])
    spf = cfg.data.samples_per_frame
    write_clip(args.out, frames, shift_audio(audio, args.delay, spf), cfg.data.fps,
               cfg.data.sample_rate)
    print(f"{args.out}: {len(frames)} frames of {len(clips)} held-out GRID clips, audio "
          f"{args.delay:+d} frames")


if __name__ == "__main__":
    main()

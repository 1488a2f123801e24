"""Ray job entry point: ``se4lip-dist audit --json`` with the job's arguments (jobs/README.md).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/extract.yaml \
        --entrypoint-num-cpus 0.25 -- python jobs/audit_job.py s3://bucket/shards \
        --model models:/se4lip@champion --fix s3://bucket/shards-audited --workers 4

The options are the CLI's (``se4lip-dist audit --help``); the summary is printed as one JSON
object.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run the ``audit`` command of the se4lip-dist CLI with ``argv`` and ``--json``."""
    from se4lip_dist.cli import app

    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" not in args and not {"--help", "-h"} & set(args):
        args.append("--json")
    app(["audit", *args], prog_name="se4lip-dist")


if __name__ == "__main__":
    main()

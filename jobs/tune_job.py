"""Ray job entry point: ``se4lip-dist tune`` with the job's arguments (see jobs/README.md).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/tune.yaml \
        --entrypoint-num-cpus 0.25 -- python jobs/tune_job.py --data SHARDS --space ... \
        --address auto
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run the ``tune`` command of the se4lip-dist CLI with ``argv``."""
    from se4lip_dist.cli import app

    app(["tune", *(sys.argv[1:] if argv is None else argv)], prog_name="se4lip-dist")


if __name__ == "__main__":
    main()

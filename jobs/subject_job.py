"""Ray job entry point: ``se4lip-dist subject`` with the job's arguments (see jobs/README.md).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/extract.yaml \
        --entrypoint-num-cpus 0.25 -- python jobs/subject_job.py s3://bucket/obama.mp4 \
        --out s3://bucket/subjects/obama --tracking-uri http://mlflow:5000 --address auto
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run the ``subject`` command of the se4lip-dist CLI with ``argv``."""
    from se4lip_dist.cli import app

    app(["subject", *(sys.argv[1:] if argv is None else argv)], prog_name="se4lip-dist")


if __name__ == "__main__":
    main()

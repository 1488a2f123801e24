"""Ray job entry point: ``se4lip-dist extract --json`` with the job's arguments (jobs/README.md).

    ray job submit --address http://HEAD:8265 --runtime-env jobs/extract.yaml \
        --entrypoint-num-cpus 0.25 -- python jobs/extract_job.py INPUT... --model URI --out DIR

The options are the CLI's (``se4lip-dist extract --help``); the summary is printed as one JSON
object and the exit status is 1 when any input failed.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """Run the ``extract`` command of the se4lip-dist CLI with ``argv`` and ``--json``."""
    from se4lip_dist.cli import app

    args = list(sys.argv[1:] if argv is None else argv)
    if "--json" not in args and not {"--help", "-h"} & set(args):
        args.append("--json")
    app(["extract", *args], prog_name="se4lip-dist")


if __name__ == "__main__":
    main()

"""The RayJob entrypoint: `python -m batchinfer_job.entrypoint --spec /etc/batchinfer/spec.json`.

Runs on the Ray head as the driver. Everything comes from the mounted spec file; nothing from the
command line but its path.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from batchinfer_job.documents import SpecError, parse_document
from batchinfer_job.status_reporter import StatusReporter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="JSON BatchInference document")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        document = parse_document(json.loads(args.spec.read_text()))
    except SpecError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    import ray

    from batchinfer_job.capacity import planned_capacity
    from batchinfer_job.local import job_failures
    from batchinfer_job.pipeline import run_pipeline

    # The RayJob's cluster (RAY_ADDRESS is set by KubeRay). INFO in every task and actor too, so the model
    # actor's `model_ready device=… precision=…` line reaches the job's log.
    ray.init(logging_config=ray.LoggingConfig(encoding="TEXT", log_level="INFO"))
    reporter = StatusReporter.in_cluster()
    try:
        result = run_pipeline(document.spec, on_progress=reporter, planned=planned_capacity(document.spec))
    except job_failures() as err:
        # KubeRay copies the job's last log lines into the RayJob's status.message, and the operator copies
        # that into the BatchInference: make the last line say what happened.
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps({"event": "finished", **result.manifest["counts"], "output": result.output_uri}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scheduled dataset rebuild: process new inputs and publish a new version, one run at a time.

Takes the same config as `ttm-ray prep` (a `kind: prep` file works as is) plus an optional
`rebuild:` section. Each run:
  1. takes the lock <dataset_root>/rebuild.lock (created atomically; JSON with host, pid,
     run id, start and heartbeat times; refreshed every rebuild.lock.heartbeat_s). A lock
     whose heartbeat is older than rebuild.lock.ttl_s, or whose pid is gone on this host,
     is stale and taken over (logged, kept in the status record). Another live rebuild
     makes this one wait up to rebuild.lock.wait_s (default 0), then exit 75;
  2. runs the incremental pipeline: only inputs not yet in the work store are processed; a
     new version is published atomically, or none when nothing changed. A crash leaves
     `latest` on the previous version. While the pipeline runs, the heartbeat needs progress
     (rows reaching the work store): after rebuild.lock.stall_s without any it stops, the
     lock goes stale for the next rebuild, and this run fails with "no progress for N s".
     The lock is checked before the pipeline, before publishing and before retention: a
     run whose lock was taken over fails with "lock lost" and publishes nothing;
  3. on success, keeps the newest rebuild.retention.keep_versions versions (null:
     publish.keep_versions; the one `latest` names is never deleted);
  4. writes <dataset_root>/rebuilds/<run_id>.json and rebuilds/last.json, logs an MLflow
     run (tag ttm.kind=rebuild) and, on failure, POSTs JSON to $TTM_REBUILD_WEBHOOK_URL
     if set (http:// or https:// only; anything else is a configuration error).
The dataset root must be a local or shared-filesystem path (EFS/NFS), not s3:// etc.

Exit codes: 0 succeeded (also when nothing was new), 1 failed, 2 invalid configuration,
75 already running (another rebuild holds the lock). Under `ray job submit` every
non-zero exit is a FAILED job: the last log line (JSON) and rebuilds/last.json tell which.

    ttm-ray rebuild --config jobs/configs/prep/production.yaml --set rebuild.lock.wait_s=600
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- \\
        python -m jobs.rebuild_dataset --config jobs/configs/prep/production.yaml
"""

from __future__ import annotations

import signal
import sys
import threading

from jobs.common import job_parser, load_job_config, run_job, setup_logging

DEFAULT_CONFIG = "jobs/configs/prep/quickstart.yaml"
NAME = "rebuild_dataset"


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    # `ray job stop` and Kubernetes send SIGTERM: unwind, so the lock is released and the
    # run is recorded as failed instead of leaving a lock that must first go stale.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(prog, __doc__ or "", DEFAULT_CONFIG)
    parser.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    outcome: dict[str, str] = {}

    def job() -> dict:
        from data_prep.rebuild import RebuildConfig, job_summary, rebuild

        cfg = load_job_config(RebuildConfig, args)
        print(f"[rebuild] {cfg.dataset_root} (work store {cfg.work_dir})", file=sys.stderr)
        record = rebuild(cfg, progress=not args.no_progress)
        outcome["status"] = record["status"]
        # The summary's "status" (succeeded or already_running) is the JSON line's status.
        return job_summary(record)

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    code = run_job(job, NAME)
    if code == 0 and outcome.get("status") == "already_running":
        from data_prep.rebuild import EXIT_ALREADY_RUNNING

        return EXIT_ALREADY_RUNNING
    return code


if __name__ == "__main__":
    sys.exit(main())

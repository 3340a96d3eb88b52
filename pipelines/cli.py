"""`deltaray batch ...`: run a job here, or submit / watch / stop it on a Ray cluster (Jobs API).

    deltaray batch run JOB.yaml [--address HOST:PORT]  joins that Ray cluster (or RAY_ADDRESS),
                                                       else starts a local one
    deltaray batch submit JOB.yaml --address http://HEAD:8265 [--no-upload] [--wait]
    deltaray batch status|logs|stop SUBMISSION_ID --address http://HEAD:8265
    deltaray batch list --address http://HEAD:8265

`submit` validates the spec here first (a bad spec never reaches the cluster), then runs
`python -m cluster.cli batch run` on the cluster with the spec in an environment variable and,
unless --no-upload, this project as the job's working directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SPEC_ENV = "DELTARAY_JOB_SPEC"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
UPLOAD_EXCLUDES = [".venv", ".git", "out", "**/__pycache__", "*.egg-info", ".pytest_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265")


def jobs_client(address: str):
    from ray.job_submission import JobSubmissionClient
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:
        raise ValueError(f"--address: no Ray Jobs API at {address} ({e})") from None


def cmd_run(args) -> None:
    from pipelines.job import JobFailed, run_job
    from pipelines.spec import load_spec, parse_spec
    import json
    if args.spec_env:
        spec = parse_spec(json.loads(os.environ[SPEC_ENV]))
    elif args.job:
        spec = load_spec(args.job)
    else:
        raise ValueError("batch run: give a job spec file")
    if args.address:
        os.environ["RAY_ADDRESS"] = args.address
    try:
        run_job(spec, quiet=args.quiet)
    except JobFailed as e:                    # one line, not Ray's traceback
        print(f"deltaray: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def submission(spec, upload: bool) -> dict:
    from pipelines.spec import spec_json
    runtime_env = {"env_vars": {SPEC_ENV: spec_json(spec)}}
    if upload:
        runtime_env.update(working_dir=str(PROJECT_ROOT), excludes=UPLOAD_EXCLUDES)
    return {"entrypoint": f"python -m cluster.cli batch run --spec-env --quiet",
            "runtime_env": runtime_env,
            "submission_id": f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            "metadata": {"deltaray_job": spec.name}}


def cmd_submit(args) -> None:
    from pipelines.spec import load_spec
    spec = load_spec(args.job)
    client = jobs_client(args.address)
    job_id = client.submit_job(**submission(spec, not args.no_upload))
    print(job_id, flush=True)
    if args.wait:
        status = wait(client, job_id)
        print(f"{job_id}: {status}")
        if status != "SUCCEEDED":
            raise ValueError(f"job {job_id} ended {status}; see `deltaray batch logs {job_id}`")


def wait(client, job_id: str, poll_s: float = 2.0) -> str:
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(poll_s)
    return status


def cmd_status(args) -> None:
    info = jobs_client(args.address).get_job_info(args.submission_id)
    print(f"{args.submission_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))


def cmd_logs(args) -> None:
    print(jobs_client(args.address).get_job_logs(args.submission_id), end="")


def cmd_stop(args) -> None:
    stopped = jobs_client(args.address).stop_job(args.submission_id)
    print(f"{args.submission_id}: {'stop requested' if stopped else 'already finished'}")


def cmd_list(args) -> None:
    for job in jobs_client(args.address).list_jobs():
        name = (job.metadata or {}).get("deltaray_job", "")
        print(f"{job.submission_id or job.job_id:<40} {job.status.value:<10} {name}")


def add_batch_commands(sub) -> None:
    """Register `batch run|submit|status|logs|stop|list` on the `deltaray` subparsers."""
    batch = sub.add_parser("batch", help="batch jobs over files and object storage (Ray Data)")
    cmds = batch.add_subparsers(dest="batch_command", required=True)
    run = cmds.add_parser("run", help="run (or resume) a job on local Ray")
    run.add_argument("job", nargs="?", help="job spec, YAML or JSON")
    run.add_argument("--spec-env", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--quiet", action="store_true", help="no periodic progress lines")
    run.add_argument("--address", help="Ray cluster to join (GCS host:port); default RAY_ADDRESS, "
                                       "else a new local Ray")
    run.set_defaults(func=cmd_run)
    submit = cmds.add_parser("submit", help="submit a job to a Ray cluster (Jobs API)")
    submit.add_argument("job")
    submit.add_argument("--address", default=default_address())
    submit.add_argument("--no-upload", action="store_true",
                        help="the project is installed in the cluster's image; upload nothing")
    submit.add_argument("--wait", action="store_true", help="wait until the job ends")
    submit.set_defaults(func=cmd_submit)
    for name, func, text in (("status", cmd_status, "a submitted job's status"),
                             ("logs", cmd_logs, "a submitted job's driver log"),
                             ("stop", cmd_stop, "stop a submitted job")):
        p = cmds.add_parser(name, help=text)
        p.add_argument("submission_id")
        p.add_argument("--address", default=default_address())
        p.set_defaults(func=func)
    listing = cmds.add_parser("list", help="jobs on a Ray cluster")
    listing.add_argument("--address", default=default_address())
    listing.set_defaults(func=cmd_list)

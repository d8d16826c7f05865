"""What every job entrypoint shares: argument parsing, config loading, the exit contract.

Contract (``ray job submit`` relies on it): validate the config before touching a cluster;
log where outputs go; exit 0 only on success with a one-line JSON summary as the last line of
stdout; exit non-zero with a clear reason otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttm_ray.config import ConfigError, load_config

CONFIG_EPILOG = (
    "Override any config key with --set KEY.PATH=VALUE (repeatable; the value is YAML).\n"
    "See the keys and defaults with `ttm-ray config show --kind KIND`."
)

EXIT_CONFIG_ERROR = 2
EXIT_FAILED = 1


def job_parser(
    prog: str | None, description: str, default_config: str | None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=CONFIG_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", "-c", default=default_config,
        help=f"job config YAML (default: {default_config})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set run.name=exp1 (repeatable)",
    )
    parser.add_argument("--address", help="Ray cluster address (overrides run.ray_address)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def resolve_config_path(path: str | None) -> str | None:
    """Config paths are relative to the working dir; fall back to the repo (installed use)."""
    if path is None or Path(path).exists():
        return path
    in_repo = repo_path(path)
    return str(in_repo) if in_repo.exists() else path


def load_job_config(cls: type, args: argparse.Namespace) -> Any:
    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"run.ray_address={args.address}")
    return load_config(cls, resolve_config_path(args.config), overrides)


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _detach_ray() -> None:
    """Disconnect from Ray before the summary line: Ray streams worker logs to this process's
    stdout asynchronously, and a late worker line must not follow the JSON summary."""
    if _ray_connected():
        sys.modules["ray"].shutdown()
    sys.stderr.flush()


def run_job(fn: Callable[[], dict], name: str) -> int:
    """Run ``fn`` and turn its outcome into the exit contract (JSON summary as last line)."""
    connected_before = _ray_connected()  # a caller's Ray (tests, a notebook) is left alone
    try:
        try:
            summary = fn()
        finally:
            if not connected_before:
                _detach_ray()
    except ConfigError as exc:
        print(f"{name}: invalid configuration:\n{exc}", file=sys.stderr)
        print(json.dumps({"job": name, "status": "config_error", "error": str(exc)}))
        return EXIT_CONFIG_ERROR
    except KeyboardInterrupt:
        print(json.dumps({"job": name, "status": "interrupted"}))
        return 130
    except Exception as exc:  # the job failed: say why on the last line, keep the traceback
        logging.getLogger(name).exception("job failed")
        error = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"job": name, "status": "failed", "error": error}))
        return EXIT_FAILED
    print(json.dumps({"job": name, "status": "succeeded", **summary}, default=str))
    return 0


def repo_path(*parts: str) -> Path:
    """A path inside the repository (the working dir a Ray job uploads)."""
    return Path(__file__).resolve().parent.parent.joinpath(*parts)

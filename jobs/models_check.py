"""``ttm-ray models check``: every model folder and weights file the given job configs need.

    ttm-ray models check --config jobs/configs/prep/production.yaml
    ttm-ray models check --config jobs/configs/train/unet_stage1.yaml --config ... --json
    ttm-ray models check --kind train --config my.yaml --set encoders.text_encoder.path=/x

Each config is loaded as its job loads it (its ``kind`` picks the class, or --kind), then every
model the run would load is listed with the config field that names it, checked (the path
exists; a model folder holds config.json + weights and the expected architecture; a vLLM or
transformers engine can serve its architecture) and, when it is missing or wrong, how to stage
it: ``huggingface-cli download <repo> --local-dir <path>`` on a machine with hub access for the
known defaults, then a copy to the same path on every node. Run it on a cluster node to check
the real model store; run it anywhere to see what must be staged.

Exit status: 0 when every model is there and right, 1 when one is missing or wrong (or a
config does not validate), 2 for bad arguments (no such file, unknown kind).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jobs.config import KINDS, config_class
from ttm_ray.config import ConfigError, load_config, load_merged
from ttm_ray.ops.models_check import (
    NEEDS,
    ModelReport,
    check_models,
    failed,
    format_table,
    model_needs,
)


def _load(path: str, kind: str | None, overrides: list[str]) -> tuple[str, object]:
    """``(kind, config)`` loaded like the job does; ValueError for argument problems."""
    if not Path(path).is_file():
        raise ValueError(f"--config {path}: no such file")
    try:
        data = load_merged(path)
    except ConfigError as exc:  # unreadable YAML, a missing base: the argument is bad
        raise ValueError(f"--config {path}: {exc}") from None
    kind = kind or data.get("kind")
    if kind is None:
        raise ValueError(f"--config {path}: no `kind:` key; give --kind "
                         f"({', '.join(sorted(NEEDS))})")
    if kind not in NEEDS:
        raise ValueError(f"--config {path}: kind {kind!r} loads no models; models check reads "
                         f"{', '.join(sorted(NEEDS))} configs")
    return kind, load_config(config_class(kind), path, overrides)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("check", help="list, check and explain how to stage the models that "
                                     "job configs need",
                       description="Exit 0 when every model is present and right, 1 when one "
                                   "is missing or wrong, 2 for bad arguments.")
    p.add_argument("--config", dest="configs", action="append", required=True, metavar="FILE",
                   help="a prep/rebuild/train/encode/generate/evaluate config (repeatable)")
    p.add_argument("--kind", choices=sorted(k for k in KINDS if k in NEEDS),
                   help="the config class, when a file has no `kind:` (applies to every file)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a key in every config (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)

    reports: list[ModelReport] = []
    invalid: list[dict[str, str]] = []
    for path in args.configs:
        try:
            kind, cfg = _load(path, args.kind, args.overrides)
        except ConfigError as exc:  # before ValueError: ConfigError is one
            # A config that does not validate (e.g. a captioner vLLM cannot serve, an unset
            # ${VAR}) is a finding reported with the rest, not a usage error.
            invalid.append({"config": path, "detail": str(exc)})
            continue
        except ValueError as exc:
            print(f"{prog or 'models check'}: {exc}", file=sys.stderr)
            return 2
        reports.extend(check_models(model_needs(kind, cfg, path)))

    if args.json:
        print(json.dumps({"ok": not failed(reports) and not invalid,
                          "models": [r.as_dict() for r in reports],
                          "invalid_configs": invalid}, indent=2))
    else:
        print(format_table(reports))
        for bad in invalid:
            print(f"INVALID {bad['config']}:\n{bad['detail']}")
    return 1 if failed(reports) or invalid else 0


if __name__ == "__main__":
    sys.exit(main())

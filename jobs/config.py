"""Show or validate job configs.

    ttm-ray config validate jobs/configs/prep/quickstart.yaml --set run.name=x
    ttm-ray config show jobs/configs/prep/quickstart.yaml      # effective config (bases, defaults)
    ttm-ray config show --kind prep                            # every key with its default

A config file names its ``kind`` (synth, prep, train, ...); the kind picks the schema.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ttm_ray.config import ConfigError, dump_yaml, from_dict, load_merged
from ttm_ray.config.loader import apply_overrides
from ttm_ray.config.schema import field_help

# kind -> "module:Class". Later issues add train, generate, evaluate, rebuild.
KINDS: dict[str, str] = {
    "synth": "data_prep.config:SynthConfig",
    "prep": "data_prep.config:PrepConfig",
    "rebuild": "data_prep.rebuild:RebuildConfig",
    "train": "ttm_ray.training.config:TrainConfig",
    "encode": "ttm_ray.encoding.config:EncodeConfig",
    "generate": "jobs.inference_config:GenerateConfig",
    "evaluate": "jobs.inference_config:EvaluateConfig",
}


def config_class(kind: str) -> type:
    if kind not in KINDS:
        raise ConfigError([f"kind: expected one of {', '.join(sorted(KINDS))}, got {kind!r}"])
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load_any(path: str, overrides: list[str]) -> object:
    """Load a config file of any kind, choosing the schema from its ``kind`` key."""
    data = apply_overrides(load_merged(path), overrides)
    kind = data.get("kind")
    if kind is None:
        raise ConfigError([f"kind: required key missing (one of {', '.join(sorted(KINDS))})"],
                          path)
    try:
        cls = config_class(kind)
    except ConfigError as exc:
        raise ConfigError(exc.errors, path) from None
    source = f"{path} (with --set {' '.join(overrides)})" if overrides else path
    return from_dict(cls, data, source)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("show", "print the effective config"),
                         ("validate", "check a config; exit 2 with every problem listed")):
        p = sub.add_parser(action, help=text, description=text)
        p.add_argument("file", nargs="?", help="config YAML")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a key (repeatable)")
        if action == "show":
            p.add_argument("--kind", choices=sorted(KINDS),
                           help="show the defaults of a kind instead of a file")
    args = parser.parse_args(argv)
    try:
        if args.action == "show" and args.file is None:
            if not args.kind:
                parser.error("show needs a FILE or --kind")
            cls = config_class(args.kind)
            cfg = from_dict(cls, {})
            for key, text in field_help(cls).items():
                print(f"# {key}: {text}")
            print(dump_yaml(cfg), end="")
            return 0
        if args.file is None:
            parser.error(f"{args.action} needs a FILE")
        cfg = load_any(args.file, args.overrides)
    except ConfigError as exc:
        print(f"invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if args.action == "show":
        print(dump_yaml(cfg), end="")
    else:
        print(f"{args.file}: ok ({type(cfg).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

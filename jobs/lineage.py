"""Print the lineage of a dataset version or a registered model from the MLflow store.

    ttm-ray lineage v0001                        # a dataset (or encoded) version (or its full name)
    ttm-ray lineage ttm-dit-stage1               # every version of a registered model
    ttm-ray lineage ttm-dit-stage1/2 --json      # one model version (models:/NAME/N works too)

Each chain runs raw videos -> prep run -> dataset version (-> encode run -> encoded version)
-> training run -> model version -> evaluation runs, read from the store's dataset inputs,
LoggedModels, Model Registry and ``ttm.*`` tags (ttm_ray/lineage.py). Exit codes: 0 printed,
1 nothing matches (or the store cannot be read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_STORE = "sqlite:///runs/quickstart/mlflow.db"


def tracking_uri(arg: str | None) -> str:
    """``--tracking-uri``, else $MLFLOW_TRACKING_URI, else the quickstart's store."""
    return arg or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE


def missing_sqlite(uri: str) -> str | None:
    """The path of a ``sqlite:///`` store that does not exist (MLflow would create an empty
    one and report nothing), else None."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        return uri[len(prefix):]
    return None


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("query", metavar="VERSION_OR_MODEL",
                        help="a dataset version (v0001), a registered model (ttm-dit-stage1) "
                             "or a model version (ttm-dit-stage1/2, models:/ttm-dit-stage1/2)")
    parser.add_argument("--tracking-uri", default=None,
                        help=f"MLflow store; default $MLFLOW_TRACKING_URI or {DEFAULT_STORE}")
    parser.add_argument("--json", action="store_true", help="print the chains as JSON")
    args = parser.parse_args(argv)
    uri = tracking_uri(args.tracking_uri)
    if (path := missing_sqlite(uri)) is not None:
        print(f"lineage: no MLflow store at {path} (run `make quickstart`, or give "
              "--tracking-uri / $MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 1
    from ttm_ray.lineage import LineageError, client_for, format_chains, lineage

    try:
        chains = lineage(client_for(uri), args.query)
    except LineageError as exc:
        print(f"lineage: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"query": args.query, "tracking_uri": uri,
                          "chains": [c.steps for c in chains]}, indent=2, default=str))
    else:
        print(format_chains(chains))
    return 0


if __name__ == "__main__":
    sys.exit(main())

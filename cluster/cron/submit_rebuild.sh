#!/usr/bin/env bash
# Submit the nightly dataset rebuild to a Ray cluster and wait for it; called by
# crontab.example. Exit status = the Ray job's (ray job submit exits non-zero on failure).
#
# Settings come from an env file (default /etc/ttm-ray/rebuild.env, mode 600, NOT in git):
#   RAY_ADDRESS=http://127.0.0.1:8265        # job API (an SSH tunnel or the in-cluster head)
#   RAY_AUTH_MODE=token
#   RAY_AUTH_TOKEN_PATH=/etc/ttm-ray/auth_token  # a file holding the token, never the token
#   TTM_RAY_CONFIG=jobs/configs/prep/production.yaml   # optional
#   TTM_RAY_CHECKOUT=/opt/ttm-ray                        # optional: upload this checkout
# With TTM_RAY_CHECKOUT the job runs that checkout's code (uploaded as the working dir,
# trimmed by jobs/runtime_env.yaml); without it, the code already in the cluster image.
set -euo pipefail

env_file="${1:-/etc/ttm-ray/rebuild.env}"
if [[ ! -r "$env_file" ]]; then
    echo "submit_rebuild: cannot read $env_file" >&2
    exit 2
fi
set -a
# shellcheck source=/dev/null
source "$env_file"
set +a

: "${RAY_ADDRESS:?RAY_ADDRESS must be set in $env_file}"
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    echo "submit_rebuild: put the token in a file (RAY_AUTH_TOKEN_PATH), not in $env_file" >&2
    exit 2
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
config="${TTM_RAY_CONFIG:-jobs/configs/prep/production.yaml}"
submission_id="rebuild-$(date -u +%Y%m%dT%H%M%SZ)"

args=(--address "$RAY_ADDRESS" --submission-id "$submission_id")
if [[ -n "${TTM_RAY_CHECKOUT:-}" ]]; then
    cd "$TTM_RAY_CHECKOUT"
    args+=(--working-dir . --runtime-env jobs/runtime_env.yaml)
else
    args+=(--runtime-env-json '{"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}')
fi

echo "submit_rebuild: $submission_id -> $RAY_ADDRESS ($config)" >&2
exec ray job submit "${args[@]}" -- python -m jobs.rebuild_dataset --config "$config"

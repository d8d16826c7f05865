"""Encode a published dataset version once: the encoded-latent cache training can read.

Reads data.dataset_root at data.version, prepares every clip as training would (decode,
render the trajectory, token ids on the model's grid), runs the frozen autoencoder and text
encoder of the `encoders:` section on a Ray Data actor pool (`resources`: GPUs per actor in
production) and publishes an encoded version (manifest, card, _SUCCESS, latest) under
output.dataset_root (default <data.dataset_root>-encoded/<encoding hash>). Clips an earlier
encoded version there already holds (same encoders and geometry) are reused, not re-encoded.
Train on it with `--set data.encoded=<that root>`.

    ttm-ray encode --config jobs/configs/encode/unet_stage2.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.encode --config jobs/configs/encode/dit_stage2.yaml
"""

from __future__ import annotations

import sys

from jobs.common import job_parser, load_job_config, run_job, setup_logging

DEFAULT_CONFIG = "jobs/configs/encode/unet_stage2_tiny.yaml"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(prog, __doc__ or "", DEFAULT_CONFIG)
    parser.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)

    def job() -> dict:
        from ttm_ray.encoding.config import EncodeConfig
        from ttm_ray.encoding.job import run_encode

        cfg = load_job_config(EncodeConfig, args)
        summary = run_encode(cfg, progress=not args.no_progress)
        print(f"[encode] {summary['source_version']} -> {summary['version_path']}: "
              f"{summary['encoded']} encoded, {summary['reused']} reused, "
              f"{summary['rejected']} rejected; train with --set "
              f"data.encoded={summary['dataset_root']}", file=sys.stderr)
        return summary

    return run_job(job, "encode")


if __name__ == "__main__":
    sys.exit(main())

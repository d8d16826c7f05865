"""``ttm-ray``: one command line over the job modules.

Each subcommand is a thin wrapper over ``jobs/<module>.py``, which also runs on its own as
``python -m jobs.<module> ...`` (what ``ray job submit`` runs). The CLI lives in ``jobs`` (not
``ttm_ray``) so the library never imports the layer above it.
"""

from __future__ import annotations

import importlib
import os
import sys

# subcommand -> (module, one-line summary). Later issues add train, generate, evaluate, ...
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("jobs.quickstart", "run the main job end to end on the embedded default"),
    "rehearse": ("jobs.rehearse", "rehearse production: the shipped configs end to end on a "
                 "scale-from-zero autoscaling Ray cluster on this machine"),
    "synth": ("jobs.synth", "generate the quickstart corpus (mp4s, SA-V masks, manifest)"),
    "config": ("jobs.config", "show or validate a job config (`config show|validate FILE`)"),
    "prep": ("jobs.build_dataset", "build a dataset with the Ray Data curation pipeline"),
    "rebuild": ("jobs.rebuild_dataset", "scheduled dataset rebuild: locked, incremental, retained"),
    "encode": ("jobs.encode", "encode a dataset version once (VAE latents, text embeddings) "
               "for training with data.encoded"),
    "train": ("jobs.train", "train a TTM model on Ray Train + DeepSpeed ZeRO"),
    "generate": ("jobs.generate", "two-stage image-to-video from exported models (or a "
                                  "manifest on Ray Data)"),
    "evaluate": ("jobs.evaluate", "generate a benchmark's items and score them (FVD, "
                                  "CLIPFrame, ViCLIP-T/V, AD; Table 5 settings)"),
    "plan": ("jobs.plan", "capacity plans: `plan model|train --config FILE`"),
    "cluster": ("jobs.cluster", "cluster YAMLs and manifests: `cluster validate`"),
    "lineage": ("jobs.lineage", "the MLflow chain of a dataset version or registered model: "
                "raw videos -> dataset -> training run -> model version -> evaluations"),
    "models": ("jobs.models_check", "the model folders and weights configs need: "
               "`models check --config FILE...` (present, right architecture, how to stage)"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: ttm-ray COMMAND [ARGS...]",
        "",
        "Through-The-Mask on Ray: data prep, training, inference. Every command takes --help.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "Jobs also run as `python -m jobs.<module> --config FILE` (the form `ray job submit`",
        "uses). Config files live under jobs/configs/; override keys with --set KEY=VALUE.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ttm-ray: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest, prog=f"ttm-ray {name}") or 0)
    except BrokenPipeError:  # `ttm-ray config show ... | head` closed our stdout: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

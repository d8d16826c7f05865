"""Generate a corpus: real mp4s of moving shapes, captions, motion and object prompts,
SA-V-format ground-truth masks, and a manifest (what `ttm-ray prep` reads).

--task corpus (default): the quickstart corpus of textured shapes (data_prep/synthetic.py),
  with --corrupt broken inputs.
--task motion: the learning task (data_prep/synthetic_task.py): 1-3 shapes doing the one
  motion the motion prompt names (left, right, up, down, grow, shrink, stay), each turning
  into the colour only its own local prompt names; --split heldout draws unseen start
  positions, shape x colour combinations and object counts. Labels go to <out>/task.jsonl.

    ttm-ray synth --out /tmp/c --videos 20 --corrupt 5 --seed 0
    ttm-ray synth --out /tmp/task-train --task motion --videos 280
    ttm-ray synth --out /tmp/task-heldout --task motion --split heldout --videos 42
    python -m jobs.synth --out /tmp/c --videos 20
"""

from __future__ import annotations

import sys
import time

from data_prep.config import SynthConfig
from jobs.common import job_parser, load_job_config, run_job, setup_logging


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = job_parser(prog, __doc__ or "", default_config=None)
    parser.add_argument("--out", help="output folder (config key: out)")
    parser.add_argument("--videos", type=int, help="number of valid videos (config: videos)")
    parser.add_argument("--corrupt", type=int, help="broken inputs to add (config: corrupt)")
    parser.add_argument("--seed", type=int, help="random seed (config: seed)")
    parser.add_argument("--task", choices=("corpus", "motion"),
                        help="corpus (default) or the motion learning task (config: task)")
    parser.add_argument("--split", choices=("train", "heldout"),
                        help="task=motion: which split (config: split)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    for key in ("out", "videos", "corrupt", "seed", "task", "split"):
        if getattr(args, key) is not None:
            args.overrides.append(f"{key}={getattr(args, key)}")

    def job() -> dict:
        cfg = load_job_config(SynthConfig, args)
        from data_prep.synthetic import generate_corpus
        from data_prep.synthetic_task import generate_task

        start = time.perf_counter()
        n = cfg.videos + cfg.corrupt

        def progress(done: int, total: int = n) -> None:
            print(f"\r[synth] {done}/{total} files", end="", file=sys.stderr, flush=True)

        if cfg.task == "motion":
            manifest = generate_task(cfg.out, cfg.videos, cfg.split, cfg.seed, progress=progress)
        else:
            manifest = generate_corpus(cfg.out, cfg.videos, cfg.seed, cfg.corrupt,
                                       progress=progress)
        print(file=sys.stderr)
        seconds = round(time.perf_counter() - start, 2)
        print(f"[synth] wrote {n} files to {cfg.out} in {seconds}s; manifest: {manifest}",
              file=sys.stderr)
        return {"out": cfg.out, "manifest": str(manifest), "videos": cfg.videos,
                "corrupt": cfg.corrupt, "task": cfg.task,
                **({"split": cfg.split} if cfg.task == "motion" else {}), "seconds": seconds}

    return run_job(job, "synth")


if __name__ == "__main__":
    sys.exit(main())

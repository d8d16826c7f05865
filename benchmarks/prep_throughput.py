"""Data-prep throughput: the Ray Data pipeline against the same stages in-process, and decode.

    .venv/bin/python benchmarks/prep_throughput.py [--videos N] [--mask-source gt|sam2] [--quick]

Generates a corpus (``data_prep.synthetic``) and tiny random models (CLIP; for ``sam2`` also
Grounding DINO and a SAM2 hiera-tiny checkpoint) in a temp dir, builds the prep config from
the quickstart YAML (``jobs/configs/prep/quickstart.yaml``: manifest captions/prompts, 8-frame
clips, the CPU resources of the embedded default) and measures, in one process:

* pipeline clips/s of :func:`~data_prep.pipeline.build_pipeline` on a local Ray (2 CPUs)
  against :func:`~data_prep.pipeline.run_sequential` (the same stages, no Ray);
* the decode rates behind it: the ingest + clip stages against bare ``decord`` doing the same
  reads (and a full decode of the same files), and the clip frames later stages read
  (:func:`~ttm_ray.dataset.video.read_frames`) against bare ``VideoReader.get_batch``;
* per-stage time shares (Ray: the pipeline's own per-batch timing hook; sequential: each
  stage's construction and calls timed);
* peak RSS: per Ray worker process (actors and task workers, reported from inside them), and
  per stage of the sequential run.

Threads: Ray gives every worker one torch thread (``OMP_NUM_THREADS=1``), so the sequential
run is pinned to one too by default (``--seq-threads``): each path then runs a model on one
core, and the ratio measures the pipeline (overlap of stages, scheduling, process and actor
start-up), not torch's intra-op threading. ``--seq-threads 0`` keeps torch's default (one
thread per core); on a shared 2-core box that is several times *slower* for these small
models (threads wait on each other at every op), which flatters Ray.

Machines are noisy and shared, so every headline number is a *ratio* against a baseline
measured in the same run; absolute rates are printed for context only. Ray starts first
(``ray.init`` is timed apart) and stays up, idle, during the sequential runs; both paths get
one untimed warm-up run on one video (imports, Ray's task workers), then ``--pipeline-repeats``
interleaved timed runs each (best of N). Model loading counts on both sides: in-process stage
construction, Ray's actor start-up. Output: tables, then one JSON line
(``{"benchmark": "prep_throughput", ...}``) for scripts.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

QUICKSTART = REPO / "jobs" / "configs" / "prep" / "quickstart.yaml"
RAY_CPUS = 2
SAM2_IMAGE_SIZE = 256  # as in the tests (hiera-tiny at 256 px: about a second a frame here)
# Default corpus sizes: each run (both paths) takes a few minutes at most on 2 busy cores.
DEFAULT_VIDEOS = {"gt": 24, "sam2": 8}
QUICK_VIDEOS = 4
MB = 1 << 20

if TYPE_CHECKING:
    from data_prep.config import PrepConfig


# ----------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Models:
    """Local model folders/files the chosen mask source needs (random weights, real loaders)."""

    clip: Path
    grounding_dino: Path | None = None
    sam2_checkpoint: Path | None = None


def write_random_sam2_checkpoint(path: Path, image_size: int) -> Path:
    """A SAM2.1 hiera-tiny checkpoint with random weights whose objects are always "present".

    With plain random weights SAM2 scores every object absent, every mask is empty and every
    clip is rejected at ``segment``, so the score stage would never run. Setting the presence
    head's last bias high (as ``tests/data_prep/conftest_masks.build_random_sam2`` does) lets
    the arbitrary masks through; the stage then loads this file through its real
    ``checkpoint`` path, like a production checkpoint.
    """
    import torch

    from data_prep.stages.segment import SegmentConfig, build_predictor

    torch.manual_seed(0)
    predictor = build_predictor(SegmentConfig(allow_random_weights=True, image_size=image_size,
                                              device="cpu"))
    with torch.no_grad():
        predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(10.0)
    torch.save({"model": predictor.state_dict()}, path)
    return path


def build_models(root: Path, mask_source: str) -> Models:
    from data_prep.tiny_models import build_tiny_clip, build_tiny_grounding_dino

    models = Models(clip=build_tiny_clip(root / "tiny-clip"))
    if mask_source == "sam2":
        models.grounding_dino = build_tiny_grounding_dino(root / "tiny-grounding-dino")
        models.sam2_checkpoint = write_random_sam2_checkpoint(root / "sam2-random.pt",
                                                              SAM2_IMAGE_SIZE)
    return models


def _cpu_actor(num_cpus: float) -> dict[str, Any]:
    """Actor-pool resources for a model stage on this CPU box (clears production's GPUs)."""
    return {"batch_size": 4, "num_cpus": num_cpus, "num_gpus": 0, "min_actors": 1,
            "max_actors": 1, "custom_resources": {}}


def build_config(mask_source: str, manifest: Path, out: Path, models: Models) -> PrepConfig:
    """The quickstart config pointed at the generated corpus (sam2: tiny models on the CPU)."""
    from data_prep.config import PrepConfig
    from ttm_ray.config import from_dict
    from ttm_ray.config.loader import deep_merge, load_merged

    top: dict[str, Any] = {
        "run": {"root": str(out), "name": "bench"},
        "source": {"path": str(manifest)},
        "output": {"dir": str(out / "prep")},
        "mask_source": mask_source,
        "score": {"clip_model_path": str(models.clip), "device": "cpu"},
    }
    if mask_source == "sam2":
        top.update(
            ground={"model_path": str(models.grounding_dino), "box_threshold": 0.0,
                    "text_threshold": 0.0, "device": "cpu"},
            segment={"sam2_config": "configs/sam2.1/sam2.1_hiera_t.yaml",
                     "checkpoint": str(models.sam2_checkpoint), "image_size": SAM2_IMAGE_SIZE,
                     "device": "cpu"},
            # Three actor pools on 2 CPUs: fractional CPUs leave one for the CPU tasks
            # (the same placement as tests/data_prep/test_pipeline.py).
            resources={"ground": _cpu_actor(0.25), "segment": _cpu_actor(0.25),
                       "score": _cpu_actor(0.25)},
            # SAM2 (~1 s a frame here) dominates: one clip a video keeps a run within minutes.
            clip={"max_clips_per_video": 1},
        )
    data = deep_merge(load_merged(QUICKSTART), top)
    return from_dict(PrepConfig, data, f"{QUICKSTART} (benchmark overrides)")


# ----------------------------------------------------------------------------- measuring
def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's lifetime peak RSS (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """``(fastest wall seconds, last result)`` of ``repeats`` calls: the least-disturbed run."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


class StageLog:
    """Seconds, rows and peak RSS per stage of an in-process run.

    A sampler thread reads the RSS every ``interval`` seconds and charges it to the stage that
    is running; the lifetime peak (``ru_maxrss``) is checked around each call as well, so a
    short spike between two samples is not missed.
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self._current: str | None = None
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _entry(self, name: str) -> dict[str, float]:
        return self.stages.setdefault(name, {"init_s": 0.0, "run_s": 0.0, "rows_in": 0,
                                             "rows_out": 0, "batches": 0,
                                             "start_rss": rss_bytes(), "peak_rss": 0})

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            name = self._current
            if name is not None:
                e = self.stages[name]
                e["peak_rss"] = max(e["peak_rss"], rss_bytes())

    @contextmanager
    def measure(self, name: str, phase: str) -> Iterator[dict[str, float]]:
        entry = self._entry(name)
        self._current, before = name, peak_rss_bytes()
        start = time.perf_counter()
        try:
            yield entry
        finally:
            entry[f"{phase}_s"] += time.perf_counter() - start
            after = peak_rss_bytes()
            entry["peak_rss"] = max(entry["peak_rss"], rss_bytes(),
                                    after if after > before else 0)
            self._current = None

    def __enter__(self) -> StageLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


class TimedStage:
    """Wraps a row stage: its construction (model loading) and every call go to a StageLog."""

    def __init__(self, name: str, factory: Callable[..., Any], *args: Any,
                 log: StageLog) -> None:
        self.name, self.log = name, log
        with log.measure(name, "init"):
            self.stage = factory(*args)

    def __call__(self, rows: list[dict]) -> list[dict]:
        with self.log.measure(self.name, "run") as entry:
            out = self.stage(rows)
            entry["rows_in"] += len(rows)
            entry["rows_out"] += len(out)
            entry["batches"] += 1
        return out


@contextmanager
def timed_stage_specs(log: StageLog) -> Iterator[None]:
    """Times the stages of :func:`run_sequential` without touching its code.

    ``run_sequential`` takes its stages from the module-level ``stage_specs``; for the
    duration of the block every spec's factory builds a :class:`TimedStage` instead.
    """
    from data_prep import pipeline

    original = pipeline.stage_specs

    def timed(cfg: Any, done: Any) -> list[Any]:
        return [dataclasses.replace(s, factory=functools.partial(TimedStage, s.name, s.factory,
                                                                 log=log))
                for s in original(cfg, done)]

    pipeline.stage_specs = timed
    try:
        yield
    finally:
        pipeline.stage_specs = original


def clip_rows(rows: list[dict]) -> list[dict]:
    """Rows that are clips (kept or rejected after clipping), not whole-video rejects."""
    return [r for r in rows if r.get("clip_id")]


def run_sequential_timed(cfg: Any, inputs: list[dict]) -> dict[str, Any]:
    from data_prep.pipeline import run_sequential

    with StageLog() as log, timed_stage_specs(log):
        start = time.perf_counter()
        rows = run_sequential(cfg, inputs)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": rows, "stages": log.stages}


# ----------------------------------------------------------------------------- Ray side
class StageSink:
    """Ray actor collecting what the workers report: per-stage time and rows, per-process
    peak RSS and torch threads."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self.workers: dict[int, dict[str, Any]] = {}

    def add(self, name: str, seconds: float, rows_in: int, rows_out: int, pid: int,
            actor: bool, peak_rss: int, torch_threads: int | None, now: float,
            created: float) -> None:
        s = self.stages.setdefault(name, {"run_s": 0.0, "rows_in": 0, "rows_out": 0,
                                          "batches": 0})
        s["run_s"] += seconds
        s["batches"] += 1
        s["rows_in"] += rows_in
        s["rows_out"] += rows_out
        w = self.workers.setdefault(pid, {"stages": [], "actor": actor, "peak_rss": 0,
                                          "torch_threads": None, "created": created,
                                          "first_report": now})
        if name not in w["stages"]:
            w["stages"].append(name)
        w["peak_rss"] = max(w["peak_rss"], peak_rss)
        w["torch_threads"] = torch_threads if torch_threads is not None else w["torch_threads"]

    def report(self) -> dict[str, Any]:
        return {"stages": self.stages, "workers": self.workers}


class WorkerProbe:
    """Stands in for the ``stats`` handle ``build_pipeline`` hands to every stage worker.

    The pipeline's adapter calls ``stats.add.remote(name, seconds, rows_in, rows_out)`` after
    each batch *inside the worker process* (task or actor). This object runs that call there,
    so it can add the worker's pid, lifetime peak RSS and torch thread count before forwarding
    to a :class:`StageSink` actor: per-actor memory without changing ``data_prep``.
    """

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    @property
    def add(self) -> WorkerProbe:
        return self

    def remote(self, name: str, seconds: float, rows_in: int, rows_out: int) -> Any:
        import ray

        torch = sys.modules.get("torch")  # never import torch into a worker that has none
        threads = torch.get_num_threads() if torch is not None else None
        actor = ray.get_runtime_context().get_actor_id() is not None
        import psutil

        # Wall clock (not perf_counter): compared with the driver's across processes.
        return self.sink.add.remote(name, seconds, rows_in, rows_out, os.getpid(), actor,
                                    peak_rss_bytes(), threads, time.time() - seconds,
                                    psutil.Process().create_time())


def start_ray() -> None:
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False


def run_ray(cfg: Any, inputs: list[dict]) -> dict[str, Any]:
    """What ``run_pipeline`` does minus the Parquet writes: build the Dataset, stream it."""
    import ray

    from data_prep.pipeline import build_pipeline, capacity_bundles
    from data_prep.rows import to_table
    from data_prep.work_index import DoneIndex
    from ttm_ray.ops.capacity import ensure_capacity

    # fail instead of hanging (a local Ray: no autoscaler, so no waiting either)
    ensure_capacity(capacity_bundles(cfg), timeout_s=0, what="benchmark")
    sink = ray.remote(StageSink).options(num_cpus=0).remote()
    wall_start, start = time.time(), time.perf_counter()
    ds = build_pipeline(cfg, to_table(inputs), DoneIndex(), WorkerProbe(sink))
    rows: list[dict] = []
    first_batch_s = None
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if first_batch_s is None:  # start-up: scheduling, actor processes, model loading
            first_batch_s = time.perf_counter() - start
        rows.extend(batch.select(["status", "clip_id"]).to_pylist())
    seconds = time.perf_counter() - start
    report = ray.get(sink.report.remote())
    ray.kill(sink)
    for w in report["workers"].values():  # start-up, in seconds after the Dataset was built
        w["created_s"] = w.pop("created") - wall_start
        w["first_batch_start_s"] = w.pop("first_report") - wall_start
    return {"seconds": seconds, "first_batch_s": first_batch_s, "rows": rows, **report}


# ----------------------------------------------------------------------------- decode
def decode_benchmark(cfg: Any, inputs: list[dict], repeats: int) -> dict[str, Any]:
    """Ingest + clip against bare decord doing the same reads; clip-frame reads likewise.

    The clip stage decodes only frame 0 of a video (its size) and the last sampled frame of
    each clip (``verify: last_frame``), so its rate is in *source frames covered* per second;
    a full decode of the same files is printed beside it for scale.
    """
    import decord

    from data_prep.stages.clip import ClipStage
    from data_prep.stages.ingest import IngestStage
    from ttm_ray.dataset.video import local_path, read_frames

    ingest, clip = IngestStage(cfg.ingest), ClipStage(cfg.clip)
    t_ingest, ingested = best_of(repeats, lambda: ingest(inputs))
    t_clip, clips = best_of(repeats, lambda: clip(ingested))
    clips = [r for r in clips if r["status"] == "ok"]
    videos: dict[str, dict[str, Any]] = {}
    for r in clips:
        v = videos.setdefault(local_path(r["source_uri"]), {"n": r["src_num_frames"],
                                                           "last": set()})
        v["last"].add(r["frame_indices"][-1])
    src_frames = sum(v["n"] for v in videos.values())

    def bare_same_reads() -> None:
        for path, v in videos.items():
            vr = decord.VideoReader(path, ctx=decord.cpu(0))
            vr.get_batch([0]).asnumpy()
            vr.get_batch(sorted(v["last"])).asnumpy()

    def bare_full() -> None:
        for path, v in videos.items():
            decord.VideoReader(path, ctx=decord.cpu(0)).get_batch(list(range(v["n"]))).asnumpy()

    t_same, _ = best_of(repeats, bare_same_reads)
    t_full, _ = best_of(repeats, bare_full)

    frames = sum(len(r["frame_indices"]) for r in clips)

    def clip_frames_read() -> None:
        for r in clips:
            read_frames(r["source_uri"], r["frame_indices"])

    def clip_frames_bare(threads: int) -> None:
        for r in clips:
            vr = decord.VideoReader(local_path(r["source_uri"]), ctx=decord.cpu(0),
                                    num_threads=threads)
            vr.get_batch(r["frame_indices"]).asnumpy()

    t_read, _ = best_of(repeats, clip_frames_read)
    t_bare0, _ = best_of(repeats, lambda: clip_frames_bare(0))
    t_bare1, _ = best_of(repeats, lambda: clip_frames_bare(1))
    return {
        "videos": len(videos), "source_frames": src_frames, "clips": len(clips),
        "clip_frames": frames,
        "ingest_clip_src_fps": src_frames / (t_ingest + t_clip),
        "clip_only_src_fps": src_frames / t_clip,
        "bare_same_reads_src_fps": src_frames / t_same,
        "bare_full_decode_fps": src_frames / t_full,
        "read_frames_fps": frames / t_read,
        "bare_get_batch_fps": frames / t_bare0,
        "bare_get_batch_1thread_fps": frames / t_bare1,
        "seconds": {"ingest": t_ingest, "clip": t_clip, "bare_same_reads": t_same,
                    "bare_full": t_full, "read_frames": t_read, "bare_get_batch": t_bare0,
                    "bare_get_batch_1thread": t_bare1},
    }


# ----------------------------------------------------------------------------- report
def shares(stages: dict[str, dict[str, float]]) -> dict[str, float]:
    total = sum(s.get("init_s", 0.0) + s["run_s"] for s in stages.values()) or 1.0
    return {k: (s.get("init_s", 0.0) + s["run_s"]) / total for k, s in stages.items()}


def ok_clip_ids(rows: list[dict]) -> list[str]:
    return sorted(r["clip_id"] for r in rows if r["status"] == "ok")


def format_report(res: dict[str, Any]) -> str:
    d, seq, ray_ = res["decode"], res["sequential"], res["ray"]
    lines = [
        f"prep_throughput: mask_source={res['mask_source']} videos={res['videos']} "
        f"clips={res['clips']} (ok {res['ok_clips']}) cpus={res['cpus']} "
        f"load_avg start/end={res['load_avg_start']}/{res['load_avg_end']}",
        "",
        f"{'pipeline (best of ' + str(res['pipeline_repeats']) + ', interleaved)':<35}"
        "seconds   clips/s   ratio",
        f"  run_sequential (baseline)      {seq['seconds']:8.2f}  {seq['clips_per_s']:8.3f}"
        f"   1.00   torch threads {res['seq_torch_threads']}",
        f"  Ray Data, local {RAY_CPUS} CPUs          {ray_['seconds']:8.2f}  "
        f"{ray_['clips_per_s']:8.3f}  {res['ray_vs_sequential']:5.2f}",
        f"  (ray.init {res['ray_init_s']:.1f}s not counted; first Ray batch after "
        f"{ray_['first_batch_s']:.1f}s; same ok clips: {res['same_ok_clips']})",
        "",
        "decode (best of {r})                    frames/s   ratio  baseline".format(
            r=res["repeats"]),
        f"  ingest+clip stages, src frames     {d['ingest_clip_src_fps']:9.0f}  "
        f"{d['ingest_clip_src_fps'] / d['bare_same_reads_src_fps']:5.2f}  bare same reads",
        f"  clip stage only, src frames        {d['clip_only_src_fps']:9.0f}  "
        f"{d['clip_only_src_fps'] / d['bare_same_reads_src_fps']:5.2f}  bare same reads",
        f"  bare decord, the clip stage reads  {d['bare_same_reads_src_fps']:9.0f}   1.00",
        f"  bare decord, full decode           {d['bare_full_decode_fps']:9.0f}  "
        f"{d['bare_full_decode_fps'] / d['bare_same_reads_src_fps']:5.2f}  bare same reads",
        f"  read_frames, clip frames           {d['read_frames_fps']:9.0f}  "
        f"{d['read_frames_fps'] / d['bare_get_batch_fps']:5.2f}  bare get_batch",
        f"  bare get_batch (auto threads)      {d['bare_get_batch_fps']:9.0f}   1.00",
        f"  bare get_batch (1 thread)          {d['bare_get_batch_1thread_fps']:9.0f}  "
        f"{d['bare_get_batch_1thread_fps'] / d['bare_get_batch_fps']:5.2f}  bare get_batch",
        "",
        "stage              seq init s  seq run s  seq share  ray busy s  ray share  "
        "ray batches  seq peak MB (+MB)",
    ]
    seq_share, ray_share = shares(seq["stages"]), shares(ray_["stages"])
    for name, s in seq["stages"].items():
        r = ray_["stages"].get(name, {"run_s": 0.0, "batches": 0})
        lines.append(
            f"  {name:<17}{s['init_s']:10.2f}{s['run_s']:11.2f}{seq_share[name]:10.1%}"
            f"{r['run_s']:12.2f}{ray_share.get(name, 0.0):10.1%}{r['batches']:13d}  "
            f"{s['peak_rss'] / MB:8.0f} ({(s['peak_rss'] - s['start_rss']) / MB:+.0f})")
    lines += ["", "Ray worker processes (reported from inside each)",
              "  pid      kind    peak RSS MB  torch threads  process start  first batch  "
              "stages"]
    for pid, w in sorted(ray_["workers"].items(), key=lambda kv: (not kv[1]["actor"], kv[0])):
        lines.append(f"  {pid:<8} {'actor' if w['actor'] else 'task':<7} "
                     f"{w['peak_rss'] / MB:11.0f}  {w['torch_threads']!s:>13}  "
                     f"{w['created_s']:+12.1f}s  {w['first_batch_start_s']:+10.1f}s  "
                     f"{','.join(w['stages'])}")
    lines.append("  (process start / first batch: seconds after the run started; a process "
                 "Ray had started earlier shows a negative start)")
    return "\n".join(lines)


def summary_json(res: dict[str, Any]) -> dict[str, Any]:
    seq, ray_ = res["sequential"], res["ray"]
    return {
        "benchmark": "prep_throughput", "mask_source": res["mask_source"],
        "videos": res["videos"], "clips": res["clips"], "ok_clips": res["ok_clips"],
        "cpus": res["cpus"], "load_avg_start": res["load_avg_start"],
        "load_avg_end": res["load_avg_end"],
        "sequential_s": round(seq["seconds"], 3), "ray_s": round(ray_["seconds"], 3),
        "sequential_s_all": res["sequential_s_all"], "ray_s_all": res["ray_s_all"],
        "ray_init_s": round(res["ray_init_s"], 2),
        "ray_first_batch_s": round(ray_["first_batch_s"] or 0.0, 3),
        "seq_torch_threads": res["seq_torch_threads"],
        "sequential_clips_per_s": round(seq["clips_per_s"], 4),
        "ray_clips_per_s": round(ray_["clips_per_s"], 4),
        "ray_vs_sequential": round(res["ray_vs_sequential"], 3),
        "same_ok_clips": res["same_ok_clips"],
        "decode": {k: (round(v, 1) if isinstance(v, float) else v)
                   for k, v in res["decode"].items() if k != "seconds"},
        "decode_ratios": {
            "ingest_clip_vs_bare_same_reads": round(
                res["decode"]["ingest_clip_src_fps"] / res["decode"]["bare_same_reads_src_fps"],
                3),
            "read_frames_vs_bare_get_batch": round(
                res["decode"]["read_frames_fps"] / res["decode"]["bare_get_batch_fps"], 3),
        },
        "stage_share_sequential": {k: round(v, 4) for k, v in shares(seq["stages"]).items()},
        "stage_share_ray": {k: round(v, 4) for k, v in shares(ray_["stages"]).items()},
        "stages_sequential": {k: {f: round(v, 3) for f, v in s.items() if "rss" not in f}
                              for k, s in seq["stages"].items()},
        "stages_ray": {k: {f: round(v, 3) for f, v in s.items()}
                       for k, s in ray_["stages"].items()},
        "peak_rss_mb_sequential": {k: round(s["peak_rss"] / MB, 1)
                                   for k, s in seq["stages"].items()},
        "peak_rss_mb_ray_workers": [
            {"pid": pid, "actor": w["actor"], "stages": w["stages"],
             "peak_rss_mb": round(w["peak_rss"] / MB, 1), "torch_threads": w["torch_threads"],
             "process_start_s": round(w["created_s"], 2),
             "first_batch_start_s": round(w["first_batch_start_s"], 2)}
            for pid, w in sorted(ray_["workers"].items())],
    }


# ----------------------------------------------------------------------------- main
def run(mask_source: str, videos: int, repeats: int, seed: int, workdir: Path,
        warmup: bool = True, seq_threads: int = 1, pipeline_repeats: int = 1
        ) -> dict[str, Any]:
    import ray
    import torch

    from data_prep.sources import list_inputs
    from data_prep.synthetic import generate_corpus

    load_start = [round(x, 2) for x in os.getloadavg()]
    log = functools.partial(print, file=sys.stderr, flush=True)
    log(f"[bench] generating {videos} videos and tiny models in {workdir}")
    manifest = generate_corpus(workdir / "corpus", videos, seed)
    models = build_models(workdir / "models", mask_source)
    cfg = build_config(mask_source, manifest, workdir, models)
    inputs = list_inputs(cfg.source)

    log("[bench] decode")
    decode = decode_benchmark(cfg, inputs, repeats)
    if seq_threads:
        torch.set_num_threads(seq_threads)
    start = time.perf_counter()
    start_ray()
    ray_init_s = time.perf_counter() - start
    seq_runs, ray_runs = [], []
    try:
        if warmup:
            log("[bench] warm-up (1 video each path)")
            run_sequential_timed(cfg, inputs[:1])
            run_ray(cfg, inputs[:1])
        # Interleaved, so a burst of load from elsewhere hits both paths alike; best of N.
        for i in range(pipeline_repeats):
            log(f"[bench] run_sequential ({i + 1}/{pipeline_repeats})")
            seq_runs.append(run_sequential_timed(cfg, inputs))
            log(f"[bench] Ray Data ({i + 1}/{pipeline_repeats})")
            ray_runs.append(run_ray(cfg, inputs))
    finally:
        ray.shutdown()
    seq = min(seq_runs, key=lambda r: r["seconds"])
    ray_res = min(ray_runs, key=lambda r: r["seconds"])

    clips = len(clip_rows(seq["rows"]))
    seq["clips_per_s"] = clips / seq["seconds"]
    ray_res["clips_per_s"] = len(clip_rows(ray_res["rows"])) / ray_res["seconds"]
    return {
        "mask_source": mask_source, "videos": videos, "repeats": repeats, "clips": clips,
        "ok_clips": len(ok_clip_ids(seq["rows"])), "cpus": os.cpu_count(),
        "load_avg_start": load_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "decode": decode, "sequential": seq, "ray": ray_res, "ray_init_s": ray_init_s,
        "pipeline_repeats": pipeline_repeats,
        "sequential_s_all": [round(r["seconds"], 3) for r in seq_runs],
        "ray_s_all": [round(r["seconds"], 3) for r in ray_runs],
        "seq_torch_threads": torch.get_num_threads(),
        "ray_vs_sequential": ray_res["clips_per_s"] / seq["clips_per_s"],
        "same_ok_clips": ok_clip_ids(seq["rows"]) == ok_clip_ids(ray_res["rows"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=None,
                        help="generated videos (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_VIDEOS.items())
                        + f"; --quick: {QUICK_VIDEOS})")
    parser.add_argument("--mask-source", choices=["gt", "sam2"], default="gt")
    parser.add_argument("--quick", action="store_true", help="a small corpus, 2 decode repeats")
    parser.add_argument("--repeats", type=int, default=None,
                        help="decode timings: best of N (default 5; --quick: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seq-threads", type=int, default=1,
                        help="torch threads of the sequential run; default 1, what Ray gives "
                        "each worker, so both paths run a model on one core; 0: torch's "
                        "default (one per core)")
    parser.add_argument("--pipeline-repeats", type=int, default=1,
                        help="pipeline timings: best of N runs of each path, interleaved")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the untimed 1-video run of each path (cold numbers)")
    args = parser.parse_args(argv)
    videos = args.videos or (QUICK_VIDEOS if args.quick else DEFAULT_VIDEOS[args.mask_source])
    repeats = args.repeats or (2 if args.quick else 5)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="prep_throughput_") as tmp:
        res = run(args.mask_source, videos, repeats, args.seed, Path(tmp),
                  warmup=not args.no_warmup, seq_threads=args.seq_threads,
                  pipeline_repeats=args.pipeline_repeats)
    print(format_report(res))
    print(json.dumps(summary_json(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Object-masked attention against unmasked SDPA: time and peak memory, as ratios.

    .venv/bin/python benchmarks/masked_attention.py [--quick] [--full] [--device cpu|cuda]
        [--threads N] [--repeats N] [--batch B] [--size NAME ...]
    .venv/bin/python benchmarks/masked_attention.py --mask-only [--tokens N] [--batch B]

Compares :func:`ttm_ray.conditioning.masked_attention.masked_attention`, every backend that
runs on the device, with plain ``F.scaled_dot_product_attention`` on the same q/k/v (no mask)
in the same process. Sizes:

* ``cpu``: 1,024 tokens (4 x 16 x 16), 4 heads x 64, 64 local-text tokens;
* ``dit-4b``: the dit-4b stage-2 grid: 4,096 tokens (16 x 16 x 16), 20 heads x 128
  (``ttm_ray/models/dit/config.py``), 64 local-text tokens (2 objects x 32);
* ``unet-l0``: the paper U-Net's level 0 (``unet-1.4b``, 16 frames of 64 x 64 latents):
  65,536 tokens, 8 heads x 40 (320 channels, ``ttm_ray/models/unet/config.py``), 64
  local-text tokens. The sdpa backend is skipped where its dense boolean mask would pass
  1 GiB (here 4 GiB per sample); far too slow for a CPU, CUDA only by default.

Token layout: two box-shaped objects moving over the frames (about 25 % and 12 % of the tokens),
the rest background (``ttm_ray.models.flops.representative_object_ids``); the local text is
32 tokens per object. Each timed call builds its own object layout (sort, block mask) as a
call without a shared ``ObjectLayout`` does; a model forward builds it once for all layers.
For each (mode, backend): forward and forward+backward seconds (best of at least
``--repeats`` rounds, more for cheap cases; the variants are timed in interleaved rounds so a
shared machine's load changes hit all alike) and peak memory above the inputs, each divided
by the unmasked SDPA of the same shape (self: N x N; cross: N x M).
Peak memory: CUDA ``torch.cuda.max_memory_allocated``; CPU the RSS high-water mark of a child
process, reset before each measurement through ``/proc/self/clear_refs``, with glibc's mmap
threshold pinned at 64 KiB so every large tensor is its own mapping and freeing it returns the
pages (RSS then tracks tensors; the timings run in the parent with the default allocator).
Also printed: the bytes a dense ``[B, heads, N, M]`` float bias would take, against the
boolean ``[B, 1, N, M]`` mask the sdpa backend builds.

On CUDA it also times bf16 forward+backward of one dit-4b stage-2 block (``DiTBlock`` with
the masked layers; skipped if ``ttm_ray.models.dit`` fails to import) and reports achieved
TFLOP/s with the dense-attention FLOP convention of ``ttm_ray/models/flops.py``.

Defaults: CPU -> the ``cpu`` size; ``--full`` adds ``dit-4b`` (slow on a CPU); CUDA -> all
three. ``--size`` picks sizes by name. ``--quick``: fewer repeats, and no flex on a CPU (it
compiles ~1 min per shape there).

``--mask-only [--tokens N]`` (default 65,536, the U-Net level 0): only the mask plan: the
peak memory (same methods as above: CPU child-process RSS high-water mark above the inputs;
CUDA ``max_memory_allocated``) and time of building one ``ObjectLayout`` with its self and
cross block masks for N tokens, against the bytes of the dense ``[B, 1, N, N]`` boolean mask
that ``create_block_mask`` used to build per call. Then (unless ``--no-flops``) the masked
layers' forward-FLOP overhead of dit-4b and unet-1.4b, dense and block-sparse
(``ttm_ray.models.flops.masked_layers_overhead``).
Output: tables, then one JSON line (``{"benchmark": "masked_attention", ...}``; with
``--mask-only`` ``{"benchmark": "masked_attention_mask", ..., "mask_peak_mib": ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from ttm_ray.conditioning.masked_attention import (  # noqa: E402
    BACKENDS,
    ObjectLayout,
    choose_backend,
    flex_available,
    masked_attention,
)
from ttm_ray.models.flops import (  # noqa: E402
    representative_local_ids,
    representative_object_ids,
)


@dataclass(frozen=True)
class Size:
    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    local_tokens: int = 64
    objects: int = 2

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


SIZES = {
    "cpu": Size("cpu", (4, 16, 16), heads=4, head_dim=64),
    "dit-4b": Size("dit-4b", (16, 16, 16), heads=20, head_dim=128),
    "unet-l0": Size("unet-l0", (16, 64, 64), heads=8, head_dim=40),
}
#: The sdpa backend is left out where its dense [B, 1, N, M] boolean mask would pass this.
SDPA_MAX_MASK_BYTES = 1 << 30


# --- layout ------------------------------------------------------------------------------


def token_layout(size: Size, batch: int, device: torch.device) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """(token ids [B, N], local-text ids [B, M]): two boxes drifting right over the frames."""
    ids = representative_object_ids(size.grid, batch)
    local = representative_local_ids(size.local_tokens, size.objects, batch)
    return ids.view(batch, -1).to(device), local.to(device)


# --- measurement -------------------------------------------------------------------------

#: glibc's mmap threshold for the memory child: every tensor above 64 KiB gets its own mapping,
#: which ``free`` unmaps, so the RSS high-water mark follows live tensors.
MMAP_THRESHOLD = 64 * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - base) * 1024


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_seconds(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                 warmup: int = 1, min_total_s: float = 2.0, max_rounds: int = 100
                 ) -> dict[str, float]:
    """Best-of seconds of each callable, timed in interleaved rounds (one call of each per
    round) so load changes on a shared machine hit every variant alike. At least ``repeats``
    rounds; cheap variants get more (up to ``max_rounds``, until ``min_total_s`` passed)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or (time.perf_counter() - start < min_total_s
                               and rounds < max_rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], _time_once(fn, device))
        rounds += 1
    return best


@dataclass
class Case:
    """The callables of one (mode, backend): ``backend=None`` is unmasked SDPA."""

    backend: str | None
    forward: Callable[[], Any]
    fwd_bwd: Callable[[], Any] | None


def make_case(size: Size, mode: str, backend: str | None, batch: int, device: torch.device,
              dtype: torch.dtype) -> Case:
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = size.tokens
    m = n if mode == "self" else size.local_tokens
    shape_q = (batch, size.heads, n, size.head_dim)
    shape_kv = (batch, size.heads, m, size.head_dim)
    q = torch.randn(shape_q, generator=gen).to(device, dtype)
    k = torch.randn(shape_kv, generator=gen).to(device, dtype)
    v = torch.randn(shape_kv, generator=gen).to(device, dtype)
    ids, local = token_layout(size, batch, device)
    kv_ids = ids if mode == "self" else local

    def attend(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        if backend is None:
            return F.scaled_dot_product_attention(qq, kk, vv)
        return masked_attention(qq, kk, vv, ids, kv_ids, mode=mode, backend=backend)

    def forward() -> None:
        with torch.no_grad():
            attend(q, k, v)

    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    grad_out = torch.randn(shape_q, generator=gen).to(device, dtype)

    def fwd_bwd() -> None:
        for t in leaves:
            t.grad = None
        attend(*leaves).backward(grad_out)

    trainable = backend != "flex" or flex_available(device, requires_grad=True)
    return Case(backend, forward, fwd_bwd if trainable else None)


def backends_for(device: torch.device, quick: bool, mask_bytes: int = 0) -> list[str]:
    """Backends that run here; flex on a CPU compiles for about a minute per shape, so
    ``--quick`` leaves it out there; sdpa is left out where its dense mask passes
    ``SDPA_MAX_MASK_BYTES``."""
    skip_flex = not flex_available(device) or (quick and device.type == "cpu")
    skip = {"flex"} if skip_flex else set()
    if mask_bytes > SDPA_MAX_MASK_BYTES:
        skip.add("sdpa")
    return [b for b in BACKENDS if b not in skip]


def run_size(size: Size, device: torch.device, dtype: torch.dtype, batch: int,
             repeats: int, quick: bool) -> dict[str, Any]:
    n, m = size.tokens, size.local_tokens
    elt = torch.finfo(dtype).bits // 8
    result: dict[str, Any] = {
        "size": size.name, "tokens": n, "heads": size.heads, "head_dim": size.head_dim,
        "batch": batch, "dtype": str(dtype).removeprefix("torch."),
        "auto": {mode: choose_backend(torch.empty(1, 1, n, 1, device=device),
                                      torch.empty(1, 1, n if mode == "self" else m, 1,
                                                  device=device), mode)
                 for mode in ("self", "cross")},
        "dense_bias_bytes": {"self": batch * size.heads * n * n * elt,
                             "cross": batch * size.heads * n * m * elt},
        "bool_mask_bytes": {"self": batch * n * n, "cross": batch * n * m},
        "rows": [],
    }
    for mode in ("self", "cross"):
        backends = backends_for(device, quick, result["bool_mask_bytes"][mode])
        cases = [make_case(size, mode, backend, batch, device, dtype)
                 for backend in [None, *backends]]
        fwd = best_seconds({str(c.backend): c.forward for c in cases}, device, repeats)
        both = best_seconds({str(c.backend): c.fwd_bwd for c in cases if c.fwd_bwd}, device,
                            repeats)
        for c in cases:
            row: dict[str, Any] = {"mode": mode, "backend": c.backend or "unmasked sdpa",
                                   "fwd_s": fwd[str(c.backend)]}
            if c.fwd_bwd is not None:
                row["fwd_bwd_s"] = both[str(c.backend)]
            result["rows"].append(row)
    return result


def measure_peaks(result: dict[str, Any], device: torch.device, dtype: torch.dtype) -> None:
    """Peak memory of every row of ``run_size``'s result (fills ``fwd_peak``/``fwd_bwd_peak``).

    On a CPU this runs in a child process started with glibc's mmap threshold pinned
    (``MALLOC_MMAP_THRESHOLD_``), which the RSS method needs; pinned in the timing process it
    would make every large allocation a fresh mapping and slow the timed calls down."""
    size = SIZES[result["size"]]
    for row in result["rows"]:
        backend = None if row["backend"] == "unmasked sdpa" else row["backend"]
        case = make_case(size, row["mode"], backend, result["batch"], device, dtype)
        case.forward()  # warm-up: first-call allocations (compiles, caches) are not the peak
        row["fwd_peak"] = measure_peak(case.forward, device)
        if case.fwd_bwd is not None:
            case.fwd_bwd()
            row["fwd_bwd_peak"] = measure_peak(case.fwd_bwd, device)


def cpu_peaks_in_child(results: list[dict[str, Any]]) -> None:
    """Run :func:`measure_peaks` for ``results`` in a fresh process (see there) and merge."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    proc = subprocess.run(
        [sys.executable, __file__, "--threads", str(torch.get_num_threads()),
         "--peaks-of", json.dumps(results)],
        env=env, capture_output=True, text=True, check=True,
    )
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for res, got in zip(results, measured, strict=True):
        for row, row_got in zip(res["rows"], got["rows"], strict=True):
            row.update({k: v for k, v in row_got.items() if k.endswith("_peak")})


def add_ratios(result: dict[str, Any]) -> None:
    for mode in ("self", "cross"):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        base = rows[0]
        for row in rows[1:]:
            for key in ("fwd_s", "fwd_peak", "fwd_bwd_s", "fwd_bwd_peak"):
                if key in row and base.get(key):
                    row[key + "_ratio"] = row[key] / base[key]


# --- the mask plan alone (--mask-only) -----------------------------------------------------


def grid_for(tokens: int) -> tuple[int, int, int]:
    """A (T, H, W) grid of ``tokens`` tokens: 16 frames where that divides, H x W as square
    as it goes (65,536 -> 16 x 64 x 64, the U-Net level 0)."""
    t = 16 if tokens % 16 == 0 else 1
    hw = tokens // t
    h = max(d for d in range(1, int(hw**0.5) + 1) if hw % d == 0)
    return t, h, hw // h


def mask_inputs(tokens: int, batch: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    size = Size(f"{tokens}", grid_for(tokens), heads=1, head_dim=1)
    return token_layout(size, batch, device)


def build_mask_plan(ids: torch.Tensor, local: torch.Tensor) -> tuple[ObjectLayout, int]:
    """What a model forward builds once: the layout and both modes' block masks; returns
    the layout and the bytes of the block masks' tensors."""
    layout = ObjectLayout(ids, local)
    total = 0
    for mode in ("self", "cross"):
        mask = layout.block_mask(mode)
        total += sum(t.numel() * t.element_size() for t in mask.as_tuple()
                     if isinstance(t, torch.Tensor))
    return layout, total


def mask_peak(tokens: int, batch: int, device: torch.device) -> int:
    """Peak bytes of building the mask plan for ``tokens`` tokens, above its inputs (on a
    CPU: run in the pinned-mmap child, see ``measure_peaks``)."""
    ids, local = mask_inputs(tokens, batch, device)
    build_mask_plan(ids, local)  # warm-up: imports, vmap set-up
    return measure_peak(lambda: build_mask_plan(ids, local), device)


def run_mask_only(tokens: int, batch: int, device: torch.device, repeats: int
                  ) -> dict[str, Any]:
    ids, local = mask_inputs(tokens, batch, device)
    _, block_bytes = build_mask_plan(ids, local)
    seconds = best_seconds({"plan": lambda: build_mask_plan(ids, local)}, device, repeats,
                           min_total_s=0.5)["plan"]
    if device.type == "cpu":
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
        proc = subprocess.run(
            [sys.executable, __file__, "--threads", str(torch.get_num_threads()),
             "--mask-peak-of", json.dumps([tokens, batch])],
            env=env, capture_output=True, text=True, check=True)
        peak = int(json.loads(proc.stdout.strip().splitlines()[-1]))
    else:
        peak = mask_peak(tokens, batch, device)
    layout = ObjectLayout(ids, local)
    pairs = layout.computed_pairs("self").double()
    return {"tokens": tokens, "grid": list(grid_for(tokens)), "batch": batch,
            "build_s": seconds, "mask_peak_bytes": peak, "mask_peak_mib": peak / 2**20,
            "block_mask_bytes": block_bytes,
            "dense_bool_mask_bytes": batch * tokens * tokens,
            "self_pairs_computed": float(pairs.mean()) / tokens**2}


def flop_overheads() -> list[dict[str, Any]]:
    """The masked layers' share of the base forward at the paper sizes (dense vs
    block-sparse), from ``ttm_ray.models.flops``."""
    from ttm_ray.config import from_dict
    from ttm_ray.models import ModelConfig
    from ttm_ray.models.flops import masked_layers_overhead

    runs = [{"family": "dit", "size": "dit-4b", "latent_channels": 16, "num_frames": 16,
             "height": 32, "width": 32},
            {"family": "unet", "size": "unet-1.4b", "latent_channels": 4, "num_frames": 16,
             "height": 64, "width": 64}]
    out = []
    for run in runs:
        report = masked_layers_overhead(from_dict(ModelConfig, {**run, "stage": 2}))
        out.append(report.as_dict() | {"latent": [run["num_frames"], run["height"],
                                                  run["width"]]})
    return out


def print_mask_only(res: dict[str, Any]) -> None:
    t, h, w = res["grid"]
    print(f"\n== mask plan for {res['tokens']:,} tokens ({t} x {h} x {w}), batch "
          f"{res['batch']}: ObjectLayout + self and cross block masks")
    print(f"   build time {res['build_s'] * 1e3:.1f} ms, peak {fmt_bytes(res['mask_peak_bytes'])}"
          f" above inputs, block-mask tensors {fmt_bytes(res['block_mask_bytes'])}")
    print(f"   (a dense [B, 1, N, N] bool mask, as create_block_mask built per call: "
          f"{fmt_bytes(res['dense_bool_mask_bytes'])})")
    print(f"   self-attention pairs the block-sparse kernel computes: "
          f"{res['self_pairs_computed']:.1%} of N^2")


def print_overheads(rows: list[dict[str, Any]]) -> None:
    print("\n== masked layers' forward FLOPs / base forward FLOPs (one sample, 64 local-text "
          "tokens, representative layout)")
    head = (f"{'model':10} {'latent':>10} {'layers':>6} {'base TFLOP':>11} {'dense':>8} "
            f"{'block-sparse':>13} {'self pairs kept':>16}")
    print(head)
    print("-" * len(head))
    for r in rows:
        latent = "x".join(str(v) for v in r["latent"])
        kept = ", ".join(sorted({f"{layer['self_pairs_blocks']:.1%}" for layer in r["layers"]}))
        print(f"{r['size']:10} {latent:>10} {len(r['layers']):>6} {r['base_flops'] / 1e12:11.2f} "
              f"{r['overhead_dense']:8.1%} {r['overhead_sparse']:13.1%} {kept:>16}")


# --- one dit-4b block (CUDA) ---------------------------------------------------------------


def dit_block_case(device: torch.device, repeats: int) -> dict[str, Any]:
    """bf16 forward+backward of one dit-4b stage-2 block; achieved TFLOP/s (dense convention)."""
    try:
        import dataclasses

        from ttm_ray.models.dit.blocks import DiTBlock
        from ttm_ray.models.dit.config import DIT_SIZES
        from ttm_ray.models.flops import dit_forward_flops
    except Exception as exc:  # the DiT is optional for this benchmark
        return {"skipped": f"ttm_ray.models.dit unavailable: {type(exc).__name__}: {exc}"}
    size = SIZES["dit-4b"]
    cfg = dataclasses.replace(DIT_SIZES["dit-4b"], depth=1, masked_blocks=1)
    text_tokens, batch = 256, 1
    block = DiTBlock(cfg, masked=True).to(device, torch.bfloat16)
    for layer in (block.masked_self_attn, block.masked_cross_attn):
        torch.nn.init.normal_(layer.to_out.weight, std=0.02)  # not a no-op: real gradients
    d, n = cfg.dim, size.tokens
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16)

    ids, local_ids = token_layout(size, batch, device)
    x = rand(batch, n, d).requires_grad_(True)
    inputs = dict(pos=rand(n, d), temb=rand(batch, d), shared_mod=rand(batch, 6 * d),
                  text=rand(batch, text_tokens, d), text_mask=None, token_ids=ids,
                  local_text=rand(batch, size.local_tokens, d), local_ids=local_ids)
    grad_out = rand(batch, n, d)

    def step():
        x.grad = None
        block.zero_grad(set_to_none=True)
        block(x, **inputs).backward(grad_out)

    seconds = best_seconds({"block": step}, device, repeats, warmup=2)["block"]
    peak = measure_peak(step, device)
    report = dit_forward_flops(cfg, size.grid, text_tokens, local_tokens=size.local_tokens)
    block_flops = sum(v for k, v in report.by_component.items()
                      if k.startswith("blocks.") or k == "masked_layers")
    train_flops = 3 * block_flops * batch
    return {"fwd_bwd_s": seconds, "peak_bytes": peak, "train_flops": train_flops,
            "tflops_per_s": train_flops / seconds / 1e12,
            "masked_backend": {mode: choose_backend(x[:, None], x[:, None, :m], mode)
                               for mode, m in (("self", n), ("cross", size.local_tokens))}}


# --- output --------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_size(res: dict[str, Any]) -> None:
    print(f"\n== {res['size']}: {res['tokens']} tokens, {res['heads']} heads x "
          f"{res['head_dim']}, batch {res['batch']}, {res['dtype']}; auto: "
          f"self -> {res['auto']['self']}, cross -> {res['auto']['cross']}")
    for mode in ("self", "cross"):
        print(f"   {mode}: dense float bias would be {fmt_bytes(res['dense_bias_bytes'][mode])}"
              f", the sdpa backend's bool mask {fmt_bytes(res['bool_mask_bytes'][mode])}")
    head = (f"{'mode':6} {'backend':14} {'fwd ms':>9} {'x sdpa':>7} {'fwd peak':>11} "
            f"{'x sdpa':>7} {'f+b ms':>9} {'x sdpa':>7} {'f+b peak':>11} {'x sdpa':>7}")
    print(head)
    print("-" * len(head))
    for r in res["rows"]:
        print(f"{r['mode']:6} {r['backend']:14} {_col(r, 'fwd_s')} {_ratio(r, 'fwd_s')} "
              f"{_col(r, 'fwd_peak')} {_ratio(r, 'fwd_peak')} {_col(r, 'fwd_bwd_s')} "
              f"{_ratio(r, 'fwd_bwd_s')} {_col(r, 'fwd_bwd_peak')} {_ratio(r, 'fwd_bwd_peak')}")


def _col(row: dict[str, Any], key: str) -> str:
    is_time = key.endswith("_s")
    if key not in row:
        return f"{'n/a':>9}" if is_time else f"{'n/a':>11}"
    return f"{row[key] * 1e3:9.2f}" if is_time else f"{fmt_bytes(row[key]):>11}"


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key + '_ratio']:7.2f}" if key + "_ratio" in row else f"{'-':>7}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke run)")
    parser.add_argument("--full", action="store_true", help="also dit-4b on a CPU")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 is steadier on a "
                             "busy shared machine, where threads stall on each other")
    parser.add_argument("--size", action="append", choices=sorted(SIZES), default=None,
                        help="sizes to run (repeatable; default depends on the device)")
    parser.add_argument("--mask-only", action="store_true",
                        help="only the peak memory and time of building the mask plan")
    parser.add_argument("--tokens", type=int, default=65536,
                        help="tokens for --mask-only (default: U-Net level 0, 16 x 64 x 64)")
    parser.add_argument("--no-flops", action="store_true",
                        help="skip the FLOP overhead table (its U-Net count takes ~20 s)")
    parser.add_argument("--peaks-of", default=None, help=argparse.SUPPRESS)  # memory child
    parser.add_argument("--mask-peak-of", default=None, help=argparse.SUPPRESS)  # ditto
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error(f"--tokens must be a positive token count, got {args.tokens}")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peaks_of is not None:
        results = json.loads(args.peaks_of)
        dtype = getattr(torch, results[0]["dtype"])
        for res in results:
            measure_peaks(res, device, dtype)
        print(json.dumps(results))
        return 0
    if args.mask_peak_of is not None:
        tokens, batch = json.loads(args.mask_peak_of)
        print(json.dumps(mask_peak(tokens, batch, device)))
        return 0
    repeats = args.repeats or (3 if args.quick else 7)
    if args.mask_only:
        return main_mask_only(args, device, repeats)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = args.size or (["cpu", "dit-4b", "unet-l0"] if device.type == "cuda" else
                          ["cpu", "dit-4b"] if args.full else ["cpu"])
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"repeats {repeats}")
    results = [run_size(SIZES[name], device, dtype, args.batch, repeats, args.quick)
               for name in names]
    if device.type == "cpu":
        cpu_peaks_in_child(results)
    else:
        for res in results:
            measure_peaks(res, device, dtype)
    for res in results:
        add_ratios(res)
        print_size(res)
    out: dict[str, Any] = {"benchmark": "masked_attention", "device": str(device),
                           "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "sizes": results}
    if device.type == "cuda":
        block = dit_block_case(device, repeats)
        out["dit4b_block_bf16"] = block
        if "skipped" in block:
            print(f"\n== dit-4b block: skipped ({block['skipped']})")
        else:
            print(f"\n== dit-4b stage-2 block, bf16 fwd+bwd: {block['fwd_bwd_s'] * 1e3:.1f} ms, "
                  f"{block['tflops_per_s']:.1f} TFLOP/s (dense convention), peak "
                  f"{fmt_bytes(block['peak_bytes'])}, masked backend {block['masked_backend']}")
    if not args.no_flops:
        out["flop_overhead"] = flop_overheads()
        print_overheads(out["flop_overhead"])
    print(json.dumps(out))
    return 0


def main_mask_only(args: argparse.Namespace, device: torch.device, repeats: int) -> int:
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    res = run_mask_only(args.tokens, args.batch, device, repeats)
    print_mask_only(res)
    out: dict[str, Any] = {"benchmark": "masked_attention_mask", "device": str(device),
                           "torch": torch.__version__, **res}
    if not args.no_flops:
        out["flop_overhead"] = flop_overheads()
        print_overheads(out["flop_overhead"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FlexAttention masked attention, forward and backward, against the float64 reference at the
paper's token counts.

    python benchmarks/gpu/flex_check.py [--cases dit-self dit-cross unet-self unet-cross]
        [--dtype bf16|fp32] [--ref-rows 1024] [--backend flex] [--cpu-smoke]

Calls ``ttm_ray.conditioning.masked_attention.masked_attention(q, k, v, q_ids, kv_ids,
mode=..., backend="flex")`` (the public function; how it builds its block mask is its own
business) and compares output, dq, dk and dv with ``masked_attention_reference`` (the
definition, naively in float64) on the same inputs. Sizes (read from the configs):

* ``dit``: the dit-4b stage-2 grid, ``jobs/configs/train/dit_stage2.yaml``'s 16 x 32 x 32
  latent through patch (1, 2, 2): 16 x 16 x 16 = 4,096 tokens, 20 heads x 128
  (``ttm_ray/models/dit/config.py``);
* ``unet``: the U-Net's level 0 (the finest, where the first masked layers sit):
  ``unet_stage2.yaml``'s 16 x 64 x 64 latent = 65,536 tokens, ``unet-1.4b``'s level-0 width 320
  in ``masked_heads or attention_heads`` = 8 heads x 40 (``ttm_ray/models/unet/config.py``).

``self``: q, k, v over the tokens; ``cross``: k, v over the 64 local-text tokens
(``flops.DEFAULT_LOCAL_TOKENS``: 2 objects x 32, each with a few padding tokens). Token layout:
three box-shaped objects moving over the frames, the rest background; only the first two have
text, so in ``cross`` the third object and the background have no allowed key (their output
and gradient must be exactly 0).

Where the dense float64 reference does not fit (more than ``--full-ref-max`` tokens, i.e. the
U-Net's 65,536: one float64 ``[heads, N, N]`` score tensor alone would be 275 GB) it is
computed for ``--ref-rows`` query rows only (stratified over the object ids, so every group
and the empty rows are covered) against all keys; the upstream gradient is zero outside those
rows, so flex's dk and dv must equal the subset reference's exactly (a key's gradient sums over
the rows that saw it), and dq/output are compared on the rows. Tolerances by dtype: relative
RMS error and max error relative to the reference's largest value.

Also printed: flex forward+backward seconds against unmasked SDPA (flash) on the same q/k/v,
as a ratio, with the allowed-pair density; the first call's seconds (compile).

``--cpu-smoke``: tiny sizes on the CPU (2 samples, 2 heads, 128 and 256 tokens, the U-Net's
head dim 40, the 256 against a 48-row reference); torch 2.14 has no FlexAttention backward on
a CPU, so flex runs forward only there (``--backend grouped`` exercises the backward
comparison on a CPU).
Output: a table, then one JSON line (``{"check": "flex", ...}``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    best_seconds,
    device_name,
    finish,
    missing_module,
    skip,
    synchronize,
    table,
)

CHECK = "flex"
CASES = ("dit-self", "dit-cross", "unet-self", "unet-cross")
#: (relative RMS error, max error / max |reference|) allowed per dtype: bf16 inputs are exact
#: in float64, so the error is flex's bf16 rounding of P and of the output (2^-8 relative).
TOLERANCE = {"bf16": (2e-2, 6e-2), "fp32": (2e-3, 1e-2)}
OBJECTS_WITH_TEXT = 2


@dataclass
class Size:
    """One attention shape: token grid, heads, head dim, local-text tokens."""

    name: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int
    text_tokens: int

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def paper_sizes() -> dict[str, Size]:
    """The dit-4b and U-Net level-0 shapes, from the train configs and the size registries."""
    from ttm_ray.config.loader import load_merged
    from ttm_ray.models.dit.config import DIT_SIZES
    from ttm_ray.models.flops import DEFAULT_LOCAL_TOKENS
    from ttm_ray.models.unet.config import UNET_SIZES

    configs = REPO / "jobs" / "configs" / "train"
    dit_model = load_merged(configs / "dit_stage2.yaml")["model"]
    unet_model = load_merged(configs / "unet_stage2.yaml")["model"]
    dit = DIT_SIZES[dit_model["size"]]
    pt, ph, pw = dit.patch
    dit_grid = (dit_model["num_frames"] // pt, dit_model["height"] // ph,
                dit_model["width"] // pw)
    unet = UNET_SIZES[unet_model["size"]]
    heads = unet.masked_heads or unet.attention_heads
    unet_grid = (unet_model["num_frames"], unet_model["height"], unet_model["width"])
    return {
        "dit": Size("dit", dit_grid, dit.heads, dit.head_dim, DEFAULT_LOCAL_TOKENS),
        "unet": Size("unet", unet_grid, heads, unet.block_out_channels[0] // heads,
                     DEFAULT_LOCAL_TOKENS),
    }


def smoke_sizes() -> dict[str, Size]:
    return {"dit": Size("dit", (2, 8, 8), 2, 16, 16),
            "unet": Size("unet", (2, 8, 16), 2, 40, 16)}


def token_ids(size: Size, batch: int, gen: Any) -> Any:
    """``[B, N]`` ids: three boxes (about 30 %, 18 %, 8 % of a frame) moving across the frames,
    -1 elsewhere; later objects drawn over earlier ones."""
    import torch

    t, h, w = size.grid
    ids = torch.full((batch, t, h, w), -1, dtype=torch.long)
    for b in range(batch):
        for obj, side in enumerate((0.55, 0.42, 0.28)):
            bh, bw = max(1, round(side * h)), max(1, round(side * w))
            y0 = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
            x_start = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
            x_end = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
            for f in range(t):
                x0 = x_start + round((x_end - x_start) * f / max(1, t - 1))
                ids[b, f, y0:y0 + bh, x0:x0 + bw] = obj
    return ids.view(batch, -1)


def text_ids(size: Size, batch: int) -> Any:
    """``[B, M]`` ids of the local text: ``OBJECTS_WITH_TEXT`` objects' prompts of M/2 tokens,
    the last quarter of each padding (-1)."""
    import torch

    per = size.text_tokens // OBJECTS_WITH_TEXT
    ids = torch.full((batch, size.text_tokens), -1, dtype=torch.long)
    for obj in range(OBJECTS_WITH_TEXT):
        ids[:, obj * per: obj * per + per - per // 4] = obj
    return ids


def reference_rows(q_ids: Any, count: int, gen: Any) -> Any:
    """About ``count`` query rows, the same number from every id of sample 0 (sorted)."""
    import torch

    groups = torch.unique(q_ids[0])
    per = max(1, count // len(groups))
    picked = []
    for gid in groups.tolist():
        rows = torch.nonzero(q_ids[0] == gid).flatten()
        picked.append(rows[torch.randperm(len(rows), generator=gen)[:per]])
    return torch.sort(torch.cat(picked)).values


def errors(got: Any, ref: Any) -> dict[str, float]:
    import torch

    got = got.double()
    diff = (got - ref).abs()
    return {"max_abs": float(diff.max()),
            "max_rel": float(diff.max() / ref.abs().max().clamp_min(1e-30)),
            "rms_rel": float(diff.norm() / ref.norm().clamp_min(1e-30)),
            "finite": bool(torch.isfinite(got).all())}


def allowed_keys(q_ids: Any, kv_ids: Any, mode: str) -> Any:
    """Per query, how many keys it may attend (from id counts: nothing N x M is built)."""
    import torch

    out = torch.zeros(q_ids.shape, dtype=torch.long, device=q_ids.device)
    for b in range(q_ids.shape[0]):
        ids, counts = torch.unique(kv_ids[b], return_counts=True)
        if mode == "cross":
            counts = counts * (ids >= 0)
        pos = torch.searchsorted(ids, q_ids[b]).clamp_max(len(ids) - 1)
        out[b] = torch.where(ids[pos] == q_ids[b], counts[pos], 0)
    return out


def density(q_ids: Any, kv_ids: Any, mode: str) -> float:
    """The fraction of (query, key) pairs the mask allows."""
    return float(allowed_keys(q_ids, kv_ids, mode).sum()) / (q_ids.numel() * kv_ids.shape[1])


def run_case(name: str, size: Size, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """One (size, mode): flex forward (+ backward) vs the float64 reference."""
    import torch
    import torch.nn.functional as F

    from ttm_ray.conditioning.masked_attention import masked_attention, masked_attention_reference

    mode = name.split("-")[1]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    b, h, d, n = args.batch, size.heads, size.head_dim, size.tokens
    q_ids = token_ids(size, b, gen)
    kv_ids = q_ids if mode == "self" else text_ids(size, b)
    m = kv_ids.shape[1]
    q = torch.randn(b, h, n, d, generator=gen).to(device, dtype)
    k = torch.randn(b, h, m, d, generator=gen).to(device, dtype)
    v = torch.randn(b, h, m, d, generator=gen).to(device, dtype)
    q_ids = q_ids.to(device)
    kv_ids = q_ids if mode == "self" else kv_ids.to(device)
    backward = args.backend != "flex" or device.type == "cuda"  # CPU flex: forward only
    subset = n > args.full_ref_max
    rows = (reference_rows(q_ids.cpu(), args.ref_rows, gen) if subset
            else torch.arange(n)).to(device)
    upstream = torch.zeros(b, h, n, d, device=device)
    upstream[:, :, rows] = torch.randn(b, h, len(rows), d, generator=gen).to(device)
    result: dict[str, Any] = {"case": name, "tokens": n, "keys": m, "heads": h, "head_dim": d,
                              "batch": b, "dtype": args.dtype, "backend": args.backend,
                              "backward": backward, "density": density(q_ids, kv_ids, mode),
                              "reference_rows": len(rows), "reference": (
                                  f"float64 on {len(rows)} of {n} query rows, all keys"
                                  if subset else "float64, all rows")}

    def flex_call(grad: bool) -> tuple[Any, list[Any]]:
        leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            out = masked_attention(*leaves, q_ids, kv_ids, mode=mode, backend=args.backend)
            if grad:
                (out.float() * upstream).sum().backward()
        return out.detach(), [t.grad for t in leaves]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out, grads = flex_call(backward)
    synchronize(device)
    result["first_call_s"] = round(time.perf_counter() - start, 2)
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)

    # The reference on the chosen rows (float64 leaves: float64 gradients).
    leaves = [q.detach()[:, :, rows].double(), k.detach().double(), v.detach().double()]
    leaves = [t.requires_grad_(backward) for t in leaves]
    with torch.set_grad_enabled(backward):
        ref = masked_attention_reference(*leaves, q_ids[:, rows], kv_ids, mode=mode)
        if backward:
            (ref * upstream[:, :, rows].double()).sum().backward()
    checks = {"out": errors(out[:, :, rows], ref.detach())}
    if backward:
        checks["dq"] = errors(grads[0][:, :, rows], leaves[0].grad)
        checks["dk"] = errors(grads[1], leaves[1].grad)
        checks["dv"] = errors(grads[2], leaves[2].grad)
    del ref, leaves
    rms_tol, max_tol = TOLERANCE[args.dtype]
    ok = all(e["finite"] and e["rms_rel"] <= rms_tol and e["max_rel"] <= max_tol
             for e in checks.values())
    if mode == "cross":  # rows with no allowed key: exactly zero output and query gradient
        empty = allowed_keys(q_ids, kv_ids, mode) == 0
        empty_rows = empty[:, None, :, None].expand_as(out)
        zero_out = bool((out[empty_rows] == 0).all())
        zero_dq = not backward or bool((grads[0][empty_rows] == 0).all())
        result["empty_rows"] = int(empty.sum())
        result["empty_rows_zero"] = zero_out and zero_dq
        ok = ok and zero_out and zero_dq
    result["errors"] = checks
    result["ok"] = ok

    if device.type == "cuda" or args.cpu_smoke:  # flex vs unmasked SDPA, fwd(+bwd), a ratio
        def sdpa_call() -> None:
            leaves_ = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            with torch.set_grad_enabled(backward):
                o = F.scaled_dot_product_attention(*leaves_)
                if backward:
                    (o.float() * upstream).sum().backward()

        flex_s = best_seconds(lambda: flex_call(backward), device, args.repeats)
        sdpa_s = best_seconds(sdpa_call, device, args.repeats)
        result.update(flex_s=flex_s, sdpa_s=sdpa_s, flex_over_sdpa=flex_s / sdpa_s)
    return result


def format_rows(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], "ERROR", r["error"][:120], "", "", "", "", ""])
            continue
        err = r["errors"]
        worst = max(err.values(), key=lambda e: e["rms_rel"])
        grads = "yes" if r["backward"] else "no (CPU flex)"
        timing = (f"{r['flex_s'] * 1e3:.1f} / {r['sdpa_s'] * 1e3:.1f} = "
                  f"{r['flex_over_sdpa']:.2f}" if "flex_s" in r else "n/a")
        shape = f"{r['batch']}x{r['heads']}x{r['tokens']}x{r['head_dim']} -> {r['keys']} keys"
        rows.append([r["case"], "PASS" if r["ok"] else "FAIL", shape, grads,
                     ", ".join(f"{k} {e['rms_rel']:.1e}/{e['max_rel']:.1e}"
                               for k, e in err.items()),
                     f"{worst['rms_rel']:.1e}", r["reference"],
                     f"{r['first_call_s']:.1f} s; {timing}"])
    return table(["case", "result", "B x heads x N x d", "backward",
                  "rel. RMS / max error (out, dq, dk, dv)", "worst RMS", "reference",
                  "first call; flex / unmasked SDPA ms"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Details: the module docstring of this file.")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--backend", default="flex", choices=("flex", "sdpa", "grouped"),
                        help="the masked_attention backend under test (default flex)")
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default=None,
                        help="q/k/v dtype (default bf16 on CUDA, fp32 on a CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default 1 (2 in --cpu-smoke)")
    parser.add_argument("--ref-rows", type=int, default=1024,
                        help="query rows of the float64 reference above --full-ref-max tokens")
    parser.add_argument("--full-ref-max", type=int, default=4096,
                        help="largest token count with a full (all-rows) reference")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (best of)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default cuda (cpu with --cpu-smoke)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny sizes on the CPU: checks this script, not the kernel")
    args = parser.parse_args(argv)

    why = missing_module("torch", "ttm_ray.conditioning.masked_attention", "yaml")
    if why:
        return skip(CHECK, why)
    import torch

    device = torch.device(args.device or ("cpu" if args.cpu_smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return skip(CHECK, "no CUDA device (torch.cuda.is_available() is False); "
                           "--cpu-smoke runs the tiny CPU version")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.batch = args.batch or (2 if args.cpu_smoke else 1)
    if args.cpu_smoke:  # the row-subset reference too: dit (128 tokens) full, unet (256) not
        args.repeats, args.full_ref_max, args.ref_rows = 1, 128, 48
    sizes = smoke_sizes() if args.cpu_smoke else paper_sizes()
    print(f"flex check on {device_name(device)}, torch {torch.__version__}, "
          f"dtype {args.dtype}, backend {args.backend}", flush=True)
    results = []
    family = None
    for name in args.cases:
        size = sizes[name.split("-")[0]]
        if family not in (None, size.name):
            # A training process runs one family: its head dim never changes under the
            # compiled flex_attention (the text length M does, and stays within a family).
            torch._dynamo.reset()
        family = size.name
        try:
            results.append(run_case(name, size, args, device))
        except Exception as exc:  # report it, go on with the other cases
            results.append({"case": name, "ok": False,
                            "error": f"{type(exc).__name__}: {exc}"[:2000]})
        print(f"  {name}: {'ok' if results[-1]['ok'] else 'FAILED'} "
              f"{results[-1].get('error', '')}", flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(format_rows(results))
    ok = all(r["ok"] for r in results)
    failed = [r["case"] for r in results if not r["ok"]]
    summary = (f"{len(results) - len(failed)}/{len(results)} cases match the float64 "
               f"reference ({args.dtype}, backend {args.backend})"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    return finish(CHECK, ok, summary, device=device_name(device), results=results)


if __name__ == "__main__":
    sys.exit(main())

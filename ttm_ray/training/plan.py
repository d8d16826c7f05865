"""Capacity plan of a training run: will it fit, how long will it take, what does it send.

``ttm-ray plan train --config ...`` prints :func:`plan_training` for a :class:`TrainConfig`
under stated :class:`Hardware` assumptions (default: the paper's A100-80GB, 8 per node).

Per-GPU memory, for ZeRO-2 and ZeRO-3 side by side (``P`` trainable parameters, ``N`` data-
parallel workers, ``L`` the largest single module's parameters; bf16 mixed precision as
DeepSpeed runs it):

* model states (the ZeRO paper's accounting, as DeepSpeed's
  ``estimate_zero{2,3}_model_states_mem_needs`` count them; they are cross-checked):

  ========================  ==================  ==========================
  bytes per GPU             ZeRO-2              ZeRO-3
  ========================  ==================  ==========================
  parameters (bf16)         ``2P``              ``2P/N``
  gradients                 ``6P/N`` (bf16+fp32)  ``4P/N`` (fp32)
  optimizer (fp32 master,   ``12P/N``           ``12P/N``
  Adam m and v)
  gathered layer            0                   ``4L`` (bf16 params + grads)
  ========================  ==================  ==========================

  Without bf16 (fp32 training): parameters ``4P`` / ``4P/N``, gradients ``4P/N``, optimizer
  ``8P/N`` (no separate master copy), gathered layer ``8L``; DeepSpeed's estimators assume
  mixed precision, so there is no cross-check then.
* communication buckets: ``2 bytes x (reduce_bucket + allgather_bucket)`` (ZeRO-3: reduce +
  DeepSpeed's default 5e7-element prefetch bucket), x4.5 with ``overlap_comm`` (DeepSpeed's
  documented footprint).
* activations: **measured**, not modelled: one forward + backward of one micro batch of the
  real model on the ``meta`` device (nothing allocated, seconds even for dit-4b), tracking the
  bytes of tensor storages created during the step and still alive (:class:`LiveBytes`); the
  peak is what the step needs beyond the model states. The storages of the parameters and
  buffers are registered as already there, so their views (``weight.t()`` in a linear layer,
  slices, a no-op ``.to``) are not activations; a real copy (a cast of a parameter to another
  dtype) is a new storage and counts (the model is converted to the run's dtype first, as
  DeepSpeed does, so forward casts no weights). Parameter gradients are dropped as they arrive
  (DeepSpeed moves them into its buckets, counted with the model states). Attention is
  accounted as the fused kernels the GPU runs (flash / FlexAttention keep q, k, v, the output
  and the log-sum-exp, never an ``N x M`` matrix or mask). Activation checkpointing is
  measured as configured. ``tests/training/test_plan.py`` checks the probe against the CPU
  allocator's own record (the profiler's memory events) of a real forward + backward: within
  20% (measured about 1-2%).
* frozen encoders: their weights in their dtype (counted from their config files on the meta
  device, or the paper's reference architectures when the folder is not on this machine);
  none with ``data.encoded`` (the encoded-latent cache: they never run on the training GPUs).
  The plan prints which.
* a fixed reserve for the CUDA context, NCCL and allocator fragmentation.

The model states are cross-checked against DeepSpeed's own
``estimate_zero{2,3}_model_states_mem_needs`` (:func:`deepspeed_estimate` calls them; the
plan prints both numbers and whether they agree).

Time: training FLOPs per sample from :mod:`ttm_ray.models.flops` (3x forward, 4x with
activation checkpointing) plus the frozen encoders' forward FLOPs (:func:`encoder_flops`,
counted on the meta device from their folders or the paper's reference architectures; zero
with ``data.encoded``) x samples per GPU per step, at ``mfu`` of ``peak_tflops``
(:meth:`Hardware.cpu` describes this machine's CPU, its peak measured by a matmul benchmark;
a test compares the predicted step time with real CPU steps and prints the ratio).

Communication per GPU per step (ring collectives move ``(N-1)/N`` of the buffer): ZeRO-2
reduce-scatters bf16 gradients every micro batch and all-gathers the updated bf16 parameters
once; ZeRO-3 all-gathers parameters for the forward and again for the backward of every micro
batch and reduce-scatters the gradients. It runs at the inter-node bandwidth when the workers
span nodes. Overlap is modelled, not assumed (:func:`comm_exposure`; the plan prints the
assumption and each stage's exposed and hidden seconds; step = compute + exposed):

* ZeRO-2: each ``reduce_bucket_size`` bucket's reduce starts when backward has filled it, so
  it hides behind the rest of backward; the last bucket, and whatever exceeds the backward
  time, is exposed; without ``overlap_comm`` all of it is. The parameter all-gather after the
  optimizer step has no compute left to hide behind: exposed.
* ZeRO-3: parameter gathers are prefetched in ``stage3_prefetch_bucket_size`` buckets and hide
  behind forward / backward compute up to its time (the first bucket exposed); the gradient
  reduce-scatter shares the link with the backward gathers, its last bucket exposed. Launch
  latency and per-module hook overhead are not modelled: ZeRO-3's time is a lower bound.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from ttm_ray.config import constrained
from ttm_ray.model_folders import model_folder

if TYPE_CHECKING:
    from ttm_ray.conditioning.autoencoders import AutoencoderConfig
    from ttm_ray.conditioning.text_encoders import TextEncoderConfig
    from ttm_ray.models import ModelConfig
    from ttm_ray.training.config import DeepSpeedConfig, TrainConfig

GIB = 1 << 30
#: DeepSpeed's default ``stage3_prefetch_bucket_size`` (elements): the deepspeed config of a
#: run does not set it.
ZERO3_PREFETCH_BUCKET = 50_000_000
#: DeepSpeed documents that ``overlap_comm`` uses 4.5x the bucket sizes.
OVERLAP_BUFFER_FACTOR = 4.5
ZERO_STAGES = (2, 3)


@dataclass
class Hardware:
    """What the plan assumes about one GPU and the network (defaults: the paper's cluster,
    A100-80GB SXM, 8 per node with NVLink, one 200 Gb/s HDR InfiniBand port per GPU)."""

    name: str = "A100-80GB SXM"
    gpu_memory_gib: float = constrained(80.0, gt=0, help="memory per GPU")
    reserved_gib: float = constrained(
        3.0, ge=0, help="kept back for the CUDA context, NCCL and allocator fragmentation")
    peak_tflops: float = constrained(312.0, gt=0, help="dense bf16 peak per GPU (A100: 312)")
    mfu: float = constrained(0.40, gt=0, le=1, help="assumed model FLOPs utilisation")
    gpus_per_node: int = constrained(8, gt=0)
    intra_node_gb_per_s: float = constrained(
        300.0, gt=0, help="per-GPU collective bandwidth inside a node (NVLink 3: ~300 GB/s)")
    inter_node_gb_per_s: float = constrained(
        25.0, gt=0, help="per-GPU bandwidth across nodes (200 Gb/s InfiniBand: 25 GB/s)")

    @classmethod
    def cpu(cls, *, bf16: bool = False, mfu: float = 1.0,
            peak_tflops: float | None = None) -> Hardware:
        """This machine's CPU as the one "GPU" of a single-worker plan: ``peak_tflops``
        measured by :func:`measure_matmul_tflops` in the run's dtype (unless given), memory =
        the machine's RAM, no reserve (no CUDA context). ``mfu`` is then the share of the
        large-matmul rate the model reaches (1.0: as fast as the benchmark)."""
        import os

        dtype = torch.bfloat16 if bf16 else torch.float32
        peak = peak_tflops if peak_tflops is not None else measure_matmul_tflops(dtype)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        return cls(name=f"CPU ({torch.get_num_threads()} threads, "
                        f"{str(dtype).removeprefix('torch.')} matmul {peak * 1e3:.0f} GFLOPS)",
                   gpu_memory_gib=ram, reserved_gib=0.0, peak_tflops=peak, mfu=mfu,
                   gpus_per_node=1)


def measure_matmul_tflops(dtype: torch.dtype = torch.float32, size: int = 1024,
                          repeats: int = 5) -> float:
    """Dense matmul throughput of this machine's CPU in TFLOPS (best of ``repeats`` square
    ``size`` matmuls after a warm-up, so a busy neighbour lowers it less)."""
    import time

    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


# ----------------------------------------------------------------------------- formulas
@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of parameters, gradients, optimizer states and (ZeRO-3) the gathered
    working layer."""

    params: int
    grads: int
    optimizer: int
    gathered: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered


def model_state_bytes(params: int, largest_layer: int, world: int, zero_stage: int,
                      bf16: bool = True) -> ModelStates:
    """Per-GPU model states under ``zero_stage`` (formulas in the module docstring)."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    p, n = int(params), int(world)
    if bf16:
        param_bytes, grad_part, opt, gathered = 2, 6, 12, 4
        if zero_stage == 3:
            grad_part = 4  # bf16 gradients are reduce-scattered bucket by bucket
    else:
        param_bytes, grad_part, opt, gathered = 4, 4, 8, 8
    if zero_stage == 2:
        return ModelStates(param_bytes * p, grad_part * p // n, opt * p // n)
    return ModelStates(param_bytes * p // n, grad_part * p // n, opt * p // n,
                       gathered * int(largest_layer))


def comm_buffer_bytes(ds: DeepSpeedConfig, zero_stage: int, bf16: bool = True) -> int:
    """Reduce / gather bucket buffers (DeepSpeed: 4.5x the bucket sizes with overlap_comm)."""
    elem = 2 if bf16 else 4
    gather = ds.allgather_bucket_size if zero_stage == 2 else ZERO3_PREFETCH_BUCKET
    factor = OVERLAP_BUFFER_FACTOR if ds.overlap_comm else 1.0
    return int(elem * (ds.reduce_bucket_size + gather) * factor)


def gradient_comm_bytes(params: int, world: int, zero_stage: int, grad_accum: int = 1,
                        bf16: bool = True) -> int:
    """Bytes each GPU sends per optimizer step for gradients and parameters (module
    docstring); 0 on a single worker."""
    if world <= 1:
        return 0
    elem = 2 if bf16 else 4
    ring = (world - 1) / world
    # ZeRO-2: a reduce-scatter per micro batch + one all-gather of the updated parameters;
    # ZeRO-3: per micro batch, gather (forward), gather (backward), reduce-scatter.
    collectives = grad_accum + 1 if zero_stage == 2 else 3 * grad_accum
    return int(collectives * elem * params * ring)


@dataclass(frozen=True)
class Exposure:
    """Seconds of one step's communication the compute cannot hide (``exposed``) and the rest
    (``hidden``), per GPU."""

    exposed: float
    hidden: float

    @property
    def total(self) -> float:
        return self.exposed + self.hidden


def _bucket_fractions(params: int, bucket: int) -> tuple[float, float]:
    """(first, last) bucket as fractions of ``params`` elements: buckets fill in order and the
    last one holds the remainder."""
    if params <= 0:
        return 1.0, 1.0
    bucket = max(1, min(int(bucket), params))
    last = params % bucket or bucket
    return bucket / params, last / params


def _trailing(comm: float, compute: float, first: float, last: float) -> float:
    """Exposed seconds of ``comm`` that starts bucket by bucket as ``compute`` produces its
    input (gradient reduce in backward): nothing before the first bucket fills, the last
    bucket's reduce after compute ends."""
    return max(comm * last, comm - compute * (1 - first))


def _prefetched(comm: float, compute: float, first: float, last: float) -> float:
    """Exposed seconds of ``comm`` that must finish, bucket by bucket, before ``compute`` uses
    it (ZeRO-3's parameter gathers): the first bucket's gather cannot be hidden, nor the last
    bucket's compute when the link is the bottleneck."""
    return max(comm * first, comm - compute * (1 - last))


def overlap_assumption(zero_stage: int, overlap_comm: bool) -> str:
    """The overlap model :func:`comm_exposure` applies, in words (printed with the plan)."""
    if zero_stage == 2:
        reduce = ("reduce-scatters each gradient bucket as backward fills it (overlap_comm), "
                  "hidden behind the rest of backward, the last bucket exposed"
                  if overlap_comm else
                  "reduces gradient buckets synchronously in backward (overlap_comm off): "
                  "all exposed")
        return (f"ZeRO-2 {reduce}; its parameter all-gather after the optimizer step "
                "is exposed")
    reduce = ("reduce-scatters gradient buckets behind backward, the last bucket exposed"
              if overlap_comm else "reduces gradients synchronously (overlap_comm off): exposed")
    return (f"ZeRO-3 prefetches parameter gathers (forward and backward) in "
            f"{ZERO3_PREFETCH_BUCKET / 1e6:g}M-element buckets, hidden behind compute up to "
            f"its time, the first bucket exposed; {reduce} (latency and hook overhead not "
            "modelled: a lower bound)")


def comm_exposure(zero_stage: int, params: int, world: int, *, grad_accum: int,
                  forward_s: float, backward_s: float, bandwidth_gb_per_s: float,
                  ds: DeepSpeedConfig, bf16: bool = True) -> Exposure:
    """Which of a step's communication (:func:`gradient_comm_bytes`) the compute hides.

    ``forward_s``/``backward_s`` are one micro batch's compute on one GPU (backward includes
    the recompute of activation checkpointing). Per micro batch (uniform gradient production
    and bucket sizes in elements; DeepSpeed's streams as documented):

    * ZeRO-2: the gradient reduce of each ``reduce_bucket_size`` bucket starts when backward
      has filled it: hidden up to the backward time left after the first bucket, the last
      bucket exposed (:func:`_trailing`); without ``overlap_comm`` all of it waits. Once per
      step the updated bf16 parameters are all-gathered after the optimizer step: nothing
      left to overlap, so exposed.
    * ZeRO-3: the forward and backward parameter gathers are prefetched in
      ``stage3_prefetch_bucket_size`` buckets, hidden behind forward / backward compute except
      the first bucket (:func:`_prefetched`); in backward the gradient reduce-scatter shares
      the link with the gathers (their sum is hidden up to the backward time), its last
      bucket exposed; without ``overlap_comm`` the reduce waits.
    """
    if world <= 1:
        return Exposure(0.0, 0.0)
    ring = (world - 1) / world
    one = (2 if bf16 else 4) * params * ring / (bandwidth_gb_per_s * 1e9)  # one collective
    r_first, r_last = _bucket_fractions(params, ds.reduce_bucket_size)
    if zero_stage == 2:
        reduce = _trailing(one, backward_s, r_first, r_last) if ds.overlap_comm else one
        exposed = grad_accum * reduce + one
        return Exposure(exposed, (grad_accum + 1) * one - exposed)
    g_first, g_last = _bucket_fractions(params, ZERO3_PREFETCH_BUCKET)
    forward = _prefetched(one, forward_s, g_first, g_last)
    if ds.overlap_comm:  # gathers and reduces share the link behind backward
        backward = max(one * g_first + one * r_last, 2 * one - backward_s * (1 - g_last))
    else:
        backward = _prefetched(one, backward_s, g_first, g_last) + one
    exposed = grad_accum * (forward + min(backward, 2 * one))
    return Exposure(exposed, 3 * grad_accum * one - exposed)


def deepspeed_estimate(params: int, largest_layer: int, world: int, zero_stage: int
                       ) -> int | None:
    """DeepSpeed's own per-GPU model-state estimate (no offload), or None without DeepSpeed."""
    try:
        if zero_stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import (
                estimate_zero2_model_states_mem_needs,
            )

            return int(estimate_zero2_model_states_mem_needs(
                params, num_gpus_per_node=world, num_nodes=1, cpu_offload=False)[1])
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return int(estimate_zero3_model_states_mem_needs(
            params, largest_layer, num_gpus_per_node=world, num_nodes=1, cpu_offload=False,
            cpu_offload_params=False)[1])
    except ImportError:
        return None


def largest_layer_params(model: torch.nn.Module) -> int:
    """Parameters of the largest single module (its own, not its children's): what ZeRO-3
    gathers at once, as DeepSpeed's estimator defines it."""
    return max((sum(p.numel() for p in m.parameters(recurse=False))
                for m in model.modules()), default=0)


# ----------------------------------------------------------------------------- activations
class _FusedAttention(torch.autograd.Function):
    """Attention as flash / FlexAttention store it for backward: q, k, v, out, logsumexp."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
                **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


def _fused_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any,
                  **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _fused_attention_accounting() -> Iterator[None]:
    """Route SDPA and masked attention through :class:`_FusedAttention` (meta device only:
    the outputs are empty)."""
    import torch.nn.functional as F

    import ttm_ray.conditioning.masked_attention as ma

    with _PATCH_LOCK:
        sdpa, masked = F.scaled_dot_product_attention, ma.masked_attention
        F.scaled_dot_product_attention, ma.masked_attention = _fused_sdpa, _fused_masked
        try:
            yield
        finally:
            F.scaled_dot_product_attention, ma.masked_attention = sdpa, masked


class LiveBytes:
    """Bytes of tensor storages created inside ``with LiveBytes() as t:`` and still alive
    (``t.live``), and their peak (``t.peak``). Works on the meta device, where storages have
    a size but no memory: a model's footprint without allocating it.

    ``exclude``: tensors that exist already (a model's parameters and buffers); outputs that
    share their storage (views such as ``w.t()``) are not counted, new storages (``w.to``
    another dtype) are."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        from torch.utils.weak import WeakIdKeyDictionary

        tracker = self
        self.live = self.peak = 0
        seen = WeakIdKeyDictionary()
        # Storages that exist before the step (parameters, buffers): a view of one (``w.t()``,
        # ``w[:n]``, a no-op ``.to``) returns the same storage and must not count as new.
        for tensor in exclude:
            seen[tensor.untyped_storage()] = None

        def free(nbytes: int) -> None:
            tracker.live -= nbytes

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        if storage not in seen:
                            nbytes = storage.nbytes()
                            seen[storage] = weakref.ref(storage, lambda _, n=nbytes: free(n))
                            tracker.live += nbytes
                tracker.peak = max(tracker.peak, tracker.live)
                return out

        self._mode = Mode()

    def __enter__(self) -> LiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def measure_activation_bytes(model_cfg: ModelConfig, micro_batch: int, *,
                             text_tokens: int, local_tokens: int, bf16: bool = True) -> int:
    """Peak bytes of activations (and backward temporaries) of one training micro batch.

    Builds the model on the meta device (``init_from`` is not loaded), runs forward and
    backward under a live-storage tracker that leaves out the parameters, buffers and their
    views (model states, counted separately); parameter gradients are dropped as they arrive
    (DeepSpeed moves them into its buckets, counted with the model states).
    """
    from ttm_ray.models import build_model
    from ttm_ray.models.flops import example_inputs

    cfg = replace(model_cfg, init_from=None)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = build_model(cfg, device="meta").to(dtype)
    model.train()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    x, t, cond = example_inputs(cfg, model, micro_batch, text_tokens=text_tokens,
                                local_tokens=local_tokens, device="meta")
    x, cond = x.to(dtype), cond.to("meta", dtype)
    resident = [*model.parameters(), *model.buffers()]
    with _fused_attention_accounting(), LiveBytes(exclude=resident) as tracker:
        out = model(x, t, cond)
        out.float().square().mean().backward()
    return int(tracker.peak)


# ----------------------------------------------------------------------------- encoders
def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def autoencoder_bytes(cfg: AutoencoderConfig) -> int | None:
    """Weight bytes of the frozen autoencoder (0 for the pixel kind; None when its folder is
    not on this machine)."""
    if cfg.kind == "pixel":
        return 0
    import diffusers

    folder = model_folder(cfg.path, ("vae",)) if cfg.path else None
    if folder is None:
        return None
    cls = getattr(diffusers, "AutoencoderKL" if cfg.kind == "image_vae" else cfg.class_name)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    return _param_bytes(model.to(getattr(torch, cfg.dtype)))


def text_encoder_bytes(cfg: TextEncoderConfig) -> int | None:
    """Weight bytes of the frozen text encoder (None when its folder is not here)."""
    import transformers

    from ttm_ray.conditioning.text_encoders import _MODEL_CLASSES

    folder = model_folder(cfg.path, ("text_encoder",)) if cfg.path else None
    if folder is None:
        return None
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    name = _MODEL_CLASSES[cfg.kind].get(config.model_type)
    if name is None:
        return None
    with torch.device("meta"):
        model = getattr(transformers, name)(config)
    return _param_bytes(model.to(getattr(torch, cfg.dtype)))


#: The paper's encoders' architectures, for FLOP counts when their folders are not on this
#: machine (the planner's laptop): T5-v1.1-XXL's encoder, CLIP ViT-L/14's text tower, the SD1.5
#: VAE; diffusers' ``AutoencoderKLCosmos`` defaults are the Cosmos CV8x8x8 tokenizer.
REFERENCE_TEXT = {
    "t5": ("T5EncoderModel", "T5Config", dict(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
        feed_forward_proj="gated-gelu")),
    "clip": ("CLIPTextModel", "CLIPTextConfig", dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, vocab_size=49408)),
}
REFERENCE_VAE = {"AutoencoderKL": dict(
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)}
#: Objects per clip assumed for stage 2's local prompts (each encoded on its own).
ASSUMED_OBJECTS = 2


@dataclass(frozen=True)
class EncoderFlops:
    """Forward FLOPs of the frozen encoders per training sample, as on-the-fly training runs
    them (``TrainingData.encode``): the first frames of video and trajectory, the target video
    (stage 1: the trajectory; stage 2: video and trajectory), the global prompt and (stage 2)
    each object's local prompt. ``source`` says where the architectures came from."""

    autoencoder: int
    text: int
    source: str

    @property
    def total(self) -> int:
        return self.autoencoder + self.text


def _meta_autoencoder(cfg: AutoencoderConfig) -> tuple[torch.nn.Module, str]:
    import diffusers

    name = "AutoencoderKL" if cfg.kind == "image_vae" else cfg.class_name
    cls = getattr(diffusers, name)
    folder = model_folder(cfg.path, ("vae",)) if cfg.path else None
    config = cls.load_config(folder) if folder is not None else REFERENCE_VAE.get(name, {})
    with torch.device("meta"):
        model = cls.from_config(config)
    # .to: buffers some VAEs build from literals (Cosmos' wavelets) ignore the device context
    return model.to("meta"), "folder" if folder is not None else "reference"


def _meta_text_encoder(cfg: TextEncoderConfig) -> tuple[torch.nn.Module, str]:
    import transformers

    from ttm_ray.conditioning.text_encoders import _MODEL_CLASSES

    folder = model_folder(cfg.path, ("text_encoder",)) if cfg.path else None
    if folder is not None:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        name, source = _MODEL_CLASSES[cfg.kind][config.model_type], "folder"
    else:
        name, config_name, kwargs = REFERENCE_TEXT[cfg.kind]
        config, source = getattr(transformers, config_name)(**kwargs), "reference"
    with torch.device("meta"):
        model = getattr(transformers, name)(config)
    return model, source


def _pixel_shape(cfg: TrainConfig, model: torch.nn.Module | None, source: str
                 ) -> tuple[int, int, int]:
    """The training clip's pixels: from the autoencoder's folder (preflight's geometry), or
    from the reference architecture's compression when the folder is not here."""
    from ttm_ray.conditioning.autoencoders import AutoencoderGeometry, geometry
    from ttm_ray.training.preflight import needed_clip

    geo = geometry(cfg.encoders.autoencoder)
    if model is not None and source == "reference":
        c = model.config
        if cfg.encoders.autoencoder.kind == "image_vae":
            spatial, temporal, causal = 2 ** (len(c.block_out_channels) - 1), 1, False
        else:
            spatial, temporal = c.spatial_compression_ratio, c.temporal_compression_ratio
            causal = True
        geo = AutoencoderGeometry(temporal, spatial, causal, c.latent_channels, "reference")
    return needed_clip(cfg, geo)


def encoder_flops(cfg: TrainConfig) -> EncoderFlops:
    """:class:`EncoderFlops` of ``cfg``'s training clips, counted by ``FlopCounterMode`` on
    the meta device (nothing allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    stage, enc = cfg.model.stage, cfg.encoders
    videos = 1 if stage == 1 else 2
    sources = []
    ae_flops = 0
    if enc.autoencoder.kind != "pixel":  # pixel unshuffle: no arithmetic
        model, src = _meta_autoencoder(enc.autoencoder)
        frames, height, width = _pixel_shape(cfg, model, src)
        sources.append(f"autoencoder {src} ({frames}x{height}x{width} px)")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            if enc.autoencoder.kind == "image_vae":  # frame by frame
                model.encode(torch.empty(videos * frames + 2, 3, height, width, device="meta"))
            else:
                model.encode(torch.empty(videos, 3, frames, height, width, device="meta"))
                model.encode(torch.empty(2, 3, 1, height, width, device="meta"))
        ae_flops = counter.get_total_flops()
    model, src = _meta_text_encoder(enc.text_encoder)
    sources.append(f"text encoder {src}")
    length = enc.text_encoder.max_length
    local = min(cfg.data.local_tokens_per_object or length, length)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=torch.zeros(1, length, dtype=torch.long, device="meta"))
        if stage == 2:
            model(input_ids=torch.zeros(ASSUMED_OBJECTS, local, dtype=torch.long,
                                        device="meta"))
    return EncoderFlops(ae_flops, counter.get_total_flops(), ", ".join(sources))


# ----------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Per-GPU memory of one ZeRO stage (bytes); ``activations``/``encoders`` None when not
    measured / not countable here."""

    zero_stage: int
    states: ModelStates
    buffers: int
    activations: int | None
    encoders: int | None
    reserved: int
    capacity: int
    deepspeed_states: int | None

    @property
    def total(self) -> int:
        return (self.states.total + self.buffers + (self.activations or 0)
                + (self.encoders or 0) + self.reserved)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass
class CommPlan:
    """One ZeRO stage's communication per GPU per step, and how much of it the step waits for
    (:func:`comm_exposure`; ``assumption`` says how, in words)."""

    zero_stage: int
    bytes_per_step: int
    bandwidth_gb_per_s: float
    scope: str  # "inter-node" | "intra-node" | "none"
    exposed_seconds: float = 0.0
    assumption: str = ""

    @property
    def seconds(self) -> float:
        return self.bytes_per_step / (self.bandwidth_gb_per_s * 1e9)

    @property
    def hidden_seconds(self) -> float:
        return max(0.0, self.seconds - self.exposed_seconds)


def _bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"


def _flops(n: float) -> str:
    return f"{n / 1e12:.3f} TFLOP" if n >= 1e11 else f"{n / 1e9:.3f} GFLOP"


@dataclass
class TrainPlan:
    """What :func:`plan_training` found; :meth:`format` prints it, :meth:`summary` is JSON."""

    run: str
    model: str
    hardware: Hardware
    params: int
    largest_layer: int
    world: int
    nodes: int
    micro_batch: int
    grad_accum: int
    global_batch: int
    max_steps: int
    tokens: int
    flops_per_sample: int  # training FLOPs (forward x 3, or x 4 with checkpointing)
    activation_checkpointing: bool
    configured_stage: int
    overlap_comm: bool
    memory: dict[int, MemoryPlan]
    comm: dict[int, CommPlan]
    notes: list[str] = field(default_factory=list)
    #: the frozen encoders' forward FLOPs per sample on the training GPUs (0 with
    #: data.encoded; None when not countable)
    encoder_flops_per_sample: int | None = None

    @property
    def compute_seconds(self) -> float:
        """Compute time of one step on one GPU at the assumed MFU (the denoiser's training
        FLOPs plus the frozen encoders' forward passes when they run on the GPU)."""
        flops = ((self.flops_per_sample + (self.encoder_flops_per_sample or 0))
                 * self.micro_batch * self.grad_accum)
        return flops / (self.hardware.peak_tflops * 1e12 * self.hardware.mfu)

    @property
    def forward_flops_per_sample(self) -> int:
        """The denoiser's forward FLOPs (training = 3x forward, 4x with checkpointing)."""
        return self.flops_per_sample // (4 if self.activation_checkpointing else 3)

    def step_seconds(self, zero_stage: int) -> float:
        """Compute plus the communication it cannot hide (:func:`comm_exposure`)."""
        return self.compute_seconds + self.comm[zero_stage].exposed_seconds

    def verdict(self, zero_stage: int | None = None) -> str:
        """One line: fits or not, with the biggest lever when it does not."""
        stage = self.configured_stage if zero_stage is None else zero_stage
        mem = self.memory[stage]
        need, cap = mem.total / GIB, mem.capacity / GIB
        if mem.fits:
            return f"ZeRO-{stage}: fits ({need:.1f} of {cap:.0f} GiB per GPU)"
        hints = []
        if stage == 2 and self.memory[3].fits:
            hints.append("ZeRO-3 fits")
        if mem.activations and not self.activation_checkpointing:
            hints.append("turn on model.activation_checkpointing")
        if mem.buffers > mem.total // 4:
            hints.append("smaller deepspeed.reduce_bucket_size / allgather_bucket_size")
        if mem.activations and self.micro_batch > 1:
            hints.append("lower batch.micro_batch (raise grad_accum)")
        hints.append("more workers (shards optimizer states further)")
        return (f"ZeRO-{stage}: DOES NOT FIT: needs {need:.1f} GiB per GPU, the "
                f"{self.hardware.name} has {cap:.0f} GiB; try: {'; '.join(hints)}")

    def format(self) -> str:
        hw = self.hardware

        def gib(b: int | None) -> str:
            return f"{'n/a':>8}" if b is None else f"{b / GIB:8.2f}"

        m2, m3 = self.memory[2], self.memory[3]
        ckpt = "on" if self.activation_checkpointing else "off"
        rows = [
            ("parameters", m2.states.params, m3.states.params),
            ("gradients", m2.states.grads, m3.states.grads),
            ("optimizer states", m2.states.optimizer, m3.states.optimizer),
            ("gathered layer (ZeRO-3)", m2.states.gathered, m3.states.gathered),
            ("comm buckets", m2.buffers, m3.buffers),
            (f"activations (ckpt {ckpt})", m2.activations, m3.activations),
            ("frozen encoders", m2.encoders, m3.encoders),
            ("reserve", m2.reserved, m3.reserved),
            ("total", m2.total, m3.total),
            ("DeepSpeed estimate (states)", m2.deepspeed_states, m3.deepspeed_states),
        ]
        lines = [
            f"Capacity plan: {self.run} ({self.model})",
            f"  {self.world} workers = {self.nodes} node(s) x {min(self.world, hw.gpus_per_node)}"
            f" {hw.name}; global batch {self.global_batch} = micro {self.micro_batch} x accum "
            f"{self.grad_accum} x {self.world}",
            f"  {self.params / 1e9:.3f} B trainable parameters (largest layer "
            f"{self.largest_layer / 1e6:.1f} M); {self.tokens} tokens per sample",
            "",
            f"  per-GPU memory (GiB)          {'ZeRO-2':>8} {'ZeRO-3':>8}",
            *(f"  {name:<30}{gib(a)} {gib(b)}" for name, a, b in rows),
            f"  {'fits in ' + format(hw.gpu_memory_gib, '.4g') + ' GiB':<30}"
            f"{'yes' if m2.fits else 'NO':>8} {'yes' if m3.fits else 'NO':>8}",
            "",
            f"  compute: {_flops(self.flops_per_sample)} per training sample; "
            f"{self.compute_seconds:.3f} s per step at {hw.mfu:.0%} MFU of "
            f"{hw.peak_tflops:g} TFLOPS",
            f"  frozen encoders: {self._encoder_text()}",
            f"  DeepSpeed cross-check: {self._deepspeed_text()}",
            "",
        ]
        if self.world > 1:
            lines += [f"  overlap: {self.comm[stage].assumption}" for stage in ZERO_STAGES]
        else:
            lines.append("  overlap: one worker, no gradient communication")
        for stage in ZERO_STAGES:
            c = self.comm[stage]
            step = self.step_seconds(stage)
            lines.append(
                f"  ZeRO-{stage}: {c.bytes_per_step / 1e9:.2f} GB sent per GPU per step "
                f"({c.scope}, {c.bandwidth_gb_per_s:g} GB/s: {c.seconds:.3f} s = "
                f"{c.exposed_seconds:.3f} s exposed + {c.hidden_seconds:.3f} s hidden); step "
                f"{self.compute_seconds:.3f} + {c.exposed_seconds:.3f} = {step:.3f} s -> "
                f"{self.max_steps:,} steps in {step * self.max_steps / 3600:.1f} h")
        lines += ["", f"  configured: {self.verdict()}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _encoder_text(self) -> str:
        """Whether the frozen encoders are in the memory and the step time, and how much."""
        enc = self.memory[2].encoders
        if self.encoder_flops_per_sample == 0 and enc == 0:
            return "not counted: data.encoded (they never run on the training GPUs)"
        weights = "weights not countable here" if enc is None \
            else f"{_bytes(enc)} of weights in the memory"
        flops = "FLOPs not countable here" if self.encoder_flops_per_sample is None \
            else (f"{_flops(self.encoder_flops_per_sample)} forward per sample in the step "
                  "time")
        return f"counted ({weights}; {flops}); data.encoded removes them"

    def _deepspeed_text(self) -> str:
        """The model states against DeepSpeed's own estimators (:func:`deepspeed_estimate`)."""
        parts = []
        for stage in ZERO_STAGES:
            mem = self.memory[stage]
            if mem.deepspeed_states is None:
                return ("not applicable (DeepSpeed's estimators assume bf16 mixed precision, "
                        "or DeepSpeed is not installed)")
            ours, theirs = mem.states.total, mem.deepspeed_states
            diff = abs(ours - theirs) / max(theirs, 1)
            verdict = "agree" if diff < 0.01 else f"DIFFER by {diff:.1%}"
            parts.append(f"ZeRO-{stage} {ours / GIB:.2f} vs {theirs / GIB:.2f} GiB {verdict}")
        return ("model states vs deepspeed's estimate_zero2/3_model_states_mem_needs: "
                + "; ".join(parts))

    def summary(self) -> dict[str, Any]:
        """A JSON-ready record (GiB, seconds, hours)."""
        return {
            "run": self.run, "model": self.model, "params": self.params,
            "world": self.world, "configured_zero_stage": self.configured_stage,
            "fits": self.memory[self.configured_stage].fits,
            "verdict": self.verdict(),
            "memory_gib": {f"zero{s}": round(m.total / GIB, 3) for s, m in self.memory.items()},
            "activations_gib": None if self.memory[2].activations is None
            else round(self.memory[2].activations / GIB, 3),
            "encoder_tflops_per_sample": None if self.encoder_flops_per_sample is None
            else round(self.encoder_flops_per_sample / 1e12, 4),
            "step_seconds": {f"zero{s}": round(self.step_seconds(s), 4) for s in ZERO_STAGES},
            "hours": {f"zero{s}": round(self.step_seconds(s) * self.max_steps / 3600, 2)
                      for s in ZERO_STAGES},
            "comm_gb_per_step": {f"zero{s}": round(c.bytes_per_step / 1e9, 3)
                                 for s, c in self.comm.items()},
            "comm_exposed_seconds": {f"zero{s}": round(c.exposed_seconds, 4)
                                     for s, c in self.comm.items()},
            "hardware": asdict(self.hardware),
        }

    def to_json(self) -> str:
        return json.dumps(self.summary())


def plan_training(cfg: TrainConfig, hardware: Hardware | None = None, *,
                  measure_activations: bool = True) -> TrainPlan:
    """The capacity plan of ``cfg`` on ``hardware`` (see the module docstring).

    ``measure_activations=False`` skips the meta-device forward/backward (activations are then
    left out of the totals and the plan says so).
    """
    from ttm_ray.models import build_model
    from ttm_ray.models.flops import DEFAULT_LOCAL_TOKENS, forward_flop_report

    hw = hardware or Hardware()
    model_cfg = replace(cfg.model, init_from=None)  # plan the shape; weights are not needed
    model = build_model(model_cfg, device="meta")
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = largest_layer_params(model)
    del model
    world = cfg.scaling.num_workers
    bf16 = cfg.deepspeed.bf16
    text_tokens = cfg.encoders.text_encoder.max_length
    local_tokens = (cfg.data.local_tokens or DEFAULT_LOCAL_TOKENS) if cfg.model.stage == 2 else 0
    report = forward_flop_report(model_cfg, text_tokens=text_tokens, local_tokens=local_tokens)
    notes = []

    activations = None
    if measure_activations:
        activations = measure_activation_bytes(model_cfg, cfg.batch.micro_batch,
                                               text_tokens=text_tokens,
                                               local_tokens=local_tokens, bf16=bf16)
    else:
        notes.append("activations not measured (--skip-activations): totals are a lower bound")
    enc_flops: int | None
    if cfg.data.encoded:
        # The encoder outputs are read from the encoded version: no encoder weights resident,
        # no encoder forward passes on the training GPUs.
        encoders, enc_flops = 0, 0
        notes.append(f"data.encoded: the frozen encoders never run on the training GPUs "
                     f"({cfg.data.encoded})")
    else:
        ae, te = autoencoder_bytes(cfg.encoders.autoencoder), text_encoder_bytes(
            cfg.encoders.text_encoder)
        # Folders not on this machine: the paper's reference architectures stand in.
        enc = cfg.encoders
        if ae is None and (enc.autoencoder.kind == "image_vae"
                           or enc.autoencoder.class_name == "AutoencoderKLCosmos"):
            ae = _param_bytes(_meta_autoencoder(enc.autoencoder)[0].to(
                getattr(torch, enc.autoencoder.dtype)))
            notes.append(f"autoencoder weights: reference architecture (no model folder at "
                         f"{enc.autoencoder.path})")
        if te is None and enc.text_encoder.kind in REFERENCE_TEXT:
            te = _param_bytes(_meta_text_encoder(enc.text_encoder)[0].to(
                getattr(torch, enc.text_encoder.dtype)))
            notes.append(f"text encoder weights: reference architecture (no model folder at "
                         f"{enc.text_encoder.path})")
        encoders = None if ae is None and te is None else (ae or 0) + (te or 0)
        for what, value, path in (("autoencoder", ae, cfg.encoders.autoencoder.path),
                                  ("text encoder", te, cfg.encoders.text_encoder.path)):
            if value is None:
                notes.append(f"{what} weights not counted: no model folder at {path}")
        try:
            counted = encoder_flops(cfg)
            enc_flops = counted.total
            if "reference" in counted.source:
                notes.append(f"encoder FLOPs from reference architectures ({counted.source})")
        except Exception as exc:  # an architecture the meta device cannot run
            enc_flops = None
            notes.append(f"encoder FLOPs not counted: {type(exc).__name__}: {exc}")

    nodes = math.ceil(world / hw.gpus_per_node)
    scope = "none" if world == 1 else "inter-node" if nodes > 1 else "intra-node"
    bandwidth = hw.inter_node_gb_per_s if nodes > 1 else hw.intra_node_gb_per_s
    # One micro batch's denoiser compute on one GPU: what communication can hide behind.
    rate = hw.peak_tflops * 1e12 * hw.mfu
    train_flops = report.training_per_sample(cfg.model.activation_checkpointing)
    forward_s = report.total * cfg.batch.micro_batch / rate
    backward_s = (train_flops - report.total) * cfg.batch.micro_batch / rate
    memory, comm = {}, {}
    for stage in ZERO_STAGES:
        memory[stage] = MemoryPlan(
            zero_stage=stage,
            states=model_state_bytes(params, largest, world, stage, bf16),
            buffers=comm_buffer_bytes(cfg.deepspeed, stage, bf16),
            activations=activations, encoders=encoders,
            reserved=int(hw.reserved_gib * GIB), capacity=int(hw.gpu_memory_gib * GIB),
            deepspeed_states=deepspeed_estimate(params, largest, world, stage) if bf16
            else None)
        exposure = comm_exposure(stage, params, world, grad_accum=cfg.batch.grad_accum,
                                 forward_s=forward_s, backward_s=backward_s,
                                 bandwidth_gb_per_s=bandwidth, ds=cfg.deepspeed, bf16=bf16)
        comm[stage] = CommPlan(stage, gradient_comm_bytes(params, world, stage,
                                                          cfg.batch.grad_accum, bf16),
                               bandwidth, scope, exposure.exposed,
                               overlap_assumption(stage, cfg.deepspeed.overlap_comm))
    return TrainPlan(
        run=cfg.run.name,
        model=f"{cfg.model.family} {cfg.model.size} stage {cfg.model.stage}, latent "
              f"{cfg.model.num_frames}x{cfg.model.height}x{cfg.model.width}",
        hardware=hw, params=params, largest_layer=largest, world=world, nodes=nodes,
        micro_batch=cfg.batch.micro_batch, grad_accum=cfg.batch.grad_accum,
        global_batch=cfg.batch.global_batch, max_steps=cfg.optim.max_steps,
        tokens=report.tokens,
        flops_per_sample=train_flops,
        activation_checkpointing=cfg.model.activation_checkpointing,
        configured_stage=cfg.deepspeed.zero_stage, overlap_comm=cfg.deepspeed.overlap_comm,
        memory=memory, comm=comm, notes=notes, encoder_flops_per_sample=enc_flops)


__all__ = [
    "CommPlan",
    "Exposure",
    "Hardware",
    "LiveBytes",
    "MemoryPlan",
    "ModelStates",
    "TrainPlan",
    "comm_buffer_bytes",
    "comm_exposure",
    "deepspeed_estimate",
    "encoder_flops",
    "gradient_comm_bytes",
    "largest_layer_params",
    "measure_activation_bytes",
    "measure_matmul_tflops",
    "model_state_bytes",
    "overlap_assumption",
    "plan_training",
]

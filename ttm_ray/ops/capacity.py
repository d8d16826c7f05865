"""Before a job places its actors: can the cluster hold them, or will it grow to?

    ensure_capacity([{"CPU": 1, "GPU": 1, "gpu_infer": 0.01}] * 4, timeout_s=900,
                    what="prep caption")

One helper for every job (prep, train, generate, evaluate). A *bundle* is what one actor or
training worker asks Ray for; the bundles must fit on the cluster's nodes together (each on
one node; first-fit decreasing over the nodes' total resources).

* They fit now: return at once (the embedded local Ray, a warm cluster).
* A fixed cluster (no autoscaler; how that is detected: ``autoscaler_state``): fail at
  once, saying what is short. Ray would otherwise wait forever for the actors.
* An autoscaling cluster (the shipped ones start every worker group at 0 nodes): ask the
  autoscaler for the bundles (``ray.autoscaler.sdk.request_resources``) and wait up to
  ``timeout_s`` for nodes to join, logging every ``poll_s`` which node types it waits for;
  fail at once if the autoscaler says no node type can hold them, and on timeout name the
  bundles, node types and resources that never came.

The request is re-sent on every poll (it is one per cluster: another job's request replaces
ours) and cleared when this returns or fails. Keeping it would pin the nodes for good (it
outlives the job) and overwrite other jobs' requests; once the job's own actors / placement
groups ask for the resources they keep the nodes busy, and idle nodes go only after the
cluster's idle timeout (minutes), far longer than the gap between this call and the job's
first actor. Checked against *total* node resources, as the autoscaler's request is: a node
busy with another job still counts (the job's actors then queue, as they would anyway).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from ttm_ray.config.resources import StageResources
from ttm_ray.ops.autoscaler_state import (
    ClusterView,
    Node,
    look,
    node_type_catalog,
    request,
    v2_enabled,
)
from ttm_ray.ops.cluster_capacity import ACCELERATOR_PREFIX, ACCELERATOR_REQUEST, NodeType, per_node

log = logging.getLogger(__name__)
EPS = 1e-9
FIRST_REPORT_S = 30.0  # a v2 autoscaler reports every few seconds once it runs
Bundle = dict[str, float]


class CapacityError(RuntimeError):
    """The cluster cannot hold the job's bundles (now, or within the timeout)."""


def stage_bundle(res: StageResources) -> Bundle:
    """One actor of a stage, as Ray Data / ``ray.remote`` asks for it (``ray_remote_args``)."""
    bundle: Bundle = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom_resources}
    if res.accelerator_type:
        bundle[ACCELERATOR_PREFIX + res.accelerator_type] = ACCELERATOR_REQUEST
    return bundle


def fmt(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def _clean(bundles: Sequence[Mapping[str, float]]) -> list[Bundle]:
    """Zero amounts dropped (Ray rejects them in requests); empty bundles need nothing."""
    out = [{k: float(v) for k, v in b.items() if v > 0} for b in bundles]
    return [b for b in out if b]


def unplaced(bundles: list[Bundle], nodes: Sequence[Node]) -> list[Bundle]:
    """The bundles that do not fit, first-fit decreasing over the nodes' total resources."""
    free = [dict(n.resources) for n in nodes]
    left = []
    order = sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0), len(b)),
                   reverse=True)
    for bundle in order:
        for room in free:
            if all(room.get(k, 0.0) + EPS >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    room[k] -= v
                break
        else:
            left.append(bundle)
    return left


def _summary(bundles: list[Bundle]) -> str:
    counts = Counter(fmt(b) for b in bundles)
    return ", ".join(f"{n} x {shape}" for shape, n in counts.items())


def _hosts(bundle: Bundle, types: Sequence[NodeType]) -> list[NodeType]:
    return [t for t in types if per_node(bundle, t)]


def impossible(bundles: list[Bundle], nodes: Sequence[Node],
               types: Sequence[NodeType] | None) -> str | None:
    """Why the cluster can never hold the bundles, whatever it launches: a bundle no node
    type (nor node already up) holds, or more of one shape than max_workers allow. None if
    it can, or if the node types are unknown."""
    if types is None:
        return None
    problems = []
    offered = {k for t in types for k in t.resources} | {k for n in nodes for k in n.resources}
    names = {t.name for t in types}
    counts = Counter(fmt(b) for b in bundles)
    for key, bundle in {fmt(b): b for b in bundles}.items():
        if not _hosts(bundle, types) and unplaced([bundle], nodes):
            missing = sorted(k for k in bundle if k not in offered and k not in ("CPU", "GPU"))
            problems.append(
                f"{key}: resource(s) {', '.join(missing)} offered by no node type" if missing
                else f"{key}: no node type holds all of it on one node")
            continue
        # Nodes the autoscaler does not manage (the head) hold what they hold now.
        slots = sum(t.max_count * per_node(bundle, t) for t in types) + sum(
            counts[key] - len(unplaced([bundle] * counts[key], [n]))
            for n in nodes if n.node_type not in names)
        if counts[key] > slots:
            detail = ", ".join(f"{t.name}: {t.max_count} x {per_node(bundle, t):g}"
                               for t in types if per_node(bundle, t))
            problems.append(f"{counts[key]} x {key}: at most {slots:g} fit "
                            f"(max_workers x per node: {detail})")
    if not problems:
        return None
    known = ", ".join(f"{t.name} {fmt(_shown(t.resources))} (max_workers {t.max_count})"
                      for t in types)
    return "; ".join(problems) + f" (node types: {known})"


def _shown(resources: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in resources.items() if k not in ("memory", "object_store_memory")}


def _waiting_for(left: list[Bundle], view: ClusterView,
                 types: Sequence[NodeType] | None) -> str:
    """Which node types the missing bundles wait for, and what the autoscaler is doing."""
    parts = []
    if types is not None:
        names = sorted({t.name for b in left for t in _hosts(b, types)})
        per = {t.name: t.max_count for t in types}
        joined = Counter(n.node_type for n in view.nodes)
        parts.append("node type(s) " + ", ".join(
            f"{n} ({joined[n]} up, max_workers {per[n]})" for n in names))
    if view.launching:
        parts.append("launching " + ", ".join(f"{n} x{c}" for n, c in view.launching.items()))
    if view.failed:
        parts.append("failed launches: " + "; ".join(view.failed[-3:]))
    return "; ".join(parts) or "autoscaler has launched nothing yet"


def _totals(nodes: Sequence[Node], bundles: list[Bundle]) -> str:
    """The cluster's totals of the resources the bundles name, e.g. "1 node(s), {CPU: 2}"."""
    names = sorted({k for b in bundles for k in b})
    have = {k: sum(n.resources.get(k, 0.0) for n in nodes) for k in names}
    return f"{len(nodes)} node(s) with {fmt(have)} in all"


def _first_report(view: ClusterView) -> ClusterView:
    """A v2 head whose autoscaler has not reported yet (a job submitted right after
    ``ray start``): wait for its first report, up to :data:`FIRST_REPORT_S`."""
    deadline = time.monotonic() + FIRST_REPORT_S
    while view.autoscaler is None and time.monotonic() < deadline:
        time.sleep(1.0)
        view = look()
    return view


def _log_hint() -> str:
    try:
        import ray

        node = ray._private.worker.global_worker.node
        return f"{node.get_session_dir_path()}/logs/monitor.*"
    except Exception:  # not connected through a local node: say where it is on the head
        return "/tmp/ray/session_latest/logs/monitor.* on the head"


def _infeasible(bundles: list[Bundle], view: ClusterView) -> bool:
    """The autoscaler marked our request infeasible (v2 judges a request as a whole)."""
    mine = Counter(_key(b) for b in bundles)
    return any(Counter(_key(b) for b in c) == mine for c in view.infeasible)


def _key(bundle: Mapping[str, float]) -> tuple:
    """Order-free identity of a bundle (the GCS returns its keys in another order)."""
    return tuple(sorted((k, round(v, 9)) for k, v in bundle.items()))


def ensure_capacity(bundles: Sequence[Mapping[str, float]], timeout_s: float, what: str = "job",
                    poll_s: float = 5.0, say: Callable[[str], None] | None = None) -> None:
    """Return once the connected cluster can hold ``bundles`` (see the module docstring);
    raise :class:`CapacityError` otherwise. ``say`` gets the progress lines (default: log)."""
    say = say or log.info
    wanted = _clean(bundles)
    if not wanted:
        return
    view = look()
    left = unplaced(wanted, view.nodes)
    if not left:
        return
    if view.autoscaler is None and v2_enabled():
        view = _first_report(view)
    if view.autoscaler is None:
        raise CapacityError(
            f"{what}: the cluster cannot hold {_summary(wanted)} (each on one node; "
            f"{_summary(left)} left over) and has no autoscaler to add nodes; it has "
            f"{_totals(view.nodes, wanted)}: lower num_cpus / num_gpus / min_actors / "
            "num_workers, or add nodes")
    types = node_type_catalog()
    if (why := impossible(wanted, view.nodes, types)) is not None:
        raise CapacityError(f"{what}: no node type of this cluster can hold: {why}")
    start = time.monotonic()
    next_say = 0.0
    try:
        while True:
            request(wanted)
            waited = time.monotonic() - start
            left = unplaced(wanted, view.nodes)
            if not left:
                say(f"[capacity] {what}: {_summary(wanted)} fit after {waited:.0f} s")
                return
            if _infeasible(wanted, view):
                here = {k for n in view.nodes for k in n.resources}
                absent = sorted({k for b in left for k in b} - here)
                raise CapacityError(
                    f"{what}: the {view.autoscaler} autoscaler reports {_summary(wanted)} "
                    "infeasible: no node type can hold some bundle, or max_workers is too "
                    f"small; missing now: {_summary(left)}"
                    + (f" (on no node now: {', '.join(absent)})" if absent else ""))
            if waited >= timeout_s:
                raise CapacityError(
                    f"{what}: waited {timeout_s:g} s for {_summary(left)}: "
                    f"{_waiting_for(left, view, types)}; never joined. Check the "
                    f"autoscaler log {_log_hint()}")
            if waited >= next_say:
                say(f"[capacity] {what}: waiting {waited:.0f}/{timeout_s:g} s for "
                    f"{_summary(left)}: {_waiting_for(left, view, types)}")
                next_say = waited + poll_s
            time.sleep(min(1.0, poll_s, max(0.0, timeout_s - waited)))
            view = look()
    finally:
        request([])


__all__ = ["CapacityError", "ensure_capacity", "fmt", "stage_bundle", "unplaced"]

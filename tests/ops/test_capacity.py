"""``ttm_ray.ops.capacity.ensure_capacity`` against scripted cluster views (no Ray): fits at
once, fails fast on a fixed cluster or a bundle no node type holds, asks the autoscaler and
waits, names what never came on timeout, clears its request; and the jobs' bundles."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest

from ttm_ray.config.resources import StageResources
from ttm_ray.ops import capacity as C
from ttm_ray.ops.autoscaler_state import ClusterView, Node
from ttm_ray.ops.cluster_capacity import NodeType

HEAD = Node("head", {"memory": 1e9})
GPU_NODE = Node("gpu_infer", {"CPU": 2, "GPU": 4, "gpu_infer": 1000})
CPU_NODE = Node("cpu_workers", {"CPU": 2, "cpu_worker": 1000})
TYPES = [NodeType("cpu_workers", {"CPU": 2, "cpu_worker": 1000}, 2),
         NodeType("gpu_infer", {"CPU": 2, "GPU": 4, "gpu_infer": 1000}, 2)]
GPU_BUNDLE = {"CPU": 1, "GPU": 1, "gpu_infer": 0.01}


class Script:
    """Stands in for autoscaler_state: each look() returns the next view (the last repeats)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, views: list[ClusterView],
                 types: list[NodeType] | None = TYPES, v2: bool = False) -> None:
        self.views: Iterator[ClusterView] = iter(views)
        self.last = views[0]
        self.requests: list[list[dict]] = []
        monkeypatch.setattr(C, "look", self.look)
        monkeypatch.setattr(C, "request", self.requests.append)
        monkeypatch.setattr(C, "node_type_catalog", lambda: types)
        monkeypatch.setattr(C, "v2_enabled", lambda: v2)
        monkeypatch.setattr(C.time, "sleep", lambda s: None)

    def look(self) -> ClusterView:
        self.last = next(self.views, self.last)
        return self.last


def test_unplaced_packs_each_bundle_on_one_node() -> None:
    assert C.unplaced([GPU_BUNDLE] * 2, [GPU_NODE]) == []
    # 3 CPUs in all, but no node has 2 free after the first 2-CPU bundle
    left = C.unplaced([{"CPU": 2}, {"CPU": 2}], [GPU_NODE, Node("x", {"CPU": 1})])
    assert left == [{"CPU": 2}]
    assert C.unplaced([{"cpu_worker": 1}], [GPU_NODE]) == [{"cpu_worker": 1}]


def test_stage_bundle_is_what_ray_data_asks() -> None:
    res = StageResources(num_cpus=4, num_gpus=1, custom_resources={"gpu_infer": 0.01},
                         accelerator_type="A100")
    assert C.stage_bundle(res) == {"CPU": 4, "GPU": 1, "gpu_infer": 0.01,
                                   "accelerator_type:A100": 0.001}


def test_fits_now_returns_without_asking(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Script(monkeypatch, [ClusterView([HEAD, GPU_NODE], "v2")])
    C.ensure_capacity([GPU_BUNDLE, {"CPU": 0, "GPU": 0}], timeout_s=10)
    assert s.requests == []


def test_fixed_cluster_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    Script(monkeypatch, [ClusterView([Node("local", {"CPU": 2})], None)])
    with pytest.raises(C.CapacityError, match=r"no autoscaler.*1 node\(s\) with \{CPU: 2"):
        C.ensure_capacity([{"CPU": 1}] * 3, timeout_s=600, what="prep")


def test_v2_head_whose_autoscaler_has_not_reported_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Script(monkeypatch, [ClusterView([HEAD], None), ClusterView([HEAD], None),
                             ClusterView([HEAD], "v2"), ClusterView([HEAD, GPU_NODE], "v2")],
               v2=True)
    C.ensure_capacity([GPU_BUNDLE], timeout_s=60)
    assert s.requests[-1] == []  # cleared


def test_no_node_type_offers_it_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Script(monkeypatch, [ClusterView([HEAD], "v2")])
    with pytest.raises(C.CapacityError, match=r"nope offered by no node type.*gpu_infer"):
        C.ensure_capacity([{"CPU": 1, "nope": 1}], timeout_s=600)
    with pytest.raises(C.CapacityError, match="no node type holds all of it"):
        C.ensure_capacity([{"CPU": 8, "gpu_infer": 1}], timeout_s=600)
    # 2 gpu_infer nodes x 2 CPUs: 5 one-CPU actors can never fit
    with pytest.raises(C.CapacityError, match=r"5 x \{CPU: 1, GPU: 1.*at most 4 fit"):
        C.ensure_capacity([GPU_BUNDLE] * 5, timeout_s=600)
    assert s.requests == []  # nothing asked for what can never come


def test_waits_for_the_autoscaler_then_clears(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    s = Script(monkeypatch, [ClusterView([HEAD], "v2"),
                             ClusterView([HEAD], "v2", launching=Counter(gpu_infer=1)),
                             ClusterView([HEAD, GPU_NODE], "v2"),
                             ClusterView([HEAD, GPU_NODE, CPU_NODE], "v2")])
    C.ensure_capacity([GPU_BUNDLE, {"cpu_worker": 1}], timeout_s=60, poll_s=0, say=said.append)
    assert s.requests[0] == [{"CPU": 1, "GPU": 1, "gpu_infer": 0.01}, {"cpu_worker": 1}]
    assert s.requests[-1] == []
    assert "gpu_infer (0 up, max_workers 2)" in said[0]
    assert "launching gpu_infer x1" in said[1]
    assert said[-1].endswith("fit after 0 s")


def test_timeout_names_the_node_type_and_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(C.time, "monotonic", lambda: float(next(clock)))
    s = Script(monkeypatch, [ClusterView([HEAD], "v1", failed=["gpu_infer: quota"])])
    with pytest.raises(C.CapacityError) as err:
        C.ensure_capacity([GPU_BUNDLE], timeout_s=600, what="generate", say=lambda m: None)
    msg = str(err.value)
    assert msg.startswith("generate: waited 600 s for 1 x {CPU: 1, GPU: 1, gpu_infer: 0.01}")
    assert "gpu_infer (0 up, max_workers 2)" in msg and "gpu_infer: quota" in msg
    assert "monitor.*" in msg
    assert s.requests[-1] == []


def test_v2_infeasible_request_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the node types (autoscaler not on this machine) the v2 autoscaler's verdict
    on the whole request is what fails it."""
    Script(monkeypatch, [ClusterView([HEAD], "v2"),
                         ClusterView([HEAD], "v2", infeasible=[[{"nope": 1, "CPU": 1}]])],
           types=None)
    verdict = re.escape("reports 1 x {CPU: 1, nope: 1} infeasible")
    with pytest.raises(C.CapacityError, match=verdict):
        C.ensure_capacity([{"CPU": 1, "nope": 1}], timeout_s=600)


def test_prep_bundles_keep_the_pools_plus_cpu_stages_rule() -> None:
    """The old check: actor pools pinning min_actors x resources must leave room for the CPU
    stages; as bundles on a 2-CPU local Ray."""
    from data_prep.config import PrepConfig
    from data_prep.pipeline import capacity_bundles
    from ttm_ray.config import from_dict

    local = [Node("local", {"CPU": 2})]
    cfg = from_dict(PrepConfig, {"resources": {
        "caption": {"num_cpus": 0.25}, "prompts": {"num_cpus": 0.25},
        "ground": {"num_cpus": 0.25}, "segment": {"num_cpus": 0.25},
        "score": {"num_cpus": 0.25}}})
    bundles = capacity_bundles(cfg)
    assert bundles[-1] == {"CPU": 1.0, "GPU": 0.0}  # one CPU-stage task
    assert C.unplaced(C._clean(bundles), local) == []
    # the defaults: ground, segment and score pools at 1 CPU each, plus a CPU task
    assert len(C.unplaced(C._clean(capacity_bundles(PrepConfig())), local)) == 2


def test_inference_bundles_are_both_pools_minimum_actors() -> None:
    from ttm_ray.inference.batch import InferenceResources, capacity_bundles

    res = InferenceResources(annotate=StageResources(num_cpus=2, min_actors=2, max_actors=3),
                             generate=StageResources(num_cpus=1, num_gpus=1))
    assert capacity_bundles(res) == [{"CPU": 2, "GPU": 0.0}] * 2 + [{"CPU": 1, "GPU": 1}]

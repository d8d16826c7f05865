"""The tiny runs train on 2 Ray Train CPU workers (all four under ZeRO-3, the stage-2 ones
under ZeRO-2 as well): finite loss that goes down on the small (overfitted) tiny dataset,
checkpoints in storage, an export."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_runs import TINY, assert_learns, metric_history, train_tiny

pytestmark = pytest.mark.slow


#: Every tiny run under ZeRO-3; the stage-2 runs under ZeRO-2 too (the export and
#: fault-tolerance tests reuse them). ZeRO-2 stage-1 runs are the shipped dit_stage1.yaml and
#: unet_stage1.yaml themselves in the production rehearsal (tests/ops/test_rehearsal.py).
RUNS = [*((name, 3) for name in TINY), ("dit_stage2_tiny", 2), ("unet_stage2_tiny", 2)]


@pytest.mark.parametrize("name, zero", RUNS)
def test_tiny_run_trains(name: str, zero: int, ray_local, tmp_path_factory: pytest.TempPathFactory,
                         tiny_dataset: Path, tiny_encoders: dict[str, Path]) -> None:
    cfg, summary = train_tiny(name, tmp_path_factory, tiny_dataset, tiny_encoders,
                              f"deepspeed.zero_stage={zero}")
    steps = cfg.optim.max_steps
    assert_learns(metric_history(cfg, summary["mlflow_run_id"]), steps)
    # Checkpoints reached storage (the last K kept), the last one with every rank's files.
    storage = Path(summary["storage"])
    kept = sorted(p.name for p in storage.glob("step_*"))
    assert kept == [f"step_{s:08d}" for s in range(steps - (cfg.checkpoint.keep_last - 1)
                                                    * cfg.checkpoint.every_steps, steps + 1,
                                                    cfg.checkpoint.every_steps)]
    last = storage / kept[-1]
    assert sorted(p.name for p in (last / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    assert (last / "meta.json").is_file() and (last / "probe.safetensors").is_file()
    # The driver's export check ran (fp32 engine: float noise only).
    assert (Path(summary["export"]) / "model.safetensors").is_file()
    assert summary["export_max_abs_diff"] <= 1e-4

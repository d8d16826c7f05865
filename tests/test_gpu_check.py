"""benchmarks/gpu_check.sh on a machine without a GPU: the dry run lists every check with its
command, a real run says there is no GPU (exit 2), and the quick CPU smoke modes of the
Python checks run their real code paths at tiny sizes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
CHECKS = ("flex", "dit_mfu", "sam2_fps", "pytest_gpu", "vllm_caption")


def run_script(*args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable)
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=120)


def test_dry_run_lists_every_check_with_its_command() -> None:
    proc = run_script("--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for name in CHECKS:
        line = next((ln for ln in lines if re.match(rf"\s+{name}\s", ln)), None)
        assert line is not None, f"{name} not listed:\n{proc.stdout}"
        assert "timeout" in line and sys.executable in line
    assert "vllm_caption  optional" in proc.stdout
    # The gpu-marked test files are found by grep, so a new one is picked up without an edit.
    assert "tests/conditioning/test_masked_attention.py" in proc.stdout
    assert re.search(r"results: benchmarks/results/gpu_\d{4}-\d{2}-\d{2}\.md", proc.stdout)
    for name in CHECKS[:3] + CHECKS[4:]:
        assert (REPO / "benchmarks" / "gpu" / f"{_file(name)}.py").is_file()


def _file(check: str) -> str:
    return {"flex": "flex_check"}.get(check, check)


def test_only_and_bad_arguments() -> None:
    proc = run_script("--dry-run", "--only", "sam2_fps")
    assert proc.returncode == 0 and "sam2_fps" in proc.stdout and "dit_mfu" not in proc.stdout
    assert run_script("--only", "nope").returncode == 64
    assert run_script("--bogus").returncode == 64


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_a_real_run_exits_2_and_runs_nothing() -> None:
    proc = run_script()
    assert proc.returncode == 2
    assert "no NVIDIA GPU" in proc.stderr


@pytest.mark.parametrize("script", ["flex_check", "dit_mfu", "sam2_fps", "vllm_caption"])
def test_each_check_has_help(script: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / f"{script}.py"),
                           "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cpu-smoke" in proc.stdout


def test_flex_check_cpu_smoke_compares_with_the_reference() -> None:
    """The comparison machinery (full and row-subset references, backward, empty cross rows)
    with the grouped backend: CPU flex has no backward and compiles for a minute."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "flex_check.py"),
                           "--cpu-smoke", "--backend", "grouped"],
                          capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and result["ok"], proc.stdout + proc.stderr
    by_case = {r["case"]: r for r in result["results"]}
    assert set(by_case) == {"dit-self", "dit-cross", "unet-self", "unet-cross"}
    assert all(r["backward"] and set(r["errors"]) == {"out", "dq", "dk", "dv"}
               for r in by_case.values())
    assert by_case["unet-self"]["reference_rows"] < by_case["unet-self"]["tokens"]
    assert by_case["dit-cross"]["empty_rows"] > 0 and by_case["dit-cross"]["empty_rows_zero"]

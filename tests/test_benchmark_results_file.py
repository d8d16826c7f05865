"""``benchmarks/results_file.py``: a benchmark rewrites its own section of a results file and
keeps the notes around it (the it-learns and train-overhead results carry probes and readings
that a rerun must not erase)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from results_file import markers, write_section  # noqa: E402


def test_a_rerun_replaces_its_section_and_keeps_the_notes(tmp_path: Path) -> None:
    path = tmp_path / "results" / "x.md"
    write_section(path, "x", "first run\n", "# X\n\nnotes above\n")
    begin, end = markers("x")
    assert path.read_text() == f"# X\n\nnotes above\n\n{begin}\nfirst run\n{end}\n"
    path.write_text(path.read_text() + "\nnotes below\n")
    write_section(path, "x", "second run", "# ignored: the file exists")
    assert path.read_text() == f"# X\n\nnotes above\n\n{begin}\nsecond run\n{end}\n\nnotes below\n"
    # another benchmark's section in the same file is left alone
    write_section(path, "y", "y run", "")
    write_section(path, "x", "third run", "")
    text = path.read_text()
    assert "third run" in text and "y run" in text and "second run" not in text
    assert text.count(begin) == 1 and text.count(markers("y")[0]) == 1

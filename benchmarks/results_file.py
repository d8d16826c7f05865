"""Results files under ``benchmarks/results/``: each run rewrites its generated section, between
two markers, and keeps the notes written around it (what the figures mean, earlier probes)."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of benchmark ``name``'s generated section."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str, header: str) -> None:
    """Put ``body`` between ``name``'s markers in ``path``: in place of the previous section
    when the file has one, else appended (after ``header`` when the file is new)."""
    begin, end = markers(name)
    section = f"{begin}\n{body.strip(chr(10))}\n{end}"
    text = path.read_text() if path.is_file() else header
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)

"""One finding of a check: which file, which field in it, what is wrong."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MAX_MESSAGE = 300  # schema messages embed the offending value, which can be a whole mapping


@dataclass(frozen=True, order=True)
class Problem:
    file: str
    field: str  # dotted key path, list items as [i]; "<file>" when the file as a whole fails
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def field_path(parts: Iterable[object], *more: object) -> str:
    """``("spec", "workerGroupSpecs", 2, "groupName")`` -> ``spec.workerGroupSpecs[2].groupName``.
    """
    out = ""
    for part in (*parts, *more):
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"

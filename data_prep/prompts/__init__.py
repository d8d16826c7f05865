"""Versioned LLM prompt templates, shipped as package data (``data_prep/prompts/*.txt``).

A template file is a small header of ``key: value`` lines, a ``---`` line, then the prompt
text with ``{placeholder}`` fields::

    name: motion
    version: v1
    source: TTM appendix, Fig. 11
    ---
    Task: ... Caption: "{caption}"

Configs name a template by file stem (``motion_v1``). The header's version must match the
stem's suffix. Rows record :attr:`Template.tag` (``motion_v1@<sha256 prefix of the text>``),
so an edit that forgot to bump the version still shows up in the data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateError(ValueError):
    """A template that is missing, malformed, or formatted with the wrong fields."""


@dataclass(frozen=True)
class Template:
    name: str  # file stem, e.g. "motion_v1"
    version: str  # from the header, e.g. "v1"
    text: str

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(_PLACEHOLDER.findall(self.text))

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:8]

    @property
    def tag(self) -> str:
        """What rows record as the prompt version."""
        return f"{self.name}@{self.fingerprint}"

    def format(self, **values: str) -> str:
        """The prompt with every placeholder filled; missing or unknown fields are errors.

        Substitution is one regex pass, so braces inside the values (a caption may contain
        any text) are never interpreted, unlike ``str.format``.
        """
        missing = self.placeholders - values.keys()
        extra = values.keys() - self.placeholders
        if missing or extra:
            raise TemplateError(
                f"template {self.name}: fields {sorted(self.placeholders)} expected; "
                f"missing {sorted(missing)}, unknown {sorted(extra)}"
            )
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), self.text)


def available_templates() -> list[str]:
    files = resources.files(__name__).iterdir()
    return sorted(f.name[:-4] for f in files if f.name.endswith(".txt"))


def parse_template(name: str, raw: str) -> Template:
    head, sep, body = raw.partition("\n---\n")
    if not sep:
        raise TemplateError(f"template {name}: no '---' line between header and text")
    header: dict[str, str] = {}
    for line in head.splitlines():
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise TemplateError(f"template {name}: header line {line!r} is not 'key: value'")
        header[key.strip()] = value.strip()
    version = header.get("version", "")
    if not version or not name.endswith(f"_{version}"):
        raise TemplateError(
            f"template {name}: header version {version!r} does not match the file name "
            f"(expected {name}.txt to say 'version: {name.rsplit('_', 1)[-1]}')"
        )
    text = body.strip("\n")
    if not text.strip():
        raise TemplateError(f"template {name}: empty text")
    return Template(name=name, version=version, text=text)


@cache
def load_template(name: str) -> Template:
    """The packaged template ``<name>.txt`` (works from a source tree and an installed wheel)."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name or ""):
        raise TemplateError(f"template name {name!r}: expected a file stem like 'motion_v1'")
    path = resources.files(__name__).joinpath(f"{name}.txt")
    if not path.is_file():
        raise TemplateError(
            f"unknown prompt template {name!r}; available: {', '.join(available_templates())}"
        )
    return parse_template(name, path.read_text(encoding="utf-8"))


__all__ = ["Template", "TemplateError", "available_templates", "load_template", "parse_template"]

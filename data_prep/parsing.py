"""Strict parsing of LLM answers into captions, motion prompts and per-object prompts.

Tolerated (real answers do this): prose before/after the answer, code fences, labels such as
``Motion-specific prompt:`` or ``Answer:``, quotes, newlines between items, full-width
brackets/colons (NFKC), any script in names and descriptions, a missing final ``]``.

Rejected with :class:`LlmParseError` (``reason_code`` in :data:`PARSE_REASONS`): anything
whose meaning we would have to guess. The local-prompt answer format is the paper's (Fig. 12)
``[[name: description] [name: description] ...]``. Decisions:

* More objects than ``max_objects`` is rejected by default (``truncate=True`` keeps the first
  ones instead). Truncating silently drops moving objects from the masks, so the clip would
  train with an unsegmented moving object; the paper also reports quality dropping beyond
  three objects.
* When the answer holds several ``[[...]]`` blocks (a model going on to invent more
  examples), the first block is the answer.
* Brackets inside an item are rejected: ``[dog: runs [ball: rolls]]`` is a model nesting
  objects, not a description.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

PARSE_REASONS = {
    "empty": "the answer is empty (or holds no words)",
    "no_brackets": "no [name: description] item in the answer",
    "unbalanced": "an item is not closed (the answer was probably cut off)",
    "nested_brackets": "brackets inside an item",
    "junk_between_items": "text between the items of the [[...]] block",
    "missing_colon": "an item is not 'name: description'",
    "empty_name": "an item has an empty object name",
    "empty_description": "an item has an empty description",
    "duplicate_name": "two items name the same object (case-insensitive)",
    "too_many_objects": "more objects than the configured cap",
    "no_objects": "the answer names no object",
    "too_long": "a name, description or prompt is far longer than the format allows",
    "template_echo": "the answer repeats the prompt's format placeholder",
    "multi_paragraph": "several paragraphs where one sentence was asked for",
}

MAX_NAME_CHARS = 60  # object names are grounding phrases for Grounding DINO ("left dog")
MAX_NAME_WORDS = 8
MAX_OBJECT_PROMPT_CHARS = 500


class LlmParseError(ValueError):
    """An answer that does not parse; ``reason_code`` is a key of :data:`PARSE_REASONS`."""

    def __init__(self, reason_code: str, message: str) -> None:
        if reason_code not in PARSE_REASONS:
            raise ValueError(f"unknown parse reason {reason_code!r}")
        self.reason_code = reason_code
        self.message = message
        super().__init__(f"{reason_code}: {message}")


@dataclass(frozen=True)
class ObjectPrompt:
    name: str
    prompt: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "prompt": self.prompt}


# ------------------------------------------------------------------------------ helpers
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*")
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"))
_QUOTES = {'"': '"', "“": "”", "”": "”", "„": "“", "'": "'", "‘": "’", "«": "»", "「": "」"}
_WRAPPERS = " \t\n\"'“”„‘’«»「」*`_"


def normalize(text: str | None) -> str:
    """NFKC (full-width ``［：］`` -> ``[:]``), no zero-width characters, no code fences."""
    if text is None:
        return ""
    s = unicodedata.normalize("NFKC", str(text)).translate(_INVISIBLE)
    s = s.replace("\r\n", "\n").replace("\r", "\n")
    return _FENCE.sub("", s)


def _squash(text: str) -> str:
    return " ".join(text.split())


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _unwrap(text: str) -> str:
    """Strip surrounding quotes, markdown emphasis and whitespace."""
    return _squash(text.strip(_WRAPPERS))


# ------------------------------------------------------------------------- local prompts
def _items_in_block(s: str, start: int) -> list[str]:
    """Items of the ``[[...]]`` block whose outer ``[`` is at ``start``."""
    items: list[str] = []
    i, item_start = start + 1, -1
    while i < len(s):
        ch = s[i]
        if item_start < 0:  # between items
            if ch == "[":
                item_start = i + 1
            elif ch == "]":
                return items
            elif not (ch.isspace() or ch in ",;.…-*•"):
                snippet = s[i:i + 40].split("\n")[0]
                raise LlmParseError("junk_between_items", f"unexpected text {snippet!r}")
        elif ch == "[":
            raise LlmParseError("nested_brackets", f"'[' inside item {s[item_start:i]!r}")
        elif ch == "]":
            items.append(s[item_start:i])
            item_start = -1
        i += 1
    if item_start >= 0:
        raise LlmParseError("unbalanced", f"item {s[item_start:item_start + 60]!r} never closes")
    return items  # the outer "]" is missing but every item is whole: accept


def _loose_items(s: str) -> list[str]:
    """Every top-level ``[...]`` group, for answers that dropped the outer brackets."""
    items: list[str] = []
    depth, item_start = 0, -1
    for i, ch in enumerate(s):
        if ch == "[":
            if depth:
                raise LlmParseError("nested_brackets", f"'[' inside item {s[item_start:i]!r}")
            depth, item_start = 1, i + 1
        elif ch == "]" and depth:
            items.append(s[item_start:i])
            depth = 0
    if depth:
        raise LlmParseError("unbalanced", f"item {s[item_start:item_start + 60]!r} never closes")
    return items


def _split_item(item: str) -> tuple[str, str]:
    name, colon, prompt = item.partition(":")
    if not colon:
        raise LlmParseError("missing_colon", f"item {_squash(item)[:80]!r} has no ':'")
    return name, prompt


def validate_object_prompts(
    pairs: list[tuple[str, str]], max_objects: int = 4, truncate: bool = False
) -> list[ObjectPrompt]:
    """Clean and check ``(name, description)`` pairs (from an answer or a manifest)."""
    out: list[ObjectPrompt] = []
    seen: set[str] = set()
    for raw_name, raw_prompt in pairs:
        name, prompt = _unwrap(raw_name), _unwrap(raw_prompt)
        if re.fullmatch(r"description of object \d+\.?", prompt, re.IGNORECASE):
            raise LlmParseError("template_echo", f"item {name!r}: {prompt!r}")
        if not _has_words(name):
            raise LlmParseError("empty_name", f"item with description {prompt[:60]!r}")
        if not _has_words(prompt):
            raise LlmParseError("empty_description", f"object {name!r} has no description")
        if len(name) > MAX_NAME_CHARS or len(name.split()) > MAX_NAME_WORDS:
            raise LlmParseError("too_long", f"object name {name[:80]!r}... is not a short phrase")
        if len(prompt) > MAX_OBJECT_PROMPT_CHARS:
            raise LlmParseError(
                "too_long", f"object {name!r}: description of {len(prompt)} characters "
                f"(cap {MAX_OBJECT_PROMPT_CHARS})"
            )
        key = name.casefold()
        if key in seen:
            raise LlmParseError("duplicate_name", f"object {name!r} appears twice")
        seen.add(key)
        out.append(ObjectPrompt(name, prompt))
    if not out:
        raise LlmParseError("no_objects", "the answer lists no object")
    if len(out) > max_objects:
        if not truncate:
            raise LlmParseError(
                "too_many_objects", f"{len(out)} objects ({', '.join(o.name for o in out)}), "
                f"cap {max_objects}"
            )
        out = out[:max_objects]
    return out


def parse_local_prompts(
    text: str | None, max_objects: int = 4, truncate: bool = False
) -> list[ObjectPrompt]:
    """Object prompts from an answer in the Fig. 12 format ``[[name: desc] [name: desc]]``."""
    s = normalize(text)
    if not _has_words(s) and "[" not in s:
        raise LlmParseError("empty", "the answer is empty")
    block = re.search(r"\[\s*\[", s)
    if block:
        items = _items_in_block(s, block.start())
    elif "[" in s:
        items = _loose_items(s)
    else:
        raise LlmParseError("no_brackets", f"no [name: description] item in {_squash(s)[:80]!r}")
    # "[[]]" and "[ ]" are an answer naming no object, not a malformed item.
    pairs = [_split_item(item) for item in items if item.strip()]
    return validate_object_prompts(pairs, max_objects=max_objects, truncate=truncate)


# -------------------------------------------------------------------------- motion prompt
_MOTION_LABEL = re.compile(r"motion[- ]?(?:specific)?[- ]?prompt\s*\**\s*:", re.IGNORECASE)
_LEAD_LABEL = re.compile(
    r"^\s*\**\s*(?:answer|output|response|motion|description|caption)\s*\**\s*:\s*",
    re.IGNORECASE,
)
_ECHO = re.compile(r"^\s*\**\s*caption\s*\**\s*:", re.IGNORECASE | re.MULTILINE)
_SENTENCE_END = re.compile(r"(?<=[.!?。])\s+(?=\S)")


def _first_quoted(s: str) -> str | None:
    """The text inside the quotes ``s`` starts with, or None when it is not quoted."""
    if not s or s[0] not in _QUOTES:
        return None
    close = s.find(_QUOTES[s[0]], 1)
    if close < 0 and s[0] in "“”":
        close = s.find('"', 1)
    return s[1:close] if close > 0 else None


def parse_motion_prompt(text: str | None, max_chars: int = 300, max_sentences: int = 3) -> str:
    """The motion-only prompt from an answer to the Fig. 11 prompt.

    The paper asks for "a single motion-specific prompt"; one to ``max_sentences`` sentences
    are accepted (models sometimes split "A, and B" into two), more is rejected.
    """
    s = normalize(text).strip()
    if not _has_words(s):
        raise LlmParseError("empty", "the answer is empty")
    label = _MOTION_LABEL.search(s)
    if label:
        s = s[label.end():]
        again = _MOTION_LABEL.search(s)  # a model inventing further examples
        if again:
            s = s[:again.start()]
    echo = _ECHO.search(s)
    if echo and _has_words(s[:echo.start()]):
        s = s[:echo.start()]
    s = _LEAD_LABEL.sub("", s.strip()).strip()
    quoted = _first_quoted(s)
    if quoted is not None:
        s = quoted
    else:
        paragraphs = [p for p in re.split(r"\n\s*\n", s) if p.strip()]
        if len(paragraphs) > 1:
            raise LlmParseError(
                "multi_paragraph", f"{len(paragraphs)} paragraphs: {_squash(s)[:120]!r}"
            )
    s = _unwrap(s)
    if not _has_words(s):
        raise LlmParseError("empty", "no words left after removing labels and quotes")
    if s.casefold().rstrip(".") == "description of overall motion":
        raise LlmParseError("template_echo", f"{s!r}")
    if len(s) > max_chars:
        raise LlmParseError("too_long", f"{len(s)} characters (cap {max_chars}): {s[:80]!r}...")
    sentences = len(_SENTENCE_END.split(s))
    if sentences > max_sentences:
        raise LlmParseError("too_long", f"{sentences} sentences (cap {max_sentences})")
    return s


# -------------------------------------------------------------------------------- caption
def parse_caption(text: str | None, max_chars: int = 2000) -> str:
    """A caption from a VLM answer: labels, quotes and line breaks removed."""
    s = _LEAD_LABEL.sub("", normalize(text).strip())
    s = _unwrap(s)
    if not _has_words(s):
        raise LlmParseError("empty", "the answer is empty")
    if len(s) > max_chars:
        raise LlmParseError("too_long", f"{len(s)} characters (cap {max_chars})")
    return s

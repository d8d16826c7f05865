"""Binding per-object prompt names to mask names (LLM object names -> GT masklets).

Why: in the "GT + LLM" setting of the failure-case harness (Table 5) the masks are the
benchmark's GT masklets, named by the manual object prompts, while the local prompts are the
LLM's, named however the LLM chose ("The Dogs" for GT "dog", "ball" for "red ball"). Exact
name matching dropped every mismatched object *and its GT mask*, silently turning a prompt
ablation into a mask ablation. Here every mask is kept and the record says how it got its
prompt.

Stages, each one small function over what earlier stages left free (a mask and a prompt are
used at most once; ties go to colour order for masks and answer order for prompts; the
first four are :data:`STAGES`):

1. ``exact``: the same string.
2. ``normalised``: the same after :func:`normalise_name` (Unicode NFKC + case folding,
   punctuation and ``_`` as spaces, whitespace collapsed, the articles a/an/the dropped, each
   word put through a simple English singular: ``-ies`` -> ``-y``, ``-ches/-shes/-sses/-xes/
   -zes`` lose ``es``, else a final ``s`` not after ``s``/``u``/``i`` goes; words of three
   letters or fewer are kept as they are).
3. ``similar``: :func:`name_similarity` >= :data:`SIMILARITY_THRESHOLD` (0.75) on the
   normalised names, best-scoring pair first (ties: higher difflib ratio). The score is the
   larger of the token *overlap coefficient* ``|A & B| / min(|A|, |B|)`` (1.0 when one
   name's words are all in the other: "ball" / "red ball", "man" / "man in red shirt", the
   usual way LLM names differ) and :class:`difflib.SequenceMatcher`'s ratio of the strings
   (spelling variants: "grey cat" / "gray cat" 0.875). 0.75 keeps apart names that share
   only a colour ("red ball" / "red car": overlap 0.5, ratio 0.67) and short words one
   letter apart ("dog" / "log": 0.67).
4. ``order``: what is left pairs up in order (masks in colour order, prompts in answer
   order). The prompt stage lists objects in the caption's order, as the manual prompts do,
   so a renamed object ("kitten" for "cat") usually sits where its mask does. This can bind
   a hallucinated extra object to a mask the LLM never named: the record says ``order`` so a
   reader can tell, and the evaluation report counts such objects.
5. ``unbound``: masks left over when prompts run out. They are kept (the caller gives them a
   fallback prompt) and counted; prompts left over are listed as ``unused_prompts``.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

BindMethod = Literal["exact", "normalised", "similar", "order", "unbound"]
#: Every method, in the order the stages run (``unbound`` last: what no stage bound).
METHODS: tuple[BindMethod, ...] = ("exact", "normalised", "similar", "order", "unbound")
#: Minimum :func:`name_similarity` for the ``similar`` stage (see the module doc).
SIMILARITY_THRESHOLD = 0.75

_ARTICLES = frozenset({"a", "an", "the"})
_SEPARATORS = re.compile(r"[\W_]+")  # punctuation, underscores and whitespace

# (mask position, prompt position, score or None): one binding found by a stage.
Pair = tuple[int, int, float | None]
# A stage: (mask names, prompt names, free mask positions, free prompt positions) -> pairs.
Stage = Callable[[Sequence[str], Sequence[str], Sequence[int], Sequence[int]], list[Pair]]


@dataclass(frozen=True)
class Binding:
    """How one mask got its prompt. ``prompt_name`` is None when ``method`` is unbound;
    ``score`` is the similarity for ``similar`` (None otherwise)."""

    mask_name: str
    color_index: int
    prompt_name: str | None
    prompt_index: int | None  # position in the prompt list
    method: BindMethod
    score: float | None = None


@dataclass(frozen=True)
class NameBinding:
    """One :class:`Binding` per mask, in the masks' order, and the prompt names no mask took."""

    bindings: tuple[Binding, ...]
    unused_prompts: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        """``{method: number of masks}`` for every method (zeros included)."""
        out = dict.fromkeys(METHODS, 0)
        for b in self.bindings:
            out[b.method] += 1
        return out

    @property
    def unbound(self) -> int:
        return sum(b.method == "unbound" for b in self.bindings)

    @property
    def non_exact(self) -> int:
        return sum(b.method != "exact" for b in self.bindings)

    def as_record(self) -> dict[str, Any]:
        """JSON-ready form for an item's output record."""
        return {"objects": [asdict(b) for b in self.bindings],
                "unused_prompts": list(self.unused_prompts), "counts": self.counts(),
                "similarity_threshold": SIMILARITY_THRESHOLD}


# ----------------------------------------------------------------------------- names
def singular(word: str) -> str:
    """A simple English singular (see the module doc); only ever applied to both sides of a
    comparison, so a wrong singular ("bus" stays, "buses" -> "bus") only costs a match."""
    if len(word) <= 3:
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes", "zes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def normalise_name(name: str) -> str:
    """The comparison key of a name: "The  Dogs!" -> "dog", "red-ball" -> "red ball"."""
    text = unicodedata.normalize("NFKC", name).casefold()
    words = [singular(w) for w in _SEPARATORS.sub(" ", text).split() if w not in _ARTICLES]
    return " ".join(words)


def _overlap_and_ratio(a: str, b: str) -> tuple[float, float]:
    """(token overlap coefficient, difflib ratio) of two normalised names."""
    if not a or not b:
        return 0.0, 0.0
    ta, tb = set(a.split()), set(b.split())
    return (len(ta & tb) / min(len(ta), len(tb)),
            difflib.SequenceMatcher(None, a, b).ratio())


def name_similarity(a: str, b: str) -> float:
    """Similarity in [0, 1] of two *normalised* names: max(token overlap coefficient,
    difflib ratio); 0.0 when either is empty."""
    return max(_overlap_and_ratio(a, b))


# ----------------------------------------------------------------------------- stages
def _by_key(masks: Sequence[str], prompts: Sequence[str], free_m: Sequence[int],
            free_p: Sequence[int], key: Callable[[str], str]) -> list[Pair]:
    """Masks in order, each taking the first free prompt with the same non-empty key."""
    left = list(free_p)
    pairs: list[Pair] = []
    for i in free_m:
        k = key(masks[i])
        j = next((j for j in left if k and key(prompts[j]) == k), None)
        if j is not None:
            left.remove(j)
            pairs.append((i, j, None))
    return pairs


def match_exact(masks: Sequence[str], prompts: Sequence[str], free_m: Sequence[int],
                free_p: Sequence[int]) -> list[Pair]:
    return _by_key(masks, prompts, free_m, free_p, lambda s: s)


def match_normalised(masks: Sequence[str], prompts: Sequence[str], free_m: Sequence[int],
                     free_p: Sequence[int]) -> list[Pair]:
    return _by_key(masks, prompts, free_m, free_p, normalise_name)


def match_similar(masks: Sequence[str], prompts: Sequence[str], free_m: Sequence[int],
                  free_p: Sequence[int], threshold: float = SIMILARITY_THRESHOLD
                  ) -> list[Pair]:
    """Greedy best-first over all free pairs scoring >= ``threshold``: the strongest
    evidence binds first, whatever the masks' order. The overlap coefficient is 1.0 for any
    name contained in another ("ball" and "red ball" both in "small red ball"), so equal
    scores go to the higher difflib ratio (the closer whole name), then to order."""
    scored = []
    for i in free_m:
        for j in free_p:
            overlap, ratio = _overlap_and_ratio(normalise_name(masks[i]),
                                                normalise_name(prompts[j]))
            scored.append((max(overlap, ratio), ratio, i, j))
    scored.sort(key=lambda t: (-t[0], -t[1], t[2], t[3]))
    used_m: set[int] = set()
    used_p: set[int] = set()
    pairs: list[Pair] = []
    for score, _, i, j in scored:
        if score < threshold:
            break
        if i not in used_m and j not in used_p:
            used_m.add(i)
            used_p.add(j)
            pairs.append((i, j, round(score, 4)))
    return pairs


def match_order(masks: Sequence[str], prompts: Sequence[str], free_m: Sequence[int],
                free_p: Sequence[int]) -> list[Pair]:
    return [(i, j, None) for i, j in zip(free_m, free_p, strict=False)]


STAGES: tuple[tuple[BindMethod, Stage], ...] = (
    ("exact", match_exact), ("normalised", match_normalised), ("similar", match_similar),
    ("order", match_order))


def bind_names(mask_names: Sequence[str], prompt_names: Sequence[str],
               color_indices: Sequence[int] | None = None) -> NameBinding:
    """Bind each mask name to at most one prompt name (see the module doc for the stages).

    ``color_indices``: the masks' trajectory colours, recorded with each binding (default
    0..K-1). Every mask gets a :class:`Binding`; none is ever dropped.
    """
    colors = list(range(len(mask_names))) if color_indices is None else list(color_indices)
    if len(colors) != len(mask_names):
        raise ValueError(f"{len(mask_names)} mask names but {len(colors)} colour indices")
    found: dict[int, tuple[int, BindMethod, float | None]] = {}
    for method, stage in STAGES:
        free_m = [i for i in range(len(mask_names)) if i not in found]
        taken = {j for j, _, _ in found.values()}
        free_p = [j for j in range(len(prompt_names)) if j not in taken]
        if not free_m or not free_p:
            break
        for i, j, score in stage(mask_names, prompt_names, free_m, free_p):
            found[i] = (j, method, score)
    bindings = []
    for i, name in enumerate(mask_names):
        if i in found:
            j, method, score = found[i]
            bindings.append(Binding(name, int(colors[i]), prompt_names[j], j, method, score))
        else:
            bindings.append(Binding(name, int(colors[i]), None, None, "unbound"))
    taken = {b.prompt_index for b in bindings}
    unused = tuple(p for j, p in enumerate(prompt_names) if j not in taken)
    return NameBinding(tuple(bindings), unused)


__all__ = ["METHODS", "SIMILARITY_THRESHOLD", "STAGES", "BindMethod", "Binding", "NameBinding",
           "bind_names", "match_exact", "match_normalised", "match_order", "match_similar",
           "name_similarity", "normalise_name", "singular"]

"""Binding LLM object names to GT masklets (the "GT + LLM" setting of Table 5): each binding
stage on its own, the whole binding, and the real batch path (data prep's front-end with a
scripted LLM whose names differ from the GT names, then generation and the report counts):
no GT mask is ever dropped, and the record says how each one got its prompt."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
from test_generate import ScriptedLlm

from ttm_ray.inference.annotation import AnnotationRejected, generation_input, objects_with_masks
from ttm_ray.inference.name_binding import (
    METHODS,
    SIMILARITY_THRESHOLD,
    bind_names,
    match_exact,
    match_normalised,
    match_order,
    match_similar,
    name_similarity,
    normalise_name,
)


# ---------------------------------------------------------------------------- stages
@pytest.mark.parametrize("name,key", [
    ("The Dogs", "dog"), ("  THE   dog! ", "dog"), ("red-ball", "red ball"),
    ("a Red Ball.", "red ball"), ("puppies", "puppy"), ("boxes", "box"),
    ("glasses", "glass"), ("benches", "bench"), ("bus", "bus"), ("cactus", "cactus"),
    ("masklet_3", "masklet 3"), ("the", ""), ("Ｄｏｇｓ", "dog"),
])
def test_normalise_name(name, key):
    assert normalise_name(name) == key


def test_similarity_scores_and_threshold():
    def sim(a: str, b: str) -> float:
        return name_similarity(normalise_name(a), normalise_name(b))

    assert SIMILARITY_THRESHOLD == 0.75
    # one name's words inside the other's: the usual LLM rename
    assert sim("red ball", "ball") == sim("man", "man in a red shirt") == 1.0
    assert sim("grey cat", "gray cat") >= SIMILARITY_THRESHOLD  # spelling
    for a, b in (("red ball", "red car"), ("dog", "log"), ("cat", "kite"), ("dog", "ball")):
        assert sim(a, b) < SIMILARITY_THRESHOLD, (a, b)
    assert name_similarity("", "dog") == 0.0


def test_each_stage_binds_only_what_it_should():
    masks, prompts = ["dog", "red ball", "cat"], ["ball", "The Dogs", "dog"]
    free_m, free_p = [0, 1, 2], [0, 1, 2]
    assert match_exact(masks, prompts, free_m, free_p) == [(0, 2, None)]
    # first free prompt with the same key, in answer order
    assert match_normalised(masks, prompts, free_m, free_p) == [(0, 1, None)]
    assert match_normalised(masks, prompts, [1, 2], [0]) == []
    assert match_similar(masks, prompts, [1, 2], [0]) == [(1, 0, 1.0)]
    assert match_similar(masks, prompts, [2], [0]) == []  # "cat" / "ball": below threshold
    assert match_order(masks, prompts, [1, 2], [0]) == [(1, 0, None)]


def test_similar_binds_the_best_pair_first():
    # Both masks' words are in "small red ball" (overlap 1.0): the closer whole name wins,
    # though "ball" comes first in colour order; "ball" is then left without a prompt.
    binding = bind_names(["ball", "red ball"], ["small red ball"])
    assert [(b.prompt_name, b.method) for b in binding.bindings] == [
        (None, "unbound"), ("small red ball", "similar")]
    # A higher score beats colour order: "dog" would take "puppy" by order only after
    # "small red ball" found "red ball".
    binding = bind_names(["dog", "small red ball"], ["red ball", "puppy"])
    assert [(b.prompt_name, b.method) for b in binding.bindings] == [
        ("puppy", "order"), ("red ball", "similar")]


def test_bind_names_records_every_mask_and_how():
    """The brief's case: two renamed objects, one extra LLM name, one GT mask the LLM never
    names. Order pairs the leftovers (the record says so); nothing is dropped."""
    binding = bind_names(["dog", "red ball", "cat"], ["The Dogs", "ball", "kite"], [3, 5, 7])
    got = [(b.mask_name, b.color_index, b.prompt_name, b.method) for b in binding.bindings]
    assert got == [("dog", 3, "The Dogs", "normalised"), ("red ball", 5, "ball", "similar"),
                   ("cat", 7, "kite", "order")]
    assert binding.unbound == 0 and binding.non_exact == 3 and binding.unused_prompts == ()
    # Fewer LLM names than masks: the rest are unbound, kept and counted.
    binding = bind_names(["dog", "red ball", "cat"], ["dog"])
    assert [b.method for b in binding.bindings] == ["exact", "unbound", "unbound"]
    assert binding.counts() == {"exact": 1, "normalised": 0, "similar": 0, "order": 0,
                                "unbound": 2}
    # More LLM names than masks: the extras are listed as unused.
    binding = bind_names(["dog"], ["kite", "dog", "tree"])
    assert binding.bindings[0].method == "exact" and binding.unused_prompts == ("kite", "tree")
    record = json.loads(json.dumps(binding.as_record()))  # JSON-ready
    assert record["counts"]["exact"] == 1 and record["objects"][0]["prompt_index"] == 1
    assert set(record["counts"]) == set(METHODS)
    with pytest.raises(ValueError, match="2 mask names but 1 colour"):
        bind_names(["a", "b"], ["a"], [0])


def test_objects_with_masks_keeps_every_mask_with_a_fallback_prompt():
    masks = [{"name": "cat", "color_index": 1, "rle": []},
             {"name": "dog", "color_index": 0, "rle": []}]
    objects, kept, binding = objects_with_masks(
        [{"name": "Dog", "prompt": "a dog runs"}], masks, fallback_prompt="A dog and a cat.")
    assert [m["name"] for m in kept] == ["dog", "cat"]  # colour order, both kept
    assert [(o.name, o.prompt, o.color_index) for o in objects] == [
        ("dog", "a dog runs", 0), ("cat", "A dog and a cat.", 1)]
    assert [b.method for b in binding.bindings] == ["normalised", "unbound"]


def test_a_failed_llm_answer_fails_gt_llm_with_its_reason():
    response = {"item_id": "x", "status": "ok", "caption": "A dog.", "masks": [],
                "llm_status": "rejected", "llm_reject_reason": "unparseable_llm_output"}
    with pytest.raises(AnnotationRejected) as info:
        generation_input(response, np.zeros((4, 4, 3), np.uint8), 0, prompts="llm")
    assert info.value.reason == "unparseable_llm_output"


# ---------------------------------------------------------------------------- the real path
GT_NAMES = ("dog", "red ball", "cat", "person")  # the 4 masklets of the bench's item 0
LLM_LOCAL = ("Answer: [[The Dogs: A dog runs to the left.] [ball: A ball bounces.] "
             "[kite: A kite flies up.]]")


def test_gt_llm_binds_renamed_objects_and_keeps_every_gt_mask(tiny_exports, bench, tmp_path):
    """GT masks named by the manual prompts, LLM prompts naming the objects otherwise
    ("The Dogs", "ball"), one extra LLM object ("kite") and GT masks it never names: the
    batch path (data prep's annotator with a scripted LLM, the harness, generation, the
    record) keeps all four GT masks, records each binding, and the report counts them."""
    from data_prep.annotate import AnnotateConfig, ImageAnnotator
    from data_prep.engines import EngineConfig
    from data_prep.stages.prompts import PromptConfig
    from ttm_ray.evaluation.benchmark import binding_counts, settings_markdown
    from ttm_ray.evaluation.report import EvaluationResults
    from ttm_ray.inference import GenerationConfig, StageModelConfig
    from ttm_ray.inference.batch import BatchConfig, plan, run_local
    from ttm_ray.inference.items import load_items
    from ttm_ray.inference.outputs import read_record
    from ttm_ray.inference.stage_model import export_pixel_shape

    exports = tiny_exports["dit"]
    [first, *_] = load_items(str(bench))
    assert len(first.object_prompts) == len(GT_NAMES)
    # The manual prompts name the masklets (masklet k = object_prompts[k]): GT names.
    item = replace(first, object_prompts=tuple(
        (name, f"The {name} moves.") for name in GT_NAMES))
    llm = ScriptedLlm("Motion-specific prompt: everything drifts to the left.", LLM_LOCAL)
    annotate = AnnotateConfig(
        prompts=PromptConfig(engine=EngineConfig(kind="transformers", model_path="unused")),
        mask_source="gt")
    gen_cfg = GenerationConfig(stage1=StageModelConfig(export=str(exports[1])),
                               stage2=StageModelConfig(export=str(exports[2])), device="cpu")
    variants = ["gt_manual", "gt_llm"]
    out = tmp_path / "out"
    results = run_local(plan([item], variants, out), gen_cfg, BatchConfig(variants=variants),
                        out, partial(ImageAnnotator, annotate, engine=llm),
                        export_pixel_shape(str(exports[2]))[0], load_stage1=False)
    assert [(r["variant"], r["status"]) for r in results] == [
        ("gt_manual", "generated"), ("gt_llm", "generated")], results
    assert {r["variant"]: r["objects"] for r in results} == {"gt_manual": 4, "gt_llm": 4}

    record = read_record(out / "gt_llm", item.item_id)
    binding = record["notes"]["name_binding"]
    assert binding["prompts"] == "llm_c_local" and binding["fallback_prompt"] == "caption"
    got = [(b["mask_name"], b["prompt_name"], b["method"]) for b in binding["objects"]]
    assert got == [("dog", "The Dogs", "normalised"), ("red ball", "ball", "similar"),
                   ("cat", "kite", "order"), ("person", None, "unbound")]
    assert binding["counts"] == {"exact": 0, "normalised": 1, "similar": 1, "order": 1,
                                 "unbound": 1}
    # Every GT mask conditioned generation, with the LLM's prompt or the caption.
    assert [(o["name"], o["prompt"]) for o in record["objects"]] == [
        ("dog", "A dog runs to the left."), ("red ball", "A ball bounces."),
        ("cat", "A kite flies up."), ("person", item.prompt)]
    # The manual setting of the same item binds exactly, as before.
    manual = read_record(out / "gt_manual", item.item_id)["notes"]["name_binding"]
    assert manual["counts"]["exact"] == 4 and manual["unused_prompts"] == []

    counts = {v: binding_counts([item], out / v) for v in variants}
    assert counts["gt_llm"] == {"objects": 4, "exact": 0, "normalised": 1, "similar": 1,
                                "order": 1, "unbound": 1, "unused_prompts": 0}
    assert counts["gt_manual"]["exact"] == counts["gt_manual"]["objects"] == 4
    results_stub = {v: EvaluationResults("custom", ("clipframe",),
                                         {"all": {"n_videos": 1, "clipframe": 0.9}})
                    for v in variants}
    table = settings_markdown(results_stub, bindings=counts)
    assert "| gt_llm | 4 | 0 | 1 | 1 | 1 | 1 | 0 |" in table
    assert "| gt_manual | 4 | 4 | 0 | 0 | 0 | 0 | 0 |" in table
    assert "unbound masks keep their mask" in table

"""LLM answer parsing: table-driven, good answers and every way an answer goes wrong."""

from __future__ import annotations

import pytest

from data_prep.parsing import (
    PARSE_REASONS,
    LlmParseError,
    ObjectPrompt,
    parse_caption,
    parse_local_prompts,
    parse_motion_prompt,
    validate_object_prompts,
)

DOG = ("dog", "A dog chases a ball.")
BALL = ("ball", "A ball is being chased by a dog.")

# (id, answer, expected [(name, prompt)] or the LlmParseError reason code)
LOCAL_CASES = [
    ("paper_format_one_line", "[[dog: A dog chases a ball.] [ball: A ball is being chased by a "
     "dog.]]", [DOG, BALL]),
    ("paper_format_multiline_with_answer_label",
     "Answer: [[dog: A dog chases a ball.]\n[ball: A ball is being chased by a dog.]]",
     [DOG, BALL]),
    ("prose_around", "Sure! Here are the objects:\n\n[[dog: A dog chases a ball.] [ball: A ball "
     "is being chased by a dog.]]\n\nLet me know if you need more.", [DOG, BALL]),
    ("code_fence", "```\n[[dog: A dog chases a ball.]\n [ball: A ball is being chased by a "
     "dog.]]\n```", [DOG, BALL]),
    ("spaced_outer_brackets_commas", "[ [dog: A dog chases a ball.], [ball: A ball is being "
     "chased by a dog.] ]", [DOG, BALL]),
    ("missing_outer_brackets", "[dog: A dog chases a ball.]\n[ball: A ball is being chased by "
     "a dog.]", [DOG, BALL]),
    ("missing_final_outer_bracket", "[[dog: A dog chases a ball.] [ball: A ball is being chased "
     "by a dog.]", [DOG, BALL]),
    ("extra_whitespace_and_newlines_in_item", "[[  dog :\n   A dog   chases\na ball.  ]]",
     [DOG]),
    ("markdown_bold_names_and_quotes", '[[**dog**: "A dog chases a ball."]]', [DOG]),
    ("multiword_names", "[[left dog: The dog runs along the beach.] [middle dog: The dog runs "
     "beside its companion.]]", [("left dog", "The dog runs along the beach."),
                                 ("middle dog", "The dog runs beside its companion.")]),
    ("unicode_names_and_fullwidth_brackets",
     "［［狗：一只狗在追球。］ ［chien: Le chien court après la balle.］］",
     [("狗", "一只狗在追球。"), ("chien", "Le chien court après la balle.")]),
    ("zero_width_chars", "[[\u200bdog\u200b: A dog chases a ball.]]", [DOG]),
    ("colon_inside_description", "[[clock: The clock shows 10:30 and its hand moves.]]",
     [("clock", "The clock shows 10:30 and its hand moves.")]),
    ("first_block_wins", "[[dog: A dog chases a ball.]]\nCaption: \"A cat.\"\nAnswer: [[cat: "
     "A cat.]]", [DOG]),
    ("trailing_ellipsis_copied_from_format", "[[dog: A dog chases a ball.] ...]", [DOG]),
    # failures
    ("empty", "", "empty"),
    ("whitespace_only", "   \n\t ", "empty"),
    ("none", None, "empty"),
    ("missing_brackets", "dog: A dog chases a ball. ball: A ball is chased.", "no_brackets"),
    ("empty_block", "Answer: [[]]", "no_objects"),
    ("empty_name", "[[: A dog chases a ball.]]", "empty_name"),
    ("empty_description", "[[dog: ]]", "empty_description"),
    ("missing_colon", "[[a dog chases a ball]]", "missing_colon"),
    ("duplicate_names_case_insensitive", "[[Dog: A dog runs.] [dog: Another dog runs.]]",
     "duplicate_name"),
    ("nested_brackets", "[[dog: A dog [brown] chases a ball.]]", "nested_brackets"),
    ("nested_object_in_object", "[[dog: runs [ball: rolls]]]", "nested_brackets"),
    ("cut_off_mid_item", "[[dog: A dog chases a ball.] [ball: A ball is be", "unbalanced"),
    ("prose_between_items", "[[dog: A dog runs.] and also [ball: A ball rolls.]]",
     "junk_between_items"),
    ("too_many_objects", "[[a: x moves.] [b: y moves.] [c: z moves.] [d: w moves.] "
     "[e: v moves.]]", "too_many_objects"),
    ("very_long_description", "[[dog: " + "The dog runs. " * 80 + "]]", "too_long"),
    ("very_long_name", "[[" + "very " * 30 + "big dog: A dog runs.]]", "too_long"),
    ("template_echo", "[[Object 1: description of object 1] [Object 2: description of "
     "object 2]]", "template_echo"),
]


@pytest.mark.parametrize(("answer", "expected"), [c[1:] for c in LOCAL_CASES],
                         ids=[c[0] for c in LOCAL_CASES])
def test_parse_local_prompts(answer, expected):
    if isinstance(expected, str):
        with pytest.raises(LlmParseError) as exc:
            parse_local_prompts(answer, max_objects=4)
        assert exc.value.reason_code == expected, exc.value
        assert exc.value.reason_code in PARSE_REASONS
        assert exc.value.message
    else:
        got = parse_local_prompts(answer, max_objects=4)
        assert [(o.name, o.prompt) for o in got] == expected


def test_local_cap_truncates_when_asked():
    answer = "[[a: x moves.] [b: y moves.] [c: z moves.]]"
    assert [o.name for o in parse_local_prompts(answer, max_objects=2, truncate=True)] == [
        "a", "b"]
    with pytest.raises(LlmParseError, match="too_many_objects"):
        parse_local_prompts(answer, max_objects=2)


def test_validate_object_prompts_shares_the_rules():
    assert validate_object_prompts([(" dog ", " runs ")]) == [ObjectPrompt("dog", "runs")]
    with pytest.raises(LlmParseError) as exc:
        validate_object_prompts([("dog", "runs"), ("DOG", "jumps")])
    assert exc.value.reason_code == "duplicate_name"
    with pytest.raises(LlmParseError) as exc:
        validate_object_prompts([])
    assert exc.value.reason_code == "no_objects"


MOTION_CASES = [
    ("paper_format", 'Motion-specific prompt: "The cat jumps onto the table and knocks over '
     'the glass."', "The cat jumps onto the table and knocks over the glass."),
    ("bare_quoted", '"The ball rolls to the right, and the kite flies upward."',
     "The ball rolls to the right, and the kite flies upward."),
    ("bare_sentence", "The car drives down the street as pedestrians cross.",
     "The car drives down the street as pedestrians cross."),
    ("short_label", "Motion prompt: The dog runs.", "The dog runs."),
    ("prose_then_quoted", 'Sure! Here is the motion-specific prompt:\n\n"The dog runs after '
     'the ball."\n\nThis omits colors and background.', "The dog runs after the ball."),
    ("curly_quotes", "“The horse gallops forward.”", "The horse gallops forward."),
    ("invented_more_examples", 'Motion-specific prompt: "The dog runs."\n\nCaption: "A cat '
     'sleeps."\nMotion-specific prompt: "The cat sleeps."', "The dog runs."),
    ("answer_then_echoed_caption", 'The dog runs.\nCaption: "A red dog."', "The dog runs."),
    ("code_fence_and_bold", "```\n**Motion-specific prompt:** The eagle flies upward.\n```",
     "The eagle flies upward."),
    ("wrapped_lines_joined", "The dog runs\nto the left.", "The dog runs to the left."),
    ("unicode", "Motion-specific prompt: «Le chien court vers la balle.»",
     "Le chien court vers la balle."),
    ("empty", "", "empty"),
    ("only_label", "Motion-specific prompt:", "empty"),
    ("only_quotes", '""', "empty"),
    ("multi_paragraph_junk", "The dog runs.\n\nIt is brown and sits in a park.\n\nThe end.",
     "multi_paragraph"),
    ("too_long", "The dog runs " + "and runs " * 60 + "away.", "too_long"),
    ("too_many_sentences", "The dog runs. The cat jumps. The bird flies. The fish swims.",
     "too_long"),
    ("template_echo", 'Motion-specific prompt: "description of overall motion"',
     "template_echo"),
]


@pytest.mark.parametrize(("answer", "expected"), [c[1:] for c in MOTION_CASES],
                         ids=[c[0] for c in MOTION_CASES])
def test_parse_motion_prompt(answer, expected):
    if expected in PARSE_REASONS:
        with pytest.raises(LlmParseError) as exc:
            parse_motion_prompt(answer)
        assert exc.value.reason_code == expected, exc.value
    else:
        assert parse_motion_prompt(answer) == expected


@pytest.mark.parametrize(("answer", "expected"), [
    ("A dog runs on grass.", "A dog runs on grass."),
    ('Caption: "A dog runs\non grass."', "A dog runs on grass."),
    ("  \n ", "empty"),
])
def test_parse_caption(answer, expected):
    if expected == "empty":
        with pytest.raises(LlmParseError, match="empty"):
            parse_caption(answer)
    else:
        assert parse_caption(answer) == expected


def test_unknown_reason_code_is_a_bug():
    with pytest.raises(ValueError, match="unknown parse reason"):
        LlmParseError("made_up", "x")

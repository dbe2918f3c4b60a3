"""The paper's prompt templates (DiffusionEngine, arXiv 2309.03893; docs/diffusion_engine.md §1.2)."""
import random

import pytest

from diffusionengine.prompts import (
    MAX_CLASS_NAMES,
    NEGATIVE_PROMPT,
    POSITIVE_STYLE,
    caption_prompt,
    class_prompt,
    random_class_prompt,
    with_style,
)


def test_caption_prompt_lower_cases_and_drops_the_final_period():
    assert caption_prompt("A Man riding a Horse.") == "realistic photo of a man riding a horse"
    assert caption_prompt("  Two dogs. Playing.  ") == "realistic photo of two dogs. playing"  # only the last '.'
    assert caption_prompt("no period") == "realistic photo of no period"
    with pytest.raises(ValueError, match="empty caption"):
        caption_prompt(" . ")


def test_class_prompt_joins_names_with_underscores_as_spaces():
    assert class_prompt(["red_circle"]) == "a photo, with red circle in the realistic photo."
    assert (
        class_prompt(("red_circle", "green_square", "dining table"))
        == "a photo, with red circle, green square, dining table in the realistic photo."
    )


def test_class_prompt_takes_one_to_four_names():
    class_prompt(["a", "b", "c", "d"])
    for bad in ([], ["a", "b", "c", "d", "e"], ["a", ""]):
        with pytest.raises(ValueError, match="1 to 4"):
            class_prompt(bad)
    with pytest.raises(TypeError, match="string"):
        class_prompt("red_circle")  # a bare string is not a list of names


def test_random_class_prompt_is_a_function_of_the_rng_state():
    names = ["red_circle", "green_square", "blue_triangle", "yellow_diamond", "magenta_cross"]
    first = [random_class_prompt(names, random.Random(3)) for _ in range(2)]
    assert first[0] == first[1]
    rng = random.Random(0)
    drawn = [random_class_prompt(names, rng) for _ in range(200)]
    counts = {p.count(",") for p in drawn}  # the prefix "a photo," holds one comma
    assert counts == {1, 2, 3, 4}  # 1..4 names, never 5
    for prompt in drawn:
        listed = prompt[len("a photo, with "):-len(" in the realistic photo.")].split(", ")
        assert len(listed) == len(set(listed)) <= MAX_CLASS_NAMES
        assert {n.replace(" ", "_") for n in listed} <= set(names)
    assert random_class_prompt(["only_one"], random.Random(1)) == "a photo, with only one in the realistic photo."
    assert random_class_prompt(names, random.Random(5), max_names=1).count(",") == 1


def test_style_suffix_and_negative_prompt():
    assert POSITIVE_STYLE.startswith("elegant, meticulous, magnificent, maximum details")
    styled = with_style(class_prompt(["red_circle"]))
    assert styled == "a photo, with red circle in the realistic photo, " + POSITIVE_STYLE
    assert with_style("realistic photo of a dog") == "realistic photo of a dog, " + POSITIVE_STYLE
    assert NEGATIVE_PROMPT and "watermark" in NEGATIVE_PROMPT

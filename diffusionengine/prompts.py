"""Text prompts of the data engine (DiffusionEngine, arXiv 2309.03893; the public code's
``DetrDatasetMapper`` with style "photo", see docs/diffusion_engine.md §1.2).

* With a caption (COCO captions): ``"realistic photo of <caption>"``.
* Otherwise, from class names: ``"a photo, with <up to 4 names> in the realistic photo."``
* At generation time :data:`POSITIVE_STYLE` is appended (``", " + style``) and
  :data:`NEGATIVE_PROMPT` is the negative prompt of classifier-free guidance.

Pure string functions (no torch, no diffusers): a tiny text-to-image model trained on the
synthetic set uses :func:`class_prompt` with the names present in each image.
"""
import random
from typing import Optional, Sequence

__all__ = [
    "MAX_CLASS_NAMES",
    "NEGATIVE_PROMPT",
    "POSITIVE_STYLE",
    "caption_prompt",
    "class_prompt",
    "random_class_prompt",
    "with_style",
]

# At most this many class names in one prompt (the public code draws <= 4 thing names).
MAX_CLASS_NAMES = 4

# Positive style suffix appended at generation (docs/diffusion_engine.md §1.2).
POSITIVE_STYLE = (
    "elegant, meticulous, magnificent, maximum details, extremely hyper aesthetic, highly detailed."
)

# Negative prompt of classifier-free guidance. The public code uses a long list that our docs do
# not reproduce; this short one names the same kinds of defect (quality, anatomy, text marks).
NEGATIVE_PROMPT = (
    "lowres, blurry, low quality, worst quality, jpeg artifacts, deformed, disfigured, bad anatomy,"
    " extra limbs, cropped, out of frame, watermark, signature, text"
)


def caption_prompt(caption: str) -> str:
    """``"realistic photo of <caption>"``: the caption stripped, lower-cased, a final '.' removed.

    >>> caption_prompt("A Dog on a sofa. ")
    'realistic photo of a dog on a sofa'
    """
    text = caption.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()
    if not text:
        raise ValueError(f"empty caption: {caption!r}")
    return f"realistic photo of {text}"


def class_prompt(class_names: Sequence[str]) -> str:
    """``"a photo, with <names> in the realistic photo."`` for 1..4 class names, in the given
    order, comma-separated, underscores written as spaces.

    >>> class_prompt(["red_circle", "blue_triangle"])
    'a photo, with red circle, blue triangle in the realistic photo.'
    """
    if isinstance(class_names, str):
        raise TypeError(f"class_names must be a sequence of names, got the string {class_names!r}")
    names = [str(n).replace("_", " ").strip() for n in class_names]
    if not 1 <= len(names) <= MAX_CLASS_NAMES or not all(names):
        raise ValueError(
            f"class_prompt takes 1 to {MAX_CLASS_NAMES} non-empty class names, got {list(class_names)}"
        )
    return f"a photo, with {', '.join(names)} in the realistic photo."


def random_class_prompt(
    class_names: Sequence[str], rng: random.Random, max_names: Optional[int] = None
) -> str:
    """:func:`class_prompt` of 1..``max_names`` (default 4) distinct names drawn from
    ``class_names`` with ``rng`` (a ``random.Random``): the same rng state gives the same prompt.
    """
    unique = list(dict.fromkeys(class_names))
    if not unique:
        raise ValueError("random_class_prompt needs at least one class name")
    limit = min(MAX_CLASS_NAMES if max_names is None else max_names, len(unique))
    if limit < 1:
        raise ValueError(f"max_names must be >= 1, got {max_names}")
    count = rng.randint(1, limit)
    return class_prompt(rng.sample(unique, count))


def with_style(prompt: str) -> str:
    """``prompt + ", " + POSITIVE_STYLE`` (the generation-time suffix), without a doubled '.'."""
    return f"{prompt.rstrip().rstrip('.')}, {POSITIVE_STYLE}"

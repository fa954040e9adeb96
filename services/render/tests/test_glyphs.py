import random
from pathlib import Path

import numpy as np
import pytest

from services.render.kiln_model import glyphs, text_scenes

KILN_TEXT = Path(__file__).parents[1] / "models" / "kiln-text"


@pytest.mark.parametrize(
    ("text", "cleaned"),
    [("open", "OPEN"), ("  24   hours ", "24 HOURS"), ("MAX 12 CHARS", "MAX 12 CHARS"), ("x", "X")],
)
def test_clean_accepts_letters_digits_and_spaces(text, cleaned):
    assert glyphs.clean(text) == cleaned


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("   ", "empty"), ("café!", "'!É'"), ("THIRTEEN CHAR", "13 characters"), ("a-b", "'-'")],
)
def test_clean_rejects_what_the_model_cannot_draw(text, message):
    with pytest.raises(ValueError, match=message):
        glyphs.clean(text)


@pytest.mark.parametrize("text", ["I", "OPEN", "WWWWWWWWWWWW", "MAX 12 CHARS"])
def test_draw_fits_one_centred_line_inside_the_margins(text):
    image = glyphs.draw(text, 128, 128)
    assert image.mode == "L" and image.size == (128, 128)
    left, top, right, bottom = image.getbbox()
    assert left >= 2 and right <= 126, "twelve characters fit between the margins"
    assert abs((left + right) / 2 - 64) <= 2 and abs((top + bottom) / 2 - 64) <= 3
    assert np.asarray(image).max() == 255


def test_parse_reads_prompts_the_way_captions_are_written():
    assert text_scenes.parse('the word "SALE" in red on a white background') == (
        "SALE",
        "the word quoted in red on a white background",
        "red",
        "white",
    )
    assert text_scenes.parse('a yellow sign that says "Open" in blue')[::2] == ("Open", "blue")
    assert text_scenes.parse('a yellow sign that says "Open" in blue')[3] == "yellow"
    assert text_scenes.parse('"24 hours" written in green on black')[2:] == ("green", "black")
    assert text_scenes.parse("a red circle") == (None, "a red circle", "red", None)


def test_captions_describe_the_scene_they_were_written_for():
    rng = random.Random(3)
    for _ in range(300):
        prompt, described = text_scenes.caption(text_scenes.random_scene(rng), rng)
        quoted, _, colour, background = text_scenes.parse(prompt)
        assert (quoted, colour, background) == (described.text, described.colour, described.background), prompt


def test_training_never_samples_a_held_out_word():
    assert len(text_scenes.HELD_OUT) >= 40 and all(glyphs.clean(w) == w for w in text_scenes.HELD_OUT)
    rng = random.Random(0)
    sampled = [text_scenes.random_scene(rng).text for _ in range(5000)]
    assert not any(text_scenes.is_held_out(text) for text in sampled)
    assert {len(text) for text in sampled} == set(range(1, 13)) and any(" " in text for text in sampled)


@pytest.fixture(scope="module")
def pipe():
    if not (KILN_TEXT / "model_index.json").exists():
        pytest.skip(f"no kiln-text model at {KILN_TEXT}")
    import torch

    from services.render.kiln_model.glyph_pipeline import GlyphPipeline

    torch.set_num_threads(2)
    return GlyphPipeline.from_folder(KILN_TEXT)


def test_the_shipped_model_renders_a_batch_like_single_images(pipe):
    import torch

    prompts = ['a sign that says "OPEN" in red on white', '"EXIT" written in white on green']
    texts = ["OPEN", "EXIT"]
    steps: list[tuple[int, int]] = []
    batch = pipe(
        prompts,
        texts,
        num_inference_steps=2,
        generators=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)],
        on_step=lambda step, total: steps.append((step, total)),
    )
    alone = pipe(prompts[:1], texts[:1], num_inference_steps=2, generators=[torch.Generator().manual_seed(1)])
    assert [image.size for image in batch] == [pipe.size, pipe.size] == [(128, 128)] * 2
    assert steps == [(1, 2), (2, 2)]
    first, second = (np.asarray(image, dtype=int) for image in batch)
    assert np.abs(first - second).mean() > 5, "two texts, two pictures"
    assert np.abs(first - np.asarray(alone[0], dtype=int)).max() <= 2, "same seed, same picture, batch or not"

import msgspec
import pytest

from services.context.compose import (
    Refusal,
    TextModel,
    apply_edit,
    check_submission,
    compose,
    looks_like_edit,
    render_request,
    seed_for,
    style_in_force,
    wants_latest_image,
)
from services.context.config import Config, Limits, Style
from shared import model_card
from shared.events import Composition, PromptSubmitted, QuotaGranted, TurnComposed
from shared.settings import DEFAULT_MODEL

CONFIG = Config(
    limits=Limits(max_prompt_chars=60, max_composed_chars=80),
    blocklist=["gore", "evil clown"],
    styles={
        "watercolor": Style(title="Watercolor", fragment="watercolor painting"),
        "pixel-art": Style(title="Pixel art", fragment="pixel art", negative="blurry", guidance=4.5),
    },
)
SHAPES = model_card.load(DEFAULT_MODEL).vocabulary  # the bundled model's words


def _submission(**fields) -> PromptSubmitted:
    return PromptSubmitted(**({"request_id": "r1", "user_id": "alice", "prompt": "  a red circle "} | fields))


def _grant(**submission_fields) -> QuotaGranted:
    return QuotaGranted(
        request_id="r1",
        user_id="alice",
        conversation_id=submission_fields.get("conversation_id", ""),
        plan="free",
        used=1,
        limit=3,
        day="2026-11-26",
        submission=_submission(**submission_fields),
    )


def _turn(request_id: str, subject: str, style: str = "") -> TurnComposed:
    return TurnComposed(
        request_id=request_id,
        user_id="alice",
        conversation_id="c1",
        prompt=subject,
        composition=Composition(text=subject, subject=subject, style=style),
    )


def _job(grant: QuotaGranted, style: str = "", source=None, vocabulary=None):
    composition, prompt = compose(grant, style, CONFIG, source, vocabulary)
    return render_request(grant, composition, prompt, CONFIG)


# -- a new picture -------------------------------------------------------------------------


def test_render_request_carries_the_prompt_and_parameters():
    job = _job(_grant(width=64, height=48, steps=12))
    assert (job.prompt, job.width, job.height, job.steps, job.tier, job.mode) == (
        "a red circle",
        64,
        48,
        12,
        "free",
        "text",
    )
    assert job.composition == Composition(text="a red circle", subject="a red circle")


def test_a_degraded_grant_draws_fewer_steps_and_says_why_in_the_composition():
    grant = msgspec.structs.replace(_grant(steps=30), steps=12, degraded="30 steps asked, 12 rendered")
    job = _job(grant)
    assert (job.steps, job.composition.degraded) == (12, "30 steps asked, 12 rendered")


def test_seed_is_the_clients_or_derived_from_the_request():
    assert _job(_grant(seed=42)).seed == 42
    derived = _job(_grant()).seed
    assert derived == seed_for("r1") == _job(_grant()).seed  # a redelivery draws the same image
    assert seed_for("r2") != derived


def test_a_style_adds_its_fragment_and_parameters_and_is_recorded():
    job = _job(_grant(), style="pixel-art")
    assert job.prompt == "a red circle, pixel art"
    assert (job.negative_prompt, job.guidance) == ("blurry", 4.5)
    assert job.composition.style == "pixel-art" and job.composition.subject == "a red circle"


# -- styles stay with the conversation -----------------------------------------------------


def test_the_conversation_keeps_its_latest_style_until_another_is_picked():
    turns = [_turn("r0", "a red circle", style="watercolor")]
    assert style_in_force(_submission(), turns, CONFIG) == "watercolor"
    assert style_in_force(_submission(style="Pixel-Art"), turns, CONFIG) == "pixel-art"
    assert style_in_force(_submission(style="none"), turns, CONFIG) == ""
    assert style_in_force(_submission(), [], CONFIG) == ""
    # A style the operator has since removed is dropped, not a failure.
    assert style_in_force(_submission(), [_turn("r0", "a red circle", style="cubism")], CONFIG) == ""


def test_an_unknown_style_is_refused_naming_the_styles():
    with pytest.raises(Refusal) as refusal:
        style_in_force(_submission(style="cubism"), [], CONFIG)
    assert refusal.value.reason == "unknown_style" and "watercolor, pixel-art" in refusal.value.detail


# -- edits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, edit",
    [
        ("make it blue", True),
        ("Now add a border", True),
        ("please turn it green", True),
        ("remove the background", True),
        ("do the last one again in yellow", True),
        ("a red circle", False),
        ("the digit 3 in blue", False),
        ("makeup on a face", False),
        ("on a green background", True),
        ("move it to the left", True),
        ("at the top", True),
        ("in blue", True),
        ("a circle in blue at the top", False),
    ],
)
def test_chat_messages_that_ask_to_change_the_picture(text, edit):
    assert looks_like_edit(text) is edit


def test_an_edit_of_the_latest_image_is_named_or_worded_and_needs_a_conversation():
    assert wants_latest_image(_submission(edit_of="last"), in_conversation=False)
    assert wants_latest_image(_submission(prompt="make it blue"), in_conversation=True)
    assert not wants_latest_image(_submission(prompt="make it blue"), in_conversation=False)
    assert not wants_latest_image(_submission(prompt="make it blue", edit_of="r7"), in_conversation=True)
    assert not wants_latest_image(_submission(prompt="a blue square"), in_conversation=True)


@pytest.mark.parametrize(
    "instruction, subject",
    [
        ("make it blue", "a blue circle on a white background"),
        ("Make it blue please", "a blue circle on a white background"),
        ("change it to green", "a green circle on a white background"),
        ("add a border", "a red circle on a white background, with a border"),
        ("remove the shadow", "a red circle on a white background, without the shadow"),
        ("make it bigger", "a red circle on a white background, bigger"),
        ("on a green background", "a red circle on a green background"),
        ("put it on black", "a red circle on a black background"),
        ("move it to the left", "a red circle on a white background at the left"),
        ("in yellow", "a yellow circle on a white background"),
    ],
)
def test_an_edit_applies_the_instruction_to_the_earlier_subject(instruction, subject):
    assert apply_edit("a red circle on a white background", instruction) == subject


def test_an_edit_replaces_the_part_it_names_not_another():
    assert apply_edit("a red circle at the top", "move it to the left") == "a red circle at the left"
    assert apply_edit("a red circle on blue", "on a green background") == "a red circle on green"
    # The object's colour, not the background's, even when the object has none.
    assert apply_edit("a circle on a white background", "make it blue") == "a circle on a white background, blue"


def test_an_edit_starts_from_the_source_image_and_records_it():
    source = ("r0", Composition(text="a red circle", subject="a red circle", style="watercolor"))
    job = _job(_grant(prompt="make it blue", strength=0.6), style="watercolor", source=source)
    assert job.prompt == "a blue circle, watercolor painting"
    assert (job.mode, job.source_key, job.strength) == ("edit", "alice/r0.png", 0.6)
    assert job.composition == Composition(
        text="make it blue", subject="a blue circle", style="watercolor", edit_of="r0"
    )


def test_an_edit_worded_as_a_whole_description_replaces_the_subject():
    source = ("r0", Composition(text="a red circle", subject="a red circle"))
    job = _job(_grant(prompt="a green square", edit_of="r0"), source=source)
    assert (job.prompt, job.mode, job.source_key) == ("a green square", "edit", "alice/r0.png")


def test_an_edit_with_a_mask_inpaints():
    source = ("r0", Composition(text="a red circle", subject="a red circle"))
    job = _job(_grant(prompt="make it blue", edit_of="r0", mask_key="alice/masks/m1.png"), source=source)
    assert (job.mode, job.mask_key) == ("inpaint", "alice/masks/m1.png")


# -- what the model draws -----------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, unknown",
    [("a cat riding a bicycle", '"cat", "riding", "bicycle"'), ("the word HI", '"word", "hi"')],
)
def test_a_picture_naming_nothing_the_model_draws_is_refused_naming_the_words(prompt, unknown):
    with pytest.raises(Refusal) as refusal:
        _job(_grant(prompt=prompt), vocabulary=SHAPES)
    assert refusal.value.reason == "not_drawable"
    assert refusal.value.detail.startswith(f"the model does not know {unknown}; it draws circle, square, triangle, 0-9")
    assert "in red, orange" in refusal.value.detail and "at left/right/top/bottom/center" in refusal.value.detail


def test_a_picture_of_known_words_but_no_subject_is_refused():
    with pytest.raises(Refusal) as refusal:
        _job(_grant(prompt="a red picture"), vocabulary=SHAPES)
    assert refusal.value.reason == "not_drawable" and '"a red picture" names nothing' in refusal.value.detail


@pytest.mark.parametrize(
    "prompt", ["a red circle on a blue background at the top", "the digit 7 in green on white", "draw me a square"]
)
def test_a_picture_naming_a_subject_is_drawn(prompt):
    assert _job(_grant(prompt=prompt), vocabulary=SHAPES).prompt == prompt


def test_only_the_users_words_are_checked_not_the_styles():
    job = _job(_grant(), style="watercolor", vocabulary=SHAPES)  # "watercolor painting": not the model's
    assert job.prompt == "a red circle, watercolor painting"
    source = ("r0", Composition(text="a red circle", subject="a red circle", style="watercolor"))
    assert (
        _job(_grant(prompt="make it blue"), "watercolor", source, SHAPES).prompt == "a blue circle, watercolor painting"
    )


def test_a_model_without_a_vocabulary_draws_anything():
    assert _job(_grant(prompt="a cat riding a bicycle")).prompt == "a cat riding a bicycle"
    source = ("r0", Composition(text="a red circle", subject="a red circle"))
    assert _job(_grant(prompt="add a border"), source=source).prompt == "a red circle, with a border"


@pytest.mark.parametrize(
    "instruction, subject",
    [
        ("make it blue", "a blue circle on a white background"),
        ("on a green background", "a red circle on a green background"),
        ("move it to the left", "a red circle on a white background at the left"),
        ("make it a square", "a red square on a white background"),
        ("turn it into a 7", "a red 7 on a white background"),
        ("make it a blue triangle", "a blue triangle"),  # a whole description
    ],
)
def test_an_edit_the_model_can_draw_is_applied(instruction, subject):
    source = ("r0", Composition(text="x", subject="a red circle on a white background"))
    assert _job(_grant(prompt=instruction), source=source, vocabulary=SHAPES).prompt == subject


@pytest.mark.parametrize(
    "instruction, unknown",
    [
        ("add a border", '"add", "border"'),
        ("now make it bigger, please", '"bigger"'),
        ("make it pink", '"pink"'),  # a colour to compose, not to this model
    ],
)
def test_an_edit_the_model_cannot_draw_is_refused_naming_the_words(instruction, unknown):
    source = ("r0", Composition(text="x", subject="a red circle"))
    with pytest.raises(Refusal) as refusal:
        _job(_grant(prompt=instruction), source=source, vocabulary=SHAPES)
    assert refusal.value.reason == "cannot_edit"
    assert refusal.value.detail.startswith(f'the model cannot "{instruction}": it does not know {unknown}; it draws')


def test_an_edit_worded_as_a_whole_description_needs_a_subject():
    source = ("r0", Composition(text="a red circle", subject="a red circle"))
    assert _job(_grant(prompt="a green circle", edit_of="r0"), source=source, vocabulary=SHAPES).prompt == (
        "a green circle"
    )
    with pytest.raises(Refusal) as refusal:
        _job(_grant(prompt="a green cat", edit_of="r0"), source=source, vocabulary=SHAPES)
    assert refusal.value.reason == "not_drawable" and '"cat"' in refusal.value.detail


# -- limits and the blocklist --------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"prompt": "x" * 61}, "prompt_too_long"),
        ({"width": 1024, "height": 32}, "too_large"),  # past Kiln's limits: quota denies it first
        ({"steps": 51}, "too_many_steps"),
        ({"prompt": "a GORE scene"}, "blocked"),
        ({"prompt": "an evil   clown at the left"}, "blocked"),
    ],
)
def test_limits_and_blocklist_refuse_with_a_reason(fields, reason):
    with pytest.raises(Refusal) as refusal:
        check_submission(_submission(**fields), CONFIG)
    assert refusal.value.reason == reason and refusal.value.detail


def test_blocklist_matches_whole_words_only():
    check_submission(_submission(prompt="a gorey clown"), CONFIG)  # neither "gore" nor "evil clown"


def test_a_composed_prompt_past_the_limit_is_refused():
    source = ("r0", Composition(text="x", subject="a red circle, " + "with stripes, " * 4))
    with pytest.raises(Refusal) as refusal:
        compose(_grant(prompt="add dots"), "watercolor", CONFIG, source)
    assert refusal.value.reason == "prompt_too_long" and "new conversation" in refusal.value.detail


# -- quoted text ---------------------------------------------------------------------------

SIGN_WORDS = ["a", "the", "sign", "that", "says", "word", "in", "on", "background", "red", "blue", "white", "black"]
TEXT_MODEL = TextModel(
    model_card.Vocabulary(subjects=[], words=SIGN_WORDS), side=128, max_chars=12, steps=6, guidance=1.5
)


def _text_job(prompt: str, source=None, **fields):
    grant = _grant(prompt=prompt, **fields)
    composition, drawn = compose(grant, "", CONFIG, source, SHAPES, TEXT_MODEL)
    return render_request(grant, composition, drawn, CONFIG, TEXT_MODEL)


def test_a_prompt_quoting_text_goes_to_the_text_model_with_the_text_in_its_composition():
    job = _text_job('a sign that says "Open 24h"', width=32, height=32, steps=20)
    assert (job.text, job.width, job.height, job.mode) == ("OPEN 24H", 128, 128, "text")
    assert (job.steps, job.guidance) == (6, 1.5)  # the text model's recipe: at most its steps
    assert _text_job('the word "GO"', steps=4).steps == 4
    assert job.composition.written == "OPEN 24H" and job.prompt == 'a sign that says "Open 24h"'
    # Without a text model, quotes are words like any other: the shapes model knows none.
    with pytest.raises(Refusal) as refusal:
        _job(_grant(prompt='a sign that says "OPEN"'), vocabulary=SHAPES)
    assert refusal.value.reason == "not_drawable"


@pytest.mark.parametrize(
    "instruction, subject, written",
    [
        ("change the text to CLOSED", 'the word "CLOSED" in red on white', "CLOSED"),
        ('make it say "sale"', 'the word "sale" in red on white', "SALE"),
        ("now make it blue", 'the word "OPEN" in blue on white', "OPEN"),
        ("on a black background", 'the word "OPEN" in red on black', "OPEN"),
    ],
)
def test_an_edit_of_a_picture_with_text_draws_it_again_with_the_change(instruction, subject, written):
    source = ("r0", Composition(text="x", subject='the word "OPEN" in red on white', written="OPEN"))
    job = _text_job(instruction, source=source)
    assert (job.prompt, job.text, job.mode, job.source_key) == (subject, written, "text", None)
    assert job.composition.edit_of == "r0"


def test_a_colour_written_in_the_text_is_not_the_colour_of_the_text():
    source = ("r0", Composition(text="x", subject='the word "RED" on white', written="RED"))
    assert _text_job("make it blue", source=source).prompt == 'the word "RED" on white in blue'


@pytest.mark.parametrize(
    "prompt, reason, detail",
    [
        ('a sign that says "THIRTEEN CHAR"', "bad_text", "has 13 characters; the model draws at most 12"),
        ('a neon sign that says "OPEN"', "not_drawable", 'the text model does not know "neon"'),
    ],
)
def test_text_the_text_model_cannot_draw_is_refused(prompt, reason, detail):
    with pytest.raises(Refusal) as refusal:
        _text_job(prompt)
    assert refusal.value.reason == reason and detail in refusal.value.detail

import pytest

from services.context.compose import (
    Refusal,
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
from shared.events import Composition, PromptSubmitted, QuotaGranted, TurnComposed

CONFIG = Config(
    limits=Limits(max_prompt_chars=60, max_composed_chars=80),
    blocklist=["gore", "evil clown"],
    styles={
        "watercolor": Style(title="Watercolor", fragment="watercolor painting"),
        "pixel-art": Style(title="Pixel art", fragment="pixel art", negative="blurry", guidance=4.5),
    },
)


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


def _job(grant: QuotaGranted, style: str = "", source=None):
    composition, prompt = compose(grant, style, CONFIG, source)
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
    ],
)
def test_an_edit_applies_the_instruction_to_the_earlier_subject(instruction, subject):
    assert apply_edit("a red circle on a white background", instruction) == subject


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

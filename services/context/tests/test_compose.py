from services.context.compose import render_request, seed_for
from shared.events import PromptSubmitted, QuotaGranted


def _grant(**submission_fields) -> QuotaGranted:
    submission = PromptSubmitted(
        **({"request_id": "r1", "user_id": "alice", "prompt": "  a red circle "} | submission_fields)
    )
    return QuotaGranted(
        request_id="r1", user_id="alice", plan="free", used=1, limit=3, day="2026-11-26", submission=submission
    )


def test_render_request_carries_the_prompt_and_parameters():
    job = render_request(_grant(width=64, height=48, steps=12))
    assert (job.prompt, job.width, job.height, job.steps, job.tier) == ("a red circle", 64, 48, 12, "free")


def test_seed_is_the_clients_or_derived_from_the_request():
    assert render_request(_grant(seed=42)).seed == 42
    derived = render_request(_grant()).seed
    assert derived == seed_for("r1") == render_request(_grant()).seed  # a redelivery draws the same image
    assert seed_for("r2") != derived

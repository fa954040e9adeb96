"""What a service may do on the bus: the patterns its declaration gives, and the check."""

import pytest

from services.context.__main__ import SERVICE as CONTEXT
from services.quota.__main__ import SERVICE as QUOTA
from shared import subjects
from shared.access import Access, Undeclared, matches


@pytest.mark.parametrize(
    ("subject", "pattern", "expected"),
    [
        ("kiln.outcome.alice.r1", "kiln.outcome.*.*", True),
        ("kiln.outcome.alice", "kiln.outcome.*.*", False),  # too short
        ("kiln.outcome.alice.r1.x", "kiln.outcome.*.*", False),  # too long
        ("kiln.outcome.alice.r1", "kiln.outcome.>", True),
        ("kiln.outcome", "kiln.outcome.>", False),  # `>` takes at least one token
        ("kiln.quota.status.alice", "kiln.outcome.*.*", False),
        ("kiln.outcome.*.*", "kiln.outcome.*.*", True),  # subscribing to the declared pattern
        ("kiln.outcome.*.*", "kiln.outcome.alice.*", False),  # wider than declared
        ("kiln.outcome.>", "kiln.outcome.*.*", False),
    ],
)
def test_a_subject_matches_a_pattern_as_nats_would(subject: str, pattern: str, expected: bool):
    assert matches(subject, pattern) is expected


def test_a_service_may_do_what_it_declares_and_nothing_else():
    access = QUOTA.access()
    access.check_publish(subjects.quota_decided("alice", "r1"))
    access.check_publish(subjects.outcome("alice", "r1"))
    access.check_publish(subjects.dead_letter("quota"))  # every service may dead-letter
    access.check_subscribe(subjects.QUOTA_STATUS.pattern)
    access.check_stream(subjects.PROMPTS.name)
    with pytest.raises(Undeclared, match="kiln.render.jobs.free.alice"):
        access.check_publish(subjects.render_job("free", "alice"))  # context's job, not quota's
    with pytest.raises(Undeclared):
        access.check_publish(subjects.dead_letter("render"))  # only its own dead letters
    with pytest.raises(Undeclared):
        access.check_stream(subjects.RENDER_JOBS.name)
    with pytest.raises(Undeclared):
        access.check_bucket(subjects.IMAGES.name)


def test_accesses_combine():
    both = QUOTA.access() | CONTEXT.access()
    both.check_publish(subjects.render_job("free", "alice"))
    both.check_publish(subjects.quota_decided("alice", "r1"))
    assert Access() | Access() == Access()

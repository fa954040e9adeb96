"""What a service may do on the bus: the patterns its declaration gives, and the check."""

import re

import pytest

from infra.nats_auth import declarations, permission_markdown, user_permissions
from services.context.__main__ import SERVICE as CONTEXT
from services.quota.__main__ import SERVICE as QUOTA
from shared import subjects
from shared.access import Access, Undeclared, matches
from shared.settings import PROJECT_ROOT


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


def test_the_readme_permission_table_is_the_one_the_declarations_make():
    readme = (PROJECT_ROOT / "README.md").read_text()
    found = re.search(r"<!-- permissions: [^\n]*-->\n(.*?)\n<!-- /permissions -->", readme, re.S)
    assert found and found.group(1) == permission_markdown(declarations()), "README's permission table is stale"


def test_a_user_may_publish_only_on_its_own_subjects():
    allowed = user_permissions("alice")
    for subject in allowed.publish:
        assert "alice" in subject or subject in (subjects.QUOTA_PRESSURE.pattern, subjects.CONTEXT_STYLES.pattern)
    assert all("alice" in subject for subject in allowed.subscribe)
    assert not any(">" == s or s.startswith("$JS.API.STREAM.MSG") for s in allowed.publish)

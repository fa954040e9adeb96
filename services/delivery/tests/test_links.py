import pytest

from services.delivery.links import Expired, Signer, Tampered, load_secret
from shared.settings import Settings, SettingsError

SIGNER = Signer(b"server secret")


def test_a_link_opens_until_it_expires():
    sig = SIGNER.signature("share", "alice/r1", 2000)
    SIGNER.check("share", "alice/r1", "2000", sig, now=1999.0)
    with pytest.raises(Expired):
        SIGNER.check("share", "alice/r1", "2000", sig, now=2001.0)


@pytest.mark.parametrize(
    "purpose, subject, expires",
    [
        ("share", "alice/r2", "2000"),  # another image
        ("share", "bob/r1", "2000"),  # another user's image
        ("share", "alice/r1", "9999"),  # a longer life
        ("download", "alice/r1", "2000"),  # a share link used as another kind of link
    ],
)
def test_changing_any_part_of_a_link_is_tampering(purpose, subject, expires):
    sig = SIGNER.signature("share", "alice/r1", 2000)
    with pytest.raises(Tampered):
        SIGNER.check(purpose, subject, expires, sig, now=0.0)


def test_a_forged_expiry_is_tampering_even_when_expired():
    sig = SIGNER.signature("share", "alice/r1", 2000)
    with pytest.raises(Tampered):
        SIGNER.check("share", "alice/r1", "1000", sig, now=1500.0)


@pytest.mark.parametrize(
    "expires, sig",
    [
        (None, None),
        ("2000", None),
        ("2000", ""),
        ("soon", "x"),
        ("2000", "AAAA"),
        ("²", "x"),
        ("9" * 5000, "x"),
        ("-1", "x"),
    ],
)
def test_missing_or_malformed_parts_are_tampering(expires, sig):
    with pytest.raises(Tampered):
        SIGNER.check("share", "alice/r1", expires, sig, now=0.0)


def test_another_servers_signature_does_not_open_the_link():
    sig = Signer(b"other secret").signature("share", "alice/r1", 2000)
    with pytest.raises(Tampered):
        SIGNER.check("share", "alice/r1", "2000", sig, now=0.0)


def test_the_secret_is_made_once_and_kept(tmp_path):
    first = load_secret(None, tmp_path)
    assert len(first) == 64 and load_secret(None, tmp_path) == first
    assert (tmp_path / "delivery" / "link-secret").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in (tmp_path / "delivery").iterdir()] == ["link-secret"]  # no draft left
    assert load_secret("c" * 32, tmp_path) == b"c" * 32


def test_a_short_configured_secret_is_refused_naming_the_variable():
    with pytest.raises(SettingsError, match="KILN_LINK_SECRET must be at least 32 characters"):
        Settings.from_env({"KILN_LINK_SECRET": "short"})

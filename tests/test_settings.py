"""Settings: every KILN_* variable read once, typed; a bad value named in one line."""

import dataclasses
import re
import subprocess
import sys

import pytest

from shared.settings import PROJECT_ROOT, README_TABLE, Settings, SettingsError, asyncpg_url, markdown_table
from shared.subjects import ALL_STREAMS


@pytest.mark.parametrize(
    "pasted",
    [
        "postgresql://kiln:pw@db:5432/kiln",
        "postgres://kiln:pw@db:5432/kiln",
        "postgresql+asyncpg://kiln:pw@db:5432/kiln",
    ],
)
def test_the_database_url_forms_people_paste_are_accepted(pasted: str):
    settings = Settings.from_env({"KILN_DATABASE_URL": pasted})
    assert settings.database_address == "postgresql://kiln:pw@db:5432/kiln"
    assert asyncpg_url(settings.database_address) == "postgresql+asyncpg://kiln:pw@db:5432/kiln"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"KILN_DATABASE_URL": "mysql://db/kiln"}, "KILN_DATABASE_URL"),
        ({"KILN_DATABASE_URL": "postgresql+psycopg://db/kiln"}, "KILN_DATABASE_URL"),
        ({"KILN_NATS_URL": "http://127.0.0.1:4222"}, "KILN_NATS_URL"),
        ({"KILN_HTTP_PORT": "eighty"}, "KILN_HTTP_PORT"),
        ({"KILN_HTTP_PORT": "70000"}, "KILN_HTTP_PORT"),
        ({"KILN_RENDER_MAX_BATCH": "0"}, "KILN_RENDER_MAX_BATCH"),
        ({"KILN_GPU_HOT_C": "nan"}, "KILN_GPU_HOT_C"),
        ({"KILN_TRACING_UI": "maybe"}, "KILN_TRACING_UI"),
        ({"KILN_LINK_SECRET": "short"}, "KILN_LINK_SECRET"),
        ({"KILN_OIDC_ISSUER": "issuer.example"}, "KILN_OIDC_ISSUER"),
        ({"KILN_OIDC_ISSUER": "https://issuer.example"}, "KILN_OIDC_CLIENT_ID"),  # an issuer needs a client id
        ({"KILN_GPU_RESUME_C": "90"}, "KILN_GPU_RESUME_C"),  # above the pause threshold
        ({"KILN_CHECKPOINT_EVERY": "0"}, "KILN_CHECKPOINT_EVERY"),
        ({"KILN_CHECKPOINT_AFTER_S": "0.5"}, "KILN_CHECKPOINT_AFTER_S"),  # quota looks once a second
    ],
)
def test_a_value_kiln_cannot_use_is_refused_naming_its_variable(env: dict[str, str], named: str):
    with pytest.raises(SettingsError, match=named) as refused:
        Settings.from_env(env)
    assert "\n" not in str(refused.value)


def test_unset_and_empty_variables_take_the_defaults(tmp_path):
    settings = Settings.from_env({"KILN_HTTP_PORT": "", "KILN_DATA_DIR": str(tmp_path)})
    assert settings.http_port == 8480 and settings.nats_url is None
    assert settings.nats_address == "nats://127.0.0.1:14222"
    assert settings.base_url == "http://127.0.0.1:8480"


def test_a_service_that_cannot_start_says_so_in_one_line():
    env = {"PATH": "/usr/bin:/bin", "KILN_DATABASE_URL": "mysql://db/kiln", "KILN_METRICS_PORT": ""}
    result = subprocess.run(
        [sys.executable, "-m", "services.quota"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("quota: KILN_DATABASE_URL must start with")
    assert "Traceback" not in result.stderr


def test_the_readme_table_is_the_one_the_code_makes():
    readme = (PROJECT_ROOT / "README.md").read_text()
    found = README_TABLE.search(readme)
    assert found, "README.md has no generated settings table"
    assert found.group(2).strip() == markdown_table().strip(), "stale: run python -m shared.settings --readme"


def test_every_kiln_variable_the_readme_names_is_a_setting():
    readme = (PROJECT_ROOT / "README.md").read_text()
    known = {spec.metadata["variable"] for spec in dataclasses.fields(Settings)} | {s.name for s in ALL_STREAMS}
    assert set(re.findall(r"KILN_[A-Z_]+[A-Z]", readme)) <= known

import pytest

from services.context.config import ConfigError, load
from shared.settings import Settings

DEFAULT_FILE = Settings().context_config


def test_the_shipped_config_loads_with_its_styles():
    config = load(DEFAULT_FILE)
    assert {"watercolor", "anime", "pixel-art"} <= set(config.styles)
    assert config.blocked is not None


@pytest.mark.parametrize(
    "text, named",
    [
        ("[limits]\nmax_stepz = 3\n", "max_stepz"),
        ("[styles.Bad_Name]\ntitle = 'x'\nfragment = 'y'\n", "Bad_Name"),
        ("[styles.none]\ntitle = 'x'\nfragment = 'y'\n", "none"),
        ("blocklist = 'gore'\n", "blocklist"),
    ],
)
def test_a_mistake_names_the_key(tmp_path, text, named):
    path = tmp_path / "context.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load(path)

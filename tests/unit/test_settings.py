"""Settings are strict: unknown names and bad values stop Charter with every problem named."""

from __future__ import annotations

import pytest

from charter.errors import ConfigurationError
from charter.settings import Settings, settings_markdown


def test_defaults_and_parsing() -> None:
    s = Settings.from_env({"CHARTER_MAX_BODY_BYTES": "2048", "CHARTER_DEMO": "yes",
                           "OTHER": "ignored"})
    assert s.max_body_bytes == 2048 and s.demo is True
    assert s.database_url.startswith("sqlite")


def test_every_problem_is_reported() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"CHARTER_MAX_BODY_BYTE": "1", "CHARTER_DEMO": "maybe",
                           "CHARTER_DB_POOL_SIZE": "five"})
    problems = info.value.details["problems"]
    assert len(problems) == 3
    assert any("CHARTER_MAX_BODY_BYTE: unknown setting" in p for p in problems)
    assert any("CHARTER_DEMO: expected a boolean" in p for p in problems)


def test_secret_key_required_outside_demo() -> None:
    with pytest.raises(ConfigurationError, match="CHARTER_SECRET_KEY"):
        Settings.from_env({}).require_secret()
    Settings.from_env({}, demo=True).require_secret()
    Settings.from_env({"CHARTER_SECRET_KEY": "k" * 32}).require_secret()


def test_settings_are_frozen() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.demo = True  # type: ignore[misc]


def test_configuration_doc_lists_every_setting() -> None:
    doc = settings_markdown()
    for name in Settings.__dataclass_fields__:
        assert f"`CHARTER_{name.upper()}`" in doc

import pytest

from shared.devstack import settings_env
from shared.settings import Settings


def test_settings_env_round_trips_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    original = Settings(block_size=None, enforce_eager=False, max_in_flight=7)
    for name, value in settings_env(original).items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt.model_dump(exclude={"worker_id"}) == original.model_dump(exclude={"worker_id"})

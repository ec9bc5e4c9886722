"""`parallm.testing.timeouts.scaled`: the one setting and the machine's load stretch a timeout."""

import os

import pytest

from parallm.errors import UserError
from parallm.testing import timeouts


@pytest.fixture
def load(monkeypatch):
    def set_load(per_cpu: float) -> None:
        cpus = 4
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setattr(os, "getloadavg", lambda: (per_cpu * cpus, 0.0, 0.0))

    return set_load


def test_idle_machine_and_no_setting_keep_the_base(monkeypatch, load):
    monkeypatch.delenv(timeouts.ENV, raising=False)
    load(0.25)
    assert timeouts.scaled(30) == 30


def test_setting_and_load_multiply(monkeypatch, load):
    monkeypatch.setenv(timeouts.ENV, "2.5")
    load(3.0)  # three runnable processes per core
    assert timeouts.scaled(10) == pytest.approx(75.0)


def test_load_factor_is_clamped(monkeypatch, load):
    monkeypatch.delenv(timeouts.ENV, raising=False)
    load(1000.0)
    assert timeouts.scaled(1) == timeouts.MAX_LOAD_FACTOR


@pytest.mark.parametrize("raw", ["0", "-1", "fast", "nan", "inf"])
def test_bad_setting_is_one_line_naming_it(monkeypatch, raw):
    monkeypatch.setenv(timeouts.ENV, raw)
    with pytest.raises(UserError, match=rf"^{timeouts.ENV}: '{raw}' is not valid"):
        timeouts.scaled(1)

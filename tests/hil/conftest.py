"""HIL tests share one connected station per session (see qkdlab.testing.hil).

The plugin is normally registered by the ``pytest11`` entry point; this conftest
registers it for runs without the entry point (``pytest tests/hil --hil lab.yaml``
still works, since this conftest then loads before the command line is parsed).
"""

from __future__ import annotations

import pytest

from qkdlab.testing import hil


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Register the HIL plugin unless the entry point or ``-p`` already did."""
    if not pluginmanager.is_registered(hil):
        pluginmanager.register(hil, hil.PLUGIN_NAME)


@pytest.fixture(autouse=True)
def _close_all_instruments() -> None:
    """Replaces tests/conftest.py's fixture of the same name here: HIL tests keep the
    session's station connected between tests (the plugin closes it at the end).  Tests
    in this folder that open instruments close them themselves."""

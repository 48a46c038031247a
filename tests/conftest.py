"""Shared fixtures: instruments closed between tests, mock servers torn down."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# pyvisa-py for every resource: without it each ResourceManager first looks for an
# IVI VISA library (0.3-0.5 s per instrument) that a CI machine does not have
os.environ.setdefault("PYVISA_LIBRARY", "@py")
from qcodes.instrument import Instrument


@pytest.fixture(autouse=True)
def _close_all_instruments() -> Iterator[None]:
    """Close every QCoDeS instrument a test opened (as QCoDeS' own suite does)."""
    yield
    Instrument.close_all()


@pytest.fixture(autouse=True)
def _qcodes_db_in_tmp(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Point QCoDeS' database at a per-session temporary folder, never ~/experiments.db."""
    import qcodes

    db = tmp_path_factory.getbasetemp() / "experiments.db"
    monkeypatch.setitem(qcodes.config.core, "db_location", str(db))


@pytest.fixture
def expected_protocol() -> Iterator[object]:
    """``expected_protocol(DriverClass, [(command, reply_or_None), ...], **kwargs)``.

    A context manager (PyMeasure's idea, over our real TCP transport): the driver is
    built against a scripted SCPI peer and must send exactly the listed lines, in
    order; on exit every exchange must have happened.  ``reply`` None means no reply.
    """
    from contextlib import contextmanager

    from qkdlab.mock_instruments.server import ScriptedScpiServer

    servers: list[ScriptedScpiServer] = []

    @contextmanager
    def run(
        driver_cls: type[Instrument], script: list[tuple[str, str | None]], **kwargs: object
    ) -> Iterator[Instrument]:
        server = ScriptedScpiServer(script)
        server.start()
        servers.append(server)
        instrument = driver_cls("dut", address=server.address, **kwargs)  # type: ignore[call-arg]
        try:
            yield instrument
        finally:
            instrument.close()
        server.check_complete()

    yield run
    for server in servers:
        server.stop()

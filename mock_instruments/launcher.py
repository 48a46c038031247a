"""Start the mock instruments of a station around one shared bench model.

An address ``mock://<vendor>/<model>[?key=value&...]`` in a station file names a
mock from :data:`MOCKS`; :class:`MockLauncher` starts it (threads, in-process) and
returns the real address a driver connects to (``TCPIP::127.0.0.1::<port>::SOCKET``
or ``socket://127.0.0.1:<port>``).  ``qkdlab mock serve`` runs the same launcher in
its own process.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from qkdlab.mock_instruments.server.faults import FaultInjector

log = logging.getLogger(__name__)

MOCK_SCHEME = "mock://"

# model key -> "module:factory"; a factory is ``(name, bench, options) -> TcpServer``.
# Imported lazily so that starting one mock does not import every other.
MOCKS: dict[str, str] = {
    "thorlabs/itc4001": "qkdlab.mock_instruments.thorlabs.itc4001:serve",
    "thorlabs/mbx": "qkdlab.mock_instruments.thorlabs.mbx:serve",
    "oif/itla": "qkdlab.mock_instruments.oif.itla:serve",
    "fpga/pattern_generator": "qkdlab.mock_instruments.fpga.pattern_generator:serve",
    "keysight/33500b": "qkdlab.mock_instruments.keysight.awg33500b:serve",
    "idquantique/id120": "qkdlab.mock_instruments.idquantique.id120:serve",
    "idquantique/id900": "qkdlab.mock_instruments.idquantique.time_controller:serve",
    "idquantique/id1000": "qkdlab.mock_instruments.idquantique.time_controller:serve",
    "thorlabs/ell14": "qkdlab.mock_instruments.thorlabs.ell14:serve",
    "thorlabs/pm100d": "qkdlab.mock_instruments.thorlabs.pm100d:serve",
    "singlequantum/snspd": "qkdlab.mock_instruments.singlequantum.snspd:serve",
    # vendor libraries, not transports: the driver gets the fake library in-process
    "swabian/ultra": "qkdlab.mock_instruments.swabian.launch:serve_ultra",
    "swabian/tt20": "qkdlab.mock_instruments.swabian.launch:serve_tt20",
    # PTU files replayed by the vendor's snAPI as a file device
    "picoquant/hydraharp": "qkdlab.mock_instruments.picoquant.ptu:serve_hydraharp",
    "picoquant/multiharp150": "qkdlab.mock_instruments.picoquant.ptu:serve_multiharp150",
    "picoquant/multiharp160": "qkdlab.mock_instruments.picoquant.ptu:serve_multiharp160",
}

class MockServer(Protocol):
    """What the launcher needs of a mock: a TCP server, or an in-process fake library
    that also has ``driver_kwargs`` (handed to the driver instead of an address)."""

    faults: FaultInjector

    @property
    def address(self) -> str: ...

    def start(self) -> Any: ...

    def stop(self) -> None: ...


MockFactory = Callable[[str, Any, Mapping[str, str]], MockServer]


class MockAddressError(ValueError):
    """A ``mock://`` address that names no known mock or has bad options."""


@dataclass(frozen=True)
class MockAddress:
    """A parsed ``mock://vendor/model?options`` address."""

    model: str
    options: dict[str, str]

    @classmethod
    def parse(cls, address: str) -> MockAddress:
        if not address.startswith(MOCK_SCHEME):
            raise MockAddressError(f"{address!r} is not a {MOCK_SCHEME} address")
        parts = urlsplit(address)
        model = f"{parts.netloc}{parts.path}".strip("/").lower()
        if model not in MOCKS:
            known = ", ".join(sorted(MOCKS))
            raise MockAddressError(f"no mock for {model!r} (known mocks: {known})")
        return cls(model=model, options=dict(parse_qsl(parts.query)))


def is_mock_address(address: object) -> bool:
    """True for addresses the mock bench serves."""
    return isinstance(address, str) and address.startswith(MOCK_SCHEME)


def _factory(model: str) -> MockFactory:
    module_name, _, attr = MOCKS[model].partition(":")
    factory: MockFactory = getattr(importlib.import_module(module_name), attr)
    return factory


class MockLauncher:
    """Owns the bench model and the servers of every mock instrument started from it.

    Args:
        seed: seeds the bench; the same seed and the same calls give the same tags.
        bench_overrides: nested mapping of bench parameters to change from their
            defaults (e.g. ``{"channel": {"length_km": 50}}``).
    """

    def __init__(self, seed: int = 0, bench_overrides: Mapping[str, Any] | None = None) -> None:
        from qkdlab.mock_instruments.bench import Bench, config_from_mapping

        self.seed = seed
        self.bench_overrides: dict[str, Any] = dict(bench_overrides or {})
        """What the bench was built with (the station's ``mock_bench`` and any extras)."""
        self.bench = Bench(config_from_mapping(bench_overrides or {}), seed=seed)
        self.servers: dict[str, MockServer] = {}
        self.models: dict[str, str] = {}
        self.driver_kwargs: dict[str, dict[str, Any]] = {}

    def start(self, name: str, address: str) -> str:
        """Start the mock named by ``address`` for instrument ``name``; its real address."""
        if name in self.servers:
            raise MockAddressError(f"a mock named {name!r} is already running")
        parsed = MockAddress.parse(address)
        server = _factory(parsed.model)(name, self.bench, parsed.options)
        server.start()
        self.servers[name] = server
        self.models[name] = parsed.model
        kwargs = getattr(server, "driver_kwargs", None)
        if kwargs is not None:
            self.driver_kwargs[name] = dict(kwargs)
        real = server.address
        log.info("mock %s (%s) serving at %s", name, parsed.model, real)
        return real

    def address(self, name: str) -> str:
        """Real address of a started mock."""
        return self.servers[name].address

    def stop(self) -> None:
        """Stop every server (idempotent)."""
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def __enter__(self) -> MockLauncher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

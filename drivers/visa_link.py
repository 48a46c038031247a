"""A VISA link that survives a dropped connection or a late reply (mixin for drivers).

pyvisa-py reports a socket closed by the peer as a read timeout, and a reply that
arrives after its timeout would answer the next query.  So on a timeout or a lost link
the driver reopens the link (which discards any late reply), checks it with ``*IDN?``
and retries the command once; errors name the instrument and the command.  Only for
drivers whose every query is free of side effects and every write sets an absolute
state, so that one retry is safe.

Use: ``class Driver(ReconnectingVisaLink, VisaInstrument)``; call
:meth:`init_link` from ``__init__`` and set the two error classes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import pyvisa.errors
from pyvisa import constants as visa_constants
from qcodes.instrument import VisaInstrument

_T = TypeVar("_T")

LINK_LOST = {
    visa_constants.StatusCode.error_connection_lost,
    visa_constants.StatusCode.error_io,
    visa_constants.StatusCode.error_resource_not_found,
    visa_constants.StatusCode.error_invalid_object,
    visa_constants.StatusCode.error_closing_failed,
}
"""pyvisa status codes meaning "the link is gone" (as opposed to "no reply in time")."""
TIMEOUT = visa_constants.StatusCode.error_timeout


def describe(err: Exception) -> str:
    """A short cause for an error message."""
    if isinstance(err, pyvisa.errors.VisaIOError) and err.error_code == TIMEOUT:
        return "no reply in time"
    return f"link error ({err})"


class ReconnectingVisaLink:
    """Reconnect-and-retry-once for a :class:`~qcodes.instrument.VisaInstrument`."""

    error_cls: ClassVar[type[Exception]] = RuntimeError
    """Raised for a garbled reply."""
    communication_error_cls: ClassVar[type[Exception]] = RuntimeError
    """Raised when the instrument does not answer, even after reconnecting."""
    RECONNECT_TIMEOUT_S: ClassVar[float] = 3.0

    # provided by VisaInstrument
    visa_handle: Any
    visa_log: Any
    full_name: str
    default_terminator: str | None
    set_address: Callable[..., None]
    set_terminator: Callable[[str | None], None]
    timeout: Any

    def init_link(self, address: str, kwargs: dict[str, Any]) -> None:
        """Remember how to reopen the link (call before ``VisaInstrument.__init__``)."""
        self._visalib: str | None = kwargs.get("visalib")
        self._reconnectable = kwargs.get("pyvisa_sim_file") is None
        self._reconnect_address = address
        self._link_generation = 0
        """+1 whenever a new link replaces the old one (lost writes can be detected)."""
        self.reconnect_timeout_s = self.RECONNECT_TIMEOUT_S

    def write_raw(self, cmd: str) -> None:
        self._with_link(cmd, lambda: super(ReconnectingVisaLink, self).write_raw(cmd))  # type: ignore[misc]

    def ask_raw(self, cmd: str) -> str:
        return self._with_link(cmd, lambda: super(ReconnectingVisaLink, self).ask_raw(cmd))  # type: ignore[misc]

    def reconnect(self, timeout_s: float | None = None) -> None:
        """Reopen the VISA link until the instrument answers ``*IDN?``.

        Retries for up to ``timeout_s`` (default :attr:`reconnect_timeout_s`) s; the
        terminator and timeout are restored on the new link.
        """
        address = self._reconnect_address
        timeout_s = self.reconnect_timeout_s if timeout_s is None else timeout_s
        visa_timeout_ms = self.visa_handle.timeout
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._reopen(visa_timeout_ms)
                # a listener that accepts and closes at once looks connected: only a
                # reply proves the link
                VisaInstrument.ask_raw(self, "*IDN?")  # type: ignore[arg-type]
                return
            except (pyvisa.errors.VisaIOError, OSError, UnicodeDecodeError) as err:
                if time.monotonic() >= deadline:
                    self._drop_late_reply()  # a fresh link, not one with a probe pending
                    raise self.communication_error_cls(
                        f"{self.full_name}: could not re-establish the link to {address} "
                        f"within {timeout_s} s ({err})"
                    ) from err
                time.sleep(0.05)

    def _with_link(self, cmd: str, operation: Callable[[], _T]) -> _T:
        """Run one exchange; on a lost link or timeout reconnect once and retry."""
        try:
            return operation()
        except UnicodeDecodeError as err:
            raise self.error_cls(
                f"{self.full_name}: garbled reply to {cmd!r} ({err.object!r})") from err
        except pyvisa.errors.VisaIOError as err:
            recoverable = err.error_code in LINK_LOST or err.error_code == TIMEOUT
            if not (recoverable and self._reconnectable):
                raise self.communication_error_cls(
                    f"{self.full_name}: {describe(err)} on {cmd!r} (timeout {self.timeout()} s)"
                ) from err
            first_error: Exception = err
        except OSError as err:  # connection reset / broken pipe from the socket layer
            if not self._reconnectable:
                raise self.communication_error_cls(
                    f"{self.full_name}: link lost on {cmd!r}: {err}") from err
            first_error = err
        self.visa_log.warning(f"{describe(first_error)} on {cmd!r}; reconnecting")
        try:
            self.reconnect()
        except self.communication_error_cls as err:
            raise self.communication_error_cls(
                f"{self.full_name}: {describe(first_error)} on {cmd!r} "
                f"(timeout {self.timeout()} s); {err}"
            ) from first_error
        try:
            return operation()
        except UnicodeDecodeError as err:
            raise self.error_cls(
                f"{self.full_name}: garbled reply to {cmd!r} ({err.object!r})") from err
        except (pyvisa.errors.VisaIOError, OSError) as err:
            self._drop_late_reply()
            raise self.communication_error_cls(
                f"{self.full_name}: {describe(err)} on {cmd!r} (timeout {self.timeout()} s), "
                "again after reconnecting"
            ) from err

    def _reopen(self, visa_timeout_ms: Any) -> None:
        self.set_address(self._reconnect_address, self._visalib)
        self.set_terminator(self.default_terminator)
        self.visa_handle.timeout = visa_timeout_ms
        self._link_generation += 1

    def _drop_late_reply(self) -> None:
        """Reopen the link without waiting for an answer, so a late reply is discarded."""
        try:
            self._reopen(self.visa_handle.timeout)
        except (pyvisa.errors.VisaIOError, OSError):
            self.visa_log.warning("could not reopen the link")

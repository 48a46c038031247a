"""A VISA link that survives a dropped connection or a late reply (mixin for drivers).

pyvisa-py reports a socket closed by the peer as a read timeout, and a reply that
arrives after its timeout would answer the next query.  So after a timeout or a lost
link the driver reopens the link (which drops a late reply on a socket; a driver's
:meth:`ReconnectingVisaLink._on_reopen` hook can clear the device too) and proves it
with a probe query, reading past any stale reply until the probe's own answer comes.
Errors name the instrument and the command.

What happens to the command that failed is the driver's choice, :attr:`RETRY_ONCE`:

* ``True``: reconnect at once (for up to :attr:`reconnect_timeout_s`) and send the
  command once more.  Only for drivers whose every query is free of side effects and
  every write sets an absolute state, so that one retry is safe.
* ``False``: raise the driver's communication error; nothing is ever resent.  The
  next command first re-establishes the link with a single attempt (raising if that
  fails); :meth:`ReconnectingVisaLink.reconnect` waits for an instrument that is
  still away.

Either way, after a failure that was not recovered the next command starts on a new,
proven link (with ``RETRY_ONCE`` by :meth:`ReconnectingVisaLink.reconnect`), so a
late reply never answers it.

Use: ``class Driver(ReconnectingVisaLink, VisaInstrument)``; call :meth:`init_link`
from ``__init__`` before ``VisaInstrument.__init__``, and set the two error classes.
"""

from __future__ import annotations

import contextlib
import math
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
MAX_STALE_REPLIES = 64
"""Most replies a probe reads past before giving up on the link."""


def describe(err: Exception) -> str:
    """A short cause for an error message."""
    if isinstance(err, pyvisa.errors.VisaIOError) and err.error_code == TIMEOUT:
        return "no reply in time"
    if isinstance(err, pyvisa.errors.InvalidSession):
        return "link closed (not re-established)"
    return f"link error ({err})"


class _UnexpectedProbeReplyError(Exception):
    """The link answered the probe with something else (another instrument?)."""


class ReconnectingVisaLink:
    """Reconnect (and, where safe, retry once) for a :class:`~qcodes.instrument.VisaInstrument`."""

    error_cls: ClassVar[type[Exception]] = RuntimeError
    """Raised for a garbled reply."""
    communication_error_cls: ClassVar[type[Exception]] = RuntimeError
    """Raised when the instrument does not answer (after reconnecting, if it retries)."""
    RECONNECT_TIMEOUT_S: ClassVar[float] = 3.0
    """Default of :attr:`reconnect_timeout_s` (s)."""
    RECONNECT_WAIT_S: ClassVar[float] = 0.05
    """Default pause between two reconnect attempts (s)."""
    RETRY_ONCE: ClassVar[bool] = True
    """Resend a command that met a timeout or a lost link once, after reconnecting."""
    LINK_PROBE: ClassVar[str] = "*IDN?"
    """Query that proves a (re)opened link; :meth:`_link_answers` judges its reply."""

    # provided by VisaInstrument
    visa_handle: Any
    visa_log: Any
    log: Any
    full_name: str
    default_terminator: str | None
    set_address: Callable[..., None]

    def init_link(self, address: str, kwargs: dict[str, Any]) -> None:
        """Remember how to reopen the link (call before ``VisaInstrument.__init__``)."""
        self._visalib: str | None = kwargs.get("visalib")
        self._sim = kwargs.get("pyvisa_sim_file") is not None
        self._reconnectable = not self._sim
        self._reconnect_address = address
        self._link_generation = 0
        """+1 whenever a new link replaces the old one (lost writes can be detected)."""
        self._link_unproven = False
        """True after a failure not recovered: the next command re-establishes the link."""
        self._link_settings: tuple[str | None, str | None, Any] = (
            self.default_terminator, self.default_terminator, None)
        self.reconnect_timeout_s = self.RECONNECT_TIMEOUT_S

    # -- hooks for drivers ----------------------------------------------------------------
    def _on_reopen(self) -> None:
        """Called on every newly opened link, before the probe (e.g. a device clear)."""

    def _link_answers(self, reply: str) -> bool:
        """True if ``reply`` is the instrument's answer to :attr:`LINK_PROBE`."""
        return True

    # -- transport ------------------------------------------------------------------------
    def write_raw(self, cmd: str) -> None:
        self._with_link(cmd, lambda: super(ReconnectingVisaLink, self).write_raw(cmd))  # type: ignore[misc]

    def ask_raw(self, cmd: str) -> str:
        return self._with_link(cmd, lambda: super(ReconnectingVisaLink, self).ask_raw(cmd))  # type: ignore[misc]

    def reconnect(self, timeout_s: float | None = None, *, attempts: int | None = None,
                  wait_s: float | None = None) -> None:
        """Reopen the VISA link until the instrument answers :attr:`LINK_PROBE`.

        Tries until ``timeout_s`` (s) have passed or ``attempts`` attempts were made,
        whichever comes first (neither given: :attr:`reconnect_timeout_s`), ``wait_s``
        (s, default :attr:`RECONNECT_WAIT_S`) apart.  Terminators and timeout carry
        over to the new link.  Raises the driver's communication error if it fails.
        """
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"{self.full_name}.reconnect: timeout_s must be > 0 s, "
                             f"got {timeout_s!r}")
        if attempts is not None and attempts < 1:
            raise ValueError(f"{self.full_name}.reconnect: attempts must be >= 1, "
                             f"got {attempts!r}")
        if wait_s is not None and not 0 <= wait_s <= 60:
            raise ValueError(f"{self.full_name}.reconnect: wait_s must be in [0, 60] s, "
                             f"got {wait_s!r}")
        if timeout_s is None and attempts is None:
            timeout_s = self.reconnect_timeout_s
        wait_s = self.RECONNECT_WAIT_S if wait_s is None else wait_s
        start = time.monotonic()
        made = 0
        while True:
            made += 1
            try:
                self._reopen_and_probe()
            except (pyvisa.errors.Error, OSError, UnicodeDecodeError,
                    _UnexpectedProbeReplyError) as err:
                out_of_attempts = attempts is not None and made >= attempts
                out_of_time = timeout_s is not None and time.monotonic() - start >= timeout_s
                if not (out_of_attempts or out_of_time):
                    time.sleep(wait_s)
                    continue
                self._link_unproven = True  # the next command starts on a fresh link
                raise self.communication_error_cls(
                    f"{self.full_name}: could not reconnect to {self._reconnect_address} "
                    f"({made} attempt(s) in {time.monotonic() - start:.2f} s): {err}"
                ) from err
            self._link_unproven = False
            self.log.info(f"reconnected to {self._reconnect_address} after {made} attempt(s)")
            return

    def _with_link(self, cmd: str, operation: Callable[[], _T]) -> _T:
        """Run one exchange; on a lost link or timeout reconnect (and retry once if safe)."""
        if self._link_unproven:
            self._reestablish_before(cmd)
        try:
            return self._once(cmd, operation)
        except (pyvisa.errors.Error, OSError) as err:
            first_error: Exception = err
        if not self.RETRY_ONCE:
            self._link_unproven = True
            raise self.communication_error_cls(
                f"{self.full_name}: {describe(first_error)} on {cmd!r} ({self._timeout_text()}); "
                "not resent: the next command re-establishes the link first"
            ) from first_error
        self.visa_log.warning(f"{describe(first_error)} on {cmd!r}; reconnecting")
        try:
            self.reconnect()
        except self.communication_error_cls as err:
            raise self.communication_error_cls(
                f"{self.full_name}: {describe(first_error)} on {cmd!r} "
                f"({self._timeout_text()}); {err}"
            ) from first_error
        try:
            return self._once(cmd, operation)
        except (pyvisa.errors.Error, OSError) as err:
            self._link_unproven = True  # a late reply must not answer the next command
            raise self.communication_error_cls(
                f"{self.full_name}: {describe(err)} on {cmd!r} ({self._timeout_text()}), "
                "again after reconnecting"
            ) from err

    def _once(self, cmd: str, operation: Callable[[], _T]) -> _T:
        """One exchange: a garbled reply or an unrecoverable error raises the driver's
        error; a timeout or a lost link is re-raised for the caller to recover."""
        try:
            return operation()
        except UnicodeDecodeError as err:
            raise self.error_cls(
                f"{self.full_name}: garbled reply to {cmd!r} ({err.object!r})") from err
        except pyvisa.errors.VisaIOError as err:
            recoverable = err.error_code in LINK_LOST or err.error_code == TIMEOUT
            if recoverable and self._reconnectable:
                raise
            raise self.communication_error_cls(
                f"{self.full_name}: {describe(err)} on {cmd!r} ({self._timeout_text()})"
            ) from err
        except (pyvisa.errors.InvalidSession, OSError) as err:
            # a closed handle (a reopen failed) or the socket layer's reset / broken pipe
            if self._reconnectable:
                raise
            raise self.communication_error_cls(
                f"{self.full_name}: link lost on {cmd!r}: {err}") from err

    def ensure_link(self, before: str) -> None:
        """Re-establish the link now if the last failure left it unproven (as the next
        command would), e.g. before a sequence that watches :attr:`_link_generation`."""
        if self._link_unproven:
            self._reestablish_before(before)

    def _reestablish_before(self, cmd: str) -> None:
        """Reopen and prove the link before ``cmd`` after a failure: by :meth:`reconnect`
        if the driver retries, else in a single attempt."""
        try:
            if self.RETRY_ONCE:
                self.reconnect()
            else:
                self._reopen_and_probe()
        except (self.communication_error_cls, pyvisa.errors.Error, OSError,
                UnicodeDecodeError, _UnexpectedProbeReplyError) as err:
            raise self.communication_error_cls(
                f"{self.full_name}: link not re-established before {cmd!r}: {err}"
                + ("" if self.RETRY_ONCE else "; call reconnect() to wait for the instrument")
            ) from err
        self._link_unproven = False

    def _reopen_and_probe(self) -> None:
        """Open a new link, run :meth:`_on_reopen`, and ask :attr:`LINK_PROBE`, reading
        past stale replies until one that :meth:`_link_answers` accepts."""
        self._reopen()
        # a listener that accepts and closes at once looks connected: only a reply
        # proves the link
        reply = VisaInstrument.ask_raw(self, self.LINK_PROBE)  # type: ignore[arg-type]
        for _ in range(MAX_STALE_REPLIES):
            if self._link_answers(reply):
                return
            self.visa_log.info(f"dropping {reply!r} while waiting for the probe's reply")
            try:
                reply = self.visa_handle.read()
            except pyvisa.errors.VisaIOError as err:
                raise _UnexpectedProbeReplyError(
                    f"unexpected reply {reply!r} to {self.LINK_PROBE!r}") from err
        raise _UnexpectedProbeReplyError(
            f"no answer to {self.LINK_PROBE!r} among {MAX_STALE_REPLIES} replies")

    def _reopen(self) -> None:
        """Close the link and open a new one with the same terminators and timeout."""
        read_term, write_term, timeout_ms = self._current_link_settings()
        visalib = self._visalib
        if self._sim:
            visalib = f"{self.visa_handle.visalib.library_path}@sim"
        self.set_address(self._reconnect_address, visalib)
        self._link_generation += 1
        handle = self.visa_handle
        handle.read_termination = read_term
        handle.write_termination = write_term
        if timeout_ms is not None:
            handle.timeout = timeout_ms
        self._on_reopen()

    def _current_link_settings(self) -> tuple[str | None, str | None, Any]:
        """Terminators and timeout (ms) of the link; the last known ones if it is closed."""
        handle = self.visa_handle
        with contextlib.suppress(pyvisa.errors.Error):  # closed: keep the last known
            self._link_settings = (handle.read_termination, handle.write_termination,
                                   handle.timeout)
        return self._link_settings

    def _timeout_text(self) -> str:
        timeout_ms = self._current_link_settings()[2]
        if timeout_ms is None:
            return "timeout unknown"
        if math.isinf(timeout_ms):
            return "no timeout"
        return f"timeout {timeout_ms / 1000:g} s"

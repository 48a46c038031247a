"""Thorlabs PM100D power meter: ``qcodes_contrib_drivers``' driver behind the PowerMeter role.

The instrument driver is ``qcodes_contrib_drivers.drivers.Thorlabs.PM100D.Thorlab_PM100D``
(package ``qcodes_contrib_drivers`` 0.24.x), used as it is; this module only subclasses
it to satisfy :class:`qkdlab.drivers.roles.PowerMeter` and to repair three parameters
whose upstream definitions cannot work against the instrument:

==================  =====================================  ===========================
Parameter           Upstream (0.24.1)                      Here
==================  =====================================  ===========================
``averaging``       ``set_cmd='AVER'`` sends no value;     ``SENS:AVER:COUN <n>`` /
                    ``AVER?`` returns a string             ``SENS:AVER:COUN?``, int
``wavelength``      ``SENS:CORR:WAV?`` reply (a string)    reply parsed as float, nm
                    is divided by ``scale`` → TypeError    → m as upstream
``beam_diameter``   same with ``CORR:BEAM?`` (mm → m)      reply parsed as float
==================  =====================================  ===========================

Upstream's constructor still sends the bare ``AVER`` (the meter queues ``-109,"Missing
parameter"``); :class:`ThorlabsPM100D` reads that entry off the error queue, logs it,
and then sets the averaging it was asked for.  Upstream's constructor also sleeps about
5.4 s (status filter set-up) and each ``power`` read about 0.2 s — the instrument's own
pace as upstream chose it.

Commands, all from the *PM100D Operation Manual*, chapter 6.4 "PM100D SCPI Commands"
(6.4.1 syntax, 6.4.2.2 reference; see :mod:`qkdlab.mock_instruments.thorlabs.pm100d`
for which pages could be read):

==========================  ==============================================  ============
Member                      Command(s)                                      from
==========================  ==============================================  ============
construction                ``STAT:OPER:PTR 512``, ``STAT:OPER:NTR 0``,     upstream
                            ``STAT:OPER?``, ``AVER``, ``CONF:POW``,
                            ``ABOR;:STAT:OPER?``, ``INIT``, ``*IDN?``
                            then ``SYST:ERR?`` (drain), ``SENS:AVER:COUN``  adapter
``power`` (W),              ``CONF:POW``, ``ABOR;:STAT:OPER?``, ``INIT``,   upstream
``read_power_w()``          ``MEAS:POW``, ``FETC?``
``averaging``               ``SENS:AVER:COUN? / <n>``                       adapter
``wavelength`` (m)          ``SENS:CORR:WAV? / <nm>``                       upstream+fix
``attenuation`` (dB)        ``CORR? / CORR <dB>``                           upstream
``power_range`` (W)         ``SENS:POW:RANG:UPP? / <W>``                    upstream
``auto_range``              ``SENS:POW:RANG:AUTO? / 0|1``                   upstream
``frequency`` (Hz)          ``MEAS:FREQ?``                                  upstream
``current`` (A)             ``MEAS:CURR?``                                  upstream
``current_range`` (A)       ``SENS:CURR:RANG:UPP?``                         upstream
``zero_value`` (W)          ``CORR:COLL:ZERO:MAGN?``                        upstream
``beam_diameter`` (m)       ``CORR:BEAM? / <mm>``                           upstream+fix
``zero()``                  ``CORR:COLL:ZERO``                              adapter
``reset()``                 ``*RST`` (6.4.2.2.4)                            adapter
``error_queue()``           ``SYST:ERR?`` until ``+0``                      adapter
==========================  ==============================================  ============

A PM100D is never unsafe to leave as it is; the role has no ``safe_state``.

Communication faults
--------------------
The link is :class:`~qkdlab.drivers.visa_link.ReconnectingVisaLink`'s, **without the
automatic retry** (``RETRY_ONCE = False``): a reply timeout or a lost link raises
:class:`PM100DCommunicationError` naming the instrument and the command ("no reply in
time on '<command>'"), an unreadable reply likewise ("garbled reply to
'<command>'"); QCoDeS appends ``"asking '<command>' to <ThorlabsPM100D: name>"``.
Nothing is resent, because a retry is not safe here:

* A power reading is a sequence (``CONF:POW``, ``ABOR;:STAT:OPER?``, ``INIT``,
  ``MEAS:POW``, then ``FETC?``) and writes are not acknowledged: after a lost link a
  resent ``FETC?`` would return a reading that the lost ``INIT``/``MEAS:POW`` never
  started — a stale value, from before the drop or from another configuration.
* ``STAT:OPER?`` clears the event register and ``SYST:ERR?`` removes the entry it
  reports: a query resent after its reply was lost loses that information.
* ``CORR:COLL:ZERO`` (zeroing) and ``*RST`` are actions, not absolute settings.

The next command after a failure first reopens the link once (``*IDN?`` read up to the
``THORLABS`` reply, so a late reply never answers it) and raises if the meter is not
back; :meth:`ThorlabsPM100D.reconnect` waits for it (up to ``reconnect_timeout_s``, or
``attempts``/``wait_s``).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from qcodes import validators as vals
from qcodes.parameters import Parameter
from qcodes_contrib_drivers.drivers.Thorlabs.PM100D import Thorlab_PM100D

from qkdlab.drivers.scpi_errors import (
    MalformedErrorReplyError,
    drain_error_queue,
    harden_reply_parsers,
)
from qkdlab.drivers.visa_link import ReconnectingVisaLink

AVERAGING_RANGE = (1, 10000)
"""Averaging counts the adapter accepts (samples per reading)."""


class PM100DError(Exception):
    """The meter reported errors (in :attr:`errors`), or could not be reached."""

    def __init__(self, message: str, errors: list[tuple[int, str]] | None = None) -> None:
        super().__init__(message)
        self.errors = list(errors or [])


class PM100DCommunicationError(PM100DError):
    """No reply in time, an unreadable reply, or a lost link not re-established."""


class ThorlabsPM100D(ReconnectingVisaLink, Thorlab_PM100D):
    """Thorlabs PM100D console (``Thorlab_PM100D`` from ``qcodes_contrib_drivers``).

    Satisfies :class:`qkdlab.drivers.roles.PowerMeter`.

    Args:
        name: QCoDeS instrument name.
        address: VISA resource (``USB0::0x1313::0x8078::<serial>::INSTR``; the mock:
            ``TCPIP::127.0.0.1::<port>::SOCKET``).
        averaging: samples averaged per reading, set after upstream's construction.
        settle_s: wait after arming the status transition filters at connection; upstream
            sleeps 5 s unconditionally, which a mock (or a meter known to be idle) does
            not need.
        **kwargs: forwarded to ``Thorlab_PM100D`` (``terminator``, ``timeout`` in s,
            ``visalib``, ``pyvisa_sim_file``, ...).
    """

    error_cls: ClassVar[type[Exception]] = PM100DCommunicationError
    communication_error_cls: ClassVar[type[Exception]] = PM100DCommunicationError
    RETRY_ONCE: ClassVar[bool] = False
    """Never resend a failed command (module docstring, "Communication faults")."""

    def __init__(self, name: str, address: str, *, averaging: int = 300,
                 settle_s: float = 5.0, **kwargs: Any) -> None:
        lo, hi = AVERAGING_RANGE
        if not lo <= averaging <= hi:
            raise ValueError(f"averaging must be in [{lo}, {hi}], got {averaging!r}")
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0 s, got {settle_s!r}")
        self._settle_s = float(settle_s)
        self.init_link(address, dict(kwargs))
        super().__init__(name, address, **kwargs)
        stale = self.error_queue()
        if stale:
            self.log.info(f"errors queued during construction (upstream's bare 'AVER'): {stale}")

        # -- repaired upstream parameters ---------------------------------------------
        self.remove_parameter("averaging")
        self.averaging: Parameter = self.add_parameter(
            "averaging",
            label="Averaging count",
            unit="",
            get_cmd="SENS:AVER:COUN?",
            get_parser=lambda reply: round(float(reply)),
            set_cmd="SENS:AVER:COUN {:d}",
            vals=vals.Ints(lo, hi),
            docstring=(
                "Samples averaged per reading ([SENSe:]AVERage[:COUNt], manual 6.4); "
                "replaces upstream's parameter, whose set sends no value."
            ),
        )
        """Samples averaged per reading."""
        self.wavelength.get_parser = float  # upstream divides the raw reply string by 1e9
        self.beam_diameter.get_parser = float
        harden_reply_parsers(self)  # garbage replies: a clear error, never NaN (scpi_errors)
        self.averaging(averaging)

    # -- PowerMeter role ------------------------------------------------------------------
    def _set_transition_filter(self, positive: int, negative: int) -> None:
        """Upstream's sequence (``STAT:OPER:PTR/NTR`` then read the register to clear it)
        with its unconditional 5 s wait replaced by ``settle_s``."""
        self.write(f"STAT:OPER:PTR {positive}")
        time.sleep(min(0.2, self._settle_s))
        self.write(f"STAT:OPER:NTR {negative}")
        time.sleep(self._settle_s)
        self.ask("STAT:OPER?")
        time.sleep(min(0.2, self._settle_s))

    def read_power_w(self) -> float:
        """Optical power (W): a fresh measurement through upstream's ``power``."""
        return float(self.power.get())

    # -- small additions ------------------------------------------------------------------
    def zero(self) -> None:
        """Zero adjustment (``CORR:COLL:ZERO``); cover the sensor first."""
        self.write("CORR:COLL:ZERO")
        self.zero_value.cache.invalidate()

    def reset(self) -> None:
        """``*RST`` (manual 6.4.2.2.4): defaults restored; caches cleared."""
        self.write("*RST")
        for parameter in self.parameters.values():
            if parameter.gettable and parameter.name not in ("IDN", "timeout"):
                parameter.cache.invalidate()

    def error_queue(self, max_reads: int = 32) -> list[tuple[int, str]]:
        """Read and empty the error queue: ``[(code, message), ...]``, oldest first."""
        try:
            errors, emptied = drain_error_queue(self.ask, "SYST:ERR?", max_reads)
        except MalformedErrorReplyError as err:
            raise PM100DError(
                f"{self.name}: reply {err.reply!r} to 'SYST:ERR?' is not '<code>,\"<message>\"'"
            ) from None
        if not emptied:
            raise PM100DError(f"{self.name}: error queue not empty after {max_reads} reads",
                              errors)
        return errors

    def check_errors(self) -> None:
        """Raise :class:`PM100DError` if the meter queued any error."""
        errors = self.error_queue()
        if errors:
            listed = "; ".join(f'{code},"{message}"' for code, message in errors)
            raise PM100DError(f"{self.name} reported error(s): {listed}", errors)

    def _link_answers(self, reply: str) -> bool:
        """The probe (``*IDN?``) is answered by a Thorlabs meter (ReconnectingVisaLink hook)."""
        return reply.upper().startswith("THORLABS")

"""qkdlab: drive, simulate, calibrate and run quantum key distribution benches.

The package is split by job (see ``docs/decisions`` and ``DESIGN.md``):
``qkdlab.drivers`` (instruments), ``qkdlab.mock_instruments`` (hardware-free
twins), ``qkdlab.experiments``, ``qkdlab.calibration``, ``qkdlab.protocol``
(pure post-processing math) and ``qkdlab.gui``.  This module stays light: it
imports nothing heavy so that ``import qkdlab.protocol`` costs only numpy.
"""

__version__ = "0.1.0"

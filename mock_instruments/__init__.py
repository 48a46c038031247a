"""Hardware-free twins of the bench instruments, served over real transports.

``qkdlab.mock_instruments.bench`` is the seeded physics model of the whole bench;
``qkdlab.mock_instruments.server`` serves mock instruments over TCP sockets
(SCPI as pyvisa ``TCPIP::...::SOCKET`` resources, raw bytes as pyserial
``socket://`` URLs).  Nothing here imports ``qkdlab.drivers``: the drivers reach
the mocks only through their transports.
"""

"""Testing aids that ship with qkdlab: the hardware-in-the-loop pytest plugin
(:mod:`qkdlab.testing.hil`), its tolerances (:mod:`qkdlab.testing.tolerances`), the
snapshot-and-restore of instrument settings around light tests
(:mod:`qkdlab.testing.state`) and the out-of-process mock bench addressed like a lab
(:mod:`qkdlab.testing.mocklab`)."""

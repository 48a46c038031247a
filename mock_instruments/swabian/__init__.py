"""Fake of Swabian Instruments' Time Tagger Python library, backed by the bench model.

``fake_timetagger`` stands in for ``Swabian.TimeTagger`` (a vendor library, not a
network protocol): the driver takes the library as a module object, and tests pass
this fake instead.  See :mod:`qkdlab.mock_instruments.swabian.fake_timetagger`.
"""

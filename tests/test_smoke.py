import qkdlab


def test_version() -> None:
    assert qkdlab.__version__

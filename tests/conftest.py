"""Fixtures shared by the whole suite."""

from pathlib import Path

import pytest

from cognate.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory) -> Path:
    """The built-in synthetic curriculum, prepared once into short 64- and long 256-token rows."""
    out = tmp_path_factory.mktemp("builtin") / "data"
    prepare(PrepareConfig(out=out, builtin=True, short_len=64, long_len=256), log=lambda _: None)
    return out

"""Fixtures shared by the whole suite."""

import sys
from pathlib import Path

import pytest

# The model test helpers (`model_testing`) are shared by every test folder, whichever is collected first.
sys.path.insert(0, str(Path(__file__).parent / "model"))

from cognate.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory) -> Path:
    """The built-in synthetic curriculum, prepared once into short 64- and long 256-token rows."""
    out = tmp_path_factory.mktemp("builtin") / "data"
    prepare(PrepareConfig(out=out, builtin=True, short_len=64, long_len=256), log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def offline_one_thread():
    """One torch thread and no hub access for a module's tests (`pytestmark = usefixtures(...)`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)

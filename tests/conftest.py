"""Fixtures shared by the whole suite."""

import os
import sys
from pathlib import Path

import pytest

# The model test helpers (`model_testing`) are shared by every test folder, whichever is collected first.
sys.path.insert(0, str(Path(__file__).parent / "model"))

from cognate.data.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory) -> Path:
    """The built-in synthetic curriculum, prepared once into short 64- and long 256-token rows.

    With $COGNATE_TEST_BUILTIN_DATA set, it is prepared there once and reused by later sessions (preparing is
    deterministic): tools/mutation.py sets it, so that each mutant's test session skips the preparation."""
    cache = os.environ.get("COGNATE_TEST_BUILTIN_DATA")
    out = Path(cache) if cache else tmp_path_factory.mktemp("builtin") / "data"
    if not (out / "manifest.json").exists():
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

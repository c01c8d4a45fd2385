import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dreamer_atari as da  # noqa: E402

# Tiny sizes: a few hundred policy steps of real ALE SpaceInvaders run in seconds on 2 CPU cores.
TINY = dict(size="tiny", prefill=100, buffer_size=2000, log_seconds=0.5, eval_episodes=2)


@pytest.fixture
def tiny_args():
    def make(**overrides):
        return da.Args(**{**TINY, **overrides})

    return make


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own folder so that `runs/` never lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path

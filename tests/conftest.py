"""Session fixtures shared by the whole suite."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete random-weight `tiny` checkpoint directory, written once per test run."""
    from model.random_checkpoint import write_random_checkpoint
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0)

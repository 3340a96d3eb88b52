"""Session fixtures shared by the whole suite."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A complete random-weight `tiny` checkpoint directory, written once per test run."""
    from model.random_checkpoint import write_random_checkpoint
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


def rms_rel_err(actual, expected):
    """Per-tensor RMS of the difference relative to the RMS of the expected tensor."""
    diff = (actual.float() - expected.float()).pow(2).mean().sqrt()
    return float(diff / expected.float().pow(2).mean().sqrt().clamp_min(1e-12))


@pytest.fixture
def assert_rms_close():
    def check(actual, expected, tol, what=""):
        assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
        err = rms_rel_err(actual, expected)
        assert err <= tol, f"{what}: rms-relative error {err:.3g} > {tol}"
    return check

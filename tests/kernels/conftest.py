import pytest
import torch


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


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


TRITON_MODULES = ["triton.language", "triton.language.standard", "triton.language.math",
                  "kernels.delta_rule_triton", "kernels.conv_triton", "kernels.moe_triton", "kernels.norm_triton"]


@pytest.fixture(scope="module")
def interpreted():
    """Run this module's Triton kernels on CPU tensors under Triton's interpreter.

    TRITON_INTERPRET is read when `@triton.jit` decorates, so when another test imported triton
    first, our kernels and triton's own jit'd helpers (tl.sum, tl.cumsum...) are compiled-mode
    objects; each one is rewrapped from its Python source instead."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    patch = pytest.MonkeyPatch()
    patch.setenv("TRITON_INTERPRET", "1")
    for name in TRITON_MODULES:
        module = importlib.import_module(name)
        for attr, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                patch.setattr(module, attr, InterpretedFunction(obj.fn))
    yield
    patch.undo()

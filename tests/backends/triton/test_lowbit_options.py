"""The lowbit backend's options reach where they act: Inductor's settings and the option check."""
from __future__ import annotations

import pytest
import torch

from qcompile.backends.triton import dynamo
from qcompile.errors import QcompileError


def _patches_for(monkeypatch, options):
    import torch._inductor.compile_fx as cfx

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches or {})
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    torch._dynamo.reset()
    torch.compile(lambda x: torch.relu(x) + 1, backend="lowbit", options=options)(torch.ones(3))
    return seen


@pytest.mark.skipif(not hasattr(torch._inductor.config.triton, "enable_pdl"), reason="torch without Inductor PDL")
def test_inductor_pdl_is_on_by_default_and_can_be_turned_off(monkeypatch):
    assert dynamo.OPTIONS["inductor_pdl"] is True
    assert _patches_for(monkeypatch, None).get("triton.enable_pdl") is True
    assert "triton.enable_pdl" not in _patches_for(monkeypatch, {"inductor_pdl": False})


def test_unknown_option_is_a_clear_error():
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unknown option") as info:  # dynamo wraps the backend's error
        torch.compile(lambda x: x + 1, backend="lowbit", options={"inductor_pdll": True})(torch.ones(2))
    assert QcompileError.__name__ in str(info.value) and "'inductor_pdl'" in str(info.value)

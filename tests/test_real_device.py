"""moesim.real's device choice: a CUDA device keeps attention off the cuDNN SDPA backend (which
re-plans at every new context length, benchmarks/gpu/sdpa_shapes.py); the CPU changes nothing."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from moesim.errors import InputError  # noqa: E402
from moesim.real.torchutil import pick_device  # noqa: E402


@pytest.fixture
def cudnn_sdp():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_turns_cudnn_attention_off(monkeypatch, cudnn_sdp):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cuda") == "cuda" and not torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    assert pick_device("auto") == "cuda" and not torch.backends.cuda.cudnn_sdp_enabled()


def test_cpu_leaves_the_backends_alone(monkeypatch, cudnn_sdp):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu" and pick_device("cpu") == "cpu"
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(InputError):
        pick_device("cuda")

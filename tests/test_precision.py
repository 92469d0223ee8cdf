"""Every preset runs in float32, under bf16 autocast (CPU here; CUDA with channels_last when lent)."""
from __future__ import annotations

import pytest
import torch

import ablate
from ablate.models import create

PRESETS = sorted(ablate.PRESETS)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _pair(preset: str, device: str):
    torch.manual_seed(0)
    model = create(preset, "micro", in_chans=1, num_classes=10).to(device)
    x = torch.randn(4, 1, 28, 28, device=device)
    return model, x


@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_autocast_on_cpu_tracks_float32(preset):
    model, x = _pair(preset, "cpu")
    model.eval()
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.03 * ref.abs().max()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("preset", PRESETS)
def test_under_bf16_autocast_every_mixer_gives_a_bf16_map(preset):
    """A mixer's bias (DWNet's depth-wise convolution has one) is added in the map's dtype, as a
    convolution's under autocast: a float32 parameter promoted the bf16 map to float32, and the norm,
    activation and cast after the mixer moved twice the bytes."""
    model, x = _pair(preset, "cpu")
    dtypes = []
    for block in model.stages[0].blocks:
        block.mixer.register_forward_hook(lambda mixer, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_bf16_channels_last_on_gpu_tracks_float32(preset):
    model, x = _pair(preset, "cuda")
    model.eval()
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert (out.float() - ref).abs().max() < 0.03 * ref.abs().max()
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x).float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_gpu_float32_matches_cpu(preset, true_float32):
    model, x = _pair(preset, "cpu")
    model.eval()
    ref = model(x)
    out = model.cuda()(x.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-4)

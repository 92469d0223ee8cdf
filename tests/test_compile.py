"""`torch.compile` of every preset: one graph each (no break), equal to eager, and through the trainer.

A graph break inside a layer makes dynamo compile each layer's frame on its own; the same frame met
again at another stage's shape is then traced with symbolic shapes, and inductor failed on those
(three presets did not compile). The fast paths are therefore PyTorch operators (torch.library) that
compile as single opaque calls. These tests hold that for every preset; the `gpu` test does the same
with inductor on a GPU, where FlexAttention and the Triton kernels run.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import ablate
from ablate.space.presets import PRESETS
from tests.test_train import cfg_for, train

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _grads_eager_and_compiled(model, x, target, backend):
    torch.manual_seed(0)
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    results = []
    for fn in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fn(x), target)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    return results


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_compiles_to_one_graph_equal_to_eager(preset):
    """fullgraph=True: a break anywhere (forward, or the backward AOT autograd traces) fails the
    test. aot_eager traces as inductor does, without its code generation (tens of seconds a preset);
    the trainer test below runs inductor itself."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ablate.create(preset, "micro", in_chans=1, num_classes=10).to(memory_format=torch.channels_last)
    model.eval()  # no drop path: both calls see the same network
    x = torch.randn(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    eager, compiled = _grads_eager_and_compiled(model, x, torch.arange(4), "aot_eager")
    (eager_loss, eager_grads), (loss, grads) = eager, compiled
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert len(grads) == len(eager_grads)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_trainer_compile_trains_as_eager_does(tmp_path):
    """trainer.compile=true through the real trainer and inductor, on a preset whose native kernels
    broke the graph before: the run completes with the eager run's loss and accuracy (up to float
    rounding: inductor fuses and reorders sums)."""
    runs = {}
    for compiled in ("true", "false"):
        torch._dynamo.reset()
        cfg = cfg_for(tmp_path / compiled, "operator=locally_connected", f"trainer.compile={compiled}")
        runs[compiled] = train(cfg)
        assert runs[compiled]["status"] == "completed", runs[compiled].get("error")
    loss = [json.loads((tmp_path / c / "runs").glob("*/metrics.jsonl").__next__().read_text())["train_loss"]
            for c in runs]
    assert abs(loss[0] - loss[1]) < 1e-2
    assert abs(runs["true"]["final_test_top1"] - runs["false"]["final_test_top1"]) <= 1.0


def test_trainer_compile_takes_a_mode_and_refuses_others(tmp_path):
    cfg = cfg_for(tmp_path, "trainer.compile=max-autotune-no-cudagraphs")
    assert cfg.trainer.compile == "max-autotune-no-cudagraphs"
    from ablate.schema import ConfigError, validate_config

    validate_config(cfg)
    with pytest.raises(ConfigError, match="trainer.compile"):
        validate_config(cfg_for(tmp_path, "trainer.compile=fastest"))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_compiles_with_inductor_on_gpu(preset, true_float32):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ablate.create(preset, "micro", in_chans=1, num_classes=10).cuda()
    model = model.to(memory_format=torch.channels_last).eval()
    x = torch.randn(8, 1, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    target = torch.arange(8, device="cuda") % 10
    (eager_loss, eager_grads), (loss, grads) = _grads_eager_and_compiled(model, x, target, "inductor")
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-4)

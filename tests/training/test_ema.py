"""The EMA of model weights (ema-pytorch's schedule) that the training loop updates after each
optimizer step, checked against its closed-form decay."""

import pytest
import torch
from torch import nn

from dermml.training.ema import EMA


def _perturb(model: nn.Module, step: int) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * (step + 1))


def test_ema_copies_the_model_until_update_after_step_then_lags_with_the_warmup_decay():
    model = nn.Linear(3, 2)
    ema = EMA(model, beta=0.9, update_after_step=3, update_every=1, power=1.0)
    assert not ema.ema_model.training
    for step in range(4):
        _perturb(model, step)
        ema.update()
        torch.testing.assert_close(ema.ema_model.weight, model.weight)
    _perturb(model, 4)
    ema.update()  # step 4: like ema-pytorch, the first averaging update starts from a copy
    torch.testing.assert_close(ema.ema_model.weight, model.weight)
    before = ema.ema_model.weight.clone()
    _perturb(model, 5)
    ema.update()  # step 5: decay = 1 - (1 + 2) ** -1
    decay = 1 - 3 ** -1.0
    assert ema.current_decay(5) == pytest.approx(decay)
    torch.testing.assert_close(ema.ema_model.weight, decay * before + (1 - decay) * model.weight)
    assert not torch.allclose(ema.ema_model.weight, model.weight)
    assert EMA(model, beta=0.9, update_after_step=3, power=1.0).current_decay(10**6) == 0.9


def test_ema_updates_only_every_update_every_steps():
    model = nn.Linear(2, 2)
    ema = EMA(model, update_after_step=100, update_every=2)
    _perturb(model, 0)
    ema.update()  # step 0: copies
    _perturb(model, 1)
    ema.update()  # step 1: skipped
    assert not torch.allclose(ema.ema_model.weight, model.weight)
    ema.update(step=10)  # the trainer's step replaces the counter
    torch.testing.assert_close(ema.ema_model.weight, model.weight)
    assert ema.step == 11


def test_ema_state_dict_round_trips_with_its_step_counter():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = EMA(model, update_after_step=2, update_every=1)
    for step in range(6):
        _perturb(model, step)
        ema.update()
    restored = EMA(nn.Linear(3, 2), update_after_step=2, update_every=1)
    restored.load_state_dict(ema.state_dict())
    assert restored.step == ema.step == 6 and restored.initted
    torch.testing.assert_close(restored.ema_model.weight, ema.ema_model.weight)
    restored.model.load_state_dict(model.state_dict())
    _perturb(model, 6)
    _perturb(restored.model, 6)
    ema.update()
    restored.update()
    torch.testing.assert_close(restored.ema_model.weight, ema.ema_model.weight)

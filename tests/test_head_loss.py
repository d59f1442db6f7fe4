"""The LM head's per-group loss sums: the fused gradient path equals plain autograd through the logits."""

from __future__ import annotations

import copy

import pytest
import torch

import core.eval
from core.eval import head_loss_sums


def reference(head: torch.nn.Module, hidden: torch.Tensor, targets, owner, groups: int) -> torch.Tensor:
    losses = torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="none")
    return torch.zeros(groups).index_add(0, owner, losses)


def case(bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(16, 50, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(50, generator=gen))
    head.requires_grad_(False)
    hidden = torch.randn(23, 16, generator=gen)
    targets = torch.randint(0, 50, (23,), generator=gen)
    owner = torch.randint(0, 3, (23,), generator=gen)
    return head, hidden, targets, owner


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_sums_and_hidden_gradients_equal_autograd_across_chunk_boundaries(monkeypatch, bias):
    monkeypatch.setattr(core.eval, "LOSS_CHUNK", 5)
    head, hidden, targets, owner = case(bias)
    weights = torch.tensor([0.5, 2.0, -1.0])

    fused_in = hidden.clone().requires_grad_(True)
    fused = head_loss_sums(head, fused_in, targets, owner, 3)
    (fused * weights).sum().backward()

    plain_in = hidden.clone().requires_grad_(True)
    plain = reference(head, plain_in, targets, owner, 3)
    (plain * weights).sum().backward()

    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(fused_in.grad, plain_in.grad, rtol=1e-5, atol=1e-6)
    assert fused.grad_fn is not None and "Fused" in type(fused.grad_fn).__name__


def test_a_head_that_trains_keeps_the_checkpointed_path_and_gets_its_weight_gradient():
    head, hidden, targets, owner = case(bias=False)
    head.requires_grad_(True)
    sums = head_loss_sums(head, hidden.requires_grad_(True), targets, owner, 3)
    sums.sum().backward()

    assert "Fused" not in type(sums.grad_fn).__name__
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_without_gradients_the_sums_are_the_plain_losses():
    head, hidden, targets, owner = case(bias=True, seed=1)
    with torch.no_grad():
        sums = head_loss_sums(head, hidden, targets, owner, 3)
    torch.testing.assert_close(sums, reference(head, hidden, targets, owner, 3))
    assert sums.grad_fn is None


def test_a_half_precision_head_gets_gradients_as_close_to_exact_as_autograd_s(monkeypatch):
    monkeypatch.setattr(core.eval, "LOSS_CHUNK", 5)
    head, hidden, targets, owner = case(bias=False)
    exact_in = hidden.double().requires_grad_(True)
    (reference(copy.deepcopy(head).double(), exact_in, targets, owner, 3) / 7.0).sum().backward()
    grads = {}
    for name, loss in (("fused", head_loss_sums), ("autograd", reference)):
        inputs = hidden.to(torch.bfloat16).requires_grad_(True)
        (loss(copy.deepcopy(head).to(torch.bfloat16), inputs, targets, owner, 3) / 7.0).sum().backward()
        grads[name] = inputs.grad

    def error(grad: torch.Tensor) -> float:
        return float(torch.linalg.norm(grad.double() - exact_in.grad) / torch.linalg.norm(exact_in.grad))

    assert grads["fused"].dtype == torch.bfloat16
    assert error(grads["fused"]) <= 1.5 * error(grads["autograd"]) < 0.02


def test_no_labelled_position_gives_zero_sums_and_a_backward_that_runs():
    head, hidden, _, _ = case(bias=False)
    empty = hidden[:0].clone().requires_grad_(True)
    sums = head_loss_sums(head, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3)
    sums.sum().backward()
    assert torch.equal(sums, torch.zeros(3)) and empty.grad.shape == (0, 16)

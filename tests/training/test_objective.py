"""The training objective returns (loss, logs): the NLL plus lambda times the alignment loss, with named terms,
equal in float64 to the same terms computed independently (a fresh forward for every strategy)."""

import pytest
import torch

from helpers import random_flow
from rrepa.align.head import AlignConfig, AlignHead
from rrepa.align.reverse import aligned_features
from rrepa.flow.config import FlowConfig
from rrepa.training.objective import Objective

CFG = FlowConfig(in_channels=1, image_height=8, image_width=8, patch_size=2, width=16, head_dim=8, num_blocks=3,
                 layers_per_block=2, num_classes=4)


def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 3, 1])
    tokens = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)  # a 2 x 2 grid of 5-d encoder tokens
    return x, y, tokens


def test_nll_only():
    model = random_flow(CFG)
    x, y, _ = batch()
    objective = Objective(model)
    loss, logs = objective(x, y, label_drop=0.0)
    assert objective.log_keys == ["nll"] == list(logs)
    torch.testing.assert_close(loss, model.nll(x, y).mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logs["nll"], loss.detach())
    assert not logs["nll"].requires_grad


@pytest.mark.parametrize("strategy, reverse", [("forward", "pseudo"), ("detach", "pseudo"), ("reverse", "pseudo"),
                                               ("reverse", "naive"), ("reverse", "jacobi")])
def test_alignment_is_one_more_term(strategy, reverse):
    model = random_flow(CFG)
    x, y, tokens = batch()
    a = AlignConfig(positions=[(3, 2), (2, 1)], strategy=strategy, reverse=reverse, jacobi_steps=2, weight=0.7,
                    projector_hidden=8)
    torch.manual_seed(1)
    head = AlignHead(a, CFG.width, tokens.shape[-1]).double()
    objective = Objective(model, head)
    loss, logs = objective(x, y, 0.0, tokens, (2, 2))

    feats = aligned_features(model, x, y, a.positions, strategy, reverse, 2)  # a fresh forward
    independent = head.loss_from_features(feats, tokens, CFG.grid, (2, 2))
    nll = model.nll(x, y).mean()
    torch.testing.assert_close(loss, nll + independent.loss, rtol=1e-10, atol=1e-12)
    assert list(logs) == objective.log_keys == ["nll", "align_loss", "align_t3_l2", "align_t2_l1"]
    torch.testing.assert_close(logs["nll"], nll.detach(), rtol=1e-10, atol=1e-12)
    per = [independent.per_position[p] for p in a.positions]
    for key, value in zip(["align_t3_l2", "align_t2_l1"], per):
        torch.testing.assert_close(logs[key], value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logs["align_loss"], torch.stack(per).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss - logs["nll"], a.weight * logs["align_loss"], rtol=1e-10, atol=1e-12)
    assert all(not v.requires_grad for v in logs.values())

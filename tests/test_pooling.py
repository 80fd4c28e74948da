"""One mean pooling for evaluation and distillation: the same function, float32, padding-blind."""

import torch

from tensorlm import pooling
from tensorlm.distill import losses
from tensorlm.evaluate import sts


def test_evaluation_and_distillation_share_one_pooling():
    assert sts.mean_pool is losses.mean_pool is pooling.mean_pool


def test_mean_pool_ignores_padding_and_pools_in_float32():
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pooling.mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    changed = hidden.clone()
    changed[0, 3:] = 1e6  # padding positions never count
    torch.testing.assert_close(pooling.mean_pool(changed, mask), pooled)
    low = pooling.mean_pool(hidden.bfloat16(), mask)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, pooling.mean_pool(hidden.bfloat16().float(), mask), rtol=0, atol=0)
    torch.testing.assert_close(pooling.mean_pool(hidden), hidden.mean(1))
    assert torch.equal(pooling.mean_pool(hidden, torch.zeros(2, 5)), torch.zeros(2, 8))

"""benchmarks/feature_variance.py: the per-batch variance against a hand-computed case."""

import torch
from conftest import load_script


def test_batch_variance_by_hand():
    mod = load_script("benchmarks/feature_variance.py")
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 5.0], [9.0, 9.0]])  # last row: partial batch, dropped
    v = mod.batch_variance(z, 2)
    # batch 1: var(1,3) = 2 (unbiased), var(0,0) = 0; batch 2: var(0,0) = 0, var(5,5) = 0
    assert torch.equal(v, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))

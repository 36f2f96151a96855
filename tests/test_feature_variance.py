"""benchmarks/feature_variance.py: the per-batch variance against a hand-computed case."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "feature_variance.py"


def test_batch_variance_by_hand():
    spec = importlib.util.spec_from_file_location("feature_variance", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 5.0], [9.0, 9.0]])  # last row: partial batch, dropped
    v = mod.batch_variance(z, 2)
    # batch 1: var(1,3) = 2 (unbiased), var(0,0) = 0; batch 2: var(0,0) = 0, var(5,5) = 0
    assert torch.equal(v, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))

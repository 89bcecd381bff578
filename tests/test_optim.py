"""What the three trainers share: fused AdamW and gradient clipping that scales only when needed."""

import math

import torch

from tether.trainers import adamw, clip_grad_norm


def _params(*grads):
    params = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    return params


def test_clip_grad_norm_leaves_small_gradients_alone_and_scales_large_ones():
    small = _params([0.3, 0.4])
    assert abs(clip_grad_norm(small, 1.0) - 0.5) < 1e-6
    assert torch.equal(small[0].grad, torch.tensor([0.3, 0.4]))  # untouched, not multiplied by 1.0
    large = _params([3.0, 4.0], [12.0])
    assert abs(clip_grad_norm(large, 1.0) - 13.0) < 1e-5
    total = math.sqrt(sum(float((p.grad ** 2).sum()) for p in large))
    assert abs(total - 1.0) < 1e-5
    assert clip_grad_norm(large, None) > 0 and clip_grad_norm([], 1.0) == 0.0


def test_clip_grad_norm_reports_non_finite_without_scaling():
    bad = _params([float("nan"), 1.0])
    assert math.isnan(clip_grad_norm(bad, 1.0))
    assert bad[0].grad[1].item() == 1.0


def test_fused_adamw_matches_the_default_implementation():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    fused = adamw(a.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.1)
    plain = torch.optim.AdamW(b.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.1)
    assert fused.defaults["fused"]
    for _ in range(5):
        x = torch.randn(4, 8)
        for model, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    plain.load_state_dict(fused.state_dict())  # checkpoints load either way

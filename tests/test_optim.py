"""PesoAdamW: torch.optim.AdamW's trajectory, state_dict round trip, beta2 warm-up, moments API."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pesocli.optim import PesoAdamW


def _toy_params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape)) for shape in ((7, 5), (7,), (3, 7), (4,))]


def _toy_loss(params: list[torch.Tensor], step: int) -> torch.Tensor:
    """A non-convex loss whose gradients change every step (data drawn from the step number)."""
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.randn(9, 5, generator=generator)
    w1, b1, w2, b2 = params
    hidden = torch.tanh(x @ w1.T + b1)
    return (hidden @ w2.T + b2[:3]).pow(2).mean() + b2.sin().sum()


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [
        {"params": params[:2]},  # group defaults
        {"params": [params[2]], "lr": 3e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)},
        {"params": [params[3]], "weight_decay": 0.0, "eps": 1e-6},
    ]


DEFAULTS = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _run(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
         steps: range) -> list[list[torch.Tensor]]:
    trajectory = []
    for step in steps:
        optimizer.zero_grad()
        _toy_loss(params, step).backward()
        optimizer.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def test_matches_torch_adamw_trajectory():
    ours_params, torch_params = _toy_params(), _toy_params()
    ours = _run(PesoAdamW(_groups(ours_params), **DEFAULTS), ours_params, range(40))
    torch_adamw = torch.optim.AdamW(_groups(torch_params), foreach=False, **DEFAULTS)
    reference = _run(torch_adamw, torch_params, range(40))
    for got, expected in zip(ours, reference, strict=True):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=1e-6, rtol=0)
    assert not torch.equal(ours[-1][0], ours[0][0])  # it did move


def test_params_without_grad_are_skipped_like_torch():
    ours_params, torch_params = _toy_params(), _toy_params()
    ours_opt = PesoAdamW(ours_params, **DEFAULTS)
    torch_opt = torch.optim.AdamW(torch_params, foreach=False, **DEFAULTS)
    for params, opt in ((ours_params, ours_opt), (torch_params, torch_opt)):
        _toy_loss(params, 0).backward()
        params[1].grad = None
        opt.step()
    for g, e in zip(ours_params, torch_params, strict=True):
        torch.testing.assert_close(g, e, atol=1e-7, rtol=0)
    assert ours_opt.step_count(ours_params[1]) == 0 and ours_opt.step_count(ours_params[0]) == 1


def test_state_dict_round_trip_continues_the_same_trajectory():
    params = _toy_params()
    optimizer = PesoAdamW(_groups(params), **DEFAULTS)
    _run(optimizer, params, range(6))
    optimizer.set_beta2_warmup(params[0], window=4, beta2_min=0.95)  # schedule state must travel too
    saved_state = copy.deepcopy(optimizer.state_dict())  # in memory: peso never pickles
    saved_params = [p.detach().clone() for p in params]

    continued = _run(optimizer, params, range(6, 14))

    fresh_params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    fresh = PesoAdamW(_groups(fresh_params), **DEFAULTS)
    fresh.load_state_dict(saved_state)
    assert fresh.beta2_at(fresh_params[0], 7) == pytest.approx(0.95)
    assert fresh.step_count(fresh_params[0]) == 6
    resumed = _run(fresh, fresh_params, range(6, 14))
    for got, expected in zip(resumed, continued, strict=True):
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, atol=0, rtol=0)


def test_beta2_warmup_values():
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = PesoAdamW([param], betas=(0.9, 0.999))
    for _ in range(5):  # five updates before the restart
        param.grad = torch.ones(3)
        optimizer.step()
    window, t_r = 10, 6
    optimizer.set_beta2_warmup(param, window=window, beta2_min=0.95)
    assert optimizer.beta2_at(param, t_r - 1) == pytest.approx(0.999)  # before the restart
    assert optimizer.beta2_at(param, t_r) == pytest.approx(0.95)
    assert optimizer.beta2_at(param, t_r + window // 2) == pytest.approx((0.95 + 0.999) / 2)
    assert optimizer.beta2_at(param, t_r + window) == pytest.approx(0.999)
    assert optimizer.beta2_at(param, t_r + window + 7) == pytest.approx(0.999)
    cosine = 0.95 + (0.999 - 0.95) * 0.5 * (1 - math.cos(math.pi * 3 / window))  # the cosine, not a line
    assert optimizer.beta2_at(param, t_r + 3) == pytest.approx(cosine)
    assert cosine < 0.95 + (0.999 - 0.95) * 3 / window


def test_update_uses_the_warmed_up_beta2():
    """During the warm-up the velocity EMA uses beta2(t); bias correction keeps 1 - beta2_final^t."""
    lr, beta1 = 0.1, 0.9
    param = torch.nn.Parameter(torch.zeros(4))
    optimizer = PesoAdamW([param], lr=lr, betas=(beta1, 0.999), eps=1e-8, weight_decay=0.0)
    param.grad = torch.full((4,), 2.0)
    optimizer.step()
    optimizer.set_beta2_warmup(param, window=6, beta2_min=0.95)
    m, v = optimizer.moments(param)
    m_before, v_before, p_before = m.clone(), v.clone(), param.detach().clone()
    param.grad = torch.full((4,), 3.0)
    optimizer.step()  # update 2 uses beta2 = 0.95
    v_ref = 0.95 * v_before + 0.05 * 9.0
    m_ref = beta1 * m_before + (1 - beta1) * 3.0
    torch.testing.assert_close(v, v_ref)
    step = lr / (1 - beta1**2) * m_ref / ((v_ref / (1 - 0.999**2)).sqrt() + 1e-8)  # Algorithm 5 l. 14-17
    torch.testing.assert_close(param.detach(), p_before - step, atol=1e-6, rtol=1e-6)


def test_moment_edits_are_seen_by_the_next_step():
    lr, beta1, beta2, eps, wd = 0.05, 0.9, 0.999, 1e-8, 0.01
    param = torch.nn.Parameter(torch.randn(3, 4))
    optimizer = PesoAdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=wd)
    for _ in range(3):
        param.grad = torch.randn(3, 4)
        optimizer.step()
    m, v = optimizer.moments(param)
    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    m.copy_(m @ rotation)  # the restart code edits in place, as D.1/D.2 do
    v.mul_(7.0)
    m_edit, v_edit, before = m.clone(), v.clone(), param.detach().clone()

    grad = torch.randn(3, 4)
    param.grad = grad
    optimizer.step()
    t = 4
    m_ref = beta1 * m_edit + (1 - beta1) * grad
    v_ref = beta2 * v_edit + (1 - beta2) * grad * grad
    expected = before * (1 - lr * wd) - lr / (1 - beta1**t) * m_ref / (
        (v_ref / (1 - beta2**t)).sqrt() + eps)
    torch.testing.assert_close(param.detach(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(optimizer.moments(param)[0], m_ref)


def test_reset_state_starts_fresh():
    param = torch.nn.Parameter(torch.randn(5))
    twin = torch.nn.Parameter(torch.randn(5))
    optimizer = PesoAdamW([param])
    for _ in range(3):
        param.grad = torch.randn(5)
        optimizer.step()
    optimizer.set_beta2_warmup(param, window=3, beta2_min=0.9)
    optimizer.reset_state(param)
    assert optimizer.step_count(param) == 0 and optimizer.beta2_at(param, 1) == pytest.approx(0.999)
    with torch.no_grad():
        twin.copy_(param)
    reference = torch.optim.AdamW([twin], foreach=False)
    grad = torch.randn(5)
    param.grad, twin.grad = grad, grad.clone()
    optimizer.step()
    reference.step()
    torch.testing.assert_close(param, twin, atol=1e-7, rtol=0)


def test_is_a_real_optimizer_with_schedulers():
    params = _toy_params()
    optimizer = PesoAdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    _run(optimizer, params, range(1))
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert copy.deepcopy(optimizer.state_dict())["param_groups"][0]["lr"] == pytest.approx(0.05)


def test_set_step_count_numbers_the_next_update_for_bias_correction():
    """Algorithm 6 lines 10-11: a tensor stepping at global step k corrects with 1 - beta^k, not its count."""
    lr, (b1, b2), eps = 0.1, (0.9, 0.999), 1e-8
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    optimizer = PesoAdamW([param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0)
    grad = torch.tensor([0.3, -0.1, 2.0], dtype=torch.float64)
    start = param.detach().clone()
    optimizer.set_step_count(param, 4)  # no update yet; the next one is update 5 (k = 5)
    param.grad = grad
    optimizer.step()
    m, v = (1 - b1) * grad, (1 - b2) * grad**2
    expected = start - lr * (m / (1 - b1**5)) / ((v / (1 - b2**5)).sqrt() + eps)
    torch.testing.assert_close(param.detach(), expected, atol=1e-12, rtol=0)
    assert optimizer.step_count(param) == 5
    # with its own count (update 1) the step would be lr * sign(g); at k = 5 it is 0.55 lr
    own = start - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    assert float((own - start).abs().min()) > 1.5 * float((expected - start).abs().max())
    restored = PesoAdamW([param], lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # the count is ordinary state
    assert restored.step_count(param) == 5


def test_tracked_warmup_corrects_by_the_weight_the_ema_really_has():
    """``tracked``: the second-moment correction is ``1 - prod beta2(t)`` (FP64 reference over a warm-up
    and after it), so an EMA refilled at a low ``beta2`` is not divided by the small ``1 - beta2_final^t``;
    untracked, the same trajectory keeps ``1 - beta2_final^t`` and takes much shorter steps."""
    lr, beta1, beta2 = 0.01, 0.9, 0.999
    torch.manual_seed(0)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(14)]

    def run(tracked: bool) -> tuple[torch.Tensor, PesoAdamW, torch.nn.Parameter]:
        param = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        optimizer = PesoAdamW([param], lr=lr, betas=(beta1, beta2), eps=1e-12, weight_decay=0.0)
        for t, grad in enumerate(grads, start=1):
            if t == 4:
                optimizer.set_beta2_warmup(param, window=6, beta2_min=0.95, tracked=tracked)
            param.grad = grad.clone()
            optimizer.step()
        return param.detach().clone(), optimizer, param

    # reference: Adam with the beta2 schedule and the EMA weight w <- b w + (1 - b)
    x, m, v, w = torch.zeros(5, dtype=torch.float64), 0.0, 0.0, 0.0
    for t, grad in enumerate(grads, start=1):
        b = beta2 if t < 4 else 0.95 + (beta2 - 0.95) * 0.5 * (1 - math.cos(math.pi * min(t - 4, 6) / 6))
        m = beta1 * m + (1 - beta1) * grad
        v = b * v + (1 - b) * grad * grad
        w = b * w + (1 - b)
        x = x - lr * (m / (1 - beta1**t)) / ((v / w).sqrt() + 1e-12)
    tracked, optimizer, param = run(True)
    torch.testing.assert_close(tracked, x, rtol=1e-10, atol=1e-12)
    c1, c2 = optimizer.bias_corrections(param)
    assert c1 == pytest.approx(1 - beta1**14) and c2 == pytest.approx(w)
    assert c2 > 10 * (1 - beta2**14)  # the warm-up filled the EMA: its weight is far above 1 - 0.999^14
    untracked, _, _ = run(False)
    assert float((untracked - x).abs().max()) > 0.01 * float(x.abs().max())

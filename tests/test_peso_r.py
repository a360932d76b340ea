"""PESO-LoRA-R restarts (Appendix D) against a dense reference written here from the paper.

Paper orientation throughout the reference: ``W (m x n) = (out, in)``, ``A (m x r)`` is
``sqrt(s) lora_B``, ``B (r x n)`` is ``sqrt(s) lora_A``, ``-G ~ U Sigma V^T`` (top r). The
reference works in FP64 from the formulas of D.1/D.2 and Algorithm 5; the code runs in FP32.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pesocli.engine import Engine
from pesocli.fullgrad import DenseGradient, FullGradConfig
from pesocli.layers import AdaptedLinear, LowRankAnchor, effective_weight
from pesocli.linalg import balanced_split, orthonormal_basis, procrustes_align, rms
from pesocli.methods.base import RestartContext
from pesocli.methods.lora_one import LoRAOne, LoRAOneConfig
from pesocli.methods.peso_r import PesoR, PesoRConfig, align_restart, rescale_moments
from pesocli.methods.schedule import restart_due
from pesocli.optim import PesoAdamW

OUT, IN, R = 11, 9, 3
ALPHA = 6.0  # scale s = alpha / r = 2: the factors are not the paper's A, B themselves
TOL = dict(atol=1e-5, rtol=1e-5)


# ---- the dense reference ------------------------------------------------------------------------
def gram_schmidt(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``matrix`` (modified Gram-Schmidt): the QR ``Q`` with ``diag(R) > 0``."""
    basis: list[torch.Tensor] = []
    for column in matrix.double().T:
        for q in basis:
            column = column - (q @ column) * q
        basis.append(column / column.norm())
    return torch.stack(basis, dim=1)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def reference_restart(a, b, g, *, tau1=0.9, tau2=0.9, gamma_later=1.0, orthonormal_ema=True) -> dict:
    """Appendix D.1 as written (``orthonormal_ema`` adds the polar step the code documents)."""
    a, b, g = a.double(), b.double(), g.double()
    q_a, q_b = gram_schmidt(a), gram_schmidt(b.T)  # A = Q_A R_A, B = R_B Q_B^T
    u_full, _, vh_full = torch.linalg.svd(-g)
    u, v = u_full[:, :R], vh_full[:R].T
    p_u, _, q_u_h = torch.linalg.svd(q_a.T @ u)  # Q_A^T U = P_U Sigma_U Q_U^T
    p_v, _, q_v_h = torch.linalg.svd(q_b.T @ v)
    u_hat, v_hat = u @ (p_u @ q_u_h).T, v @ (p_v @ q_v_h).T  # U^ = U R_U^T
    u_ema = tau1 * q_a + (1 - tau1) * u_hat
    v_ema = tau1 * q_b + (1 - tau1) * v_hat
    if orthonormal_ema:
        u_ema, v_ema = polar(u_ema), polar(v_ema)
    s_new = tau2 * (u_ema.T @ (a @ b) @ v_ema) - (1 - tau2) / gamma_later * (u_ema.T @ g @ v_ema)
    r_l, sigma, r_r_h = torch.linalg.svd(s_new)
    root = sigma.sqrt()
    return dict(q_a=q_a, q_b=q_b, u_hat=u_hat, v_hat=v_hat, u_ema=u_ema, v_ema=v_ema, s_new=s_new,
                sigma=sigma, a_new=u_ema @ r_l * root, b_new=root[:, None] * r_r_h @ v_ema.T,
                t_a=q_a.T @ u_ema, t_b=q_b.T @ v_ema,
                step=(1 - tau2) / gamma_later * (u_ema @ (u_ema.T @ -g @ v_ema) @ v_ema.T))


def close(got: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    torch.testing.assert_close(got.double(), expected.double(), **(tol or TOL))


@pytest.fixture
def factors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paper ``A (out, r)``, ``B (r, in)`` and a full gradient ``G (out, in)``."""
    return torch.randn(OUT, R), torch.randn(R, IN), torch.randn(OUT, IN)


# ---- D.1 pieces ---------------------------------------------------------------------------------
def test_qr_bases_are_the_unique_positive_diagonal_qr(factors):
    a, b, _ = factors
    for matrix in (a, b.T):
        q, r = orthonormal_basis(matrix)
        close(q, gram_schmidt(matrix))
        close(q @ r, matrix)
        assert torch.all(torch.diagonal(r) > 0) and torch.allclose(r, torch.triu(r))
        close(q.T @ q, torch.eye(R))


def test_procrustes_alignment_is_orthonormal_and_optimal(factors):
    a, _, g = factors
    q_a = gram_schmidt(a).float()
    u = torch.linalg.svd(-g)[0][:, :R]
    aligned = procrustes_align(u, q_a)
    close(aligned, reference_restart(*factors)["u_hat"])
    close(aligned.T @ aligned, torch.eye(R))
    best = float((aligned - q_a).norm())
    assert best <= float((u - q_a).norm()) + 1e-6
    for _ in range(200):  # min_R ||U R - Q_A||_F over orthogonal R
        rotation = torch.linalg.qr(torch.randn(R, R))[0]
        assert best <= float((u @ rotation - q_a).norm()) + 1e-6
    flipped = u * torch.tensor([-1.0, 1.0, -1.0])  # SVD signs do not matter after alignment
    close(procrustes_align(flipped, q_a), aligned)


def test_balanced_split_reproduces_the_core():
    core = torch.randn(R, R)
    left, right = balanced_split(core)
    close(left @ right, core)
    sigma = torch.linalg.svdvals(core)
    close(left.T @ left, torch.diag(sigma))
    close(right @ right.T, torch.diag(sigma))


@pytest.mark.parametrize("orthonormal_ema", [False, True], ids=["as-written", "polar"])
@pytest.mark.parametrize("gamma_later", [1.0, 4.0])
def test_align_restart_matches_reference(factors, orthonormal_ema, gamma_later):
    a, b, g = factors
    cfg = PesoRConfig(rank=R, tau1=0.7, tau2=0.8, gamma_later=gamma_later, orthonormal_ema=orthonormal_ema)
    ref = reference_restart(a, b, g, tau1=0.7, tau2=0.8, gamma_later=gamma_later,
                            orthonormal_ema=orthonormal_ema)
    out = align_restart(a, b, DenseGradient(g), cfg)
    close(out.old_basis, ref["q_a"])
    close(out.rotate_a, ref["t_a"])
    close(out.rotate_b, ref["t_b"])
    # S_new and its balanced split: A_new B_new = U_ema S_new V_ema^T
    close(out.a_new @ out.b_new, ref["u_ema"] @ ref["s_new"] @ ref["v_ema"].T)
    # the factors themselves, up to the per-component sign freedom of the SVD split
    signs = torch.sign(torch.sum(out.a_new.double() * ref["a_new"], dim=0))
    close(out.a_new * signs.float(), ref["a_new"])
    close(signs.float()[:, None] * out.b_new, ref["b_new"])
    if orthonormal_ema:  # orthonormal bases -> balanced factors: A^T A = B B^T = Sigma
        close(ref["u_ema"].T @ ref["u_ema"], torch.eye(R))
        close(out.a_new.T @ out.a_new, torch.diag(ref["sigma"]))
        close(out.b_new @ out.b_new.T, torch.diag(ref["sigma"]))
    else:  # the paper's EMA of two orthonormal bases is not orthonormal (why the polar switch exists)
        assert float((ref["u_ema"].T @ ref["u_ema"] - torch.eye(R, dtype=torch.float64)).abs().max()) > 1e-4


# ---- a full restart on a layer with an optimizer -------------------------------------------------
def _method(**options) -> PesoR:
    """peso-r on one layer, with the paper's D.1 moment rotation and D.2 (moment rescale + beta2 warm-up)
    unless ``options`` say."""
    options = {"rescale_moments": True, "beta2_warmup": True, "transport_moments": False, **options}
    config = PesoRConfig(rank=R, alpha=ALPHA, restart_every=9, gamma=2.0, target_modules=("proj",), **options)
    method = PesoR(config)
    method.setup(total_steps=100, steps_per_epoch=100)
    return method


def _layer(method: PesoR) -> AdaptedLinear:
    base = nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    return AdaptedLinear(base, method.build_delta(OUT, IN), LowRankAnchor(OUT, IN))


def _restart(method, layer, optimizer, gradient: torch.Tensor, step: int):
    ctx = RestartContext(step=step, layers={"proj": layer}, optimizer=optimizer,
                         gradients={"proj": DenseGradient(gradient)})
    return method.restart(ctx)


def _trained_state(method: PesoR, factors):
    """A layer after the step-0 init and some 'training': adapters (A, B), moments, anchor."""
    a, b, g = factors
    layer = _layer(method)
    optimizer = PesoAdamW(list(layer.delta.parameters()), lr=1e-2)
    records = _restart(method, layer, optimizer, torch.randn(OUT, IN), step=0)
    assert records[0].kind == "init"
    layer.anchor.absorb(torch.randn(OUT, 2), torch.randn(2, IN))
    for _ in range(4):  # real optimizer state (step count 4)
        layer.delta.lora_A.grad = torch.randn(R, IN)
        layer.delta.lora_B.grad = torch.randn(OUT, R)
        optimizer.step()
    layer.delta.set_product(a, b)  # the adapters the restart sees are exactly (A, B)
    return layer, optimizer, g


def test_set_product_holds_the_paper_factors():
    method = _method()
    delta = _layer(method).delta
    a, b = torch.randn(OUT, R), torch.randn(R, IN)
    delta.set_product(a, b)
    close(delta.weight(), a @ b)
    close(delta.scale * delta.lora_B @ delta.lora_A, a @ b)
    paper_a, paper_b = delta.paper_factors()
    close(paper_a, a)
    close(paper_b, b)


@pytest.mark.parametrize("anchor_update", ["paper", "continuous"])
def test_restart_sets_factors_rotates_momentum_and_warms_beta2(factors, anchor_update):
    method = _method(anchor_update=anchor_update)
    layer, optimizer, g = _trained_state(method, factors)
    a, b, _ = factors
    delta = layer.delta
    m_b_before, v_b_before = (t.clone() for t in optimizer.moments(delta.lora_B))
    m_a_before, v_a_before = (t.clone() for t in optimizer.moments(delta.lora_A))
    ref = reference_restart(a, b, g)

    records = _restart(method, layer, optimizer, g, step=9)

    assert records[0].kind == "restart" and records[0].principal_angle_deg is not None
    close(delta.weight(), ref["a_new"] @ ref["b_new"])  # s lora_B lora_A = A_new B_new
    # D.1 rotation: lora_B is the paper's A (m_A <- m_A T_A), lora_A the paper's B (m_B <- T_B^T m_B)
    close(optimizer.moments(delta.lora_B)[0], m_b_before.double() @ ref["t_a"])
    close(optimizer.moments(delta.lora_A)[0], ref["t_b"].T @ m_a_before.double())
    close(optimizer.moments(delta.lora_B)[1], v_b_before)  # velocity is not rotated
    close(optimizer.moments(delta.lora_A)[1], v_a_before)
    # D.2 beta2 warm-up over T = floor(K / 3) = 3 updates, starting at the next one (update 5)
    assert method.beta2_window == 3
    for param in (delta.lora_A, delta.lora_B):
        assert optimizer.beta2_at(param, 5) == pytest.approx(0.95)
        assert optimizer.beta2_at(param, 8) == pytest.approx(0.999)
        assert optimizer.step_count(param) == 4  # state kept, not reset
    assert method.rescale_pending


def test_paper_anchor_update_double_counts_as_written(factors):
    method = _method(anchor_update="paper")
    layer, optimizer, g = _trained_state(method, factors)
    a, b, _ = factors
    w_before = effective_weight(layer, layer.delta.weight())
    anchor_before = layer.anchor.materialize()
    ref = reference_restart(a, b, g)
    _restart(method, layer, optimizer, g, step=9)
    # Algorithm 5 line 5: W~ <- W~ + A B, then (A, B) <- (A_new, B_new)
    close(layer.anchor.materialize(), anchor_before + a @ b)
    close(effective_weight(layer, layer.delta.weight()), w_before.double() + ref["a_new"] @ ref["b_new"])


def test_continuous_anchor_update_moves_the_model_by_the_projected_step_only(factors):
    method = _method(anchor_update="continuous")
    layer, optimizer, g = _trained_state(method, factors)
    a, b, _ = factors
    x = torch.randn(5, IN)
    w_before = effective_weight(layer, layer.delta.weight())
    ref = reference_restart(a, b, g)
    _restart(method, layer, optimizer, g, step=9)
    expected = w_before.double() + ref["step"]  # U_ema [(1 - tau2)/gamma U_ema^T (-G) V_ema] V_ema^T
    close(effective_weight(layer, layer.delta.weight()), expected, atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        close(layer(x), x.double() @ expected.T, atol=1e-4, rtol=1e-5)
    # the step is a projection of -G: zero on the orthogonal complement of the new bases
    u_perp = torch.eye(OUT, dtype=torch.float64) - ref["u_ema"] @ ref["u_ema"].T
    close(u_perp @ ref["step"], torch.zeros(OUT, IN), atol=1e-10, rtol=0)


def test_rms_rescale_from_the_first_post_restart_gradient(factors):
    method = _method()
    layer, optimizer, g = _trained_state(method, factors)
    _restart(method, layer, optimizer, g, step=9)
    delta = layer.delta
    grads = {"lora_A": torch.randn(R, IN) * 30, "lora_B": torch.randn(OUT, R) * 0.01}
    before = {}
    for name, param in (("lora_A", delta.lora_A), ("lora_B", delta.lora_B)):
        param.grad = grads[name]
        before[name] = tuple(t.clone() for t in optimizer.moments(param))

    method.before_update({"proj": layer}, optimizer, step=9)

    for name, param in (("lora_A", delta.lora_A), ("lora_B", delta.lora_B)):
        m0, v0 = before[name]
        g_rms = grads[name].pow(2).mean().sqrt()
        s_m = g_rms / m0.pow(2).mean().sqrt()  # ||g|| / ||m||, RMS norms
        s_v = g_rms**2 / v0.pow(2).mean().sqrt()  # ||g||^2 / ||v||
        m, v = optimizer.moments(param)
        close(m, s_m * m0)
        close(v, s_v * v0)
        assert rms(m) == pytest.approx(float(g_rms), rel=1e-5)
        assert rms(v) == pytest.approx(float(g_rms) ** 2, rel=1e-5)
    snapshot = [t.clone() for t in optimizer.moments(delta.lora_A)]
    delta.lora_A.grad = torch.randn(R, IN) * 1e3
    method.before_update({"proj": layer}, optimizer, step=10)  # only the first step after a restart
    close(optimizer.moments(delta.lora_A)[0], snapshot[0])
    close(optimizer.moments(delta.lora_A)[1], snapshot[1])


def test_keep_ratio_split_keeps_the_product_and_the_old_factor_ratio(factors):
    """``factor_split: keep-ratio``: the same ``A_new B_new`` as the paper's balanced split, with
    ``||A_new|| / ||B_new||`` the old adapter's ratio (balanced: 1)."""
    a, b, g = factors
    a = a * 3.0  # an unbalanced adapter, as LoRA's training leaves it
    balanced = align_restart(a, b, DenseGradient(g), PesoRConfig())
    kept = align_restart(a, b, DenseGradient(g), PesoRConfig(factor_split="keep-ratio"))
    close(kept.a_new @ kept.b_new, balanced.a_new @ balanced.b_new)
    assert float(balanced.a_new.norm() / balanced.b_new.norm()) == pytest.approx(1.0, rel=1e-4)
    assert float(kept.a_new.norm() / kept.b_new.norm()) == pytest.approx(float(a.norm() / b.norm()), rel=1e-4)
    close(kept.absorb_up @ kept.absorb_down, balanced.absorb_up @ balanced.absorb_down)
    assert any("factor_split" in e for e in PesoRConfig(factor_split="even").validate())


def test_bias_corrected_rescale_sizes_the_moments_adam_reads():
    """``bias_correction: tracked``: after D.2, ``m / c1`` and ``v / c2`` (what AdamW divides by) have
    the RMS of ``g`` and ``g^2``; the paper's rescale sizes the raw moments instead, so early in a run
    ``v / c2`` is ``1 / c2`` times ``g^2`` and the next step is ``sqrt(c2)`` times shorter."""
    torch.manual_seed(0)
    param = nn.Parameter(torch.randn(6, 4))
    optimizer = PesoAdamW([param], lr=1e-2)
    for _ in range(20):
        param.grad = torch.randn(6, 4)
        optimizer.step()
    optimizer.set_beta2_warmup(param, window=5, beta2_min=0.95, tracked=True)
    grad = torch.randn(6, 4) * 0.3
    rescale_moments(optimizer, param, grad, bias_corrected=True)
    c1, c2 = optimizer.bias_corrections(param)
    m, v = optimizer.moments(param)
    g = float(grad.pow(2).mean().sqrt())
    assert rms(m / c1) == pytest.approx(g, rel=1e-5)
    assert rms(v / c2) == pytest.approx(g * g, rel=1e-5)
    assert c2 == pytest.approx(1 - 0.999**20)
    rescale_moments(optimizer, param, grad)  # the paper's: the raw v, so v / c2 is 1 / c2 too large
    assert rms(optimizer.moments(param)[1] / c2) == pytest.approx(g * g / c2, rel=1e-5)


def test_bias_correction_key_is_validated():
    assert any("bias_correction" in e for e in PesoRConfig(bias_correction="both").validate())
    assert not PesoRConfig(bias_correction="tracked").validate()


def test_without_d2_a_restart_leaves_the_second_moments_and_beta2_alone(factors):
    """``rescale_moments: false`` + ``beta2_warmup: false``: after a restart AdamW goes on with the
    same ``beta2`` and the same ``v``; only D.1's rotation touches the first moments."""
    method = _method(rescale_moments=False, beta2_warmup=False)
    layer, optimizer, g = _trained_state(method, factors)
    delta = layer.delta
    v_before = {id(p): optimizer.moments(p)[1].clone() for p in (delta.lora_A, delta.lora_B)}
    _restart(method, layer, optimizer, g, step=9)
    for param in (delta.lora_A, delta.lora_B):
        param.grad = torch.randn_like(param) * 5
        assert "beta2_start" not in optimizer.state[param]
        assert optimizer.beta2_at(param, optimizer.step_count(param) + 1) == pytest.approx(0.999)
    method.before_update({"proj": layer}, optimizer, step=9)
    for param in (delta.lora_A, delta.lora_B):
        close(optimizer.moments(param)[1], v_before[id(param)])


def test_second_moment_rotation_uses_the_squared_rotation(factors):
    """``rotate_second_moment``: ``v_A <- v_A (T_A o T_A)``, ``v_B <- (T_B o T_B)^T v_B``; ``m`` as D.1."""
    method = _method(rescale_moments=False, beta2_warmup=False, rotate_second_moment=True)
    layer, optimizer, g = _trained_state(method, factors)
    a, b, _ = factors
    delta = layer.delta
    m_b, v_b = (t.clone().double() for t in optimizer.moments(delta.lora_B))
    m_a, v_a = (t.clone().double() for t in optimizer.moments(delta.lora_A))
    ref = reference_restart(a, b, g)
    _restart(method, layer, optimizer, g, step=9)
    close(optimizer.moments(delta.lora_B)[0], m_b @ ref["t_a"])
    close(optimizer.moments(delta.lora_A)[0], ref["t_b"].T @ m_a)
    close(optimizer.moments(delta.lora_B)[1], v_b @ ref["t_a"].square())
    close(optimizer.moments(delta.lora_A)[1], ref["t_b"].square().T @ v_a)
    assert bool((optimizer.moments(delta.lora_A)[1] >= 0).all())


def test_transported_moments_are_the_gradient_average_in_the_new_factors(factors):
    """``transport_moments`` with ``tau1 = tau2 = 1`` (a pure SVD re-split of the same product): moments
    that are ``M lora_A^T`` and ``lora_B^T M`` for a full-gradient average ``M`` become exactly
    ``M lora_A'^T`` and ``lora_B'^T M`` of the new factors; D.1's rotation (``T = I`` here) does not."""
    for transport in (True, False):
        method = _method(rescale_moments=False, beta2_warmup=False, tau1=1.0, tau2=1.0,
                         transport_moments=transport)
        layer, optimizer, g = _trained_state(method, factors)
        delta = layer.delta
        product = delta.weight().clone()
        big_m = torch.randn(OUT, IN)
        optimizer.moments(delta.lora_B)[0].copy_(big_m @ delta.lora_A.detach().T)
        optimizer.moments(delta.lora_A)[0].copy_(delta.lora_B.detach().T @ big_m)
        _restart(method, layer, optimizer, g, step=9)
        close(delta.weight(), product)  # the same product, other factors
        expected_b = big_m @ delta.lora_A.detach().T
        expected_a = delta.lora_B.detach().T @ big_m
        if transport:
            close(optimizer.moments(delta.lora_B)[0], expected_b)
            close(optimizer.moments(delta.lora_A)[0], expected_a)
        else:
            assert not torch.allclose(optimizer.moments(delta.lora_B)[0], expected_b, atol=1e-3)


def test_reset_moments_forgets_the_optimizer_state_at_a_restart(factors):
    """``reset_moments``: Adam starts afresh on the new factors (no moments, step count 0, no D.2)."""
    method = _method(reset_moments=True)  # D.2 requested too: reset replaces it
    layer, optimizer, g = _trained_state(method, factors)
    _restart(method, layer, optimizer, g, step=9)
    for param in (layer.delta.lora_A, layer.delta.lora_B):
        assert optimizer.step_count(param) == 0
        assert float(optimizer.moments(param)[0].abs().sum()) == 0.0
        assert "beta2_start" not in optimizer.state[param]
    assert not method.rescale_pending


def test_rescale_leaves_zero_moments_alone():
    param = nn.Parameter(torch.randn(4))
    optimizer = PesoAdamW([param])
    assert rescale_moments(optimizer, param, torch.randn(4)) == (1.0, 1.0)
    assert float(optimizer.moments(param)[0].abs().sum()) == 0.0


def test_first_peso_r_restart_is_the_lora_one_init(factors):
    method = _method()
    layer = _layer(method)
    optimizer = PesoAdamW(list(layer.delta.parameters()))
    g0 = torch.randn(OUT, IN)
    _restart(method, layer, optimizer, g0, step=0)
    close(layer.delta.weight(), _lora_one_reference(g0, gamma=2.0, scale=ALPHA / R))
    assert not method.rescale_pending  # nothing to rescale after the init
    assert layer.anchor.is_zero


# ---- LoRA-One initialisation -------------------------------------------------------------------
def _lora_one_reference(g: torch.Tensor, gamma: float, scale: float) -> torch.Tensor:
    """``(s / (gamma sigma_1)) [-G]_r``: LoRA-One's code with its 1/sqrt(gamma sigma_1) on each factor."""
    u, s, vh = torch.linalg.svd(-g.double())
    return scale / (gamma * s[0]) * (u[:, :R] * s[:R]) @ vh[:R]


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_one_init_formula(rslora):
    config = LoRAOneConfig(rank=R, alpha=ALPHA, rslora=rslora, gamma=16.0, target_modules=("proj",))
    method = LoRAOne(config)
    layer = AdaptedLinear(nn.Linear(IN, OUT, bias=False).requires_grad_(False), method.build_delta(OUT, IN),
                          LowRankAnchor(OUT, IN))
    optimizer = PesoAdamW(list(layer.delta.parameters()))
    for param in layer.delta.parameters():  # stale state must be dropped by the init
        param.grad = torch.randn_like(param)
    optimizer.step()
    g = torch.randn(OUT, IN)
    ctx = RestartContext(step=0, layers={"proj": layer}, optimizer=optimizer,
                         gradients={"proj": DenseGradient(g)})
    method.restart(ctx)
    delta = layer.delta
    scale = ALPHA / (math.sqrt(R) if rslora else R)
    assert delta.scale == pytest.approx(scale)
    close(delta.scale * delta.lora_B @ delta.lora_A, _lora_one_reference(g, 16.0, scale))
    close(delta.lora_B.T @ delta.lora_B, delta.lora_A @ delta.lora_A.T)  # balanced, as sqrt(S) on both
    assert all(optimizer.step_count(p) == 0 for p in delta.parameters())
    assert layer.anchor.is_zero  # W0 untouched


def test_lora_one_through_the_engine_uses_minus_the_autograd_gradient():
    torch.manual_seed(1)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(IN, OUT))
    x, c = torch.randn(6, IN), torch.randn(6, OUT)

    def loss() -> torch.Tensor:
        return (torch.tanh(model(x)) * c).sum()

    plain = nn.Linear(IN, OUT)
    plain.load_state_dict(model.proj.state_dict())
    (torch.tanh(plain(x)) * c).sum().backward()
    method = LoRAOne(LoRAOneConfig(rank=R, alpha=ALPHA, gamma=3.0, target_modules=("proj",)))
    engine = Engine(model, method, FullGradConfig(mode="exact"))
    optimizer = PesoAdamW(engine.trainable_parameters())
    records = engine.maybe_restart(0, optimizer, lambda: loss().backward())
    assert [r.kind for r in records] == ["init"]
    close(engine.layers["proj"].delta.weight(), _lora_one_reference(plain.weight.grad, 3.0, ALPHA / R))
    assert engine.maybe_restart(1, optimizer, lambda: loss().backward()) == []


# ---- schedule -----------------------------------------------------------------------------------
def _due(steps, **kwargs) -> list[int]:
    return [s for s in range(steps) if restart_due(s, **kwargs)]


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(every=5, per_epoch=None, steps_per_epoch=100), [0, 5, 10, 15, 20, 25]),
    (dict(every=None, per_epoch=2, steps_per_epoch=10), [0, 5, 10, 15, 20, 25]),
    (dict(every=None, per_epoch=3, steps_per_epoch=10), [0, 3, 6, 10, 13, 16, 20, 23, 26]),
    # both: multiples of K, at most n per epoch (epoch 1 starts at 10: first multiple of 3 is 12)
    (dict(every=3, per_epoch=2, steps_per_epoch=10), [0, 3, 12, 15, 21, 24]),
    (dict(every=None, per_epoch=None, steps_per_epoch=10), [0]),
    (dict(every=1, per_epoch=None, steps_per_epoch=10), list(range(30))),
])
def test_schedule(kwargs, expected):
    assert _due(30, **kwargs) == expected


def test_beta2_window_defaults_to_a_third_of_k():
    assert _method().beta2_window == 3  # K = 9
    assert _method(beta2_window=7).beta2_window == 7
    per_epoch = PesoR(PesoRConfig(rank=R, restart_every=None, restarts_per_epoch=2))
    per_epoch.setup(total_steps=300, steps_per_epoch=100)
    assert per_epoch.beta2_window == 16  # K = 100 / 2 = 50 steps between restarts
    assert [s for s in range(200) if per_epoch.restart_due(s)] == [0, 50, 100, 150]


def test_method_state_round_trips():
    method = _method()
    method.restarts_done, method.rescale_pending = 3, True
    other = _method()
    other.load_state_dict(method.state_dict())
    assert (other.restarts_done, other.rescale_pending) == (3, True)


def test_d2_rescale_reads_the_clipped_gradient_in_the_trainer(tmp_path, monkeypatch, train_embedded):
    """D.2 sizes ``m`` and ``v`` to the gradient AdamW then uses: the clipped one, not the raw one.

    Through the real loop with a tiny ``max_grad_norm`` (every step clips hard): right after the
    rescale ``RMS(m) = RMS(g)`` and ``sqrt(RMS(v)) = RMS(g)`` for the ``g`` that enters the update.
    Rescaling before clipping leaves both off by the clip factor (here ~1e3).
    """
    seen: list[list[tuple[float, float]]] = []
    update = PesoAdamW.step

    def recording_step(self, closure=None):
        ratios = []
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param in self.state:
                    m, v = self.state[param]["exp_avg"], self.state[param]["exp_avg_sq"]
                    g = rms(param.grad)
                    ratios.append((rms(m) / g, math.sqrt(rms(v)) / g))
        seen.append(ratios)
        return update(self, closure)

    monkeypatch.setattr(PesoAdamW, "step", recording_step)
    overrides = {"train.max_steps": 4, "method.restart_every": 3, "optim.max_grad_norm": 1e-3,
                 "train.batch_size": 4, "data.limit": 32, "data.val_split": 0, "train.export": "none",
                 "train.log_every": 1, "method.rescale_moments": True, "method.beta2_warmup": True}
    result = train_embedded(tmp_path, overrides)
    metrics = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    norms = [json.loads(line)["grad_norm"] for line in metrics]
    assert norms[3] > 100 * 1e-3  # the post-restart step really clips (by more than 100x)
    assert len(seen) == 4 and len(seen[3]) == 2 * 14  # lora_A and lora_B of 14 layers
    for m_ratio, v_ratio in seen[3]:  # step 3: the first update after the restart before it
        assert m_ratio == pytest.approx(1.0, rel=1e-4)
        assert v_ratio == pytest.approx(1.0, rel=1e-4)

"""Closed-form and property tests of the preference losses (SPEC "INPO", "The peers")."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inpo.losses import (
    LOSSES,
    dpo_loss,
    get_loss,
    inpo_loss,
    ipo_length_normalized_loss,
    ipo_loss,
    sppo_loss,
    todo_loss,
)

D = torch.float64


def _t(*xs):
    return [torch.tensor(x, dtype=D) for x in xs]


def test_dpo_zero_margin_is_log2():
    z = torch.zeros(5, dtype=D)
    out = dpo_loss(z, z, z, z, beta=0.1)
    assert torch.allclose(out.losses, torch.full((5,), math.log(2.0), dtype=D))
    assert out.losses.shape == (5,)


def test_dpo_gradient_signs():
    pc, pr = (torch.tensor([-3.0, -1.0], dtype=D, requires_grad=True) for _ in range(2))
    ref = torch.tensor([-2.0, -2.0], dtype=D)
    dpo_loss(pc, pr, ref, ref, beta=0.5).losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_ipo_minimiser_is_half_inverse_beta(beta):
    target = 1.0 / (2 * beta)
    pc, pr, rc, rr = _t([target - 1.0], [-1.0], [0.0], [0.0])
    assert ipo_loss(pc, pr, rc, rr, beta=beta).losses.item() == pytest.approx(0.0, abs=1e-12)
    # Minimise over the chosen log-prob: lands on margin 1/(2β).
    x = torch.zeros(1, dtype=D, requires_grad=True)
    opt = torch.optim.LBFGS([x], line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ipo_loss(x, pr, rc, rr, beta=beta).losses.sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert (x - pr).item() == pytest.approx(target, rel=1e-8)


@pytest.mark.parametrize("eta,tau", [(0.005, 0.005 / 3), (0.1, 0.05), (1.0, 0.0)])
def test_inpo_minimiser_margin(eta, tau):
    pc, pr, rc, rr, qc, qr = _t([-5.0], [-7.0], [-4.0], [-6.5], [-5.5], [-6.0])
    out = inpo_loss(pc, pr, rc, rr, qc, qr, eta=eta, tau=tau)
    r = tau / eta
    h = (pc - pr) - r * (rc - rr) - (1 - r) * (qc - qr)
    assert torch.allclose(out.margins, h)
    assert torch.allclose(out.losses, (h - 1 / (2 * eta)) ** 2)
    # Shift the chosen log-prob so that h = 1/(2η): loss is exactly 0 there.
    pc2 = pc + (1 / (2 * eta) - h)
    assert inpo_loss(pc2, pr, rc, rr, qc, qr, eta=eta, tau=tau).losses.item() == pytest.approx(
        0.0, abs=1e-9
    )


def test_inpo_special_cases_equal_ipo():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr, qc, qr = (torch.randn(16, generator=g, dtype=D) for _ in range(6))
    eta = 0.3
    # tau = eta: IPO against π_ref with β = η.
    a = inpo_loss(pc, pr, rc, rr, qc, qr, eta=eta, tau=eta).losses
    assert torch.allclose(a, ipo_loss(pc, pr, rc, rr, beta=eta).losses)
    # tau = 0: IPO against π_t.
    b = inpo_loss(pc, pr, rc, rr, qc, qr, eta=eta, tau=0.0).losses
    assert torch.allclose(b, ipo_loss(pc, pr, qc, qr, beta=eta).losses)


def test_inpo_gradient_signs_and_ties():
    pc = torch.tensor([-2.0], dtype=D, requires_grad=True)
    pr = torch.tensor([-2.0], dtype=D, requires_grad=True)
    z = torch.tensor([-2.0], dtype=D)
    inpo_loss(pc, pr, z, z, z, z, eta=0.1, tau=0.05).losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # margin 0 < 1/(2η): push chosen up
    # A tie's target is "no preference": margin 0 gives zero loss and zero gradient.
    tie = inpo_loss(pc, pr, z, z, z, z, eta=0.1, tau=0.05, ties=torch.tensor([True]))
    assert tie.losses.item() == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eta": 0.0, "tau": 0.0},
        {"eta": -1.0, "tau": 0.0},
        {"eta": 0.1, "tau": 0.2},
        {"eta": 0.1, "tau": -0.01},
        {"eta": float("nan"), "tau": 0.0},
        {"eta": 0.1, "tau": float("inf")},
    ],
)
def test_inpo_invalid_hyperparameters(kwargs):
    z = torch.zeros(2)
    with pytest.raises(ValueError):
        inpo_loss(z, z, z, z, z, z, **kwargs)


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss])
@pytest.mark.parametrize("beta", [0.0, -0.5, float("nan")])
def test_beta_must_be_positive(fn, beta):
    z = torch.zeros(2)
    with pytest.raises(ValueError):
        fn(z, z, z, z, beta=beta)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=0.1)


def test_ipo_length_normalized_is_ipo_on_means():
    pc, pr, rc, rr = _t([-6.0, -4.0], [-9.0, -3.0], [-5.0, -4.5], [-8.0, -2.0])
    lc, lr = torch.tensor([3, 2]), torch.tensor([3, 1])
    got = ipo_length_normalized_loss(pc, pr, rc, rr, lc, lr, beta=0.2).losses
    want = ipo_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta=0.2).losses
    assert torch.allclose(got, want)
    assert not torch.allclose(got, ipo_loss(pc, pr, rc, rr, beta=0.2).losses)


def test_sppo_minimiser_is_winrate_target():
    eta = 0.5
    wc, wr = _t([0.8], [0.3])
    qc, qr = _t([-3.0], [-4.0])
    pc, pr = qc + (wc - 0.5) / eta, qr + (wr - 0.5) / eta
    assert sppo_loss(pc, pr, qc, qr, wc, wr, eta=eta).losses.item() == pytest.approx(0.0)
    x = pc.clone().requires_grad_(True)
    sppo_loss(x - 1.0, pr, qc, qr, wc, wr, eta=eta).losses.sum().backward()
    assert x.grad.item() < 0


def test_todo_tie_minimised_at_zero_margin_and_strict_decreasing():
    u = torch.linspace(-3, 3, 601, dtype=D)
    z = torch.zeros_like(u)
    tie = todo_loss(u, z, z, z, torch.ones_like(u, dtype=torch.bool), beta=1.0, alpha=0.5)
    assert abs(u[tie.losses.argmin()].item()) < 1e-9
    strict = todo_loss(u, z, z, z, torch.zeros_like(u, dtype=torch.bool), beta=1.0, alpha=0.5)
    assert (strict.losses[1:] < strict.losses[:-1]).all()
    # P(win) + P(lose) + P(tie) = 1 under the tie-rank BT model.
    alpha, uu = 0.5, torch.tensor([0.7], dtype=D)
    pw = torch.sigmoid(uu - alpha)
    pl = torch.sigmoid(-uu - alpha)
    pt = torch.exp(-todo_loss(uu, uu * 0, uu * 0, uu * 0, torch.tensor([True]), beta=1.0).losses)
    assert (pw + pl + pt).item() == pytest.approx(1.0, abs=1e-12)


def test_specs_declare_inputs_that_match_signatures():
    for name, spec in LOSSES.items():
        params = list(inspect.signature(spec.fn).parameters.values())
        positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert tuple(positional) == spec.inputs, name
        kwonly = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
        assert set(spec.hyperparameters) | set(spec.optional_inputs) <= kwonly, name
    assert get_loss("inpo").needs_ref and get_loss("inpo").needs_prev
    assert not get_loss("dpo").needs_prev and get_loss("sppo").needs_winrates
    assert get_loss("todo").needs_ties
    with pytest.raises(ValueError, match="did you mean 'inpo'"):
        get_loss("inp")


def test_spec_call_names_missing_columns_and_unknown_hparams():
    spec = get_loss("inpo")
    z = torch.zeros(2)
    batch = {k: z for k in spec.inputs if not k.startswith("prev_")}
    with pytest.raises(KeyError, match="prev_chosen_logps"):
        spec(batch, eta=0.1, tau=0.0)
    with pytest.raises(ValueError, match="beta"):
        spec({k: z for k in spec.inputs}, eta=0.1, tau=0.0, beta=1.0)


finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    b=st.integers(1, 12),
    eta=st.floats(1e-3, 10.0),
    frac=st.floats(0.0, 1.0),
)
def test_inpo_property_effective_reference(data, b, eta, frac):
    cols = [
        torch.tensor(data.draw(st.lists(finite, min_size=b, max_size=b)), dtype=D) for _ in range(6)
    ]
    tau = frac * eta
    out = inpo_loss(*cols, eta=eta, tau=tau)
    assert out.losses.shape == (b,)
    assert torch.isfinite(out.losses).all() and (out.losses >= 0).all()
    r = tau / eta
    eff_c = r * cols[2] + (1 - r) * cols[4]
    eff_r = r * cols[3] + (1 - r) * cols[5]
    ipo = ipo_loss(cols[0], cols[1], eff_c, eff_r, beta=eta).losses
    assert torch.allclose(out.losses, ipo, rtol=1e-9, atol=1e-9)
    # Diagnostics are detached.
    assert not out.margins.requires_grad


@settings(max_examples=60, deadline=None)
@given(data=st.data(), b=st.integers(1, 12), beta=st.floats(1e-3, 10.0))
def test_dpo_property_bounds(data, b, beta):
    cols = [
        torch.tensor(data.draw(st.lists(finite, min_size=b, max_size=b)), dtype=D) for _ in range(4)
    ]
    out = dpo_loss(*cols, beta=beta)
    assert out.losses.shape == (b,)
    assert (out.losses >= 0).all() and torch.isfinite(out.losses).all()
    # Swapping chosen and rejected: σ(m) + σ(−m) = 1.
    swapped = dpo_loss(cols[1], cols[0], cols[3], cols[2], beta=beta)
    assert torch.allclose(
        torch.exp(-out.losses) + torch.exp(-swapped.losses), torch.ones(b, dtype=D)
    )

"""Caffe's lr policies and update rules against hand-written numpy (float64) versions of the formulas
in caffe-semantics.md §2.12 — never against the code under test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from runner.solver import Solver, check_solver, fmt, learning_rate


def solver_param(**fields) -> caffe_pb2.SolverParameter:
    sp = caffe_pb2.SolverParameter(lr_policy="fixed", base_lr=0.01, max_iter=100)
    for k, v in fields.items():
        if isinstance(v, list):
            getattr(sp, k).extend(v)
        else:
            setattr(sp, k, v)
    return sp


# ------------------------------------------------------------------------------------------------
# Learning-rate policies
# ------------------------------------------------------------------------------------------------
POLICY_CASES = [
    (dict(lr_policy="fixed", base_lr=0.01), lambda t: 0.01),
    (dict(lr_policy="step", base_lr=0.1, gamma=0.5, stepsize=3), lambda t: 0.1 * 0.5 ** (t // 3)),
    (dict(lr_policy="exp", base_lr=0.01, gamma=0.95), lambda t: 0.01 * 0.95 ** t),
    (dict(lr_policy="inv", base_lr=0.01, gamma=1e-4, power=0.75), lambda t: 0.01 * (1 + 1e-4 * t) ** -0.75),
    (dict(lr_policy="poly", base_lr=0.01, power=0.5, max_iter=10), lambda t: 0.01 * (1 - t / 10) ** 0.5),
    (dict(lr_policy="sigmoid", base_lr=0.01, gamma=0.5, stepsize=4),
     lambda t: 0.01 / (1 + math.exp(-0.5 * (t - 4)))),
    (dict(lr_policy="multistep", base_lr=0.01, gamma=0.1, stepvalue=[2, 5, 6]),
     lambda t: 0.01 * 0.1 ** sum(t >= s for s in (2, 5, 6))),
]


@pytest.mark.parametrize("fields,expected", POLICY_CASES, ids=[c[0]["lr_policy"] for c in POLICY_CASES])
def test_lr_policy(fields, expected):
    sp = solver_param(**fields)
    step = 0
    for t in range(10):
        rate, step = learning_rate(sp, t, step)
        assert rate == pytest.approx(expected(t), rel=2e-6), t


def test_multistep_advances_once_per_iteration_and_keeps_step():
    sp = solver_param(lr_policy="multistep", base_lr=1.0, gamma=0.5, stepvalue=[3, 3, 4])
    step, steps = 0, []
    for t in range(6):
        _, step = learning_rate(sp, t, step)
        steps.append(step)
    # Caffe checks only the next stepvalue each call: repeated values advance one iteration apart
    assert steps == [0, 0, 0, 1, 2, 3]


def test_printed_rates_match_caffe_logs():
    """Values Caffe printed in the golden logs (sgd_inv, sgd_policy_exp, sgd_policy_poly)."""
    inv = solver_param(lr_policy="inv", base_lr=0.01, gamma=1e-4, power=0.75)
    assert fmt(learning_rate(inv, 58, 0)[0]) == "0.00995672"
    assert fmt(learning_rate(inv, 59, 0)[0]) == "0.00995598"
    assert fmt(learning_rate(inv, 40, 0)[0]) == "0.00997011"  # needs a correctly rounded powf
    exp = solver_param(lr_policy="exp", base_lr=0.01, gamma=0.95)
    assert fmt(learning_rate(exp, 1, 0)[0]) == "0.0095"
    assert fmt(float("nan")) == "nan" and fmt(float("inf")) == "inf" and fmt(1e-5) == "1e-05"


# ------------------------------------------------------------------------------------------------
# Update rules: numpy references, float64
# ------------------------------------------------------------------------------------------------
def reference_run(rule: str, sp: caffe_pb2.SolverParameter, w0: list[np.ndarray], grads: list[list[np.ndarray]],
                  lr_mult: list[float], decay_mult: list[float]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Apply len(grads) updates by the table of §2.12; returns (weights, history blobs in Caffe's order)."""
    w = [x.astype(np.float64) for x in w0]
    n = len(w)
    h = [np.zeros_like(x) for x in w]
    h2 = [np.zeros_like(x) for x in w]
    mu, delta = sp.momentum, sp.delta
    step = 0
    for t, g_raw in enumerate(grads):
        rate, step = learning_rate(sp, t, step)  # checked independently above
        g = [x.astype(np.float64) for x in g_raw]
        if sp.clip_gradients >= 0:
            norm = math.sqrt(sum(float((x ** 2).sum()) for x in g))
            if norm > sp.clip_gradients:
                g = [x * sp.clip_gradients / norm for x in g]
        for i in range(n):
            gi = g[i] / sp.iter_size
            decay = sp.weight_decay * decay_mult[i]
            gi = gi + decay * (w[i] if sp.regularization_type == "L2" else np.sign(w[i]))
            lr = rate * lr_mult[i]
            if rule == "SGD":
                h[i] = mu * h[i] + lr * gi
                u = h[i]
            elif rule == "Nesterov":
                old = h[i]
                h[i] = mu * h[i] + lr * gi
                u = (1 + mu) * h[i] - mu * old
            elif rule == "AdaGrad":
                h[i] = h[i] + gi ** 2
                u = lr * gi / (np.sqrt(h[i]) + delta)
            elif rule == "RMSProp":
                h[i] = sp.rms_decay * h[i] + (1 - sp.rms_decay) * gi ** 2
                u = lr * gi / (np.sqrt(h[i]) + delta)
            elif rule == "AdaDelta":
                h[i] = mu * h[i] + (1 - mu) * gi ** 2
                up = gi * np.sqrt((h2[i] + delta) / (h[i] + delta))
                h2[i] = mu * h2[i] + (1 - mu) * up ** 2
                u = lr * up
            elif rule == "Adam":
                b1, b2, tau = mu, sp.momentum2, t + 1
                h[i] = b1 * h[i] + (1 - b1) * gi
                h2[i] = b2 * h2[i] + (1 - b2) * gi ** 2
                u = lr * math.sqrt(1 - b2 ** tau) / (1 - b1 ** tau) * h[i] / (np.sqrt(h2[i]) + delta)
            w[i] = w[i] - u
    hist = h + (h2 if rule in ("AdaDelta", "Adam") else [])
    return w, hist


def torch_run(sp, w0, grads, lr_mult, decay_mult):
    params = [torch.tensor(x) for x in w0]
    solver = Solver(sp, params, lr_mult, decay_mult)
    for g in grads:
        for p, gi in zip(params, g, strict=True):
            p.grad = torch.tensor(gi)
        solver.apply_update()
        solver.iter += 1
    return [p.numpy() for p in params], [h.numpy() for h in solver.history], solver


RULES = {
    "SGD": dict(momentum=0.9),
    "Nesterov": dict(momentum=0.9),
    "AdaGrad": dict(delta=1e-3),
    "RMSProp": dict(rms_decay=0.9, delta=1e-3),
    "AdaDelta": dict(momentum=0.95, delta=1e-6, base_lr=1.0),
    "Adam": dict(momentum=0.9, momentum2=0.999, delta=1e-8, base_lr=0.001),
}


def problem(seed=0, steps=7):
    rng = np.random.default_rng(seed)
    shapes = [(3, 4), (3,), (5,)]
    w0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(steps)]
    return w0, grads, [1.0, 2.0, 0.0], [1.0, 0.0, 1.0]  # a frozen blob still gets decay into its history


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("variant", ["step_lr", "l1_itersize_clip"])
def test_update_rule_matches_numpy(rule, variant):
    fields = dict(type=rule, weight_decay=0.01, **RULES[rule])
    base = fields.pop("base_lr", 0.05)
    if variant == "step_lr":  # lr halves every 2 iterations: the velocity must keep its old-lr scale
        fields.update(lr_policy="step", base_lr=base, gamma=0.5, stepsize=2)
    else:
        fields.update(lr_policy="fixed", base_lr=base, regularization_type="L1", iter_size=3, clip_gradients=2.0)
    sp = solver_param(**fields)
    w0, grads, lr_mult, decay_mult = problem()
    want_w, want_h = reference_run(rule, sp, w0, grads, lr_mult, decay_mult)
    got_w, got_h, _ = torch_run(sp, w0, grads, lr_mult, decay_mult)
    for i, (a, b) in enumerate(zip(got_w, want_w, strict=True)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=f"{rule} weight {i}")
    assert len(got_h) == len(want_h)
    for i, (a, b) in enumerate(zip(got_h, want_h, strict=True)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7, err_msg=f"{rule} history {i}")


def test_sgd_by_hand_two_steps():
    """w=1, g=1, lr 0.1 then 0.05 (step), μ 0.9, wd 0.1: v1 = 0.1·1.1 = 0.11, w1 = 0.89;
    v2 = 0.9·0.11 + 0.05·(1 + 0.089) = 0.15345, w2 = 0.73655 (torch's SGD would give 0.7255)."""
    sp = solver_param(type="SGD", lr_policy="step", base_lr=0.1, gamma=0.5, stepsize=1, momentum=0.9,
                      weight_decay=0.1)
    w = torch.ones(1)
    s = Solver(sp, [w], [1.0], [1.0])
    for _ in range(2):
        w.grad = torch.ones(1)
        s.apply_update()
        s.iter += 1
    assert float(w) == pytest.approx(0.73655, rel=1e-6)
    assert float(s.history[0]) == pytest.approx(0.15345, rel=1e-6)


def test_clip_is_on_the_unnormalised_sum_and_logged():
    sp = solver_param(type="SGD", iter_size=2, clip_gradients=1.0)
    w = torch.zeros(2)
    lines = []
    s = Solver(sp, [w], [1.0], [0.0], log=lambda where, msg: lines.append(msg))
    w.grad = torch.tensor([3.0, 4.0])  # sum of two sub-batches: norm 5 > 1 → scaled by 0.2, then halved
    s.apply_update()
    np.testing.assert_allclose(w.numpy(), [-0.01 * 0.3, -0.01 * 0.4], rtol=1e-6)
    assert lines == ["Gradient clipping: scaling down gradients (L2 norm 5 > 1) by scale factor 0.2"]


def test_state_roundtrip_and_refusals():
    sp = solver_param(type="Adam", momentum=0.9)
    w0, grads, lr_mult, decay_mult = problem(steps=3)
    _, _, solver = torch_run(sp, w0, grads, lr_mult, decay_mult)
    st = solver.state("x_iter_3.caffemodel")
    assert st.iter == 3 and st.learned_net == "x_iter_3.caffemodel" and len(st.history) == 6
    assert list(st.history[0].shape.dim) == [3, 4]
    other = Solver(sp, [torch.tensor(x) for x in w0], lr_mult, decay_mult)
    other.restore(caffe_pb2.SolverState.FromString(st.SerializeToString()))
    assert other.iter == 3
    for a, b in zip(other.history, solver.history, strict=True):
        assert torch.equal(a, b)
    sgd = Solver(solver_param(type="SGD"), [torch.tensor(x) for x in w0], lr_mult, decay_mult)
    with pytest.raises(CaffeError, match="history blobs"):
        sgd.restore(st)


@pytest.mark.parametrize("fields,message", [
    (dict(lr_policy="cosine"), "unknown lr_policy"),
    (dict(lr_policy=""), "lr_policy is required"),
    (dict(lr_policy="step", stepsize=0), "stepsize > 0"),
    (dict(type="AdaGrad", momentum=0.9), "momentum cannot be used"),
    (dict(type="RMSProp", rms_decay=1.5), "rms_decay"),
    (dict(type="Foo"), "unknown solver type"),
    (dict(regularization_type="L3"), "regularization_type"),
    (dict(iter_size=0), "iter_size"),
    (dict(snapshot_format=caffe_pb2.SolverParameter.HDF5), "HDF5"),
    (dict(lr_policy="multistep", stepvalue=[5, 3]), "stepvalue"),
])
def test_bad_solver_fields(fields, message):
    with pytest.raises(CaffeError, match=message):
        check_solver(solver_param(**fields), "s.prototxt")

"""Caffe's solvers: learning-rate policies, the six update rules, clipping, iter_size normalisation,
regularisation and the solver state — in Caffe's order of operations, not ``torch.optim``'s.

Sources: ``src/caffe/solvers/sgd_solver.cpp`` (GetLearningRate, ApplyUpdate, ClipGradients, Normalize,
Regularize, ComputeUpdateValue, SnapshotSolverStateToBinaryProto, RestoreSolverStateFromBinaryProto) and
``nesterov_solver.cpp``, ``adagrad_solver.cpp``, ``rmsprop_solver.cpp``, ``adadelta_solver.cpp``,
``adam_solver.cpp``. The arithmetic is float32 as in Caffe; where Caffe mixes float and double (``pow`` of a
float and an int is a double in C++11) the constants are computed the same way, so the printed learning rate
is Caffe's to the last digit.

Why not ``torch.optim``: Caffe folds the learning rate into the momentum buffer (``v ← μv + lr·g; w -= v``),
so after an lr change the old velocity keeps its old scale; torch's SGD rescales it (pytorch#1099). Caffe also
clips on the global norm of the *un-normalised* iter_size sum, and adds weight decay before the adaptive
scaling of AdaGrad/RMSProp/AdaDelta/Adam. Every rule below writes its update into the diff, then
``w -= diff`` (``Net::Update``), exactly as Caffe does, so ``snapshot_diff`` stores the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from converter import caffe_pb2
from converter.errors import CaffeError
from converter.io import array_to_blob, blob_shape, blob_to_array

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
UPDATE_RULES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
TWO_HISTORIES = ("AdaDelta", "Adam")  # history_ holds 2N blobs: AdaDelta g² then update², Adam m then v

f32 = np.float32


def check_solver(sp: caffe_pb2.SolverParameter, path: str = "solver") -> None:
    """Caffe's CHECKs on solver fields (solver.cpp, sgd_solver.cpp, each rule's PreSolve), raised up front.

    Caffe fails on most of these only when the iteration that uses them comes; we refuse them before any
    work starts.
    """

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise CaffeError(f"{path}: {msg}")

    need(sp.type in UPDATE_RULES, f"unknown solver type '{sp.type}' (one of {', '.join(UPDATE_RULES)})")
    need(sp.lr_policy in LR_POLICIES, f"unknown lr_policy '{sp.lr_policy}' (one of {', '.join(LR_POLICIES)})"
         if sp.lr_policy else f"lr_policy is required (one of {', '.join(LR_POLICIES)})")
    need(sp.max_iter >= 0, f"max_iter must be >= 0, got {sp.max_iter}")
    need(sp.iter_size >= 1, f"iter_size must be >= 1, got {sp.iter_size}")
    need(sp.average_loss >= 1, f"average_loss must be >= 1, got {sp.average_loss}")
    need(sp.display >= 0, f"display must be >= 0, got {sp.display}")
    need(sp.snapshot >= 0, f"snapshot must be >= 0, got {sp.snapshot}")
    need(sp.test_interval >= 0, f"test_interval must be >= 0, got {sp.test_interval}")
    need(all(t >= 0 for t in sp.test_iter), f"test_iter must be >= 0, got {list(sp.test_iter)}")
    need(math.isfinite(sp.base_lr), f"base_lr must be finite, got {sp.base_lr}")
    need(sp.regularization_type in ("L1", "L2"),
         f"unknown regularization_type '{sp.regularization_type}' (L1 or L2)")
    need(sp.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO,
         "snapshot_format HDF5 is not supported; use BINARYPROTO (the default)")
    if sp.lr_policy in ("step", "sigmoid"):
        need(sp.stepsize > 0, f"lr_policy {sp.lr_policy} needs stepsize > 0, got {sp.stepsize}")
    if sp.lr_policy in ("step", "exp", "inv", "sigmoid", "multistep"):
        need(sp.gamma >= 0, f"lr_policy {sp.lr_policy} needs gamma >= 0, got {sp.gamma}")
    if sp.lr_policy == "poly":
        need(sp.max_iter > 0, "lr_policy poly needs max_iter > 0")
    if sp.lr_policy == "multistep":
        values = list(sp.stepvalue)
        need(all(b > a for a, b in zip(values, values[1:], strict=False)),
             f"stepvalue must increase, got {values}")
    if sp.type in ("AdaGrad", "RMSProp"):
        need(sp.momentum == 0, f"momentum cannot be used with {sp.type} (got {sp.momentum})")
    if sp.type == "RMSProp":
        need(0 <= sp.rms_decay <= 1, f"rms_decay must be in [0, 1], got {sp.rms_decay}")


def learning_rate(sp: caffe_pb2.SolverParameter, it: int, current_step: int) -> tuple[float, int]:
    """``SGDSolver::GetLearningRate`` at iteration ``it``: (rate as a float32 value, new current_step).

    ``current_step`` only matters to multistep (which advances it at most once per call, as Caffe does)
    and is set from ``it`` by step.
    """
    policy = sp.lr_policy
    base = f32(sp.base_lr)
    if policy == "fixed":
        rate = base
    elif policy == "step":
        current_step = it // sp.stepsize
        rate = float(base) * math.pow(float(f32(sp.gamma)), current_step)  # pow(float, int) is double
    elif policy == "exp":
        rate = float(base) * math.pow(float(f32(sp.gamma)), it)
    elif policy == "inv":
        x = f32(1) + f32(sp.gamma) * f32(it)
        rate = base * powf(x, -f32(sp.power))
    elif policy == "multistep":
        if current_step < len(sp.stepvalue) and it >= sp.stepvalue[current_step]:
            current_step += 1
        rate = float(base) * math.pow(float(f32(sp.gamma)), current_step)
    elif policy == "poly":
        rate = base * powf(f32(1) - f32(it) / f32(sp.max_iter), f32(sp.power))
    elif policy == "sigmoid":
        rate = base * (f32(1) / (f32(1) + f32(math.exp(-f32(sp.gamma) * (f32(it) - f32(sp.stepsize))))))
    else:
        raise CaffeError(f"unknown learning rate policy: '{policy}'")
    return float(f32(rate)), current_step


def powf(x: np.floating, y: np.floating) -> np.float32:
    """glibc's ``powf`` (correctly rounded); numpy's float32 power can be one ulp off."""
    return f32(math.pow(float(x), float(y)))


def _mul(values: Sequence[float | np.floating]) -> float:
    """A float32 product, as Caffe's ``Dtype`` arithmetic rounds it."""
    out = f32(1)
    for v in values:
        out = f32(out * f32(v))
    return float(out)


class Solver:
    """The state and update of one Caffe solver over a net's learnable blobs.

    ``params`` are the distinct learnable tensors in Caffe's ``learnable_params`` order, ``lr_mults`` and
    ``decay_mults`` their multipliers. ``iter`` is the number of updates done, as Caffe's ``iter_``.
    """

    def __init__(self, sp: caffe_pb2.SolverParameter, params: Sequence[torch.Tensor],
                 lr_mults: Sequence[float], decay_mults: Sequence[float],
                 log: Callable[[str, str], None] | None = None):
        self.sp = sp
        self.params = list(params)
        self.lr_mults = [float(m) for m in lr_mults]
        self.decay_mults = [float(m) for m in decay_mults]
        self.iter = 0
        self.current_step = 0
        self.log = log or (lambda where, msg: None)
        n = 2 if sp.type in TWO_HISTORIES else 1
        self.history = [torch.zeros_like(p) for _ in range(n) for p in self.params]
        self._zero_diffs: dict[int, torch.Tensor] = {}
        # one group per (lr_mult, decay_mult): the multi-tensor ops then take one scalar per group
        groups: dict[tuple[float, float], list[int]] = {}
        for i, key in enumerate(zip(self.lr_mults, self.decay_mults, strict=True)):
            groups.setdefault(key, []).append(i)
        self.groups = list(groups.items())

    # ------------------------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """The rate of update ``self.iter`` (advances multistep's current_step, logging it as Caffe)."""
        before = self.current_step
        rate, self.current_step = learning_rate(self.sp, self.iter, self.current_step)
        if self.sp.lr_policy == "multistep" and self.current_step != before:
            self.log("sgd_solver.cpp:50", f"MultiStep Status: Iteration {self.iter}, step = {self.current_step}")
        return rate

    def diffs(self) -> list[torch.Tensor]:
        """Each learnable's accumulated gradient (``.grad``), zeros for blobs autograd leaves out."""
        out = []
        for i, p in enumerate(self.params):
            if p.grad is not None:
                out.append(p.grad)
            else:
                z = self._zero_diffs.get(i)
                if z is None or z.device != p.device:
                    z = self._zero_diffs[i] = torch.zeros_like(p)
                else:
                    z.zero_()
                out.append(z)
        return out

    @torch.no_grad()
    def clip_gradients(self, diffs: list[torch.Tensor]) -> None:
        """``ClipGradients``: scale every diff by clip/‖all diffs‖₂ when the global norm exceeds clip."""
        clip = float(f32(self.sp.clip_gradients))
        if clip < 0:
            return
        norms = torch._foreach_norm(diffs)
        sumsq = torch.stack([n.float() * n.float() for n in norms]).sum() if norms else torch.zeros(())
        l2norm = float(f32(math.sqrt(float(sumsq))))
        if l2norm > clip:
            scale = float(f32(f32(clip) / f32(l2norm)))
            self.log("sgd_solver.cpp:92", f"Gradient clipping: scaling down gradients (L2 norm {fmt(l2norm)} > "
                     f"{fmt(clip)}) by scale factor {fmt(scale)}")
            torch._foreach_mul_(diffs, scale)

    @torch.no_grad()
    def apply_update(self, rate: float | None = None) -> float:
        """``SGDSolver::ApplyUpdate`` then ``Net::Update`` for iteration ``self.iter``; returns the rate.

        ``rate`` is :meth:`learning_rate`'s, when the caller already asked for it (to log it where Caffe
        does). The caller increments ``self.iter`` afterwards (as ``Solver::Step`` does), so the rate, the
        multistep status and Adam's bias correction see the iteration being updated.
        """
        if rate is None:
            rate = self.learning_rate()
        sp = self.sp
        diffs = self.diffs()
        self.clip_gradients(diffs)
        n = len(self.params)
        for (lr_mult, decay_mult), idx in self.groups:
            p = [self.params[i] for i in idx]
            g = [diffs[i] for i in idx]
            # Normalize
            if sp.iter_size > 1:
                torch._foreach_mul_(g, float(f32(1) / f32(sp.iter_size)))
            # Regularize
            local_decay = _mul([sp.weight_decay, decay_mult])
            if local_decay:
                if sp.regularization_type == "L2":
                    torch._foreach_add_(g, p, alpha=local_decay)
                else:
                    torch._foreach_add_(g, torch._foreach_sign(p), alpha=local_decay)
            # ComputeUpdateValue
            local_rate = _mul([rate, lr_mult])
            h = [self.history[i] for i in idx]
            h2 = [self.history[n + i] for i in idx] if sp.type in TWO_HISTORIES else []
            UPDATES[sp.type](sp, g, h, h2, local_rate, self.iter)
            # Net::Update
            torch._foreach_sub_(p, g)
        return rate

    # ------------------------------------------------------------------------------------------
    def state(self, learned_net: str) -> caffe_pb2.SolverState:
        """``SnapshotSolverStateToBinaryProto``: iter, learned_net, current_step, history in Caffe's order."""
        st = caffe_pb2.SolverState(iter=self.iter, learned_net=learned_net, current_step=self.current_step)
        for h in self.history:
            st.history.append(array_to_blob(h.detach().cpu().numpy()))
        return st

    @torch.no_grad()
    def restore(self, st: caffe_pb2.SolverState, where: str = "solverstate") -> None:
        """``RestoreSolverStateFromBinaryProto`` (weights are the caller's: ``learned_net``)."""
        if st.iter < 0 or st.current_step < 0:
            raise CaffeError(f"{where}: iter {st.iter} and current_step {st.current_step} must not be negative "
                             f"(a damaged or hand-edited solver state)")
        if len(st.history) != len(self.history):
            raise CaffeError(f"{where}: holds {len(st.history)} history blobs, the {self.sp.type} solver of "
                             f"this net needs {len(self.history)} (incorrect length of history blobs)")
        for i, (blob, h) in enumerate(zip(st.history, self.history, strict=True)):
            shape = blob_shape(blob)
            if math.prod(shape) != h.numel():
                raise CaffeError(f"{where}: history blob {i} has shape {shape}, the net's learnable blob "
                                 f"{i % len(self.params)} has {tuple(h.shape)}")
            h.copy_(torch.from_numpy(blob_to_array(blob, f"{where}: history {i}").reshape(h.shape)))
        self.iter = st.iter
        self.current_step = st.current_step


# ----------------------------------------------------------------------------------------------
# ComputeUpdateValue of each rule: g (the normalised, regularised diffs) becomes the update, in place.
# ----------------------------------------------------------------------------------------------
def _sgd(sp, g, h, h2, local_rate, it):
    # history = local_rate·g + momentum·history; diff = history
    torch._foreach_mul_(h, float(f32(sp.momentum)))
    torch._foreach_add_(h, g, alpha=local_rate)
    torch._foreach_copy_(g, h)


def _nesterov(sp, g, h, h2, local_rate, it):
    # old = history; history = local_rate·g + μ·history; diff = (1+μ)·history − μ·old
    mu = f32(sp.momentum)
    old = torch._foreach_mul(h, 1.0)
    torch._foreach_mul_(h, float(mu))
    torch._foreach_add_(h, g, alpha=local_rate)
    torch._foreach_mul_(old, -float(mu))
    torch._foreach_add_(old, h, alpha=float(f32(1) + mu))
    torch._foreach_copy_(g, old)


def _divide_by_root(sp, g, h, local_rate):
    """diff = local_rate · g / (sqrt(history) + delta): the last step of AdaGrad and RMSProp."""
    denom = torch._foreach_sqrt(h)
    torch._foreach_add_(denom, float(f32(sp.delta)))
    torch._foreach_div_(g, denom)
    torch._foreach_mul_(g, local_rate)


def _adagrad(sp, g, h, h2, local_rate, it):
    # history += g²; diff = local_rate · g / (sqrt(history) + delta)
    torch._foreach_add_(h, torch._foreach_mul(g, g))
    _divide_by_root(sp, g, h, local_rate)


def _rmsprop(sp, g, h, h2, local_rate, it):
    # history = (1−rms_decay)·g² + rms_decay·history; diff = local_rate · g / (sqrt(history) + delta)
    decay = f32(sp.rms_decay)
    torch._foreach_mul_(h, float(decay))
    torch._foreach_add_(h, torch._foreach_mul(g, g), alpha=float(f32(1) - decay))
    _divide_by_root(sp, g, h, local_rate)


def _adadelta(sp, g, h, h2, local_rate, it):
    # Eg² = (1−μ)g² + μEg²; u = g·sqrt((Edx² + δ)/(Eg² + δ)); Edx² = (1−μ)u² + μEdx²; diff = local_rate·u
    mu = f32(sp.momentum)
    delta = float(f32(sp.delta))
    torch._foreach_mul_(h, float(mu))
    torch._foreach_add_(h, torch._foreach_mul(g, g), alpha=float(f32(1) - mu))
    num = torch._foreach_add(h2, delta)
    den = torch._foreach_add(h, delta)
    torch._foreach_div_(num, den)
    torch._foreach_sqrt_(num)
    torch._foreach_mul_(g, num)
    torch._foreach_mul_(h2, float(mu))
    torch._foreach_add_(h2, torch._foreach_mul(g, g), alpha=float(f32(1) - mu))
    torch._foreach_mul_(g, local_rate)


def _adam(sp, g, m, v, local_rate, it):
    # m = (1−β1)g + β1m; v = (1−β2)g² + β2v; diff = local_rate·√(1−β2^t)/(1−β1^t) · m/(√v + ε), t = iter+1
    b1, b2 = f32(sp.momentum), f32(sp.momentum2)
    t = it + 1
    correction = f32(math.sqrt(1.0 - math.pow(float(b2), t)) / (1.0 - math.pow(float(b1), t)))
    torch._foreach_mul_(m, float(b1))
    torch._foreach_add_(m, g, alpha=float(f32(1) - b1))
    torch._foreach_mul_(v, float(b2))
    torch._foreach_add_(v, torch._foreach_mul(g, g), alpha=float(f32(1) - b2))
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, float(f32(sp.delta)))
    torch._foreach_copy_(g, m)
    torch._foreach_div_(g, denom)
    torch._foreach_mul_(g, float(f32(f32(local_rate) * correction)))


UPDATES = {"SGD": _sgd, "Nesterov": _nesterov, "AdaGrad": _adagrad, "RMSProp": _rmsprop,
           "AdaDelta": _adadelta, "Adam": _adam}


def fmt(x: float) -> str:
    """A number as C++'s ``ostream <<`` prints it (``%g``, 6 significant digits; inf/nan as glibc)."""
    if math.isnan(x):
        return "-nan" if math.copysign(1.0, x) < 0 else "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"

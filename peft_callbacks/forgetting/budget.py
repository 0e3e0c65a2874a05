r"""A forgetting budget held by a controller: the strength of a penalty set from the forgetting it measures.

Fine-tuning with a mitigation term (here the normalised L2-SP penalty, :mod:`peft_callbacks.forgetting.penalties`)
is a constrained problem: minimise the new task's loss subject to ``forgetting ≤ budget``. Its Lagrangian is
``L_new + λ · P`` with ``λ ≥ 0`` the multiplier of the constraint; instead of a weight picked by a sweep, ``λ`` is
raised while the measured forgetting is over the budget and lowered while it is under, as in the PID Lagrangian of
Stooke et al. 2020 ("Responsive safety in reinforcement learning by PID Lagrangian methods"). Two changes make one
set of defaults work across models:

* **log-space control.** The useful ``λ`` spans orders of magnitude (it depends on how large the update has to be to
  forget), so :class:`BudgetController` integrates the error in ``log λ``: each reading multiplies ``λ`` by at most
  ``e^{3·ki}`` up and ``e^{-2·ki}`` down (``ki = 0.5``). A proportional term (``kp``) reacts at once; the integral
  holds the value that balances the constraint, and does not grow while the forgetting, though over the target, is
  already falling (no wind-up past the turn). ``λ`` is ``0`` until the forgetting first exceeds the target; it then
  starts from ``min_multiplier``, which the callback sets to where the penalty equals 1 (the size of a task loss).
* **the learning rate where the penalty alone would be unstable.** A quadratic penalty of strength ``λ·scale`` under
  plain SGD with learning rate ``η`` pulls the update back by ``η·λ·scale`` of itself per step, and diverges past 2.
  Above ``ceiling = 1/(2·η·scale)`` (``η`` the largest learning rate of the optimizer) the learning rate is scaled by
  ``ceiling/λ`` (:func:`lr_scale`), so the step stays stable while the penalty's fixed point, which does not depend
  on the learning rate, keeps tightening. Adaptive optimizers (Adam) take bounded steps: for them the ceiling is
  only a safe bound.
* **normalised error.** The error is ``(forgetting − target) / max(target, 0.01)``, clipped to ``[−2, 3]``: a reading
  twice over the target weighs the same whatever the budget. The target is ``(1 − margin) · max_forgetting``, so the
  oscillation around it stays under the budget.

Readings are cheap **proxies**: the KL divergence from the starting model's outputs on a few base batches
(:class:`ProxyCalibration` turns it into forgetting, ``forgetting ≈ a + c · KL``), fitted on **full scores**
(the base metric on the whole base set) taken periodically. Until a full score has seen some forgetting, every
reading among the first ``full_every`` is a full score, and so is every reading whose KL is past 1.5 times the
largest the line was fitted on: early, small forgetting would otherwise set a line far too low for what follows.

Example::

    >>> controller = BudgetController(max_forgetting=0.1)
    >>> controller.update(0.0)  # no forgetting: no penalty
    0.0
    >>> controller.update(0.3) > 0  # three times the budget: the multiplier rises
    True
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

_SMALLEST_TARGET = 0.01  # error normalisation for budgets near zero
_LARGEST_ERROR = 3.0  # far over the target: the multiplier rises by at most e^{ki·3} per reading
_SMALLEST_ERROR = -2.0  # far under it (no forgetting): it falls by at most e^{-2·ki}


def noise_margin(max_forgetting: float, examples: int, z: float = 1.0) -> float:
    r"""The margin that covers the split-to-split noise of a forgetting read on ``examples`` base examples.

    Forgetting read on one split (``f = mean(correct_before − correct_after)``) differs from the same model's on
    another split of the same size by about ``σ(t) = sqrt(2 · t · (1 − t) / n)`` at forgetting ``t`` (each example
    that flips is a Bernoulli draw; two independent splits: twice the variance). The target ``t`` is the forgetting
    that stays ``z`` such deviations under the budget, ``t + z · σ(t) = max_forgetting``; the margin is
    ``1 − t / max_forgetting``. A budget read on 112 examples, as in the main job, gives a third of itself to noise;
    on 10,000 examples, a twentieth.

    Example::

        >>> round(noise_margin(0.1, 112), 2), round(noise_margin(0.1, 10_000), 2), noise_margin(0.0, 50)
        (0.33, 0.04, 0.0)
    """
    if max_forgetting <= 0 or examples <= 0:
        return 0.0
    low, high = 0.0, max_forgetting  # t + z·σ(t) rises with t on [0, 1/2]: bisection
    for _ in range(60):
        t = 0.5 * (low + high)
        if t + z * math.sqrt(2.0 * t * (1.0 - t) / examples) > max_forgetting:
            high = t
        else:
            low = t
    return 1.0 - low / max_forgetting


def replay_share(odds: float, max_share: float) -> float:
    """The replay share a strength stands for: base examples ``odds`` times as many as new ones, at most
    ``max_share`` of each step (``odds / (1 + odds)``).

    Example::

        >>> replay_share(0.0, 0.8), replay_share(1.0, 0.8), replay_share(100.0, 0.8)
        (0.0, 0.5, 0.8)
    """
    return min(odds / (1.0 + odds), max_share) if odds > 0 else 0.0


def snapshot_trained(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of what training changes: every parameter that requires grad and every floating-point buffer
    (BatchNorm statistics), by name; :func:`restore_trained` puts it back.

    Example::

        >>> net = nn.Linear(2, 2)
        >>> saved = snapshot_trained(net)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> restore_trained(net, saved)
        >>> torch.equal(net.weight, saved["weight"])
        True
    """
    tensors = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    tensors.update({n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()})
    return tensors


def restore_trained(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`snapshot_trained` back into ``module`` in place (the same names; a missing name is an error)."""
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    missing = sorted(set(tensors) - set(own))
    if missing:
        raise KeyError(f"The saved state names tensors the model does not have: {missing[:5]}.")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].device, own[name].dtype))


def lr_scale(multiplier: float, ceiling: float | None) -> float:
    """The learning-rate factor that keeps a penalty of strength ``multiplier`` stable: ``min(1, ceiling/λ)``.

    Example::

        >>> lr_scale(10.0, ceiling=40.0), lr_scale(80.0, ceiling=40.0), lr_scale(80.0, ceiling=None)
        (1.0, 0.5, 1.0)
    """
    if ceiling is None or multiplier <= ceiling:
        return 1.0
    return ceiling / multiplier


class BudgetController:
    """PI control of a Lagrange multiplier ``λ`` in log space (see the module docstring).

    Args:
        max_forgetting: the budget, in ``[0, 1]``.
        margin: aim at ``(1 − margin) · max_forgetting``, in ``[0, 1)``.
        kp: proportional gain on ``log λ``.
        ki: integral gain on ``log λ`` (per reading).
        min_multiplier: ``λ`` once the constraint is active (the integral at zero); below it ``λ = 0``.
        max_multiplier: the largest ``λ`` (the integral stops there: no wind-up against a saturated actuator).
        lead: readings to look ahead while forgetting rises (0: none): the error is taken on ``f + lead · (f − f_prev)``
            (a derivative term on the rise only), so a fast rise is met before it crosses the target.

    Example::

        >>> controller = BudgetController(max_forgetting=0.1, margin=0.0)
        >>> for _ in range(60):  # forgetting falls as the strength rises: 0.5 / (1 + λ/100)
        ...     forgetting = 0.5 / (1 + controller.multiplier / 100)
        ...     _ = controller.update(forgetting)
        >>> round(0.5 / (1 + controller.multiplier / 100), 3)
        0.1
    """

    def __init__(
        self,
        max_forgetting: float,
        margin: float = 0.2,
        kp: float = 0.3,
        ki: float = 0.5,
        min_multiplier: float = 1.0,
        max_multiplier: float = 1e8,
        lead: float = 0.0,
    ) -> None:
        self.max_forgetting = max_forgetting
        self.margin = margin
        self.kp, self.ki, self.lead = kp, ki, lead
        self.min_multiplier, self.max_multiplier = min_multiplier, max_multiplier
        self.integral = 0.0  # log(λ / min_multiplier) held by the integral term; 0: inactive
        self.multiplier = 0.0
        self.error = 0.0
        self.last: float | None = None  # the previous reading

    @property
    def target(self) -> float:
        """The forgetting the controller aims at: ``(1 − margin) · max_forgetting``."""
        return (1.0 - self.margin) * self.max_forgetting

    def update(self, forgetting: float) -> float:
        """One reading of the forgetting (a non-finite one counts as the worst); returns the new multiplier ``λ``."""
        rise = forgetting - self.last if self.last is not None and math.isfinite(forgetting) else 0.0
        ahead = forgetting + self.lead * max(rise, 0.0)
        error = (ahead - self.target) / max(self.target, _SMALLEST_TARGET)
        error = error if math.isfinite(forgetting) else _LARGEST_ERROR
        self.error = min(max(error, _SMALLEST_ERROR), _LARGEST_ERROR)
        span = math.log(self.max_multiplier / self.min_multiplier)
        falling = self.error > 0 and self.last is not None and forgetting < self.last
        rising = self.error < 0 and rise > 0
        # over the target but already falling, or under it but rising: hold the integral (no wind-up past the turn,
        # no release while the forgetting still climbs towards the target)
        if not (falling or rising):
            self.integral = min(max(self.integral + self.ki * self.error, 0.0), span)
        self.last = forgetting if math.isfinite(forgetting) else None
        level = self.integral + self.kp * self.error if self.integral > 0 else 0.0
        self.multiplier = self.min_multiplier * math.exp(min(level, span)) if level > 0 else 0.0
        return self.multiplier

    @property
    def active(self) -> bool:
        """Is the constraint active (``λ > 0`` held by the integral)?"""
        return self.integral > 0

    def start_active(self, multiplier: float) -> None:
        """Start with the constraint active at ``multiplier`` (``> min_multiplier``): a feed-forward start for an
        actuator whose effect lags (replay against an optimizer's momentum); the controller lowers it, down to
        release, while the forgetting stays under the target."""
        if multiplier > self.min_multiplier:
            self.integral = min(
                math.log(multiplier / self.min_multiplier), math.log(self.max_multiplier / self.min_multiplier)
            )
            self.multiplier = self.min_multiplier * math.exp(self.integral)

    def start_at(self, multiplier: float) -> None:
        """While inactive: the ``λ`` the next activation starts from (``min_multiplier``), at least ``1``."""
        if not self.active and math.isfinite(multiplier):
            self.min_multiplier = min(max(1.0, multiplier), self.max_multiplier)

    def state_dict(self) -> dict[str, float]:
        return {
            "integral": self.integral,
            "multiplier": self.multiplier,
            "error": self.error,
            "min_multiplier": self.min_multiplier,
            "last": self.last,
            "margin": self.margin,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.integral = float(state.get("integral", 0.0))
        self.multiplier = float(state.get("multiplier", 0.0))
        self.error = float(state.get("error", 0.0))
        self.min_multiplier = float(state.get("min_multiplier", self.min_multiplier))
        self.last = None if state.get("last") is None else float(state["last"])
        self.margin = float(state.get("margin", self.margin))


class ProxyCalibration:
    """``forgetting ≈ a + c · KL``, fitted on the (KL, forgetting) pairs of the full scores: a least-squares line
    over decayed sums (older pairs weigh ``decay`` as much at each new one: the relation drifts in training), so the
    estimate is unbiased around the KLs seen, where a line through the origin reads low near the budget (ruled by
    the largest KLs, where accuracy saturates) and would let the controller settle over it. With one pair, or KLs
    that do not vary, ``c = Σ forgetting / Σ KL``; ``c ≥ 0`` always.

    Example::

        >>> calibration = ProxyCalibration()
        >>> calibration.factor is None
        True
        >>> calibration.add(kl=0.2, forgetting=0.1)
        >>> calibration.estimate(0.4)
        0.2
        >>> calibration.add(kl=0.4, forgetting=0.15)
        >>> round(calibration.estimate(0.3), 4)  # on the line through both pairs
        0.125
    """

    def __init__(self, decay: float = 0.7) -> None:
        self.decay = decay
        self.sums = [0.0] * 5  # Σw, Σw·KL, Σw·forgetting, Σw·KL², Σw·KL·forgetting
        self.pairs = 0
        self.max_kl = 0.0  # the largest KL of a pair: beyond it the line is extrapolated

    def _line(self) -> tuple[float, float] | None:
        weight, kl, forgetting, kl2, cross = self.sums
        if weight <= 0 or kl <= 0 or forgetting <= 0:
            return None
        variance = kl2 / weight - (kl / weight) ** 2
        if self.pairs < 2 or variance <= 1e-12 * (kl2 / weight):
            return 0.0, forgetting / kl
        slope = max((cross / weight - kl * forgetting / weight**2) / variance, 0.0)
        return forgetting / weight - slope * kl / weight, slope

    @property
    def factor(self) -> float | None:
        """``c``, the slope, or ``None`` before a full score has seen both drift and forgetting."""
        line = self._line()
        return None if line is None else line[1]

    def add(self, kl: float, forgetting: float) -> None:
        """One full score and the proxy KL read at the same step."""
        pair = (1.0, kl, forgetting, kl * kl, kl * forgetting)
        self.sums = [self.decay * total + value for total, value in zip(self.sums, pair)]
        self.pairs += 1
        self.max_kl = max(self.max_kl, kl)

    def estimate(self, kl: float) -> float | None:
        """The forgetting a proxy KL stands for (``None`` until calibrated)."""
        line = self._line()
        return None if line is None else max(line[0] + line[1] * kl, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": list(self.sums), "pairs": self.pairs, "max_kl": self.max_kl}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = [float(v) for v in state.get("sums", [0.0] * 5)]
        self.pairs = int(state.get("pairs", 0))
        self.max_kl = float(state.get("max_kl", 0.0))


class ForgettingBudgetState:
    """The controller, the calibration and the reading schedule together: what the callback drives and saves.

    Args:
        max_forgetting: the budget, in ``[0, 1]``.
        full_every: a full score every this many readings once calibrated.
        margin: see :class:`BudgetController`.

    Example::

        >>> budget = ForgettingBudgetState(max_forgetting=0.1, full_every=3)
        >>> budget.needs_full()  # not calibrated yet: every reading is a full score
        True
        >>> row = budget.observe(step=10, kl=0.05, full_forgetting=0.2)
        >>> row["forgetting"], row["multiplier"] > 0, budget.needs_full()
        (0.2, True, False)
        >>> budget.observe(step=20, kl=0.05)["forgetting"]  # estimated from the proxy
        0.2
    """

    extrapolation = 1.5  # a full score once the proxy KL passes 1.5 x the largest KL calibrated on

    def __init__(self, max_forgetting: float, full_every: int = 5, margin: float = 0.2) -> None:
        self.controller = BudgetController(max_forgetting, margin=margin)
        self.calibration = ProxyCalibration()
        self.full_every = full_every
        self.readings = 0
        self.since_full = 0
        self.lr_scale = 1.0
        self.history: list[dict[str, float | int | None]] = []

    @property
    def multiplier(self) -> float:
        return self.controller.multiplier

    def needs_full(self, kl: float | None = None) -> bool:
        """Should this reading be a full score? Every ``full_every`` readings; every reading among the first
        ``full_every`` until a full score has seen forgetting (a budget that is never approached costs no more); and
        whenever the proxy ``kl`` is past ``extrapolation`` times the largest KL the calibration was fitted on (the
        relation bends: early, tiny forgetting would put the line far too low for larger KLs)."""
        uncalibrated = self.calibration.factor is None and self.readings < self.full_every
        beyond = kl is not None and self.calibration.max_kl > 0 and kl > self.extrapolation * self.calibration.max_kl
        return uncalibrated or beyond or self.since_full + 1 >= self.full_every

    def observe(
        self, step: int, kl: float, full_forgetting: float | None = None, ceiling: float | None = None
    ) -> dict[str, float | int | None]:
        """One reading: the proxy ``kl`` and, on a full score, the measured forgetting; returns the logged row.
        ``ceiling``: the strength past which the learning rate is scaled down (:func:`lr_scale`)."""
        if full_forgetting is not None:
            if kl > 0 and math.isfinite(kl) and math.isfinite(full_forgetting):
                self.calibration.add(kl, full_forgetting)
            forgetting, self.since_full = full_forgetting, 0
        else:
            estimate = self.calibration.estimate(kl) if math.isfinite(kl) else math.inf
            forgetting, self.since_full = estimate or 0.0, self.since_full + 1
        self.readings += 1
        multiplier = self.controller.update(forgetting)
        self.lr_scale = lr_scale(multiplier, ceiling)
        row = {
            "step": step,
            "kl": kl,
            "forgetting": forgetting,
            "measured_forgetting": full_forgetting,
            "calibration": self.calibration.factor,
            "multiplier": multiplier,
            "lr_scale": self.lr_scale,
        }
        self.history.append(row)
        return row

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "calibration": self.calibration.state_dict(),
            "readings": self.readings,
            "since_full": self.since_full,
            "lr_scale": self.lr_scale,
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state.get("controller", {}))
        self.calibration.load_state_dict(state.get("calibration", {}))
        self.readings = int(state.get("readings", 0))
        self.since_full = int(state.get("since_full", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.history = [dict(r) for r in state.get("history", [])]

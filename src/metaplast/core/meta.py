"""Meta-parameters (Algorithm 1's outer loop): the named set a run learns, their regularisers
(Eq. 6, Eq. S.16) and the per-term meta-step scaling ``rule.term_scale``.

:class:`MetaParameters` holds Θ (shared, per layer or per synapse), a plastic pathway's
coefficients ψ, meta-learned initial feedback matrices and meta-learned initial weights of
chosen layers — each its own Adam parameter group with its own learning rate and regulariser.

Term scaling: the paper's plain Adam takes sign-like first steps of the same size on every θ_r,
although the terms F^r differ in size by up to two orders of magnitude (DESIGN §8: F^5 is F^0
scaled by Σ y_ℓ ≈ 45); a step of 1e-3 on θ_5 already makes the inner loop diverge. Adam on
``φ_r = s_r θ_r`` (its moments live in φ-space) is plain Adam with a per-term step lr / s_r,
while Θ, the regulariser and every log stay in the paper's units; ``s_r = 1`` for every r is
plain Adam bit for bit. The scales are given per term id or measured (``auto``): the size of
each term relative to F^0 along the inner loops of a few calibration episodes with the run's
initial Θ (:func:`term_ratios`, :func:`scales_from_ratios`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metaplast.core.learner import Learner, State
from metaplast.core.networks import Products
from metaplast.core.terms import TERMS, term_norms

#: Regularisers R of a meta-parameter group, per trial: ‖·‖₁ (Eq. 6), ‖·‖₂ — the norm, not its
#: square (Eq. S.16) — or none.
REGULARISERS = ("none", "l1", "l2")

#: ``term_scale=auto``: the quantile over all calibration steps of ``‖F^r‖ / ‖F^0‖`` that sets
#: ``s_r`` (then the maximum over layers, clamped at 1), high enough to see a term's growth.
QUANTILE = 0.9


def regulariser(value: Tensor | list[Tensor], kind: str) -> Tensor:
    """R per trial of a meta-parameter (``(T, ...)``, or a list of such): ‖·‖₁, ‖·‖₂ or 0."""
    parts = value if isinstance(value, (list, tuple)) else [value]
    flat = torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
    if kind == "l1":
        return flat.abs().sum(1)
    if kind == "l2":
        return flat.norm(dim=1)
    if kind == "none":
        return flat.new_zeros(flat.shape[0])
    raise ValueError(f"regulariser {kind!r} is unknown; allowed: {', '.join(REGULARISERS)}")


class MetaParameters(torch.nn.Module):
    """The meta-parameters of ``trials`` independent trials (the leading dimension of each).

    - ``theta``: Θ in the shape of :meth:`Learner.theta_shape`, starting at ``theta_init``
      (one value per rule term);
    - ``psi``: the pathway's own rule coefficients (plastic feedback), starting at ``psi_init``;
    - ``feedback``: meta-learned initial matrices of the pathway (given starting values), or none;
    - ``init``: meta-learned initial weights of chosen layers ``{layer: (T, n, m)}``, or none;
    - ``bias``: meta-learned biases ``[(T, 1, n) per layer]`` (fixed within an episode), or none;
    - the pathway's own meta-parameters (:meth:`metaplast.core.pathways.Pathway.meta_parameters`),
      each under its own name.
    """

    def __init__(
        self,
        learner: Learner,
        trials: int,
        theta_init: list[float],
        psi_init: list[float] | None = None,
        feedback: list[Tensor] | None = None,
        init: Mapping[int, Tensor] | None = None,
        bias: list[Tensor] | None = None,
    ):
        super().__init__()
        row = torch.tensor(theta_init, dtype=torch.get_default_dtype())
        shapes = learner.theta_shape(trials)
        if learner.share == "synapse":
            self.theta = torch.nn.ParameterList([torch.nn.Parameter(row.expand(s).clone()) for s in shapes])
        else:
            self.theta = torch.nn.Parameter(row.expand(shapes[0]).clone())
        terms = learner.pathway.rule_terms
        if terms:
            values = torch.tensor(psi_init if psi_init is not None else [0.0] * len(terms))
            self.psi = torch.nn.Parameter(values.to(row.dtype).expand(trials, len(terms)).clone())
        self.feedback = torch.nn.ParameterList([torch.nn.Parameter(b.clone()) for b in feedback or []])
        self.init = torch.nn.ParameterDict(
            {str(layer): torch.nn.Parameter(w.clone()) for layer, w in (init or {}).items()}
        )
        self.bias = torch.nn.ParameterList([torch.nn.Parameter(b.clone()) for b in bias or []])
        own = learner.pathway.meta_parameters(trials, learner.network.sizes)
        clash = set(own) & {"theta", "psi", "feedback", "init", "bias"}
        if clash:
            raise ValueError(f"the pathway's meta-parameters {sorted(clash)} clash with metaplast's own")
        self.extra = torch.nn.ParameterDict(
            {k: torch.nn.Parameter(v.to(row.dtype).clone()) for k, v in own.items()}
        )

    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Named groups of parameters (one Adam parameter group each), only those in use."""
        theta = list(self.theta) if isinstance(self.theta, torch.nn.ParameterList) else [self.theta]
        groups = {"theta": theta}
        if hasattr(self, "psi"):
            groups["psi"] = [self.psi]
        if len(self.feedback):
            groups["feedback"] = list(self.feedback)
        if len(self.init):
            groups["init"] = list(self.init.values())
        if len(self.bias):
            groups["bias"] = list(self.bias)
        groups.update({name: [value] for name, value in self.extra.items()})
        return groups

    def as_meta(self) -> dict:
        """The mapping the learner reads (``theta``, and ``psi``, ``feedback``, ``init`` where used)."""
        theta = list(self.theta) if isinstance(self.theta, torch.nn.ParameterList) else self.theta
        meta = {"theta": theta}
        if hasattr(self, "psi"):
            meta["psi"] = self.psi
        if len(self.feedback):
            meta["feedback"] = list(self.feedback)
        if len(self.init):
            meta["init"] = {int(k): v for k, v in self.init.items()}
        if len(self.bias):
            meta["bias"] = list(self.bias)
        meta.update(self.extra.items())
        return meta


# ---------------------------------------------------------------- term scaling


#: Named scale sets: ``measured`` are the scales that removed most of the divergence of the pool
#: in the discovery issue (about each term's size relative to F^0, with a margin of 5 for the
#: cubic terms F^6..F^8, which grow as the weights do); ``stable`` (the pool's default) also
#: divides θ_1's step by 3: F^1 = -e_ℓ e_{ℓ-1}ᵀ is quadratic in the errors, and the trials that
#: still diverged under ``measured`` had drifted to large θ_1 (README, Discovery).
NAMED_TERM_SCALES: dict[str, dict[int, float]] = {
    "measured": {3: 10.0, 4: 3.0, 5: 45.0, 6: 5.0, 7: 5.0, 8: 5.0, 9: 25.0},
    "stable": {1: 3.0, 3: 10.0, 4: 3.0, 5: 45.0, 6: 5.0, 7: 5.0, 8: 5.0, 9: 25.0},
}


def check_term_scale(spec) -> None:
    """``null``, ``auto``, a name of :data:`NAMED_TERM_SCALES` or a mapping ``{term id: finite s > 0}``;
    raises ValueError naming the value."""
    if spec is None or spec == "auto" or (isinstance(spec, str) and spec in NAMED_TERM_SCALES):
        return
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"{spec!r} is not allowed; allowed: null (plain Adam), auto (measured before training), "
            f"{', '.join(NAMED_TERM_SCALES)}, or a mapping term id -> scale, e.g. {{5: 45, 9: 25}}"
        )
    for key, value in spec.items():
        try:
            r = int(key)
        except (TypeError, ValueError):
            r = None
        if r not in TERMS:
            raise ValueError(
                f"{{{key!r}: {value!r}}}: {key!r} is not a term id; allowed: {min(TERMS)}..{max(TERMS)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{{{key!r}: {value!r}}}: the scale must be a finite number > 0")


def fixed_scales(spec: Mapping | str, terms) -> list[float]:
    """One scale per column of Θ (the rule's terms) from ``{term id: s}`` or a named set; unnamed
    terms get 1."""
    spec = NAMED_TERM_SCALES[spec] if isinstance(spec, str) else spec
    given = {int(r): float(s) for r, s in spec.items()}
    return [given.get(r, 1.0) for r in terms]


@torch.no_grad()
def term_ratios(learner: Learner, state: State, meta: Mapping, x_train: Tensor, y_train: Tensor) -> Tensor:
    """``‖F^r_ℓ‖ / ‖F^0_ℓ‖`` at every online step of the inner loop, shape ``(steps, T, L, 10)``."""
    coefficients = learner.layer_coefficients(meta["theta"])
    ratios = []
    for step in range(x_train.shape[1]):
        x, y = x_train[:, step : step + 1], y_train[:, step : step + 1]
        layers, _, _ = learner.signals(state, meta, x, y, Products(state.weights))
        norms = torch.stack(
            [
                term_norms(w, s if s.wt_y is not None else s._replace(wt_y=s.y_post @ w))
                for w, s in zip(state.weights, layers)
            ],
            dim=1,
        )
        ratios.append(norms / norms[..., :1])
        state = learner.step(state, meta, x, y, coefficients)
    return torch.stack(ratios)


def scales_from_ratios(ratios: Tensor, learner: Learner, quantile: float = QUANTILE) -> list[float]:
    """``s_r``: the ``quantile`` over steps and trials of each layer's ratio, the maximum over the
    layers whose rule has term r, clamped at 1 (no term's step is enlarged); one per column of Θ."""
    ratios = ratios.flatten(0, 1).double()  # (steps * T, L, 10)
    finite = ratios.masked_fill(~ratios.isfinite(), float("nan"))  # a step with F^0 = 0 says nothing
    per_layer = torch.nanquantile(finite, quantile, dim=0)  # (L, 10)
    rule, scales = learner.rule, []
    for r in rule.terms:
        layers = [i for i, terms in enumerate(rule.layer_terms) if r in terms]
        scales.append(max(1.0, float(per_layer[layers, r].max())))
    return scales

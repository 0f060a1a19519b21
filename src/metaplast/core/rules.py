"""Plasticity rules: which terms Θ holds and which of them each layer uses (Eqs. 4-10, Table 1)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from metaplast.core.terms import TERM_IDS, TERMS

#: Named rules: Eq. 4 (f0), Eq. 5 (pool), Eq. 7 (bio), Eq. 8 (ehebb), Eq. 10 (oja); FLP's local
#: rule (flp, Lindsey & Litwin-Kumar 2020); ``none``: a frozen layer (per-layer rules only). One
#: line each.
NAMED_RULES: dict[str, tuple[int, ...]] = {
    "f0": (0,),
    "pool": TERM_IDS,
    "bio": (0, 2, 9),
    "ehebb": (0, 2),
    "oja": (0, 9),
    "flp": (10,),
    "none": (),
}


def resolve_rule(spec: str | int | Iterable[int]) -> tuple[int, ...]:
    """Term ids of a rule given by name (f0, pool, bio, ehebb, oja) or as a list of ids."""
    if isinstance(spec, str):
        if spec not in NAMED_RULES:
            raise ValueError(
                f"rule {spec!r} is unknown; allowed: {', '.join(NAMED_RULES)} or a list of term ids "
                f"{min(TERMS)}..{max(TERMS)}"
            )
        return NAMED_RULES[spec]
    ids = [spec] if isinstance(spec, int) else list(spec)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i not in TERMS]
    if bad or not ids:
        raise ValueError(
            f"rule terms {ids!r} are invalid ({bad!r}); allowed: a non-empty list of term ids "
            f"{min(TERMS)}..{max(TERMS)}"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"rule terms {ids!r} repeat an id; each term id may appear once")
    return tuple(sorted(ids))


def rule_name(terms: Sequence[int]) -> str:
    """The name of a term set in :data:`NAMED_RULES`, else its ids in braces: ``bio``, ``{0,3}``."""
    terms = tuple(sorted(terms))
    for name, named in NAMED_RULES.items():
        if named == terms:
            return name
    return "{" + ",".join(map(str, terms)) + "}"


@dataclass(frozen=True)
class Rule:
    """Which terms Θ holds (its columns) and which of them each layer uses."""

    terms: tuple[int, ...]
    layer_terms: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, spec, depth: int, per_layer: Sequence | None = None) -> Rule:
        """One rule shared by all ``depth`` layers, or one rule per layer (Table 1)."""
        if per_layer is None:
            terms = resolve_rule(spec)
            if not terms:
                raise ValueError(f"rule {spec!r} has no terms: a whole frozen network learns nothing")
            return cls(terms, (terms,) * depth)
        if len(per_layer) != depth:
            raise ValueError(
                f"rule.per_layer has {len(per_layer)} entries but the network has {depth} layers; "
                f"give one rule per layer"
            )
        layer_terms = tuple(resolve_rule(s) for s in per_layer)
        terms = tuple(sorted(set().union(*layer_terms)))
        if not terms:
            raise ValueError(
                "rule.per_layer makes every layer frozen ('none'); give at least one plastic layer"
            )
        return cls(terms, layer_terms)

    @property
    def label(self) -> str:
        """``ehebb``, ``{0,3}``, or one name per layer ``[f0,ehebb,f0]`` (tables, legends, tags)."""
        if len(set(self.layer_terms)) > 1:
            return "[" + ",".join(rule_name(t) for t in self.layer_terms) + "]"
        return rule_name(self.terms)

    def with_depth(self, depth: int) -> Rule:
        """The same rule for a network of ``depth`` layers (a per-layer rule must already fit)."""
        if len(self.layer_terms) == depth:
            return self
        if len(set(self.layer_terms)) > 1:
            raise ValueError(
                f"the rule has one term set per layer for {len(self.layer_terms)} layers, "
                f"but this network has {depth}"
            )
        return Rule(self.terms, (self.terms,) * depth)

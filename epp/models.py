"""Model resolution: which model a request is sent as, and at what priority.

Order (documented in README "Model resolution"):
1. an InferenceModelRewrite rule that names the model exactly;
2. an InferenceModel whose modelName is the model (its weighted targetModels);
3. a generic InferenceModelRewrite rule (empty `matches`);
4. the header `x-llm-d-model-name-rewrite` / `x-gateway-model-name-rewrite`;
5. otherwise the model as sent.
The objects are the operator's and win over the header, which any client can set: the reference
applies a matching rewrite rule (exact or generic) after reading the header, so the rule wins.
Priority: the InferenceObjective named by `x-llm-d-inference-objective` / `x-gateway-inference-objective`
when it exists, else the criticality of an InferenceModel claiming the client's model name, else 0.
An InferenceModel is an exact claim on a name, so it beats a generic rewrite; an exact rewrite is
the newer, explicit API, so it wins the target, while the InferenceModel's criticality still sets
the priority.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from epp.resources import InferenceModel, InferenceModelRewrite, TargetModel, age_key


class NoValidTarget(Exception):
    """Every target of the matching object has weight 0 (a reserved model name)."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome for one request's model name."""

    target: str
    priority: int
    source: str  # "header" | "rewrite" | "model" | "generic" | "none"
    rule: str = ""  # namespace/name of the object that decided, for metrics and logs


def weighted_choice(targets: Sequence[TargetModel], rng: random.Random | None = None) -> str:
    """Pick a target by weight; uniform when no weight is given or all are zero."""
    r = rng or random
    if len(targets) == 1:
        return targets[0].name
    weights = [t.weight or 0 for t in targets]
    total = sum(weights)
    if total <= 0:
        return targets[r.randrange(len(targets))].name
    x = r.random() * total
    for t, w in zip(targets, weights, strict=True):
        x -= w
        if x < 0:
            return t.name
    return targets[-1].name


def _model_target(m: InferenceModel, rng: random.Random | None) -> str:
    if not m.targets:
        return m.model_name
    if all(t.weight is not None for t in m.targets):
        if sum(t.weight or 0 for t in m.targets) <= 0:
            raise NoValidTarget(f"no valid target model for {m.model_name!r} (all weights are 0)")
        return weighted_choice(m.targets, rng)
    # weights absent: each target weight 1 (the CRD default)
    return m.targets[(rng or random).randrange(len(m.targets))].name


@dataclass(slots=True)
class ModelTable:
    """Lookup tables built once per change of the model objects; read per request."""

    exact: dict[str, tuple[str, tuple[TargetModel, ...]]] = field(default_factory=dict)
    generic: tuple[str, tuple[TargetModel, ...]] | None = None
    models: dict[str, InferenceModel] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, models: Iterable[InferenceModel], rewrites: Iterable[InferenceModelRewrite]) -> ModelTable:
        t = cls()
        for m in sorted(models, key=lambda m: age_key(m.meta)):
            winner = t.models.get(m.model_name)
            if winner is None:
                t.models[m.model_name] = m
            else:
                t.conflicts[m.meta.key] = (
                    f"modelName {m.model_name!r} is already claimed by the older InferenceModel {winner.meta.key}"
                )
        for rw in sorted(rewrites, key=lambda r: age_key(r.meta)):
            for rule in rw.rules:
                if not rule.matches:
                    if t.generic is None:
                        t.generic = (rw.meta.key, rule.targets)
                    continue
                for name in rule.matches:
                    t.exact.setdefault(name, (rw.meta.key, rule.targets))
        return t

    def resolve(self, model: str, forced: str | None = None, rng: random.Random | None = None) -> Resolution:
        """Resolve a client model name (`forced`: the client's rewrite header, weakest of all);
        raises NoValidTarget for a reserved name."""
        im = self.models.get(model)
        priority = im.priority if im is not None else 0
        hit = self.exact.get(model)
        if hit is not None:
            return Resolution(weighted_choice(hit[1], rng), priority, "rewrite", hit[0])
        if im is not None:
            return Resolution(_model_target(im, rng), priority, "model", im.meta.key)
        if self.generic is not None:
            return Resolution(weighted_choice(self.generic[1], rng), priority, "generic", self.generic[0])
        if forced:
            return Resolution(forced, priority, "header")
        return Resolution(model, priority, "none")

    @property
    def empty(self) -> bool:
        return not (self.exact or self.generic or self.models)

"""Model resolution: rewrites, InferenceModels, precedence, weighted draws."""

from __future__ import annotations

import random

import pytest

from epp.models import ModelTable, NoValidTarget, weighted_choice
from epp.resources import parse_object


def rewrite(name, rules, created=""):
    return parse_object({"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "kind": "InferenceModelRewrite",
                         "metadata": {"name": name, "creationTimestamp": created},
                         "spec": {"poolRef": {"name": "p"}, "rules": rules}})


def model(name, model_name, targets=None, crit=None, created="", version="v1alpha2"):
    spec = {"modelName": model_name, "poolRef": {"name": "p"}}
    if targets is not None:
        spec["targetModels"] = targets
    if crit:
        spec["criticality"] = crit
    return parse_object({"apiVersion": f"inference.networking.x-k8s.io/{version}", "kind": "InferenceModel",
                         "metadata": {"name": name, "creationTimestamp": created}, "spec": spec})


def rule(matches, *targets):
    return {"matches": [{"model": {"type": "Exact", "value": m}} for m in matches],
            "targets": [{"modelRewrite": t} if isinstance(t, str) else {"modelRewrite": t[0], "weight": t[1]}
                        for t in targets]}


def test_precedence_exact_over_generic_then_oldest_then_first_rule():
    t = ModelTable.build([], [
        rewrite("new", [rule(["a"], "from-new"), rule([], "generic-new")], "2025-02-01T00:00:00Z"),
        rewrite("old", [rule([], "generic-old"), rule(["a"], "from-old-1"), rule(["a"], "from-old-2")],
                "2025-01-01T00:00:00Z"),
    ])
    assert t.resolve("a").target == "from-old-1"
    assert t.resolve("zzz").target == "generic-old"
    assert t.resolve("zzz").source == "generic"


def test_inference_model_beats_generic_and_exact_rewrite_beats_model():
    t = ModelTable.build([model("im", "a", [{"name": "a-v2"}], crit="Critical"), model("im2", "b", crit="Sheddable")],
                         [rewrite("rw", [rule(["a"], "a-rewritten"), rule([], "generic")])])
    r = t.resolve("a")
    assert (r.target, r.source, r.priority) == ("a-rewritten", "rewrite", 100)
    r = t.resolve("b")
    assert (r.target, r.source, r.priority) == ("b", "model", -1)
    assert t.resolve("c").target == "generic"


def test_operator_objects_win_over_the_client_rewrite_header():
    # the reference applies a matching rule (exact or generic) after reading the header
    t = ModelTable.build([model("im", "b", [{"name": "b-v2"}])],
                         [rewrite("rw", [rule(["a"], "a-rewritten"), rule([], "generic")])])
    assert (t.resolve("a", forced="x").target, t.resolve("a", forced="x").source) == ("a-rewritten", "rewrite")
    assert t.resolve("b", forced="x").target == "b-v2"
    assert t.resolve("c", forced="x").target == "generic"
    only_exact = ModelTable.build([], [rewrite("rw", [rule(["a"], "a-rewritten")])])
    r = only_exact.resolve("c", forced="x")
    assert (r.target, r.source) == ("x", "header")
    assert only_exact.resolve("c").source == "none"


def test_duplicate_model_name_oldest_wins_and_loser_reported():
    t = ModelTable.build([model("young", "a", [{"name": "young-t"}], created="2025-03-01T00:00:00Z"),
                          model("old", "a", [{"name": "old-t"}], created="2025-01-01T00:00:00Z")], [])
    assert t.resolve("a").target == "old-t"
    assert "default/young" in t.conflicts and "default/old" in t.conflicts["default/young"]


def test_all_zero_weights_is_no_valid_target():
    t = ModelTable.build([model("r", "reserved", [{"name": "x", "weight": 0}])], [])
    with pytest.raises(NoValidTarget, match="no valid target model"):
        t.resolve("reserved")


def test_rewrite_uniform_when_weights_absent_or_zero():
    rng = random.Random(1)
    counts = {"x": 0, "y": 0}
    t = ModelTable.build([], [rewrite("rw", [rule(["a"], ("x", 0), ("y", 0))])])
    for _ in range(2000):
        counts[t.resolve("a", rng=rng).target] += 1
    assert 850 < counts["x"] < 1150


def test_weighted_choice_converges():
    from epp.resources import TargetModel
    rng = random.Random(7)
    ts = [TargetModel("a", 90), TargetModel("b", 10)]
    n = 10000
    a = sum(weighted_choice(ts, rng) == "a" for _ in range(n))
    assert abs(a - 9000) < 5 * (n * 0.09) ** 0.5


def test_criticality_default_names_per_version():
    assert model("x", "x", version="v1alpha1").criticality == "Default"
    assert model("x", "x").criticality == "Standard"

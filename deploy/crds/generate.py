"""Generate the CustomResourceDefinitions in this folder (the YAML files are the artifacts users apply).

Run `python deploy/crds/generate.py` after changing a schema here; tests/deploy/test_crds.py fails when
the committed YAML and this generator disagree, so the two cannot drift.

The schemas follow the public Gateway API Inference Extension types (field names, limits, enums and
defaults), written as OpenAPI v3 structural schemas: every node has a type, maps use
additionalProperties, and cross-field rules are CEL `x-kubernetes-validations`. llm-d (router v0.10.0,
config/crd/bases) ships InferenceObjective and InferenceModelRewrite in its own `llm-d.ai` group with the
same fields; the picker watches that group too, so the same schemas are generated for it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

GROUP_V1 = "inference.networking.k8s.io"
GROUP_X = "inference.networking.x-k8s.io"
GROUP_LLMD = "llm-d.ai"

# Groups ending in .k8s.io are protected by the API server: a CRD there must carry this annotation.
# These CRDs are not the upstream-approved ones, so they declare themselves unapproved (the server
# accepts them and reports a KubernetesAPIApprovalPolicyConformant=False condition).
APPROVAL = {"api-approved.kubernetes.io": "unapproved, experimental-only; project-local schema"}

Schema = dict[str, Any]

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GROUP_PATTERN = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
KIND_PATTERN = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
CONDITION_REASON = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
CONDITION_TYPE = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)

# CEL rules used below. The test validator evaluates each of these by name (it knows exactly this set).
RULE_UNIQUE_PORTS = "self.all(p1, self.exists_one(p2, p1.number == p2.number))"
RULE_PORT_FOR_SERVICE = "self.kind != 'Service' || has(self.port)"
RULE_WEIGHTS_ALL_OR_NONE = "self.all(t, has(t.weight)) || self.all(t, !has(t.weight))"


def obj(props: dict[str, Schema], required: list[str] | None = None, desc: str = "", **extra: Any) -> Schema:
    """An object node with the given properties."""
    node: Schema = {"type": "object"}
    if desc:
        node["description"] = desc
    node["properties"] = props
    if required:
        node["required"] = required
    node.update(extra)
    return node


def string(desc: str = "", **extra: Any) -> Schema:
    node: Schema = {"type": "string"}
    if desc:
        node["description"] = desc
    node.update(extra)
    return node


def integer(desc: str = "", fmt: str = "int32", **extra: Any) -> Schema:
    node: Schema = {"type": "integer", "format": fmt}
    if desc:
        node["description"] = desc
    node.update(extra)
    return node


def array(items: Schema, desc: str = "", **extra: Any) -> Schema:
    node: Schema = {"type": "array"}
    if desc:
        node["description"] = desc
    node["items"] = items
    node.update(extra)
    return node


def picker_ref_fields() -> dict[str, Any]:
    """group/kind/name of the endpoint picker reference (v1 endpointPickerRef, v1alpha2 extensionRef)."""
    return {
        "group": string("API group of the picker object; empty for core.", default="", maxLength=253,
                        pattern=GROUP_PATTERN),
        "kind": string("Kind of the picker object.", default="Service", minLength=1, maxLength=63,
                       pattern=KIND_PATTERN),
        "name": string("Name of the picker object.", minLength=1, maxLength=253),
    }


def port_number(desc: str) -> Schema:
    return integer(desc, minimum=1, maximum=65535)


def pending(condition_type: str) -> list[Schema]:
    """The condition GIE and llm-d default a new status to (no controller has looked yet)."""
    return [{"lastTransitionTime": "1970-01-01T00:00:00Z", "message": "Waiting for controller",
             "reason": "Pending", "status": "Unknown", "type": condition_type}]


def conditions(desc: str, **extra: Any) -> Schema:
    """metav1.Condition list, keyed by type."""
    cond = obj(
        {
            "type": string(
                "Condition type, CamelCase or domain/CamelCase.", maxLength=316, pattern=CONDITION_TYPE
            ),
            "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
            "observedGeneration": integer(
                "The .metadata.generation the condition was set for.", "int64", minimum=0
            ),
            "lastTransitionTime": string("When the condition last changed status.", format="date-time"),
            "reason": string(
                "Machine-readable CamelCase reason.", minLength=1, maxLength=1024, pattern=CONDITION_REASON
            ),
            "message": string("Human-readable details.", maxLength=32768),
        },
        ["type", "status", "lastTransitionTime", "reason", "message"],
    )
    return array(
        cond,
        desc,
        maxItems=8,
        **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        **extra,
    )


def pool_ref(default_group: str) -> Schema:
    """PoolObjectReference: an InferencePool in the referrer's namespace."""
    return obj(
        {
            "group": string(
                "API group of the pool.", default=default_group, maxLength=253, pattern=GROUP_PATTERN
            ),
            "kind": string(
                "Kind of the referent.",
                default="InferencePool",
                minLength=1,
                maxLength=63,
                pattern=KIND_PATTERN,
            ),
            "name": string("Name of the InferencePool.", minLength=1, maxLength=253),
        },
        ["name"],
        "The InferencePool this object configures; it must be in the same namespace.",
    )


def parent_status(ref_key: str) -> Schema:
    """Status a gateway writes per parent (Gateway) that uses the pool."""
    ref = obj(
        {
            "group": string(default="gateway.networking.k8s.io", maxLength=253, pattern=GROUP_PATTERN),
            "kind": string(default="Gateway", minLength=1, maxLength=63, pattern=KIND_PATTERN),
            "name": string(minLength=1, maxLength=253),
            "namespace": string(minLength=1, maxLength=63),
        },
        ["name"],
        "The parent (usually a Gateway) this status entry is for.",
    )
    entry = obj(
        {ref_key: ref, "conditions": conditions("Conditions of the pool for this parent.")},
        [ref_key],
    )
    return entry


def failure_mode() -> Schema:
    return string(
        "What the proxy does when the endpoint picker fails or is unreachable.",
        default="FailClose",
        enum=["FailOpen", "FailClose"],
    )


# ---- InferencePool ---------------------------------------------------------------------------------


def pool_v1_schema() -> Schema:
    spec = obj(
        {
            "selector": obj(
                {
                    "matchLabels": {
                        "type": "object",
                        "description": "Labels a pod must carry to be a member of the pool.",
                        "additionalProperties": string(maxLength=63, pattern=LABEL_VALUE),
                        "maxProperties": 64,
                        "minProperties": 1,
                    }
                },
                ["matchLabels"],
                "Which pods belong to the pool (in the pool's namespace).",
                **{"x-kubernetes-map-type": "atomic"},
            ),
            "targetPorts": array(
                obj({"number": port_number("Port on the pod.")}, ["number"]),
                "Ports on each selected pod; every podIP:port is one endpoint.",
                minItems=1,
                maxItems=8,
                **{
                    "x-kubernetes-list-type": "atomic",
                    "x-kubernetes-validations": [
                        {"rule": RULE_UNIQUE_PORTS, "message": "port number must be unique"}
                    ],
                },
            ),
            "appProtocol": string("Protocol the model servers speak.", enum=["http", "kubernetes.io/h2c"]),
            "endpointPickerRef": obj(
                {
                    **picker_ref_fields(),
                    "port": obj(
                        {"number": port_number("Port the picker serves ext_proc on.")},
                        ["number"],
                        "Port of the picker; required when kind is Service.",
                    ),
                    "failureMode": failure_mode(),
                },
                ["name"],
                "The endpoint picker (ext_proc server) that picks endpoints of this pool.",
                **{
                    "x-kubernetes-validations": [
                        {"rule": RULE_PORT_FOR_SERVICE, "message": "port is required when kind is 'Service'"}
                    ]
                },
            ),
        },
        ["selector", "targetPorts", "endpointPickerRef"],
        "The desired state of the pool.",
    )
    status = obj(
        {
            "parents": array(
                parent_status("parentRef"), "Status per parent that references the pool.", maxItems=32
            )
        },
        desc="Observed state, written by gateways.",
    )
    return root_schema(
        "InferencePool: a group of model-server pods behind one endpoint picker.", spec, status
    )


def pool_v1alpha2_schema() -> Schema:
    spec = obj(
        {
            "selector": {
                "type": "object",
                "description": "Labels a pod must carry to be a member of the pool.",
                "additionalProperties": string(maxLength=63, pattern=LABEL_VALUE),
                "maxProperties": 64,
                "minProperties": 1,
            },
            "targetPortNumber": port_number("Port on each selected pod that serves traffic."),
            "extensionRef": obj(
                {
                    **picker_ref_fields(),
                    "portNumber": port_number("Port the picker serves ext_proc on (default 9002)."),
                    "port": port_number("Older spelling of portNumber."),
                    "failureMode": failure_mode(),
                },
                ["name"],
                "The endpoint picker (ext_proc server) that picks endpoints of this pool.",
            ),
        },
        ["selector", "targetPortNumber", "extensionRef"],
        "The desired state of the pool.",
    )
    status = obj(
        {
            "parent": array(
                parent_status("parentRef"), "Status per parent that references the pool.", maxItems=32
            )
        },
        desc="Observed state, written by gateways.",
    )
    return root_schema(
        "InferencePool (alpha): a group of model-server pods behind one endpoint picker.", spec, status
    )


# ---- InferenceModel --------------------------------------------------------------------------------


def model_schema(v1alpha1: bool) -> Schema:
    """InferenceModel. v1alpha1 follows its Go types (optional names, weight default 1, `Default`);
    v1alpha2 requires the names, renames `Default` to `Standard` and has weights all-or-none."""
    criticalities = (
        ["Critical", "Default", "Sheddable"] if v1alpha1 else ["Critical", "Standard", "Sheddable"]
    )
    weight = integer("Share of traffic sent to this target.", minimum=0, maximum=1000000)
    if v1alpha1:
        weight["default"] = 1
    targets = array(
        obj(
            {
                "name": string(
                    "Model or LoRA adapter name as registered in the model server.", maxLength=253
                ),
                "weight": weight,
            },
            None if v1alpha1 else ["name"],
        ),
        "Weighted targets for traffic splitting; without any, the target is modelName itself.",
        maxItems=10,
    )
    if not v1alpha1:
        targets["x-kubernetes-validations"] = [
            {"rule": RULE_WEIGHTS_ALL_OR_NONE, "message": "weights must be set on all targets or on none"}
        ]
    spec = obj(
        {
            "modelName": string(
                "The model name clients send in the request body; unique among models of one pool "
                "(the oldest object wins a clash).",
                maxLength=253,
            ),
            "criticality": string(
                "How important serving this model is compared to other models of the pool.",
                default=criticalities[1],
                enum=criticalities,
            ),
            "targetModels": targets,
            "poolRef": pool_ref(GROUP_X),
        },
        ["poolRef"] if v1alpha1 else ["modelName", "poolRef"],
        "A model use case served by a pool.",
    )
    status = obj(
        {"conditions": conditions("Conditions of the model, e.g. a modelName clash.")},
        desc="Observed state, written by the endpoint picker.",
    )
    return root_schema("InferenceModel: a client-facing model name of a pool.", spec, status)


# ---- InferenceModelRewrite -------------------------------------------------------------------------


def rewrite_schema() -> Schema:
    match = obj(
        {
            "model": obj(
                {
                    "type": string("How value is compared; only Exact.", default="Exact", enum=["Exact"]),
                    "value": string("The model name from the request body.", minLength=1),
                },
                ["value"],
            )
        },
        ["model"],
    )
    target = obj(
        {
            "modelRewrite": string("The model name written into the request body."),
            "weight": integer(
                "Share of traffic sent to this target (set on all targets or on none; unset: uniform).",
                minimum=1,
                maximum=1000000,
            ),
        },
        ["modelRewrite"],
    )
    rule = obj(
        {
            "matches": array(
                match, "Any one matching selects the rule; empty means every request no other rule matched."
            ),
            "targets": array(target, "Weighted rewrite targets.", minItems=1),
        },
        ["targets"],
    )
    spec = obj(
        {
            "poolRef": pool_ref(GROUP_V1),
            "rules": array(rule, "Rewrite rules (exact matches win over generic rules)."),
        },
        # as GIE v1.5.0 and llm-d v0.10.0 declare it: rules required, weights 1..1000000, names unbounded
        ["poolRef", "rules"],
        "Model-name rewrites for requests to a pool.",
    )
    # status as GIE and llm-d declare it (conditions, e.g. Accepted); the picker never writes it
    status = obj(
        {"conditions": conditions("Conditions of the rewrite.", default=pending("Accepted"))}, desc="Observed state."
    )
    return root_schema(
        "InferenceModelRewrite: rewrites the requested model name (read-only config).", spec, status
    )


# ---- InferenceObjective ----------------------------------------------------------------------------


def objective_schema() -> Schema:
    spec = obj(
        {
            "priority": integer(
                "Relative priority; higher is served first, negative is sheddable, unset is 0."
            ),
            "poolRef": pool_ref(GROUP_V1),
        },
        ["poolRef"],
        "A named priority, selected by the x-gateway-inference-objective request header.",
    )
    status = obj(
        {"conditions": conditions("Conditions of the objective.", default=pending("Ready"))}, desc="Observed state."
    )
    return root_schema("InferenceObjective: a named request priority for a pool.", spec, status)


def root_schema(desc: str, spec: Schema, status: Schema | None) -> Schema:
    props: dict[str, Schema] = {
        "apiVersion": string("Versioned schema of this object."),
        "kind": string("REST resource this object represents."),
        "metadata": {"type": "object"},
        "spec": spec,
    }
    if status is not None:
        props["status"] = status
    return obj(props, ["spec"], desc)


# ---- CRD assembly ----------------------------------------------------------------------------------


def version(name: str, schema: Schema, *, storage: bool, status: bool, columns: list[Schema]) -> Schema:
    v: Schema = {
        "name": name,
        "served": True,
        "storage": storage,
        "schema": {"openAPIV3Schema": schema},
    }
    if status:
        v["subresources"] = {"status": {}}
    if columns:
        v["additionalPrinterColumns"] = columns
    return v


def crd(group: str, kind: str, plural: str, versions: list[Schema], short: list[str] | None = None) -> Schema:
    md: Schema = {"name": f"{plural}.{group}"}
    if group.endswith(".k8s.io"):
        md["annotations"] = dict(APPROVAL)
    names: Schema = {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()}
    if short:
        names["shortNames"] = short
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": md,
        "spec": {"group": group, "names": names, "scope": "Namespaced", "versions": versions},
    }


AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def all_crds() -> dict[str, Schema]:
    """File name -> CRD object, for every CRD this project ships."""
    model_cols = [
        {"name": "Model Name", "type": "string", "jsonPath": ".spec.modelName"},
        {"name": "Pool", "type": "string", "jsonPath": ".spec.poolRef.name"},
        {"name": "Criticality", "type": "string", "jsonPath": ".spec.criticality"},
        AGE,
    ]
    ref_cols = [{"name": "Pool", "type": "string", "jsonPath": ".spec.poolRef.name"}, AGE]
    obj_cols = [
        {"name": "Priority", "type": "integer", "jsonPath": ".spec.priority"},
        {"name": "Pool", "type": "string", "jsonPath": ".spec.poolRef.name"},
        AGE,
    ]
    out = {
        f"{GROUP_V1}_inferencepools.yaml": crd(
            GROUP_V1,
            "InferencePool",
            "inferencepools",
            [version("v1", pool_v1_schema(), storage=True, status=True, columns=[AGE])],
            ["infpool"],
        ),
        f"{GROUP_X}_inferencepools.yaml": crd(
            GROUP_X,
            "InferencePool",
            "inferencepools",
            [
                version("v1alpha2", pool_v1alpha2_schema(), storage=True, status=True, columns=[AGE]),
                # v1alpha1 had the same shape; served so old manifests still apply (no conversion needed).
                version("v1alpha1", pool_v1alpha2_schema(), storage=False, status=True, columns=[AGE]),
            ],
        ),
        f"{GROUP_X}_inferencemodels.yaml": crd(
            GROUP_X,
            "InferenceModel",
            "inferencemodels",
            [
                version(
                    "v1alpha2", model_schema(v1alpha1=False), storage=True, status=True, columns=model_cols
                ),
                version(
                    "v1alpha1", model_schema(v1alpha1=True), storage=False, status=True, columns=model_cols
                ),
            ],
        ),
    }
    # llm-d.ai last: its files are added after the ones this folder already listed (kustomization order)
    for group in (GROUP_X, GROUP_V1, GROUP_LLMD):
        out[f"{group}_inferencemodelrewrites.yaml"] = crd(
            group,
            "InferenceModelRewrite",
            "inferencemodelrewrites",
            [version("v1alpha2", rewrite_schema(), storage=True, status=True, columns=ref_cols)],
        )
        out[f"{group}_inferenceobjectives.yaml"] = crd(
            group,
            "InferenceObjective",
            "inferenceobjectives",
            [version("v1alpha2", objective_schema(), storage=True, status=True, columns=obj_cols)],
        )
    return out


HEADER = "# Generated by deploy/crds/generate.py; edit the generator, not this file.\n"


def render(doc: Schema) -> str:
    """The YAML text of one CRD, as committed."""
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120, default_flow_style=False)


def kustomization() -> str:
    """`kubectl apply -k deploy/crds` applies them all."""
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": list(all_crds()),
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False)


def main(argv: list[str]) -> int:
    """Write (or with --check, compare) every CRD file next to this script."""
    here = Path(__file__).resolve().parent
    stale = []
    files = {name: render(doc) for name, doc in all_crds().items()}
    files["kustomization.yaml"] = kustomization()
    for name, text in files.items():
        path = here / name
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    for name in stale:
        print(f"stale: {name}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Render the Helm charts offline (helm-python-sdk: Helm's Go library, no helm binary) and read the result."""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "deploy" / "charts"
RBAC_CALLS = REPO / "deploy" / "rbac_calls.yaml"

Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


@dataclass
class Rendered:
    """A rendered release: every object, by (kind, name), and the NOTES text."""

    objects: list[dict[str, Any]]
    notes: str

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]


@functools.cache
def _chart(name: str) -> helm_python.Chart:
    return helm_python.Chart.load(str(CHARTS / name))


def render(chart: str, values: dict[str, Any] | None = None, release: str = "llama", namespace: str = "ml") -> Rendered:
    """Render `chart` as `helm template` would (values checked against values.schema.json)."""
    out = _chart(chart).render(values or {}, name=release, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects, notes)


def lint(chart: str, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm lint --strict` findings above "info" (icon is recommended is info)."""
    report = helm_python.lint(str(CHARTS / chart), values or {}, strict=True, namespace="ml")
    return [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]


def expand_rules(rules: list[dict[str, Any]]) -> set[Rule]:
    """RBAC rules as the set of (group, resource, verb) they grant."""
    return {
        (g, r, v)
        for rule in rules
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


def expected_calls(leader_election: bool) -> set[Rule]:
    """deploy/rbac_calls.yaml: the API calls the picker makes."""
    doc = yaml.safe_load(RBAC_CALLS.read_text())
    rules = [r for r in doc["rules"] if leader_election or r.get("when") != "leaderElection"]
    return expand_rules(rules)


# ---- value sets (tests/deploy/values/<chart>-<case>.yaml) ------------------------------------------

VALUES_DIR = Path(__file__).resolve().parent / "values"


def value_cases() -> list[tuple[str, str]]:
    """(chart, case) for every values file; the chart is the file name's first part."""
    cases = []
    for path in sorted(VALUES_DIR.glob("*.yaml")):
        chart, _, case = path.stem.partition("-")
        assert chart in ("inferencepool", "standalone"), path
        cases.append((chart, case))
    return cases


def load_values(chart: str, case: str) -> dict[str, Any]:
    """The values of one case, as `helm -f` would read them."""
    data = yaml.safe_load((VALUES_DIR / f"{chart}-{case}.yaml").read_text())
    assert isinstance(data, dict)
    return data


# ---- Pod Security Standards, "restricted" profile ---------------------------------------------------

# Volume types the restricted profile allows (everything else, e.g. hostPath, is refused).
_RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What a pod spec breaks of the Kubernetes "restricted" Pod Security Standard, plus a writable root
    filesystem (this project asks for read-only roots too). Empty when it complies."""
    bad: list[str] = []
    psc = pod.get("securityContext") or {}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"pod {key}")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            bad.append(f"volume {vol['name']}: {sorted(kinds - _RESTRICTED_VOLUMES)}")
    containers = [*(pod.get("initContainers") or []), *pod["containers"]]
    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation not false")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{where}: runAsNonRoot not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities not dropping ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities {caps['add']}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                bad.append(f"{where}: hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where}: root filesystem writable")
    return bad


# ---- running the picker as a rendered Deployment would ---------------------------------------------


def container(out: Rendered, name: str = "epp") -> dict[str, Any]:
    """A container of the release's Deployment."""
    pod = out.get("Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def flag(args: list[str], name: str) -> str | None:
    """The value of `name` in args (`--name value` or `--name=value`); None when absent."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def local_args(out: Rendered, workdir: Path, ports: dict[str, int]) -> list[str]:
    """The rendered picker's args rewritten for a process on this machine: the config file becomes the
    ConfigMap's text in `workdir`, the three listening ports the given ones (from the OS), a mounted
    serving certificate a fresh self-signed pair, the session key file the release's Secret (see
    `_session_key_file`), a client CA bundle a fresh self-signed certificate, and everything listens on
    loopback only."""
    from epp.tls import self_signed

    args = list(container(out)["args"])
    config_map = next(o for o in out.all("ConfigMap") if o["metadata"]["name"].endswith("-epp-config"))
    replace = {
        "--grpc-port": str(ports["grpc"]),
        "--grpc-health-port": str(ports["health"]),
        "--metrics-port": str(ports["metrics"]),
    }
    result: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config-file":
            name = args[i + 1].removeprefix("/config/")
            path = workdir / name
            path.write_text(config_map["data"][name])
            result += [a, str(path)]
            i += 2
            continue
        if a == "--cert-path":
            certs = workdir / "tls"
            certs.mkdir()
            pair = self_signed(["localhost"])
            (certs / "tls.crt").write_bytes(pair.cert)
            (certs / "tls.key").write_bytes(pair.key)
            result += [a, str(certs)]
            i += 2
            continue
        if a == "--session-key-file":
            result += [a, str(_session_key_file(out, workdir))]
            i += 2
            continue
        if a == "--client-ca-file":
            ca = workdir / "client-ca.crt"
            ca.write_bytes(self_signed(["client-ca"]).cert)
            result += [a, str(ca)]
            i += 2
            continue
        if a in replace:
            result += [a, replace[a]]
            i += 2
            continue
        result.append(a)
        i += 1
    return [*result, "--bind-address", "127.0.0.1"]


def _session_key_file(out: Rendered, workdir: Path) -> Path:
    """The session key file as the pod sees it: the chart's Secret's key (decoded) when the release
    creates the Secret; for a Secret named in values (not in the release) a key derived from its name,
    so that every process started from one render holds the same key, as the pods would."""
    pod = out.get("Deployment")["spec"]["template"]["spec"]
    secret = next(v for v in pod["volumes"] if v["name"] == "session-key")["secret"]
    item = secret["items"][0]["key"]
    created = [o for o in out.all("Secret") if o["metadata"]["name"] == secret["secretName"]]
    if created:
        key = base64.b64decode(created[0]["data"][item])
    else:
        key = hashlib.sha256(secret["secretName"].encode()).hexdigest().encode()
    path = workdir / "session-key"
    path.write_bytes(key + b"\n")
    return path


def local_env(out: Rendered, namespace: str, otel_endpoint: str) -> dict[str, str]:
    """The container's environment with downward-API fields filled in as the kubelet would, and the
    OTLP exporter pointed at a loopback address (the test network is loopback only)."""
    fields = {"metadata.namespace": namespace, "metadata.name": "picker-0", "spec.nodeName": "node-0"}
    env: dict[str, str] = {}
    for var in container(out).get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = otel_endpoint
    return env

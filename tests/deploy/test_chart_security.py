"""The charts' security wiring (issue 13): one session-token key for every replica (a Secret the chart
makes or the operator names), mutual TLS on the picker's ext_proc port, and the standalone chart's
built-in Envoy verifying the picker and letting chosen client headers through. Each is rendered, then
run: the picker started with the rendered args, Envoy's own validation of the rendered config."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from epp import envoyconf
from epp.scheduling import session
from tests.deploy.charts import CHARTS, Rendered, container, flag, render
from tests.deploy.envoy_run import envoy_binary, validate
from tests.deploy.test_charts import POOL, _start_picker, _stop
from tests.e2e.certs import CA
from tests.extproc_client import body_chunks, chat, exchange, request_headers, response_headers, set_headers
from tests.procs import free_port, wait_serving
from tests.test_session_key import CONFIG as SESSION_CONFIG  # the same session-affinity config

KEY_FILE = "/etc/epp/session/key"
# three endpoints (nothing listens there: picking needs no model server)
POD_IPS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _pod(out: Rendered) -> dict[str, Any]:
    spec: dict[str, Any] = out.get("Deployment")["spec"]["template"]["spec"]
    return spec


def _volume(out: Rendered, name: str) -> dict[str, Any] | None:
    return next((v for v in _pod(out)["volumes"] if v["name"] == name), None)


def _mount(out: Rendered, name: str) -> dict[str, Any] | None:
    return next((m for m in container(out)["volumeMounts"] if m["name"] == name), None)


# ---- the session-token key ---------------------------------------------------------------------


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_the_chart_makes_one_session_key_secret_and_mounts_it(chart: str) -> None:
    """By default the release has a Secret with a random 64-character key (the picker needs 16 bytes),
    mounted read-only where --session-key-file points."""
    out = render(chart, POOL)
    args = container(out)["args"]
    assert flag(args, "--session-key-file") == KEY_FILE
    secret = out.get("Secret", "llama-epp-session-key")
    key = base64.b64decode(secret["data"]["key"])
    assert len(key) == 64 and key.isalnum()
    volume = _volume(out, "session-key")
    assert volume == {"name": "session-key", "secret": {"secretName": "llama-epp-session-key",
                                                        "items": [{"key": "key", "path": "key"}]}}
    mount = _mount(out, "session-key")
    assert mount == {"name": "session-key", "mountPath": "/etc/epp/session", "readOnly": True}
    assert f"{mount['mountPath']}/{volume['secret']['items'][0]['path']}" == KEY_FILE
    # without a cluster to look the Secret up in (helm template), each render makes a new key
    again = base64.b64decode(render(chart, POOL).get("Secret", "llama-epp-session-key")["data"]["key"])
    assert again != key


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_a_named_session_key_secret_is_mounted_not_made(chart: str) -> None:
    out = render(chart, _merge(POOL, {"inferenceExtension": {"sessionKey": {"secretName": "shared",
                                                                             "secretKey": "keys"}}}))
    assert not out.all("Secret")
    assert _volume(out, "session-key") == {"name": "session-key", "secret": {
        "secretName": "shared", "items": [{"key": "keys", "path": "key"}]}}
    assert flag(container(out)["args"], "--session-key-file") == KEY_FILE


@pytest.mark.parametrize("chart", ["inferencepool", "standalone"])
def test_session_key_off(chart: str) -> None:
    out = render(chart, _merge(POOL, {"inferenceExtension": {"sessionKey": {"enabled": False}}}))
    assert not out.all("Secret")
    assert _volume(out, "session-key") is None and _mount(out, "session-key") is None
    assert flag(container(out)["args"], "--session-key-file") is None


async def _route(port: int, token: str | None) -> tuple[str, str]:
    """(destination, the response's x-session-token) for one chat request over ext_proc."""
    extra = {session.SESSION_TOKEN_HEADER: token} if token else None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        replies = await asyncio.wait_for(exchange(ch, [
            request_headers(extra=extra), *body_chunks(chat()), response_headers(eos=True)]), 20)
    dest = set_headers(replies[0])["x-gateway-destination-endpoint"]
    resp = next(r for r in replies if r.WhichOneof("response") == "response_headers")
    return dest, set_headers(resp)[session.SESSION_TOKEN_HEADER]


def _session_render() -> Rendered:
    values = _merge(POOL, {"inferenceExtension": {
        "secureServing": False, "pluginsConfigFile": "session.yaml",
        "pluginsCustomConfig": {"session.yaml": SESSION_CONFIG}}})
    return render("inferencepool", values)


def _objects(out: Rendered, path: Path) -> None:
    """The release's pool and three ready pods as a no-cluster manifests file."""
    pool = out.get("InferencePool")
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"vllm-{i}", "namespace": "ml", "labels": pool["spec"]["selector"]["matchLabels"]},
             "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}
            for i, ip in enumerate(POD_IPS)]  # fmt: skip
    path.write_text(yaml.safe_dump_all([pool, *pods]))


async def test_replicas_of_one_release_accept_each_others_session_tokens(tmp_path: Path) -> None:
    """Two pickers started with one render's args (each reading the release's Secret, as two replicas
    would) share the key: a token the first hands out routes on the second, every time. A picker of
    another render (another random key, as a replica without the shared Secret) ignores it: its picks
    spread over the three endpoints (15 on the token's one by chance: 3 * (1/3)^15, about 2e-7)."""
    out, other = _session_render(), _session_render()
    manifests = tmp_path / "objects.yaml"
    _objects(out, manifests)
    extra = ["--manifests", str(manifests), "--drain-timeout", "0"]
    procs = []
    try:
        ports = []
        for i, release in enumerate((out, out, other)):
            work = tmp_path / f"replica{i}"
            work.mkdir()
            proc, p, log = _start_picker(release, work, extra, {})
            procs.append(proc)
            assert proc.poll() is None, log.read_text()[-3000:]
            await wait_serving(p["health"])
            ports.append(p["grpc"])
        first, second, stranger = ports
        dest, token = await _route(first, None)
        assert dest.rsplit(":", 1)[0] in POD_IPS
        for _ in range(5):
            assert (await _route(second, token))[0] == dest
        seen = {(await _route(stranger, token))[0] for _ in range(15)}
        assert len(seen) > 1
    finally:
        for proc in procs:
            _stop(proc)


# ---- mutual TLS on ext_proc (inferencepool chart) -------------------------------------------------


def test_client_ca_is_mounted_and_passed() -> None:
    values = _merge(POOL, {"inferenceExtension": {"tls": {"clientCA": {"secretName": "gateway-ca"}}}})
    out = render("inferencepool", values)
    assert flag(container(out)["args"], "--client-ca-file") == "/etc/epp/client-ca/ca.crt"
    assert _volume(out, "client-ca") == {"name": "client-ca", "secret": {
        "secretName": "gateway-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    assert _mount(out, "client-ca") == {"name": "client-ca", "mountPath": "/etc/epp/client-ca", "readOnly": True}
    plain = render("inferencepool", POOL)
    assert flag(container(plain)["args"], "--client-ca-file") is None and _volume(plain, "client-ca") is None
    with pytest.raises(Exception, match="clientCA needs secureServing"):
        render("inferencepool", _merge(values, {"inferenceExtension": {"secureServing": False}}))


# ---- the standalone chart's built-in Envoy: verifying the picker, allowed client headers ----------

CERT_MANAGER = {"inferenceExtension": {"tls": {"certManager": {"enabled": True, "issuerRef": {"name": "ca"}}}}}
SWITCHES = {
    "verify": {"envoy": {"verifyPicker": {"enabled": True}}},
    "verify-sans": {"envoy": {"verifyPicker": {"enabled": True, "sans": ["epp.example", "127.0.0.1", "::1"]}}},
    "allow": {"envoy": {"allowClientHeaders": [envoyconf.OBJECTIVE_HEADER, envoyconf.LLMD_FAIRNESS_HEADER]}},
    "both": {"envoy": {"verifyPicker": {"enabled": True, "caSecretName": "picker-ca", "caKey": "bundle.pem"},
                       "allowClientHeaders": list(envoyconf.CLIENT_HEADERS)}},
    "mtls": {"envoy": {"verifyPicker": {"enabled": True, "clientCertSecretName": "envoy-client"}},
             "inferenceExtension": {"tls": {"clientCA": {"secretName": "llama-epp-tls"}}}},
}


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("standalone_generate", CHARTS / "standalone" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _switched(profile: str, switch: str) -> tuple[Rendered, dict[str, Any]]:
    values = _merge(_merge(POOL, CERT_MANAGER), SWITCHES[switch])
    values = _merge(values, {"envoy": {"profile": profile}})
    return render("standalone", values), values


def _envoy_config(out: Rendered) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(out.get("ConfigMap", "llama-epp-envoy")["data"]["envoy.yaml"])
    return config


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("profile", envoyconf.PROFILES)
def test_standalone_envoy_switches_give_what_envoyconf_gives(profile: str, switch: str) -> None:
    """The chart's changes to the generated file are exactly envoyconf's for the same flags
    (--epp-ca-file at the mounted CA, --epp-san, --allow-client-header), and the CA is mounted there."""
    gen = _generator()
    out, values = _switched(profile, switch)
    verify = values["envoy"].get("verifyPicker", {})
    allow = tuple(values["envoy"].get("allowClientHeaders", ()))
    tls: bool | envoyconf.PickerTLS = True
    if verify:
        client = bool(verify.get("clientCertSecretName"))
        tls = envoyconf.PickerTLS(ca_file=gen.PICKER_CA, sans=tuple(verify.get("sans") or ["llama-epp.ml.svc"]),
                                  cert_file=gen.PICKER_CLIENT_CERT if client else "",
                                  key_file=gen.PICKER_CLIENT_KEY if client else "")
    expected = yaml.safe_load(envoyconf.dumps(gen.config(profile, tls, allow)))
    assert _envoy_config(out) == expected
    envoy = container(out, "envoy")
    mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    if verify:
        assert mounts["picker-ca"] == {"name": "picker-ca", "mountPath": "/etc/envoy/picker-ca", "readOnly": True}
        assert _volume(out, "picker-ca") == {"name": "picker-ca", "secret": {
            "secretName": verify.get("caSecretName") or "llama-epp-tls",
            "items": [{"key": verify.get("caKey", "ca.crt"), "path": "ca.crt"}]}}  # fmt: skip
        assert f"{mounts['picker-ca']['mountPath']}/ca.crt" == gen.PICKER_CA
    else:
        assert "picker-ca" not in mounts and _volume(out, "picker-ca") is None
    if verify.get("clientCertSecretName"):
        assert mounts["picker-client-cert"]["mountPath"] == "/etc/envoy/picker-client" == str(
            Path(gen.PICKER_CLIENT_CERT).parent)
        assert _volume(out, "picker-client-cert") == {"name": "picker-client-cert", "secret": {
            "secretName": "envoy-client", "items": [{"key": "tls.crt", "path": "tls.crt"},
                                                    {"key": "tls.key", "path": "tls.key"}]}}  # fmt: skip
        # the picker asks for a client certificate from the serving Secret's CA
        assert flag(container(out)["args"], "--client-ca-file") == "/etc/epp/client-ca/ca.crt"
        assert _volume(out, "client-ca") == {"name": "client-ca", "secret": {
            "secretName": "llama-epp-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
    else:
        assert "picker-client-cert" not in mounts and flag(container(out)["args"], "--client-ca-file") is None


def test_standalone_without_switches_embeds_the_generated_file() -> None:
    out = render("standalone", _merge(POOL, CERT_MANAGER))
    text = out.get("ConfigMap", "llama-epp-envoy")["data"]["envoy.yaml"]
    assert text == (CHARTS / "standalone" / "files" / "envoy-buffered-tls.yaml").read_text()


def test_standalone_envoy_client_header_names_are_envoyconfs() -> None:
    schema = json.loads((CHARTS / "standalone" / "values.schema.json").read_text())
    names = schema["properties"]["envoy"]["properties"]["allowClientHeaders"]["items"]["enum"]
    assert tuple(names) == envoyconf.CLIENT_HEADERS


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"envoy": {"verifyPicker": {"enabled": True}}}, "CA-issued certificate"),  # self-signed picker
        (_merge(CERT_MANAGER, {"envoy": {"verifyPicker": {"enabled": True}, "pickerTLS": False}}), "pickerTLS"),
        ({"envoy": {"allowClientHeaders": ["x-gateway-destination-endpoint"]}}, "allowClientHeaders"),
        ({"envoy": {"verifyPicker": {"enabled": True, "sans": ["a b"]}}}, "sans"),
        # the built-in Envoy would be refused by its own picker
        (_merge(CERT_MANAGER, {"inferenceExtension": {"tls": {"clientCA": {"secretName": "ca"}}}}),
         "needs a client certificate"),
        (_merge(CERT_MANAGER, {"envoy": {"verifyPicker": {"clientCertSecretName": "c"}}}), "needs envoy.verifyPicker"),
        (_merge(CERT_MANAGER, {"envoy": {"pickerTLS": False},
                               "inferenceExtension": {"tls": {"clientCA": {"secretName": "ca"}}}}),
         "mutual TLS is TLS"),
    ],
)
def test_standalone_envoy_switches_refuse_what_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        render("standalone", _merge(POOL, values))


@pytest.mark.envoy
@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")
def test_standalone_switched_envoy_configs_pass_envoy_validate(tmp_path: Path) -> None:
    """Real Envoy (`--mode validate`) accepts every switched render, with a real CA at the mounted path."""
    gen = _generator()
    ca = CA()
    ca_file = ca.write(tmp_path / "ca.pem")
    client = ca.issue(tmp_path / "client", ["envoy"], client=True)
    paths = []
    for profile in envoyconf.PROFILES:
        for switch in SWITCHES:
            out, _ = _switched(profile, switch)
            text = out.get("ConfigMap", "llama-epp-envoy")["data"]["envoy.yaml"]
            path = tmp_path / f"{profile}-{switch}.yaml"
            text = text.replace(gen.PICKER_CLIENT_CERT, str(client.cert))
            text = text.replace(gen.PICKER_CLIENT_KEY, str(client.key))
            path.write_text(text.replace(gen.PICKER_CA, str(ca_file)))
            paths.append(path)
    results = validate(paths)
    assert {p.name: out for p, (code, out) in results.items() if code != 0} == {}


@pytest.mark.envoy
@pytest.mark.skipif(envoy_binary() is None, reason="no envoy binary")
@pytest.mark.parametrize("picker_cert", ["from-the-ca", "wrong-san", "self-signed", "mutual", "mutual-other-ca"])
async def test_standalone_envoy_verifies_the_picker_as_rendered(tmp_path: Path, picker_cert: str) -> None:
    """The render with envoy.verifyPicker run for real: the picker with the rendered args, Envoy with the
    rendered config (ports from the OS, the CA at its mounted path replaced by the test's CA file) and a
    simulated model server. A picker certificate from the CA for the Service's name routes; one for
    another name, or the picker's own self-signed one, is refused (FailClose: 5xx). With mutual TLS
    (tls.clientCA + verifyPicker.clientCertSecretName) the picker takes Envoy's certificate from the CA
    and refuses one from another CA."""
    from epp.sim.config import DEFAULT_MODEL
    from tests.deploy.charts import local_env
    from tests.deploy.envoy_run import run_envoy
    from tests.deploy.test_shutdown import _local_envoy_config

    gen = _generator()
    ca = CA()
    ca_file = ca.write(tmp_path / "ca.pem")
    sim_port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "epp.sim", "--port", str(sim_port), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    picker = None
    try:
        assert sim.stdout is not None and "SIM READY" in sim.stdout.readline()
        mutual = picker_cert.startswith("mutual")
        values = _merge(_merge(POOL, CERT_MANAGER), {
            "envoy": {"verifyPicker": {"enabled": True}, "profile": "lean"},
            "inferencePool": {"targetPorts": [{"number": sim_port}]},
            "inferenceExtension": {"monitoring": {"prometheus": {"auth": {"enabled": False}}}}})
        if mutual:
            values = _merge(values, SWITCHES["mtls"])
        out = render("standalone", values)
        pool = out.get("InferencePool")
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "sim-0", "namespace": "ml", "labels": pool["spec"]["selector"]["matchLabels"]},
               "status": {"podIP": "127.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
        manifests = tmp_path / "objects.yaml"
        manifests.write_text(yaml.safe_dump_all([pool, pod]))
        extra = ["--manifests", str(manifests)]
        if picker_cert != "self-signed":  # the mounted serving Secret: a pair from the CA (last --cert-path wins)
            sans = ["other.ml.svc", "127.0.0.1"] if picker_cert == "wrong-san" else ["llama-epp.ml.svc"]
            extra += ["--cert-path", str(ca.issue(tmp_path / "serving", sans).folder)]
        if mutual:  # the mounted client CA bundle: the test's CA (the last --client-ca-file wins)
            assert flag(container(out)["args"], "--client-ca-file")
            extra += ["--client-ca-file", str(ca_file)]
        picker, ports, log = _start_picker(out, tmp_path, extra, local_env(out, "ml", "http://127.0.0.1:9"))
        await wait_serving(ports["health"])
        config = _local_envoy_config(out, ports["grpc"])
        text = envoyconf.dumps(config)
        assert gen.PICKER_CA in text
        if mutual:
            assert gen.PICKER_CLIENT_CERT in text
            issuer = ca if picker_cert == "mutual" else CA("other")
            envoy_cert = issuer.issue(tmp_path / "envoy-client", ["envoy"], client=True)
            text = text.replace(gen.PICKER_CLIENT_CERT, str(envoy_cert.cert))
            text = text.replace(gen.PICKER_CLIENT_KEY, str(envoy_cert.key))
        config = yaml.safe_load(text.replace(gen.PICKER_CA, str(ca_file)))
        async with run_envoy(config, tmp_path) as envoy, aiohttp.ClientSession() as client:
            body = {"model": DEFAULT_MODEL, "prompt": "hello", "max_tokens": 2}
            statuses = []
            for _ in range(3):
                async with client.post(f"{envoy.url}/v1/completions", json=body,
                                       timeout=aiohttp.ClientTimeout(total=30)) as reply:
                    statuses.append(reply.status)
        if picker_cert in ("from-the-ca", "mutual"):
            assert statuses == [200, 200, 200], (statuses, envoy.log()[-2000:])
        else:
            assert all(500 <= s < 600 for s in statuses), statuses
    finally:
        _stop(picker)
        sim.kill()
        sim.wait(timeout=10)

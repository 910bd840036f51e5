"""helm/kvfold rendered by real Helm (v4 Go SDK via helm-python-sdk), every manifest validated
against the Kubernetes OpenAPI schemas (kubernetes-validate), bad values refused by the schema."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import helm_python as helm  # scripts/setup-deploy-tools.sh installs both (the `deploy` extra)
import kubernetes_validate
import pytest
import yaml
from deploy_tools import DASHBOARD, REPO, RULES

from kvfold.attention_backends import BACKENDS
from kvfold.attention_backends.selection import method_for, options_for

CHART = REPO / "helm" / "kvfold"
K8S_VERSION = kubernetes_validate.latest_version()  # the newest the installed schemas cover
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # prometheus-operator CRDs: no upstream schema

NON_DEFAULT = {
    "replicaCount": 2,
    "model": {"source": "path", "path": "/opt/models/qwen", "servedModelName": "qwen"},
    "kvfold": {"backend": "CUSTOM", "options": {"method": "dense"}},
    "vllm": {"maxModelLen": 32768, "dtype": "bfloat16", "tensorParallelSize": 2,
             "extraArgs": ["--enable-prefix-caching"]},
    "gpu": {"count": 2, "resourceName": "nvidia.com/gpu"},
    "apiKey": {"existingSecret": "kvfold-api", "key": "token"},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3},
    "runtimeClassName": "nvidia",
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "extraVolumes": [{"name": "models", "hostPath": {"path": "/srv/models", "type": "Directory"}}],
    "extraVolumeMounts": [{"name": "models", "mountPath": "/opt/models", "readOnly": True}],
}


def render(values: dict | None = None) -> dict[str, dict]:
    """kind -> manifest (the chart renders at most one object per kind)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values or {}, name="demo", namespace="serving")
    objects: dict[str, dict] = {}
    for path, text in files.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


def validate_all(objects: dict[str, dict]) -> None:
    for kind, obj in objects.items():
        if kind in CRD_KINDS:
            continue  # checked field by field (and by promtool) in the tests below
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def container(objects: dict[str, dict]) -> dict:
    (c,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def test_lint_is_clean() -> None:
    report = helm.lint(CHART, strict=True)
    assert all(m["severity"] <= 1 for m in report["messages"]), report  # info ("icon") only
    assert not report["errors"], report


def test_default_values_render_valid_hardened_manifests() -> None:
    objects = render()
    assert set(objects) == {"Deployment", "Service", "ServiceAccount"}
    validate_all(objects)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # Every directory vLLM, torch and prometheus-client write to is a volume.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", "/cache", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HOME"] == env["XDG_CACHE_HOME"] == "/cache" and env["TMPDIR"] == "/tmp"
    assert "VLLM_API_KEY" not in env
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["command"] == ["kvfold", "serve"]
    assert c["args"][0] == "/models" and "--attention-backend=KVFOLD_DENSE" in c["args"]
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert objects["Deployment"]["spec"]["replicas"] == 1
    service = objects["Service"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]


def test_non_default_values_render_valid_manifests() -> None:
    objects = render(NON_DEFAULT)
    assert set(objects) == {"Deployment", "Service", "ServiceAccount", "ServiceMonitor",
                            "PrometheusRule", "ConfigMap", "HorizontalPodAutoscaler"}
    validate_all(objects)
    c = container(objects)
    args = c["args"]
    assert args[0] == "/opt/models/qwen"
    assert "--attention-backend=CUSTOM" in args and "--served-model-name=qwen" in args
    assert {"--tensor-parallel-size=2", "--max-model-len=32768", "--dtype=bfloat16",
            "--enable-prefix-caching"} <= set(args)
    # The options reach vLLM as JSON that kvfold's own start-up check accepts.
    (extra,) = [a.split("=", 1)[1] for a in args if a.startswith("--additional-config=")]
    config = json.loads(extra)
    assert method_for("CUSTOM", config) == "KVFOLD_DENSE"
    options_for("KVFOLD_DENSE", config)
    api_key = next(e for e in c["env"] if e["name"] == "VLLM_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"] == {"name": "kvfold-api", "key": "token"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert "model" not in {v["name"] for v in pod["volumes"]}
    assert pod["runtimeClassName"] == "nvidia"
    assert "replicas" not in objects["Deployment"]["spec"]  # the HPA owns the replica count
    hpa = objects["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == objects["Deployment"]["metadata"]["name"]
    monitor = objects["ServiceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == objects["Service"]["spec"]["selector"]
    assert monitor["spec"]["endpoints"][0]["port"] == objects["Service"]["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["kvfold-dashboard.json"]) == json.loads(DASHBOARD.read_text())


def test_rendered_prometheus_rule_is_the_deploy_rules_file(tmp_path: Path) -> None:
    rule = render({"prometheusRule": {"enabled": True}})["PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    promtool = shutil.which("promtool")
    assert promtool, "promtool not installed: run scripts/setup-deploy-tools.sh"
    rendered = tmp_path / "rendered-rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run([promtool, "check", "rules", str(rendered)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_chart_copies_of_rules_and_dashboard_match_deploy() -> None:
    assert (CHART / "files" / "kvfold-rules.yaml").read_bytes() == RULES.read_bytes()
    assert (CHART / "files" / "kvfold-dashboard.json").read_bytes() == DASHBOARD.read_bytes()


def test_schema_backend_names_are_kvfolds() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["kvfold"]["properties"]["backend"]["enum"] == [*BACKENDS, "CUSTOM"]


# The file each method loads by path (the schema requires it for that method).
REQUIRED_OPTIONS = {"KVFOLD_VQKV": {"codebooks": "/models/m/vqkv_codebooks"},
                    "KVFOLD_FOURIER": {"dims": "/models/m/fourier_dims"}}


@pytest.mark.parametrize("kvfold", [
    *({"backend": name, "options": REQUIRED_OPTIONS.get(name, {})} for name in BACKENDS),
    {"backend": "CUSTOM", "options": {"method": "treekv"}},
    {"backend": "CUSTOM", "options": {"method": "fourier", "dims": "/models/m/fourier_dims"}},
    {"backend": "CUSTOM", "options": {"method": "KVFOLD_DENSE"}},
], ids=lambda v: v["backend"] + v["options"].get("method", ""))
def test_prefix_caching_is_off_exactly_for_methods_that_refuse_it(kvfold: dict) -> None:
    from kvfold.attention_backends.selection import backend_class

    args = container(render({"kvfold": kvfold}))["args"]
    method = method_for(kvfold["backend"], {"kvfold": kvfold["options"]})
    refuses = backend_class(method).prefix_caching_refusal is not None
    assert ("--no-enable-prefix-caching" in args) == refuses


@pytest.mark.parametrize(("values", "complaint"), [
    ({"kvfold": {"backend": "KVFOLD_VQKV"}}, "/kvfold"),
    ({"kvfold": {"backend": "KVFOLD_VQKV", "options": {"codebooks": "rel/dir"}}}, "/kvfold/options/codebooks"),
    ({"kvfold": {"backend": "KVFOLD_FOURIER"}}, "/kvfold"),
    ({"kvfold": {"backend": "KVFOLD_FOURIER", "options": {"dims": "rel/dir"}}}, "/kvfold/options/dims"),
    ({"kvfold": {"backend": "FLASH_ATTN"}}, "/kvfold/backend"),
    ({"securityContext": {"readOnlyRootFilesystem": False}}, "/securityContext/readOnlyRootFilesystem"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "/securityContext/allowPrivilegeEscalation"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"model": {"source": "s3"}}, "/model/source"),
    ({"model": {"source": "pvc", "pvc": {"claimName": "", "mountPath": "/models"}}}, "/model/pvc/claimName"),
    ({"model": {"source": "path", "path": "relative/dir"}}, "/model/path"),
    ({"gpu": {"count": -1}}, "/gpu/count"),
    ({"vllm": {"gpuMemoryUtilization": 1.5}}, "/vllm/gpuMemoryUtilization"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
    ({"service": {"port": 70000}}, "/service/port"),
    ({"replicas": 3}, "additional properties 'replicas'"),
])
def test_schema_rejects_bad_values(values: dict, complaint: str) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert complaint in str(refused.value)


def documented_install() -> tuple[str, dict]:
    """The ``helm install`` command of docs/deployment.md: (chart path, values from its --set)."""
    text = (REPO / "docs" / "deployment.md").read_text()
    (command,) = [block for block in text.split("```bash\n")[1:] if block.startswith("helm install")]
    command = command.split("```")[0].replace("\\\n", " ")
    words = command.split()
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    values: dict = {}
    for assignment in sets:
        parsed = helm.parse_set_string(assignment)
        node, new = values, parsed
        while isinstance(new, dict) and len(new) == 1:  # merge one dotted path at a time
            (key, value), = new.items()
            if isinstance(value, dict) and isinstance(node.get(key), dict):
                node, new = node[key], value
            else:
                node[key] = value
                break
    return words[3], values


def test_documented_helm_install_renders() -> None:
    chart, values = documented_install()
    assert (REPO / chart).resolve() == CHART
    assert values["apiKey"]["existingSecret"] == "kvfold-api" and values["model"]["pvc"]["subPath"]
    objects = render(values)
    validate_all(objects)
    assert {"ServiceMonitor", "PrometheusRule", "ConfigMap"} <= set(objects)
    c = container(objects)
    assert c["args"][0] == "/models/Qwen2.5-7B-Instruct"
    assert c["image"] == "registry.example.com/ml/kvfold-vllm:0.1.0"

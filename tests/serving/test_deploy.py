"""The deploy/ files are read by the real tools that consume them."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_vllm_config_is_accepted_by_vllms_own_parser(tmp_path):
    from ircan_serve.serving import vllm_arg_parser

    parser = vllm_arg_parser()
    args = parser.parse_args(["--model", str(tmp_path), "--config", str(DEPLOY / "vllm-config.yaml")])
    assert args.served_model_name == ["smollm2-conflicts"]
    assert args.generation_config == "vllm" and args.port == 8000
    assert args.tensor_parallel_size == 1 and args.pipeline_parallel_size == 1


def _kube():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def _compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["ircan"]


def _locked_vllm_version() -> str:
    import re

    lock = (DEPLOY.parent / "requirements.lock").read_text()
    return re.search(r"^vllm(?:-cpu)?==(\S+)$", lock, re.M).group(1)


def test_kubernetes_manifest_probes_claim_and_security():
    kinds = _kube()
    assert set(kinds) == {"Deployment", "Service", "PersistentVolumeClaim"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # a slow load is not restart-looped
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    claim = kinds["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert not any(e.get("value") and e["name"] == "VLLM_API_KEY" for e in container["env"])  # from a Secret


def test_compose_is_local_only_non_root_and_checks_health():
    service = _compose()
    assert service["ports"] == ["127.0.0.1:8000:8000"]
    assert any(v.startswith("../export/out/") and v.endswith(":ro") for v in service["volumes"])
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert service["healthcheck"]["start_period"]
    assert not service["user"].startswith("0")
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_kubernetes_and_the_config_agree():
    """One vLLM config for both: kustomize builds the ConfigMap from the file compose mounts;
    the same args, image (pinned to the lock's vLLM), port and model path everywhere."""
    kinds, service = _kube(), _compose()
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    config = yaml.safe_load((DEPLOY / "vllm-config.yaml").read_text())
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]

    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert generated[volumes["config"]["configMap"]["name"]] == ["vllm-config.yaml"]
    assert "kubernetes.yaml" in kustomization["resources"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert f"--config={mounts['config']}/vllm-config.yaml" in container["args"]
    assert "./vllm-config.yaml:/config/vllm-config.yaml:ro" in service["volumes"]

    assert container["args"] == service["command"]
    assert container["image"] == service["image"] == f"vllm/vllm-openai:v{_locked_vllm_version()}"
    assert container["ports"][0]["containerPort"] == config["port"]
    assert service["ports"][0].rsplit(":", 1)[1] == str(config["port"])
    model = next(a for a in container["args"] if a.startswith("--model=")).split("=", 1)[1]
    assert model.startswith(mounts["models"] + "/")
    assert model.rsplit("/", 1)[1] == config["served-model-name"]
    assert any(v.endswith(f":{model}:ro") for v in service["volumes"])
    assert "api-key" not in config

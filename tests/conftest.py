"""Shared fixtures: a tiny trained-on-the-fly tokenizer, tiny random models of every supported
family (head_dim 64, as vLLM's CPU kernels need), and the real SmolLM2 for end-to-end tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import API_KEY, FAMILIES, tiny_config


def _tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from ircan_serve.data import load_examples

    texts = []
    for e in load_examples("conflicts").examples:
        texts += [e.prompt + e.answer + e.memorized, e.prompt_without_context]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts * 3, vocab_size=600, min_frequency=1, special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A saved folder (safetensors + tokenizer) of a tiny random model per family."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(tiny_config(family, len(tiny_tokenizer)))
        with torch.no_grad():  # larger weights than the init, so scores are not all ~0
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.08)
        path = root / family
        model.save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        out[family] = path
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    from ircan_serve.models import load_model

    return load_model(str(tiny_llama_dir))


@pytest.fixture(scope="session")
def conflicts():
    from ircan_serve.data import load_examples

    return load_examples("conflicts").examples


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (converted once to the cache by `make setup`)."""
    from ircan_serve.models import load_model

    return load_model("smollm2")


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def patched_smollm2(tmp_path_factory) -> Path:
    """SmolLM2 patched from the shipped recipe (all stages, as `ircan export RECIPE` runs them)."""
    from ircan_serve.config import load_recipe
    from ircan_serve.pipeline import run_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "export" / "smollm2-conflicts.toml")
    out = tmp_path_factory.mktemp("export") / "smollm2-conflicts"
    run_recipe(recipe.model_copy(update={"output": str(out)}), progress=False)
    return out


@pytest.fixture(scope="session")
def vllm_server(patched_smollm2):
    """A real vLLM OpenAI server on 127.0.0.1 serving the patched SmolLM2, once per session."""
    from ircan_serve.serving import ServeConfig, VLLMServer

    with VLLMServer(patched_smollm2, ServeConfig(api_key=API_KEY, max_model_len=1024, enable_tools=True)) as server:
        yield server


def pytest_collection_modifyitems(items):
    """The tier follows from what a test uses: the live server (``server``), the real SmolLM2
    (``e2e``). Tests that start servers or load real models themselves carry the marker."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "vllm_server" in names:
            item.add_marker(pytest.mark.server)
        elif names & {"smollm2", "patched_smollm2", "gemma3", "patched_gemma3"}:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def real_tokenizers(tmp_path_factory):
    """name -> a folder with that family's real tokenizer (from tests/fixtures/tokenizers)."""
    from helpers import real_tokenizer_dir

    root = tmp_path_factory.mktemp("tokenizers")
    return lambda name: real_tokenizer_dir(name, root)


@pytest.fixture(scope="session")
def gemma3():
    """The second real model, Gemma 3 270M base (converted once to the cache by `make setup`)."""
    from ircan_serve.models import load_model

    return load_model("gemma3-270m")

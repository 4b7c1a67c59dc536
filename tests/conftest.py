"""Shared fixtures: a tiny trained-on-the-fly tokenizer, tiny random models of every supported
family (head_dim 64, as vLLM's CPU kernels need), and the real SmolLM2 for end-to-end tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


def tiny_config(model_type: str, vocab_size: int):
    """A 2-layer random config of ``model_type`` with hidden 128 and head_dim 64."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=128, n_layer=2, n_head=2, n_inner=256,
                                    n_positions=256, **common)
    if model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=128, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=256,
                                    max_position_embeddings=256, **common)
    extra = {"head_dim": 64} if model_type in ("gemma", "qwen3", "mistral") else {}
    return AutoConfig.for_model(
        model_type, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=256, max_position_embeddings=256,
        tie_word_embeddings=False, **extra, **common,
    )


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox"]


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


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


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


API_KEY = "ircan-test-key"


@pytest.fixture(scope="session")
def vllm_server(patched_smollm2):
    """A real vLLM OpenAI server on 127.0.0.1 serving the patched SmolLM2, once per session."""
    from ircan_serve.serving import ServeConfig, VLLMServer

    with VLLMServer(patched_smollm2, ServeConfig(api_key=API_KEY, max_model_len=1024, enable_tools=True)) as server:
        yield server

"""Every family of the architecture table: layouts, reweighting, fast = reference, shared prefix."""

import pytest
import torch

from helpers import FAMILIES
from ircan_serve.architectures import ARCHITECTURES, layout_for
from ircan_serve.attribution import ContextAwareIntegratedGradients
from ircan_serve.config import AttributionConfig
from ircan_serve.errors import IrcanError
from ircan_serve.models import load_model
from ircan_serve.reweight import reweighted
from ircan_serve.units import projections, units_per_layer, weight_names


def test_table_covers_required_families():
    for family in ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox"]:
        assert family in ARCHITECTURES


def test_unsupported_architecture_is_named():
    with pytest.raises(IrcanError, match="'mamba' is not supported"):
        layout_for("mamba")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layout_finds_ffn_neurons(family, tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs[family]))
    down = projections(lm.model)
    assert len(down) == 2
    assert units_per_layer(lm.model) == 256
    names = dict(lm.model.named_parameters())
    assert names[weight_names(family, "neuron", 1)[0]] is down[1].weight


@pytest.mark.parametrize("family", FAMILIES)
def test_family_reweighting_scales_only_the_neurons(family, tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs[family]))
    axis = layout_for(family).neuron_axis
    w = projections(lm.model)[1].weight
    before = w.detach().clone()
    with reweighted(lm.model, {1: [3, 7]}, beta=2.5):
        changed = (w != before).any(dim=1 - axis).nonzero().flatten().tolist()
        assert changed == [3, 7]
        torch.testing.assert_close(w.select(axis, 3), before.select(axis, 3) * 2.5)
    assert torch.equal(w, before)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fast_matches_reference(family, tiny_model_dirs, conflicts):
    lm = load_model(str(tiny_model_dirs[family]))
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    fast = ig.attribute(conflicts[0], AttributionConfig(method="fast", internal_batch_size=20))
    ref = ig.attribute(conflicts[0], AttributionConfig(method="reference"))
    scale = ref.scores.abs().max()
    assert scale > 0
    torch.testing.assert_close(fast.scores, ref.scores, rtol=1e-5, atol=1e-5 * scale.item())


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_output_head_gives_the_models_logits(family, tiny_model_dirs):
    """Where the fast path computes P(answer) from the decoder's hidden state itself, that is
    exactly what the model's own forward would give."""
    from ircan_serve.attribution.answer_probability import plain_output_head

    lm = load_model(str(tiny_model_dirs[family]))
    head = plain_output_head(lm.model)
    assert head is not None
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(head(lm.model.base_model(ids).last_hidden_state), lm.model(ids).logits)


@pytest.mark.parametrize(("model_type", "setting"), [("gemma2", {"final_logit_softcapping": 30.0}),
                                                      ("granite", {"logits_scaling": 4.0})])
def test_heads_that_change_logits_are_not_plain(model_type, setting, tiny_tokenizer, conflicts):
    """Soft-capped or scaled logits keep the model's own head, and the fast path still equals
    the reference."""
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config
    from ircan_serve.attribution.answer_probability import plain_output_head

    cfg = tiny_config(model_type, len(tiny_tokenizer))
    for key, value in setting.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert plain_output_head(model) is None
    for key in setting:  # the same family without the change has a plain head
        setattr(cfg, key, {"final_logit_softcapping": None, "logits_scaling": 1.0}[key])
    assert plain_output_head(AutoModelForCausalLM.from_config(cfg)) is not None
    ig = ContextAwareIntegratedGradients(model, tiny_tokenizer)
    fast = ig.attribute(conflicts[0], AttributionConfig(n_steps=3)).scores
    ref = ig.attribute(conflicts[0], AttributionConfig(n_steps=3, method="reference")).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_family_fast_passes_share_the_prefix(family, tiny_model_dirs, conflicts, caplog, monkeypatch):
    """Every family runs the fast passes through shared_prefix_attention: its attention goes
    through transformers' attention functions, and no row gets its own copy of the prompt's cache."""
    from ircan_serve.attribution import fast, shared_prefix_attention

    layers = []
    real = shared_prefix_attention.shared_prefix_attention
    monkeypatch.setattr(shared_prefix_attention, "shared_prefix_attention",
                        lambda module, *a, **k: (layers.append(module.layer_idx), real(module, *a, **k))[1])
    monkeypatch.setattr(fast, "per_row_cache", lambda *_a, **_k: pytest.fail("per-row copies of the cache"))
    lm = load_model(str(tiny_model_dirs[family]))
    ContextAwareIntegratedGradients(lm.model, lm.tokenizer).attribute(conflicts[0], AttributionConfig(n_steps=3))
    assert layers == [0, 1]  # one pass, both layers
    assert "bypasses" not in caplog.text
    assert lm.model.config._attn_implementation != shared_prefix_attention.SHARED_PREFIX_ATTENTION  # restored


def test_attention_that_bypasses_the_shared_prefix_is_redone_with_copies(tiny_model_dirs, conflicts, caplog,
                                                                        monkeypatch):
    """An attention that never calls the registered function would have attended to the new
    token alone: the pass is redone with per-row caches and the scores stay the reference's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ircan_serve.attribution import shared_prefix_attention

    monkeypatch.setattr(shared_prefix_attention, "shared_prefix_attention", sdpa_attention_forward)  # records nothing
    lm = load_model(str(tiny_model_dirs["llama"]))
    ig = ContextAwareIntegratedGradients(lm.model, lm.tokenizer)
    fast = ig.attribute(conflicts[0], AttributionConfig(n_steps=3, internal_batch_size=3)).scores  # a pass per layer
    assert caplog.text.count("bypasses the shared-prefix attention") == 1  # found once, then not tried again
    ref = ig.attribute(conflicts[0], AttributionConfig(n_steps=3, method="reference")).scores
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_adds_to_residual_says_how_a_patch_changes_the_layer_output(model_type):
    """The table's ``adds_to_residual`` is true exactly where patching the projection's input
    changes the layer's output by proj(new) - proj(old), as the fast path then assumes."""
    from transformers import AutoModelForCausalLM

    from helpers import tiny_config
    from ircan_serve.architectures import decoder_layers

    cfg = tiny_config(model_type, 600)
    if model_type == "granite":
        cfg.residual_multiplier = 0.5  # real Granite checkpoints scale the residual branches
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3)  # large enough for the post-FFN norms to show
    proj, layer = projections(model)[1], decoder_layers(model)[1]
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    seen = {}

    def run(new=None):
        def patch(_m, args):
            seen["old"] = args[0][:, -1].clone()
            if new is None:
                return None
            x = args[0].clone()
            x[:, -1] = new
            return (x,)

        hooks = [proj.register_forward_pre_hook(patch),
                 layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__(
                     "out", (out[0] if isinstance(out, tuple) else out)[:, -1]))]
        with torch.no_grad():
            model(ids)
        for h in hooks:
            h.remove()
        return seen["out"], seen["old"]

    plain, old = run()
    torch.manual_seed(1)
    new = old + torch.randn_like(old)
    patched, _ = run(new)
    with torch.no_grad():
        predicted = plain + proj(new) - proj(old)
    linear = torch.allclose(patched, predicted, rtol=1e-4, atol=1e-4 * (patched - plain).abs().max().item())
    assert linear == layout_for(model_type).adds_to_residual

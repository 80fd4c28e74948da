"""The method registry and the plan: a toy method needs no edit elsewhere; plans are exact; old folders load."""

import json
import shutil
from dataclasses import dataclass

import pytest
import torch
from conftest import DATA, FIXTURES
from safetensors.torch import load_file
from torch import nn

from tensorlm import Recipe, compress, count_parameters, load_compressed, load_model, plan, save_compressed
from tensorlm.layers.base import dense_linear, dense_weight, register_layer
from tensorlm.methods import Method, register_method
from tensorlm.methods.registry import is_linear, linear_shape
from tensorlm.plan import LayerPlan, Plan
from tensorlm.recipe import Target
from tensorlm.surgery import plan_reads_weights


# --- a toy method, everything in one place: W ~ diag(s) + U V --------------------------------------
@register_layer
class DiagLowRank(nn.Module):
    """``y = x * s + (x V^T) U^T + b``: ``s: (n,)``, ``u: (n, r)``, ``v: (r, n)`` for a square ``W (n, n)``."""

    def __init__(self, features: int, rank: int, bias: bool = True):
        super().__init__()
        self.features, self.rank = features, rank
        self.s = nn.Parameter(torch.zeros(features))
        self.u = nn.Parameter(torch.zeros(features, rank))
        self.v = nn.Parameter(torch.zeros(rank, features))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None

    def forward(self, x):
        y = x * self.s + (x @ self.v.T) @ self.u.T
        return y if self.bias is None else y + self.bias

    def to_dense(self):
        return dense_linear((torch.diag(self.s) + self.u @ self.v).detach(), self.bias)

    def tensorlm_config(self):
        return {"features": self.features, "rank": self.rank, "bias": self.bias is not None}

    @classmethod
    def from_tensorlm_config(cls, cfg, shared):
        return cls(cfg["features"], cfg["rank"], cfg["bias"])


@dataclass
class DiagLowRankOptions:
    rank: int = 2


def toy_plan(module, name, options, context):
    out_features, in_features, bias = linear_shape(module)
    n, r = out_features, options.rank
    return LayerPlan(name, "diag_lowrank", context.stage, [n, in_features], "DiagLowRank",
                     {"features": n, "rank": r, "bias": bias}, {"s": [n], "u": [n, r], "v": [r, n]}, [r],
                     n * in_features + bias * n, n + 2 * n * r + bias * n)


def toy_build(module, entry, stats=None):
    w, bias = dense_weight(module, entry.name)  # (n, n)
    layer = DiagLowRank(entry.config["features"], entry.config["rank"], bias is not None)
    u, s, vh = torch.linalg.svd(w - torch.diag(torch.diagonal(w)))
    with torch.no_grad():
        layer.s.copy_(torch.diagonal(w))
        layer.u.copy_(u[:, : layer.rank] * s[: layer.rank])
        layer.v.copy_(vh[: layer.rank])
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


register_method(Method("diag_lowrank", DiagLowRankOptions, accepts=is_linear, plan=toy_plan, build=toy_build))
TOY = {"name": "toy", "stages": [{"method": "diag_lowrank", "targets": ["re:.*attn\\.c_proj"],
                                  "options": {"rank": 3}}]}


def test_a_toy_method_runs_through_plan_compress_save_and_load(tiny_gpt2, tmp_path):
    recipe = Recipe.from_dict(TOY)
    the_plan = plan(tiny_gpt2, recipe)
    assert [e.name for e in the_plan.entries] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    small = compress(tiny_gpt2, recipe, progress=False, plan=the_plan)
    assert isinstance(small.transformer.h[0].attn.c_proj, DiagLowRank)
    assert the_plan.params_after == count_parameters(small)["total"]
    again = load_compressed(save_compressed(small, tmp_path / "toy", recipe=recipe))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(small(ids).logits, again.model(ids).logits)


@pytest.mark.parametrize("name,edit", [
    ("kngpt2", None), ("tq-gpt2", None), ("tq-gpt2-tied", None),
    ("tensorgpt-gpt2", {"shape": [2, 4, 4], "ranks": 2}),
    ("tucker-bank-1x7-attention", {"ranks": [2, 8], "block_size": 32}),
])
def test_plan_totals_equal_the_compressed_model(name, edit, tiny_gpt2):
    recipe = Recipe.load(name)
    for stage in recipe.stages:
        if hasattr(stage.options, "permute"):
            stage.options.permute = None  # counts do not depend on permutations
        if stage.method == "kronecker" and stage.options.shapes:
            stage.options.shapes = {"128x32": {"a_shape": [64, 16], "b_shape": [2, 2], "rank": 2},
                                    "32x128": {"a_shape": [16, 64], "b_shape": [2, 2], "rank": 2},
                                    "96x32": {"a_shape": [48, 16], "b_shape": [2, 2], "rank": 2},
                                    "32x32": {"a_shape": [16, 16], "b_shape": [2, 2], "rank": 2}}
        for key, value in (edit or {}).items():
            setattr(stage.options, key, value)
    if name == "tucker-bank-1x7-attention":
        recipe.stages[0].targets = [Target("re:.*attn\\.c_proj")]
    the_plan = plan(tiny_gpt2, recipe)
    small = compress(tiny_gpt2, recipe, progress=False)
    table = count_parameters(small)
    assert (the_plan.params_after, the_plan.params_after_without_head) == (table["total"], table["total_without_head"])
    assert the_plan.params_before == count_parameters(tiny_gpt2)["total"]
    assert Plan.from_dict(json.loads(the_plan.to_json())).to_dict() == the_plan.to_dict()


def test_plan_runs_no_decomposition_and_build_uses_the_prepared_search(tiny_gpt2, monkeypatch):
    import tensorlm.decompose.kronecker as kron
    import tensorlm.layers.kronecker as layers
    from tensorlm.methods import kronecker as method

    recipe = Recipe.from_dict({"stages": [{"method": "kronecker", "targets": ["transformer.h.0.mlp.c_fc"],
                                           "options": {"a_shape": [64, 16], "b_shape": [2, 2], "rank": 2,
                                                       "permute": {"max_rounds": 1, "time_budget_s": 1}}}]})
    calls = []
    monkeypatch.setattr(layers, "nearest_kronecker",
                        lambda *a, **k: calls.append("layer") or kron.nearest_kronecker(*a, **k))
    searches = []
    real_search = method.search_permutations
    monkeypatch.setattr(method, "search_permutations", lambda *a, **k: searches.append(1) or real_search(*a, **k))
    the_plan = plan(tiny_gpt2, recipe)
    assert searches == [] and calls == [] and the_plan.entries[0].permute["rows"]
    small = compress(tiny_gpt2, recipe, progress=False, plan=the_plan)
    assert searches == [1] and calls == []  # the search's factors are the layer's: no second SVD
    found = the_plan.entries[0].prepared
    assert torch.equal(small.transformer.h[0].mlp.c_fc.a, found.factors.a)


def test_plan_on_a_tiny_llama_with_gqa_and_tied_embeddings(tiny_llama):
    recipe = Recipe.from_dict({"stages": [
        {"method": "lowrank", "targets": ["re:.*self_attn\\.(k|v)_proj"], "options": {"rank": 4}},
        {"method": "tt_embedding", "targets": ["model.embed_tokens"], "options": {"shape": [4, 4, 4], "ranks": 2}},
    ]})
    the_plan = plan(tiny_llama, recipe)
    assert {tuple(e.dense_shape) for e in the_plan.stages[0].entries} == {(32, 64)}  # 2 kv heads of 16
    small = compress(tiny_llama, recipe, progress=False)
    assert the_plan.params_after == count_parameters(small)["total"]
    assert count_parameters(small)["tied_head"] == "tied-factored"


@pytest.mark.parametrize("folder", ["gpt2-kron", "gpt2-tt"])
def test_folders_saved_before_the_registry_still_load_to_the_same_logits(folder):
    expected = load_file(FIXTURES / folder / "expected.safetensors")
    loaded = load_compressed(FIXTURES / folder)
    # the same function up to round-off: the fixture's logits were saved under an older transformers, and
    # transformers 5.24 moved them by at most 1e-7 (logits up to 0.5); one block weight flipped moves them by 0.1
    factored = loaded.model(expected["ids"]).logits  # the factored path, as saved
    torch.testing.assert_close(factored, expected["logits"], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # inference caches (a TT tied head's table) sum in another order: round-off only
        torch.testing.assert_close(loaded.model(expected["ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-6)


def test_an_architecture_not_registered_for_the_model_type_is_refused(tmp_path):
    import shutil

    from tensorlm.errors import TensorLMError

    folder = tmp_path / "f"
    shutil.copytree(FIXTURES / "gpt2-kron", folder)
    manifest = json.loads((folder / "tensorlm.json").read_text())
    manifest["architecture"] = "BertModel"
    (folder / "tensorlm.json").write_text(json.dumps(manifest))
    with pytest.raises(TensorLMError, match="not a transformers model registered for model_type 'gpt2'"):
        load_compressed(folder)


def test_a_dry_run_on_the_meta_device_gives_the_same_plan(tiny_gpt2, tmp_path):
    """``load_model(weights=False)`` reads no weights; a recipe whose plan reads none plans the same there."""
    tiny_gpt2.save_pretrained(tmp_path / "tiny")
    shutil.copytree(DATA / "gpt2-tokenizer", tmp_path / "tiny", dirs_exist_ok=True)
    skeleton = load_model(tmp_path / "tiny", weights=False).model
    assert all(p.is_meta for p in skeleton.parameters())
    recipe = Recipe.from_dict({"name": "dry", "stages": [
        {"name": "mlp", "method": "kronecker", "targets": ["re:.*mlp\\.c_fc"],
         "options": {"a_shape": [64, 16], "b_shape": [2, 2], "rank": 2}},
        {"name": "attn", "method": "lowrank", "targets": ["re:.*attn\\.c_attn"], "options": {"rank": 4}}]})
    assert not plan_reads_weights(recipe)
    assert plan(skeleton, recipe).to_dict() == plan(tiny_gpt2, recipe).to_dict()
    recipe.stages[0].options.a_shape = recipe.stages[0].options.b_shape = None
    recipe.stages[0].options.ratio = 0.5
    assert plan_reads_weights(recipe)  # the shape of least error is chosen on the real weights

"""Reconstruction of a factored token table and its tied head (tensorlm.heal.embedding): the objective is the
relative error of the looked-up rows and of the logits, it falls for every table method, it touches nothing
but the table's factors, and it leaves a dense table alone."""

import copy

import pytest
import torch
from conftest import make_tiny_llama

from tensorlm import Recipe, TensorLMError, compress
from tensorlm.heal import ReconstructConfig
from tensorlm.heal.embedding import _Objective, reconstruct_embedding, table_statistics

TABLES = {"lowrank_embedding": {"rank": 8}, "tt_embedding": {"shape": [4, 4, 4], "ranks": [2, 2]},
          "kronecker_embedding": {"factor": 4}, "tt_matrix_embedding": {"ranks": [4, 4]}}
CONFIG = ReconstructConfig(lr=3e-3, embedding_steps=30, val_fraction=0.25, eval_every=5, patience=3,
                           head_directions=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def zipf_batches(n: int, seed: int, vocab: int = 256) -> list[torch.Tensor]:
    """``n`` batches ``(4, 24)`` of ids drawn with probability ~ 1 / rank, as text is."""
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float)
    return [torch.multinomial(probs, 96, replacement=True, generator=g).view(4, 24) for _ in range(n)]


def table_student(teacher, method: str, head: str = "tie"):
    stage = {"name": "s", "method": method, "targets": ["model.embed_tokens"],
             "options": {**TABLES[method], "head": head}}
    return compress(teacher, Recipe.from_dict({"name": "t", "stages": [stage]}), progress=False)


@pytest.mark.parametrize("method", sorted(TABLES))
def test_every_table_method_lowers_its_held_out_objective_and_nothing_else_moves(method):
    teacher = make_tiny_llama()
    student = table_student(teacher, method)
    before = copy.deepcopy(student.state_dict())
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    result = reconstruct_embedding(student, teacher, zipf_batches(8, 0), config=CONFIG, log=None)
    assert result.tied_head and result.head_directions == 16 and 0 < result.head_energy <= 1
    assert result.val_after < result.val_before and set(result.val_terms_after) == {"input", "head"}
    assert result.val_after == pytest.approx(sum(result.val_terms_after.values()))
    after = student.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    # only the table's factors (the tied head holds the same tensors); buffers (permutations) never move
    assert moved and all(k.startswith(("model.embed_tokens.", "lm_head.embedding.")) for k in moved)
    assert all(torch.equal(b, buffers[n]) for n, b in student.named_buffers())


def test_the_head_term_at_every_direction_is_the_relative_centred_logit_error_on_the_calibration_positions():
    teacher = make_tiny_llama()
    student = table_student(teacher, "lowrank_embedding")
    batches = zipf_batches(3, 1)
    stats = table_statistics(teacher, batches, 256, head=True, head_directions=64)  # d = 64: every direction
    assert stats.head_energy == pytest.approx(1.0) and stats.positions == 3 * 96
    assert torch.equal(stats.counts, torch.bincount(torch.cat([b.reshape(-1) for b in batches]),
                                                    minlength=256).double())
    dense = teacher.get_input_embeddings().weight.detach()
    with torch.no_grad():
        terms = _Objective(stats, dense, 1.0).terms(student.get_input_embeddings())
        hidden = []
        hook = teacher.lm_head.register_forward_pre_hook(lambda m, a: hidden.append(a[0].reshape(-1, 64)))
        for b in batches:
            teacher(b)
        hook.remove()
        h = torch.cat(hidden).double()  # (N, d)
        approx = student.get_input_embeddings().to_dense().weight.double()
        centre = torch.eye(256, dtype=torch.float64) - 1 / 256  # the softmax ignores a shift of every logit
        logit_error = ((h @ (approx - dense.double()).T @ centre).square().sum()
                       / (h @ dense.double().T @ centre).square().sum())
        used = stats.counts > 0
        rows = (stats.counts[used, None] * (approx - dense.double())[used].square()).sum() / (
            stats.counts[used, None] * dense.double()[used].square()).sum()
    assert float(terms["head"]) == pytest.approx(float(logit_error), rel=1e-4)
    assert float(terms["input"]) == pytest.approx(float(rows), rel=1e-4)


def test_an_untied_head_fits_the_lookups_only_and_a_dense_table_is_left_untouched():
    teacher = make_tiny_llama()
    student = table_student(teacher, "lowrank_embedding", head="untie")
    head = student.lm_head.weight.detach().clone()
    result = reconstruct_embedding(student, teacher, zipf_batches(8, 0), config=CONFIG, log=None)
    assert not result.tied_head and set(result.val_terms_after) == {"input"}
    assert result.val_after < result.val_before and torch.equal(student.lm_head.weight, head)
    dense = copy.deepcopy(teacher)
    state = copy.deepcopy(dense.state_dict())
    result = reconstruct_embedding(dense, teacher, zipf_batches(8, 0), config=CONFIG, log=None)
    assert result.stopped == "not run" and all(torch.equal(v, dense.state_dict()[k]) for k, v in state.items())
    off = reconstruct_embedding(student, teacher, [], config=ReconstructConfig(embedding_steps=0), log=None)
    assert off.stopped == "not run"


def test_bad_settings_are_refused_in_one_line():
    for key, value in (("embedding_steps", -1), ("embedding_lr", 0.0), ("head_directions", 0)):
        with pytest.raises(TensorLMError, match=key) as err:
            ReconstructConfig(**{key: value})
        assert "\n" not in str(err.value)
    teacher = make_tiny_llama()
    with pytest.raises(TensorLMError, match="no held-out"):
        reconstruct_embedding(table_student(teacher, "lowrank_embedding"), teacher, zipf_batches(2, 0),
                              config=CONFIG, log=None)


def test_the_kl_head_term_is_the_mean_kl_of_the_tied_heads_softmax_at_the_teachers_head_inputs(monkeypatch):
    teacher = make_tiny_llama()
    student = table_student(teacher, "lowrank_embedding")
    batches = zipf_batches(3, 1)
    stats = table_statistics(teacher, batches, 256, head=True, head_directions=64, keep_inputs=True)
    monkeypatch.setattr("tensorlm.heal.embedding.KL_LOGITS", 100 * 256)  # 100 positions a mini-batch: 3 of them
    with torch.no_grad():
        objective = _Objective(stats, teacher.get_input_embeddings().weight.detach(), 1.0)
        table = student.get_input_embeddings()
        terms = objective.terms(table)
        hidden = []
        hook = teacher.lm_head.register_forward_pre_hook(lambda m, a: hidden.append(a[0].reshape(-1, 64)))
        for b in batches:
            teacher(b)
        hook.remove()
        h = torch.cat(hidden)  # (N, d)
        assert torch.allclose(stats.head_inputs, h) and objective.chunks == 3  # 288 positions
        want = torch.nn.functional.kl_div(student.lm_head(h).log_softmax(-1), teacher.lm_head(h).log_softmax(-1),
                                          log_target=True, reduction="batchmean")
        first = torch.nn.functional.kl_div(student.lm_head(h[:100]).log_softmax(-1),
                                           teacher.lm_head(h[:100]).log_softmax(-1), log_target=True,
                                           reduction="batchmean")
        chunk = objective.terms(table, chunk=0)["head"]
    assert float(terms["head"]) == pytest.approx(float(want), rel=1e-4) and float(want) > 0
    assert float(chunk) == pytest.approx(float(first), rel=1e-4)


def test_healing_by_kl_lowers_the_held_out_kl_and_moves_only_the_table():
    teacher = make_tiny_llama()
    student = table_student(teacher, "lowrank_embedding")
    before = copy.deepcopy(student.state_dict())
    config = ReconstructConfig(**{**CONFIG.to_dict(), "embedding_head": "kl"})
    result = reconstruct_embedding(student, teacher, zipf_batches(8, 0), config=config, log=None)
    assert result.head_loss == "kl" and result.head_directions == 0
    assert result.val_terms_after["head"] < result.val_terms_before["head"] and result.val_after < result.val_before
    moved = {k for k, v in student.state_dict().items() if not torch.equal(before[k], v)}
    assert moved and all(k.startswith(("model.embed_tokens.", "lm_head.embedding.")) for k in moved)
    with pytest.raises(TensorLMError, match=r"embedding_head must be one of \['centred', 'kl'\], got 'mse'"):
        ReconstructConfig(embedding_head="mse")

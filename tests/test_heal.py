"""Block-wise reconstruction (tensorlm.heal): it reduces every block's error, touches nothing it should not,
trains a shared Tucker bank jointly across its blocks, refuses bad input in one line, and is deterministic;
the recipe's ``heal:`` block and the pipeline step."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from transformers import AutoTokenizer

from tensorlm import Recipe, TensorLMError, compress
from tensorlm.heal import ReconstructConfig, reconstruct_blocks
from tensorlm.heal.blocks import find_blocks
from tensorlm.heal.stage import check_heal_plan
from tensorlm.heal.teacher_store import TeacherStore, build_teacher_store, topk_kl
from tensorlm.pipeline import run
from tensorlm.surgery import plan_recipe

ATTN = "re:model\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj"
MLP = "re:model\\.layers\\.\\d+\\.mlp\\.(gate|up|down)_proj"
STAGES = {
    "lowrank": {"method": "lowrank", "targets": [ATTN, MLP], "options": {"rank": 8}},
    "kronecker": {"method": "kronecker", "targets": [MLP], "options": {"shapes": {
        "128x64": {"a_shape": [64, 32], "b_shape": [2, 2], "rank": 2},
        "64x128": {"a_shape": [32, 64], "b_shape": [2, 2], "rank": 2}}, "permute": {"max_rounds": 1}}},
    "tucker_bank": {"method": "tucker_bank", "targets": [ATTN, MLP], "options": {"ranks": [6, 24], "block_size": 32}},
}
CONFIG = ReconstructConfig(lr=3e-3, max_steps=40, batch_size=4, val_fraction=0.25, eval_every=5, patience=4,
                           joint_steps=60)


pytestmark = pytest.mark.usefixtures("one_thread")


def token_batches(n: int, vocab: int, seed: int, shape=(4, 24)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, shape, generator=g) for _ in range(n)]


def compressed(teacher, stage: dict):
    return compress(teacher, Recipe.from_dict({"name": "t", "stages": [{"name": "s", **stage}]}), progress=False)


@torch.no_grad()
def block_outputs(model, batches) -> list[torch.Tensor]:
    """Every block's output hidden states ``(N, L, d)`` over ``batches`` (full forward passes)."""
    _, blocks = find_blocks(model)
    seen = [[] for _ in blocks]
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[0] if isinstance(out, tuple) else out))
             for i, b in enumerate(blocks)]
    try:
        for batch in batches:
            model(**(batch if isinstance(batch, dict) else {"input_ids": batch}))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in seen]


def per_block_mse(student, teacher, batches) -> list[float]:
    return [float((s - t).pow(2).mean()) for s, t in zip(block_outputs(student, batches),
                                                         block_outputs(teacher, batches), strict=True)]


@pytest.mark.parametrize("method", sorted(STAGES))
def test_reconstruction_reduces_every_blocks_error_on_held_out_and_fresh_inputs(method):
    teacher = make_tiny_llama()
    free = compressed(teacher, STAGES[method])
    healed = copy.deepcopy(free)
    buffers = {n: b.clone() for n, b in healed.named_buffers()}
    bank = {n: p.clone() for n, p in healed.named_parameters() if ".bank." in n}
    result = reconstruct_blocks(healed, teacher, token_batches(8, 256, seed=1), config=CONFIG, progress=False)
    assert [b.index for b in result.blocks] == [0, 1] and result.storage == "memory"
    assert all(b.trainable > 0 and b.val_mse_after < b.val_mse_before for b in result.blocks)
    fresh = token_batches(3, 256, seed=2)
    before, after = per_block_mse(free, teacher, fresh), per_block_mse(healed, teacher, fresh)
    # a Tucker bank's shared factors train in the joint pass after the block-by-block one
    assert all(a < 0.95 * b for a, b in zip(after, before, strict=True)), (before, after)
    # permutations (buffers) never move
    assert all(torch.equal(b, buffers[n]) for n, b in healed.named_buffers())
    if method == "tucker_bank":
        assert bank and result.shared_frozen > 0 and result.joint is not None
        assert not all(torch.equal(p, bank[n]) for n, p in healed.named_parameters() if ".bank." in n)
    else:
        assert not bank and result.shared_frozen == 0 and result.joint is None
    # norms and other dense weights are frozen by default
    dense = {n: p for n, p in free.named_parameters() if "norm" in n or "embed" in n}
    assert dense and all(torch.equal(p, dense[n]) for n, p in healed.named_parameters() if n in dense)


def test_gpt2_conv1d_and_bert_encoder_with_padding(tiny_bert):
    teacher = make_tiny_gpt2()
    student = compressed(teacher, {"method": "lowrank", "targets": ["re:transformer\\.h\\.\\d+\\.mlp\\.c_fc"],
                                   "options": {"rank": 4}})
    result = reconstruct_blocks(student, teacher, token_batches(8, 100, seed=3), config=CONFIG, progress=False)
    assert result.blocks_path == "transformer.h"
    assert all(b.val_mse_after < b.val_mse_before for b in result.blocks)
    g = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(8):
        mask = torch.ones(4, 16, dtype=torch.long)
        mask[1:, 10:] = 0  # padded sentences: their padding never enters the loss
        batches.append({"input_ids": torch.randint(0, 64, (4, 16), generator=g), "attention_mask": mask})
    free = compressed(tiny_bert, {"method": "lowrank", "options": {"rank": 4},
                                  "targets": ["re:encoder\\.layer\\.\\d+\\.intermediate\\.dense"]})
    student = copy.deepcopy(free)
    result = reconstruct_blocks(student, tiny_bert, batches, config=CONFIG, progress=False)
    assert result.blocks_path == "encoder.layer"
    assert all(b.val_mse_after < b.val_mse_before for b in result.blocks)
    for batch in batches:  # other tokens under the padding: the same result, bit for bit
        batch["input_ids"][1:, 10:] = 7
    again = copy.deepcopy(free)
    second = reconstruct_blocks(again, tiny_bert, batches, config=CONFIG, progress=False)
    assert [b.val_mse_after for b in second.blocks] == [b.val_mse_after for b in result.blocks]
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in again.state_dict().items())


def test_an_uncompressed_student_is_left_bit_identical_without_any_forward_pass():
    teacher = make_tiny_llama()
    student = copy.deepcopy(teacher)
    state = {k: v.clone() for k, v in student.state_dict().items()}

    def refuse(*_):
        raise AssertionError("no forward pass expected")

    handles = [m.register_forward_pre_hook(refuse) for m in (teacher, student)]
    lines = []
    result = reconstruct_blocks(student, teacher, token_batches(8, 256, seed=1), config=CONFIG, progress=False,
                                log=lines.append)
    for h in handles:
        h.remove()
    assert all(b.trainable == 0 and b.stopped == "nothing to train" for b in result.blocks)
    assert len(lines) == 1 and f"the {len(result.blocks)} blocks" in lines[0] and "nothing to train" in lines[0]
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_same_seed_same_result_bit_for_bit_in_memory_and_on_disk():
    teacher = make_tiny_llama()
    free = compressed(teacher, STAGES["lowrank"])
    batches = token_batches(8, 256, seed=1)
    runs = []
    for max_memory_mb in (1024.0, 0.01, 1024.0):
        student = copy.deepcopy(free)
        config = ReconstructConfig(**{**CONFIG.to_dict(), "max_memory_mb": max_memory_mb, "max_steps": 15})
        result = reconstruct_blocks(student, teacher, batches, config=config, progress=False)
        runs.append((result, student.state_dict()))
    assert [r.storage for r, _ in runs] == ["memory", "disk", "memory"]
    for result, state in runs[1:]:
        assert [b.val_mse_after for b in result.blocks] == [b.val_mse_after for b in runs[0][0].blocks]
        assert all(torch.equal(v, runs[0][1][k]) for k, v in state.items())
    other = copy.deepcopy(free)
    reconstruct_blocks(other, teacher, batches, progress=False,
                       config=ReconstructConfig(**{**CONFIG.to_dict(), "max_steps": 15, "seed": 1}))
    assert not all(torch.equal(v, runs[0][1][k]) for k, v in other.state_dict().items())


def test_time_budget_and_patience_stop_a_block_and_it_keeps_its_best_weights():
    teacher = make_tiny_llama()
    student = compressed(teacher, STAGES["lowrank"])
    config = ReconstructConfig(lr=10.0, max_steps=50, batch_size=4, val_fraction=0.25, eval_every=1, patience=2)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    result = reconstruct_blocks(student, teacher, token_batches(8, 256, seed=1), config=config, progress=False)
    # an absurd learning rate never improves on the training-free weights: every block keeps them
    assert all(b.stopped == "patience" and b.best_step == 0 and b.steps == 2 for b in result.blocks)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())
    config = ReconstructConfig(max_steps=10_000, batch_size=4, val_fraction=0.25, time_budget_s=0.2, patience=10_000)
    result = reconstruct_blocks(student, teacher, token_batches(8, 256, seed=1), config=config, progress=False)
    assert all(b.stopped == "time_budget" and b.steps < 10_000 for b in result.blocks)


def without_seconds(result) -> list[dict]:
    return [{**dataclasses.asdict(b), "seconds": 0.0} for b in result.blocks]


def test_joint_pass_trains_a_shared_bank_below_the_sequential_pass_alone_and_the_same_on_disk():
    teacher = make_tiny_llama()
    free = compressed(teacher, STAGES["tucker_bank"])
    bank = {n: p for n, p in free.named_parameters() if ".bank." in n}
    dense = {n: p for n, p in free.named_parameters() if "norm" in n or "embed" in n}
    assert bank and dense
    batches, fresh = token_batches(8, 256, seed=1), token_batches(3, 256, seed=2)
    runs = {}
    for joint_steps, max_memory_mb in ((0, 1024.0), (60, 1024.0), (60, 0.01)):
        student = copy.deepcopy(free)
        config = ReconstructConfig(**{**CONFIG.to_dict(), "joint_steps": joint_steps, "max_memory_mb": max_memory_mb})
        runs[joint_steps, max_memory_mb] = student, reconstruct_blocks(student, teacher, batches, config=config,
                                                                       progress=False)
    (alone, alone_result), (joint, result) = runs[0, 1024.0], runs[60, 1024.0]
    # joint_steps 0: no joint pass and the shared bank stays frozen, as before the joint pass existed
    assert alone_result.joint is None and alone_result.to_dict()["joint"] is None
    assert all(torch.equal(p, bank[n]) for n, p in alone.named_parameters() if n in bank)
    # the block-by-block pass is the same; the joint pass starts from the sum of its held-out MSE and lowers it
    assert without_seconds(result) == without_seconds(alone_result)
    j = result.joint
    assert j.val_mse_before == pytest.approx(sum(b.val_mse_after for b in alone_result.blocks), rel=1e-6)
    assert j.val_mse_after < 0.85 * j.val_mse_before and j.val_mse_after == pytest.approx(sum(j.block_val_mse_after))
    assert all(a < b for a, b in zip(j.block_val_mse_after, j.block_val_mse_before, strict=True))
    assert 0 < j.best_step <= j.steps <= 60 and j.stopped in ("joint_steps", "patience")
    assert j.shared == sum(p.numel() for p in bank.values()) > 0 and j.trainable > j.shared
    assert result.to_dict()["joint"]["val_mse_after"] == j.val_mse_after
    # two sets more than the block-by-block pass alone: every block's targets and block 0's student inputs
    assert result.activation_mb == pytest.approx(alone_result.activation_mb / 3 * 4)
    # the bank moved; norms, embeddings and buffers did not
    assert not all(torch.equal(p, bank[n]) for n, p in joint.named_parameters() if n in bank)
    assert all(torch.equal(p, dense[n]) for n, p in joint.named_parameters() if n in dense)
    assert all(torch.equal(b, dict(free.named_buffers())[n]) for n, b in joint.named_buffers())
    # fresh inputs through the whole student: every block is closer to the teacher than after the first pass alone
    before, after = per_block_mse(alone, teacher, fresh), per_block_mse(joint, teacher, fresh)
    assert all(a < 0.9 * b for a, b in zip(after, before, strict=True)), (before, after)
    # activations on disk: the same result bit for bit
    disk, disk_result = runs[60, 0.01]
    assert disk_result.storage == "disk" and result.storage == "memory"
    assert disk_result.joint.val_mse_after == j.val_mse_after
    assert all(torch.equal(v, joint.state_dict()[k]) for k, v in disk.state_dict().items())


def test_joint_steps_change_nothing_without_shared_parameters_and_a_joint_pass_keeps_its_best_state():
    teacher = make_tiny_llama()
    batches = token_batches(8, 256, seed=1)
    free = compressed(teacher, STAGES["lowrank"])
    runs = []
    for joint_steps in (0, 60):
        student = copy.deepcopy(free)
        config = ReconstructConfig(**{**CONFIG.to_dict(), "joint_steps": joint_steps})
        runs.append((student.state_dict(), reconstruct_blocks(student, teacher, batches, config=config,
                                                              progress=False)))
    (state, result), (other_state, other) = runs
    assert result.joint is None and other.joint is None and result.storage == other.storage
    assert result.activation_mb == other.activation_mb and without_seconds(result) == without_seconds(other)
    assert all(torch.equal(v, state[k]) for k, v in other_state.items())
    # a bank's joint pass that never improves (an absurd learning rate) ends where joint_steps 0 leaves it
    free = compressed(teacher, STAGES["tucker_bank"])
    alone = copy.deepcopy(free)
    reconstruct_blocks(alone, teacher, batches, config=ReconstructConfig(**{**CONFIG.to_dict(), "joint_steps": 0}),
                       progress=False)
    student = copy.deepcopy(free)
    config = ReconstructConfig(**{**CONFIG.to_dict(), "joint_steps": 50, "joint_lr": 1e3})
    j = reconstruct_blocks(student, teacher, batches, config=config, progress=False).joint
    assert (j.stopped, j.steps, j.best_step) == ("patience", 20, 0) and j.val_mse_after == j.val_mse_before
    assert j.block_val_mse_after == j.block_val_mse_before
    assert all(torch.equal(v, alone.state_dict()[k]) for k, v in student.state_dict().items())
    # the joint pass's own wall-time budget
    config = ReconstructConfig(**{**CONFIG.to_dict(), "joint_steps": 10_000, "patience": 10_000,
                                  "joint_time_budget_s": 0.2})
    j = reconstruct_blocks(copy.deepcopy(free), teacher, batches, config=config, progress=False).joint
    assert j.stopped == "time_budget" and 0 < j.steps < 10_000


def test_a_calibration_set_too_small_for_the_held_out_slice_is_refused_in_one_line():
    teacher = make_tiny_llama()
    student = compressed(teacher, STAGES["lowrank"])
    state = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(TensorLMError, match="no held-out batch at val_fraction 0.1") as err:
        reconstruct_blocks(student, teacher, token_batches(4, 256, seed=1), progress=False,
                           config=ReconstructConfig(val_fraction=0.1))
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_recipe_heal_block_parses_validates_and_round_trips():
    stage = {"name": "s", **STAGES["lowrank"], "heal": {"reconstruct": {"lr": 1e-3, "max_steps": 5}}}
    recipe = Recipe.from_dict({"stages": [stage]})
    assert recipe.stages[0].heal.reconstruct == ReconstructConfig(lr=1e-3, max_steps=5)
    assert recipe.stages[0].heal.reconstruct.to_dict()["joint_steps"] == 200  # a shared bank trains jointly
    joint = {"joint_steps": 0, "joint_lr": 1e-4, "joint_time_budget_s": 30.0}
    parsed = Recipe.from_dict({"stages": [{**stage, "heal": {"reconstruct": joint}}]}).stages[0].heal.reconstruct
    assert parsed == ReconstructConfig(**joint) and {k: parsed.to_dict()[k] for k in joint} == joint
    again = Recipe.from_dict(json.loads(recipe.to_json()))
    assert again.stages[0].heal == recipe.stages[0].heal
    assert Recipe.from_dict({"stages": [{**stage, "heal": {"reconstruct": True}}]}).stages[0].heal.reconstruct == \
        ReconstructConfig()
    bad = [({"reconstruct": {"learning_rate": 1}}, "unknown option.*learning_rate.*valid"),
           ({"recon": {}}, "unknown option.*recon"),
           ({"reconstruct": {"val_fraction": 1.5}}, "val_fraction must be in"),
           ({"reconstruct": {"max_steps": "5"}}, "max_steps"),
           ({"reconstruct": {"joint_steps": -1}}, "joint_steps must be an integer >= 0"),
           ({"reconstruct": {"joint_steps": 2.5}}, "joint_steps"),
           ({"reconstruct": {"joint_lr": 0}}, "joint_lr must be > 0"),
           ({"reconstruct": {"joint_time_budget_s": -1.0}}, "joint_time_budget_s must be > 0"),
           ({}, "asks for nothing")]
    for heal, message in bad:
        with pytest.raises(TensorLMError, match=message) as err:
            Recipe.from_dict({"stages": [{**stage, "heal": heal}]})
        assert "\n" not in str(err.value) and "heal" in str(err.value)


def test_check_heal_plan_refuses_a_stage_that_leaves_nothing_to_train_and_a_too_small_calibration_set():
    teacher = make_tiny_llama()
    embedding = {"name": "emb", "method": "kronecker_embedding", "targets": ["model.embed_tokens"],
                 "options": {"factor": 2, "head": "tie"}, "heal": {"reconstruct": {"embedding_steps": 0}}}
    recipe = Recipe.from_dict({"stages": [embedding]})
    with pytest.raises(TensorLMError, match="'emb': heal reconstruct .* none .*embedding_steps is 0") as err:
        check_heal_plan(teacher, recipe, plan_recipe(teacher, recipe))
    assert "\n" not in str(err.value)
    # the factored table itself is something to train (embedding_steps > 0) ...
    recipe = Recipe.from_dict({"stages": [{**embedding, "heal": {"reconstruct": {}}}]})
    check_heal_plan(teacher, recipe, plan_recipe(teacher, recipe))
    # ... and after a stage that compressed the blocks, so are their factors
    recipe = Recipe.from_dict({"stages": [{"name": "s", **STAGES["lowrank"]}, embedding]})
    check_heal_plan(teacher, recipe, plan_recipe(teacher, recipe))
    small = Recipe.from_dict({"calibration": {"samples": 8}, "stages": [
        {"name": "s", **STAGES["lowrank"], "heal": {"reconstruct": {"batch_size": 4}}}]})
    with pytest.raises(TensorLMError, match="'s': reconstruct: 2 calibration batches leave no held-out"):
        check_heal_plan(teacher, small, plan_recipe(teacher, small))


def heal_recipe(stages: list[dict]) -> Recipe:
    return Recipe.from_dict({"name": "heal", "calibration": {"samples": 8, "length": 32}, "stages": stages})


def test_run_reconstructs_after_the_stage_and_refuses_a_stage_with_nothing_to_train(gpt2_folder_and_data, tmp_path):
    folder, data = gpt2_folder_and_data
    mlp = {"name": "mlp", "method": "lowrank", "targets": ["re:.*mlp\\.c_fc"], "options": {"rank": 4},
           "heal": {"reconstruct": {"max_steps": 10, "batch_size": 2, "val_fraction": 0.25, "eval_every": 2}}}
    out = tmp_path / "run"
    results = run(str(folder), heal_recipe([mlp]), out, data_dir=data, eval_mode="none")
    record = results.stages[0]["reconstruct"]
    assert record["train_batches"] == 3 and record["val_batches"] == 1 and record["storage"] == "memory"
    assert all(b["val_mse_after"] < b["val_mse_before"] for b in record["blocks"])
    assert json.loads((out / "results.json").read_text())["stages"][0]["reconstruct"] == record
    assert record["embedding"]["stopped"] == "not run"  # the token table is dense
    table = {"name": "wte", "method": "kronecker_embedding", "targets": ["transformer.wte"],
             "options": {"factor": 2, "head": "tie"}, "heal": mlp["heal"]}
    results = run(str(folder), heal_recipe([table]), tmp_path / "table", data_dir=data, eval_mode="none")
    record = results.stages[0]["reconstruct"]["embedding"]
    assert record["table"] == "transformer.wte" and record["tied_head"] and record["steps"] >= 1
    assert record["val_after"] < record["val_before"]
    embedding = {"name": "wte", "method": "kronecker_embedding", "targets": ["transformer.wte"],
                 "options": {"factor": 2, "head": "tie"},
                 "heal": {"reconstruct": {**mlp["heal"]["reconstruct"], "embedding_steps": 0}}}
    too_small = {**mlp, "heal": {"reconstruct": {}}}  # 8 samples in one batch of 8: no held-out slice
    bad = tmp_path / "bad"
    for stage, message in ((embedding, "'wte': heal reconstruct .* none"), (too_small, "'mlp': .* no held-out")):
        with pytest.raises(TensorLMError, match=message) as err:
            run(str(folder), heal_recipe([stage]), bad, data_dir=data, eval_mode="none")
        assert "\n" not in str(err.value)
        assert not bad.exists() and not Path(f"{bad}.partial").exists()


def full_kl(student_logits, teacher_logits) -> torch.Tensor:
    logp, logq = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def test_topk_teacher_store_reproduces_the_full_kl_at_k_equal_vocab_and_bounds_it_below(data_dir, tmp_path):
    teacher, student = make_tiny_llama(), make_tiny_llama(seed=1)
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "gpt2-tokenizer")
    ids = torch.cat(token_batches(2, 256, seed=5))  # (8, 24)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    s_logits = student(input_ids=ids).logits.detach().requires_grad_()
    exact = full_kl(s_logits, t_logits)
    store = build_teacher_store(teacher, tokenizer, ids, k=256, batch_size=3)
    assert store.k == 256 and store.logprobs.shape == (8, 24, 256) and torch.equal(store.ids, ids)
    approx = topk_kl(s_logits, store.indices, store.logprobs, store.rest)
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-7)  # stated tolerance: 1e-5 relative
    (g_approx,) = torch.autograd.grad(approx, s_logits)
    (g_exact,) = torch.autograd.grad(full_kl(s_logits, t_logits), s_logits)
    torch.testing.assert_close(g_approx, g_exact, rtol=1e-4, atol=1e-8)
    small = build_teacher_store(teacher, tokenizer, ids)  # k = 64 by default, plus the remaining mass
    assert small.k == 64 and bool((small.rest < 0).all())
    coarse = topk_kl(s_logits, small.indices, small.logprobs, small.rest)
    assert 0 < coarse <= exact + 1e-6 and torch.isfinite(torch.autograd.grad(coarse, s_logits)[0]).all()


def test_teacher_store_round_trips_and_refuses_another_model_or_tokenizer_in_one_line(data_dir, tmp_path):
    teacher = make_tiny_llama()
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "gpt2-tokenizer")
    store = build_teacher_store(teacher, tokenizer, torch.cat(token_batches(1, 256, seed=5)), k=8)
    path = store.save(tmp_path / "teacher.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.safetensors"]
    again = TeacherStore.load(path, teacher, tokenizer)
    assert all(torch.equal(getattr(again, n), getattr(store, n)) for n in ("ids", "indices", "logprobs", "rest"))
    hot = build_teacher_store(teacher, tokenizer, store.ids, k=8, temperature=2.0)  # log_softmax(z / 2)
    assert TeacherStore.load(hot.save(tmp_path / "hot.safetensors"), teacher, tokenizer).temperature == 2.0
    flatter = hot.logprobs[..., 0] - store.logprobs[..., 0]  # a hotter softmax lowers the top log-probability
    assert again.temperature == 1.0 and bool((flatter <= 0).all()) and bool((flatter < 0).any())
    (tmp_path / "hot.safetensors").unlink()
    other_tokenizer = AutoTokenizer.from_pretrained(data_dir / "gpt2-tokenizer")
    other_tokenizer.add_tokens(["<extra>"])
    (tmp_path / "junk.safetensors").write_text("not a store")
    for args, message in (((path, make_tiny_llama(seed=1), tokenizer), "another model"),
                          ((path, teacher, other_tokenizer), "another tokenizer"),
                          ((tmp_path / "junk.safetensors", teacher, tokenizer), "not a safetensors"),
                          ((tmp_path / "none.safetensors", teacher, tokenizer), "does not exist")):
        with pytest.raises(TensorLMError, match=message) as err:
            TeacherStore.load(*args)
        assert "\n" not in str(err.value)
    with pytest.raises(TensorLMError, match="k must be in"):
        build_teacher_store(teacher, tokenizer, torch.cat(token_batches(1, 256, seed=5)), k=257)

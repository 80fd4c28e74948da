"""The distillation trainer and its data: selection, DDP equivalence, bit-for-bit resume, refusals."""

import copy
import json
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tensorlm import Recipe, compress
from tensorlm.distill import DistillConfig, distill
from tensorlm.distill.data import LMBlocks, SentencePool, batch_indices, documents, split_sentences
from tensorlm.errors import TensorLMError
from tensorlm.heal.teacher_store import TeacherStore

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TENSORLM_DATA", ROOT.parent / "shared" / "data"))
WORDS = [f"w{i}" for i in range(40)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 46-token word-level tokenizer over WORDS (fits the 64-token tiny models)."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "[CLS]": 3, "[SEP]": 4, ".": 5}
    vocab.update({w: 6 + i for i, w in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def write_text(folder: Path, shards: int = 2, docs: int = 12) -> Path:
    """Shards of documents (blank-line separated) of sentences of WORDS; sentences start with W-words."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        text = []
        for _ in range(docs):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 10))) + " ." for _ in range(4)]
            text.append(" ".join("W" + x[1:] for x in sentences))
        (folder / f"shard{s}.txt").write_text("\n\n".join(text) + "\n")
    return folder


def gpt2_pair(vocab: int = 64, dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab, n_positions=64, bos_token_id=2,
                     eos_token_id=2, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    teacher = GPT2LMHeadModel(cfg).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def causal_config(text_dir: Path, **overrides) -> DistillConfig:
    settings = dict(loss="logits", steps=12, lr=3e-3, batch_size=4, seq_len=16, warmup=2, eval_every=4,
                    save_every=4, log_every=2, text_dir=str(text_dir), val_size=4, seed=3)
    settings.update(overrides)
    return DistillConfig(**settings)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_training(a: dict, b: dict, start: dict) -> None:
    """``a`` and ``b`` agree to float noise (Adam divides by sqrt(v), so near-zero gradients turn summation
    order noise into ~1e-6 steps), and training moved the weights far more than that tolerance."""
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-3
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=3e-5)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


# -- data ---------------------------------------------------------------------------------------------


def test_lm_blocks_pack_documents_with_eos_and_hold_out_disjoint_validation(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    blocks = LMBlocks(tok, text, seq_len=8, val_blocks=3, cache_dir=tmp_path / "cache")
    first = (text / "shard0.txt").read_text()
    expected = []
    for doc in documents(first):
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert blocks.shards[0].tolist() == expected
    assert len(blocks.val_index) == 3 and not set(blocks.val_index) & set(blocks.train_index)
    assert {shard for shard, _ in blocks.val_index} == {0, 1}  # spread over the shards
    again = LMBlocks(tok, text, seq_len=8, val_blocks=3, cache_dir=tmp_path / "cache")  # from the cache
    assert isinstance(again.shards[0], np.memmap) and again.shards[0].tolist() == expected
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2


def test_batches_visit_every_sample_once_per_epoch_and_depend_only_on_seed_and_step():
    n, b = 10, 4
    stream = [i for step in range(5) for i in batch_indices(step, b, n, seed=1)]  # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert batch_indices(3, b, n, seed=1) == stream[12:16]
    assert batch_indices(0, b, n, seed=2) != batch_indices(0, b, n, seed=1)


def test_split_sentences():
    doc = "The cat sat down . It was \"Happy\" today! what now? A b c d e f."
    assert split_sentences(doc, min_words=2) == ["The cat sat down .", "It was \"Happy\" today! what now?",
                                                 "A b c d e f."]
    assert split_sentences("Too short.", min_words=4) == []


def test_sentence_pool_trains_on_sts_train_never_on_dev_or_test(tmp_path):
    assert DATA.is_dir(), f"shared data folder {DATA} is missing (set TENSORLM_DATA)"
    text = write_text(tmp_path / "text")
    pool = SentencePool(text, DATA, val_size=5)
    train = set(pool.train)
    from tensorlm.data import load_sts

    for name, split in (("stsb", "dev"), ("stsb", "test"), ("sick", "dev"), ("sick", "test")):
        held = {s for a, b, _ in load_sts(name, split, DATA) for s in (a, b)}
        assert not train & held, (name, split)
    sts_train = {s for a, b, _ in load_sts("stsb", "train", DATA) for s in (a, b)}
    assert len(train & sts_train) > 0.8 * len(sts_train)  # the rest also occur in dev/test
    assert not set(pool.val) & train and len(pool.val) == 5


# -- training -----------------------------------------------------------------------------------------


def test_distill_lowers_validation_loss_and_keeps_the_best_weights(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    teacher_before = params(teacher)
    result = distill(student, teacher, tok, causal_config(text), tmp_path / "run", kind="causal-lm",
                     progress=False)
    assert result.stopped == "completed" and result.steps == 12
    vals = {r["step"]: r["val_nll"] for r in result.history if "val_nll" in r}
    assert sorted(vals) == [0, 4, 8, 12]
    assert result.best_metric == min(vals.values()) < vals[0]
    assert result.best_step == min(vals, key=vals.get)
    assert result.teacher_metrics["val_nll"] < vals[0]
    # the student holds the best step's weights: its validation NLL is the recorded best
    blocks = LMBlocks(tok, text, 16, val_blocks=4)
    with torch.no_grad():
        from tensorlm.distill.losses import next_token_ce

        nll = torch.stack([next_token_ce(student(input_ids=b).logits, b) for b in blocks.val_batches(1)]).mean()
    assert float(nll) == pytest.approx(result.best_metric, rel=1e-5)
    assert all(torch.equal(v, teacher_before[k]) for k, v in params(teacher).items())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history and any("tokens_per_s" in r for r in lines)
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == [f"best-{result.best_step:07d}.safetensors", "checkpoint-0000012.pt", "checkpoint.json",
                     "metrics.jsonl"]


def test_grad_accumulation_gives_the_same_steps_as_one_big_batch(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    final = []
    start = params(gpt2_pair()[0])
    for accum in (1, 2):
        student, teacher = gpt2_pair()
        cfg = causal_config(text, steps=4, grad_accum=accum, eval_every=100, save_every=100)
        distill(student, teacher, tok, cfg, tmp_path / f"run{accum}", kind="causal-lm", progress=False)
        final.append(torch.load(tmp_path / f"run{accum}" / "checkpoint-0000004.pt", weights_only=True)["student"])
    assert_same_training(final[0], final[1], start)


def assert_equal_nested(a, b) -> None:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_nested(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal_nested(x, y)
    else:
        assert a == b


class Crash(RuntimeError):
    pass


def test_killed_run_resumes_bit_for_bit(tmp_path):
    """A crash between checkpoints (here: in the step-8 validation) loses nothing: resuming from the
    step-4 checkpoint reproduces the uninterrupted run exactly, dropout and accumulation included."""
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    cfg = causal_config(text, grad_accum=2, dropout=True)

    def run(out, crash_at=None):
        student, teacher = gpt2_pair(dropout=0.1)
        calls = []

        def score(model):  # deterministic in the weights: closeness to the teacher
            calls.append(1)
            if crash_at is not None and len(calls) == crash_at:
                raise Crash("simulated kill")
            return -float(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), teacher.parameters(),
                                                                   strict=True)))

        result = distill(student, teacher, tok, cfg, out, kind="causal-lm", resume=True, eval_fn=score,
                         progress=False)
        return student, result

    reference, ref_result = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "killed", crash_at=3)  # validations at steps 0, 4, 8: dies at step 8
    assert json.loads((tmp_path / "killed" / "checkpoint.json").read_text())["step"] == 4
    (tmp_path / "killed" / "checkpoint-0000008.pt.tmp").write_bytes(b"half-written")  # a torn write
    resumed, result = run(tmp_path / "killed")
    assert result.best_step == ref_result.best_step
    for k, v in params(reference).items():
        assert torch.equal(params(resumed)[k], v), k
    last = [torch.load(tmp_path / run / "checkpoint-0000012.pt", weights_only=True) for run in ("straight", "killed")]
    assert_equal_nested(last[0]["student"], last[1]["student"])
    assert_equal_nested(last[0]["optimizer"], last[1]["optimizer"])
    timeless = [[{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in res.history]
                for res in (result, ref_result)]
    assert timeless[0] == timeless[1]


def test_time_budget_stops_with_a_checkpoint_that_resumes(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    result = distill(student, teacher, tok, causal_config(text, time_budget_s=1e-9), tmp_path / "run",
                     kind="causal-lm", progress=False)
    assert result.stopped == "time_budget" and result.steps == 1
    assert [r["step"] for r in result.history if "val_nll" in r] == [0, 1]  # the last step is validated too
    student, teacher = gpt2_pair()
    result = distill(student, teacher, tok, causal_config(text), tmp_path / "run", kind="causal-lm",
                     resume=True, progress=False)
    assert result.stopped == "completed" and result.steps == 12


def test_the_validations_before_the_first_step_count_in_the_time_budget(tmp_path, monkeypatch):
    import time

    from tensorlm.distill import trainer

    validate = trainer._Run._default_metrics

    def slow(self, model):  # the teacher's and the student's validation before step 1 take 0.3 s each
        time.sleep(0.3)
        return validate(self, model)

    monkeypatch.setattr(trainer._Run, "_default_metrics", slow)
    student, teacher = gpt2_pair()
    result = distill(student, teacher, tiny_tokenizer(), causal_config(write_text(tmp_path / "text"),
                                                                       time_budget_s=0.5),
                     tmp_path / "run", kind="causal-lm", progress=False)
    assert result.stopped == "time_budget" and result.steps == 1  # uncounted, the run went on to step 4


def test_a_folder_of_another_run_or_a_used_folder_is_refused(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    cfg = causal_config(text, steps=2, eval_every=2, save_every=2)
    distill(student, teacher, tok, cfg, tmp_path / "run", kind="causal-lm", progress=False)
    with pytest.raises(TensorLMError, match="--resume") as refused:
        distill(student, teacher, tok, cfg, tmp_path / "run", kind="causal-lm", progress=False)
    assert "resume=True" not in str(refused.value) and "--restart" in str(refused.value)
    with pytest.raises(TensorLMError, match=r"another run \(config changed: lr: 0.003 -> 0.001\)") as refused:
        distill(student, teacher, tok, causal_config(text, steps=5, eval_every=2, lr=1e-3), tmp_path / "run",
                kind="causal-lm", resume=True, progress=False)
    other_student = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=64))
    with pytest.raises(TensorLMError, match="another run"):
        distill(other_student, teacher, tok, cfg, tmp_path / "run", kind="causal-lm", resume=True,
                progress=False)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("someone else's")
    with pytest.raises(TensorLMError, match="not empty"):
        distill(student, teacher, tok, cfg, tmp_path / "stranger", kind="causal-lm", progress=False)


def test_steps_can_be_raised_on_resume(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    first = distill(student, teacher, tok, causal_config(text, steps=4, eval_every=2, save_every=2),
                    tmp_path / "run", kind="causal-lm", progress=False)
    assert first.steps == 4
    student, teacher = gpt2_pair()
    more = distill(student, teacher, tok, causal_config(text, steps=6, eval_every=2, save_every=2),
                   tmp_path / "run", kind="causal-lm", resume=True, progress=False)
    assert more.stopped == "completed" and more.steps == 6
    assert [r["step"] for r in more.history if "loss" in r][-1] == 6


def test_a_corrupted_checkpoint_is_refused(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    cfg = causal_config(text, steps=2, eval_every=2, save_every=2)
    run = tmp_path / "run"
    distill(student, teacher, tok, cfg, run, kind="causal-lm", progress=False)
    path = run / "checkpoint-0000002.pt"
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(TensorLMError, match="corrupted"):
        distill(student, teacher, tok, cfg, run, kind="causal-lm", resume=True, progress=False)
    (run / "checkpoint.json").write_text("{not json")
    with pytest.raises(TensorLMError, match="corrupted"):
        distill(student, teacher, tok, cfg, run, kind="causal-lm", resume=True, progress=False)


def test_without_a_teacher_ce_trains_exactly_as_ce_with_any_teacher(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    cfg = causal_config(text, weights={"logit_kl": 0.0, "ce": 1.0})
    alone, teacher = gpt2_pair()
    start = params(alone)
    with_teacher = copy.deepcopy(alone)
    result = distill(alone, None, tok, cfg, tmp_path / "alone", kind="causal-lm", progress=False)
    distill(with_teacher, teacher, tok, cfg, tmp_path / "with", kind="causal-lm", progress=False)
    vals = [r["val_nll"] for r in result.history if "val_nll" in r]
    assert result.teacher_metrics == {} and result.best_metric == min(vals) < vals[0]
    assert_same_training(params(alone), params(with_teacher), start)
    with pytest.raises(TensorLMError, match="without a teacher"):
        distill(alone, None, tok, causal_config(text), tmp_path / "kl", kind="causal-lm", progress=False)


def test_different_vocabularies_and_missing_layers_are_refused(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, _ = gpt2_pair(vocab=72)
    _, teacher = gpt2_pair(vocab=64)
    with pytest.raises(TensorLMError, match="vocabulary"):
        distill(student, teacher, tok, causal_config(text), tmp_path / "a", kind="causal-lm", progress=False)
    student, teacher = gpt2_pair()
    with pytest.raises(TensorLMError, match="out of range"):
        distill(student, teacher, tok, causal_config(text, loss="ilkd", layer_map={0: 0, 1: 7}), tmp_path / "b",
                kind="causal-lm", progress=False)


def test_a_non_finite_loss_stops_the_run_with_an_error(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    with torch.no_grad():
        student.transformer.wpe.weight[0, 0] = float("nan")
    with pytest.raises(TensorLMError, match="loss is nan at step 1"):
        distill(student, teacher, tok, causal_config(text), tmp_path / "run", kind="causal-lm", progress=False)


def test_encoder_distillation_with_attention_kl_restores_the_attention_kind(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text", docs=20)
    torch.manual_seed(0)
    teacher = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = teacher.config._attn_implementation
    cfg = DistillConfig(loss="embedding", weights={"attention_kl": 1.0}, steps=10, lr=3e-3, batch_size=8,
                        warmup=1, eval_every=5, save_every=5, text_dir=str(text), val_size=16, max_length=16)
    result = distill(student, teacher, tok, cfg, tmp_path / "run", kind="encoder", progress=False)
    vals = [r["val_cosine"] for r in result.history if "val_cosine" in r]
    assert result.metric == "val_cosine" and result.best_metric == max(vals) > vals[0]
    assert teacher.config._attn_implementation == student.config._attn_implementation == before
    assert any(r.get("loss/attention_kl", 0) > 0 for r in result.history)


# -- two processes (DDP over gloo) ----------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), TENSORLM_CACHE=f"{folder}/cache",
                      ACCELERATE_USE_CPU="yes", OMP_NUM_THREADS="1")  # what `accelerate launch --cpu` sets
    torch.set_num_threads(1)
    student, teacher = gpt2_pair()
    text = Path(folder) / "text"
    distill(student, teacher, tiny_tokenizer(), causal_config(text, steps=4, eval_every=2, save_every=4),
            Path(folder) / "ddp", kind="causal-lm", progress=False)
    from accelerate import PartialState

    assert PartialState().num_processes == world and PartialState().distributed_type == "MULTI_CPU"
    if rank == 0:
        torch.save(params(student), Path(folder) / "ddp_final.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    write_text(tmp_path / "text")
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp_final.pt", weights_only=True)
    student, teacher = gpt2_pair()
    start = params(student)
    result = distill(student, teacher, tiny_tokenizer(), causal_config(tmp_path / "text", steps=4, eval_every=2,
                     save_every=4), tmp_path / "single", kind="causal-lm", progress=False)
    assert result.best_step > 0  # the compared weights are trained ones
    assert_same_training(params(student), ddp, start)


# -- the top-k teacher store, gradient checkpointing, training only the factors (issue 11) ---------------


def counted(model) -> list:
    """Count ``model``'s forward calls (a list that grows by one per call)."""
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_topk_store_at_full_vocabulary_trains_as_the_full_kl_without_teacher_passes(tmp_path, monkeypatch):
    """k = vocabulary size: the store-based loss equals the trainer's full-vocabulary KL at every step (stated
    tolerance: 1e-5 relative on each logged loss, 3e-5 absolute on the weights after 6 steps), and during
    training the teacher runs only for its one validation batch; a second run reuses the store (no rebuild)."""
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    histories, weights = [], []
    start = params(gpt2_pair()[0])
    for name, k in (("full", 0), ("store", 64), ("again", 64)):
        student, teacher = gpt2_pair()
        calls = counted(teacher)
        cfg = causal_config(text, steps=6, log_every=1, eval_every=3, save_every=3, teacher_topk=k,
                            temperature=2.0)
        result = distill(student, teacher, tok, cfg, tmp_path / name, kind="causal-lm", progress=False)
        histories.append([r["loss"] for r in result.history if "loss" in r])
        weights.append(params(student))
        if name == "store":  # built once: one pass over the visited blocks in micro-batches of 4, + 1 val batch
            stores = list((tmp_path / "cache" / "teacher-topk").iterdir())
            assert len(stores) == 1 and len(calls) == -(-len(TeacherStore.load(stores[0], teacher, tok).ids) // 4) + 1
            monkeypatch.setattr(sys.modules["tensorlm.distill.trainer"], "build_teacher_store", None)  # no rebuild
        if name == "again":
            assert len(calls) == 1  # the teacher's own validation only
    torch.testing.assert_close(torch.tensor(histories[1]), torch.tensor(histories[0]), rtol=1e-5, atol=0)
    assert_same_training(weights[0], weights[1], start)
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])


def test_a_few_steps_with_a_top64_store_reduce_the_loss_and_a_foreign_store_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORLM_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair(vocab=128)  # k = 16 of 128 tokens: the "rest" outcome carries real mass
    store = tmp_path / "store.safetensors"
    cfg = causal_config(text, teacher_topk=16, teacher_store=str(store))
    result = distill(student, teacher, tok, cfg, tmp_path / "run", kind="causal-lm", progress=False)
    losses = [r["loss/logit_kl"] for r in result.history if "loss" in r]
    vals = [r["val_nll"] for r in result.history if "val_nll" in r]
    assert losses[-1] < 0.5 * losses[0] and result.best_metric < vals[0]
    assert TeacherStore.load(store, teacher, tok).k == 16
    other_teacher = gpt2_pair(vocab=128)[0]
    other_tok = tiny_tokenizer()
    other_tok.add_tokens(["w999"])
    student = gpt2_pair(vocab=128)[0]
    for model, tokenizer, overrides, message in (
            (other_teacher, tok, {}, "another model"), (teacher, other_tok, {}, "another tokenizer"),
            (teacher, tok, {"teacher_topk": 8}, "holds k=16 .* needs k=8"),
            (teacher, tok, {"seq_len": 8}, "other blocks")):
        before = store.read_bytes()
        with pytest.raises(TensorLMError, match=message) as err:
            distill(student, model, tokenizer, DistillConfig.from_dict({**cfg.to_dict(), **overrides}),
                    tmp_path / "refused", kind="causal-lm", progress=False)
        assert "\n" not in str(err.value) and not (tmp_path / "refused").exists() and store.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run", "store.safetensors", "text"]
    assert not (tmp_path / "cache" / "teacher-topk").exists()  # a named store is the only store


def test_teacher_topk_refuses_what_cannot_work_in_one_line(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    for overrides, model, message in (
            ({"loss": "ilkd"}, teacher, r"forward pass, which \['attention_kl', 'embedding_mse', 'hidden_mse'\]"),
            ({"weights": {"logit_kl": 0.0, "ce": 1.0}}, teacher, "logit_kl, whose weight is 0"),
            ({"teacher_topk": 65}, teacher, r"exceeds the vocabulary \(64\)"),
            ({"weights": {"logit_kl": 0.0, "ce": 1.0}}, None, "needs a causal LM and its teacher")):
        with pytest.raises(TensorLMError, match=message) as err:
            distill(student, model, tok, causal_config(text, **{"teacher_topk": 8, **overrides}), tmp_path / "x",
                    kind="causal-lm", progress=False)
        assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


def test_gradient_checkpointing_trains_as_without_it_and_is_switched_off_after(tmp_path):
    """The config asks for dropout 0.1 but the run keeps dropout off: checkpointed blocks must not switch it on."""
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    start = params(gpt2_pair(dropout=0.1)[0])
    final = []
    for on in (False, True):
        student, teacher = gpt2_pair(dropout=0.1)
        cfg = causal_config(text, steps=4, eval_every=4, save_every=4, gradient_checkpointing=on)
        distill(student, teacher, tok, cfg, tmp_path / f"gc{on}", kind="causal-lm", progress=False)
        final.append(params(student))
        assert not any(getattr(m, "gradient_checkpointing", False) for m in student.modules())
    assert_same_training(final[0], final[1], start)


def test_gradient_checkpointing_is_active_during_the_step(tmp_path, monkeypatch):
    """Under checkpointing a block's insides run twice per micro-batch (forward, then recomputed in backward);
    module hooks do not fire in the recomputation, so the MLP's forward method itself is counted."""
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    student, teacher = gpt2_pair()
    mlp, calls = student.transformer.h[0].mlp, []
    forward = mlp.forward
    mlp.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    cfg = causal_config(text, steps=2, eval_every=100, save_every=100, gradient_checkpointing=True)
    distill(student, teacher, tok, cfg, tmp_path / "run", kind="causal-lm", progress=False)
    val_passes = 2 * 1  # one validation batch at steps 0 and 2
    assert len(calls) == 2 * 2 + val_passes


def test_trainable_factors_moves_only_the_factorized_layers_and_restores_the_flags(tmp_path):
    tok = tiny_tokenizer()
    text = write_text(tmp_path / "text")
    _, teacher = gpt2_pair()
    recipe = Recipe.from_dict({"name": "t", "stages": [{"name": "mlp", "method": "lowrank",
                                                         "targets": ["re:.*mlp\\.c_fc"], "options": {"rank": 4}}]})
    student = compress(teacher, recipe, progress=False)
    before = params(student)
    cfg = causal_config(text, steps=4, eval_every=4, save_every=4, trainable="factors")
    distill(student, teacher, tok, cfg, tmp_path / "run", kind="causal-lm", progress=False)
    after = torch.load(tmp_path / "run" / "checkpoint-0000004.pt", weights_only=True)["student"]  # step 4's
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(".mlp.c_fc." in k for k in moved)
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(TensorLMError, match="no factorized layer") as err:
        distill(gpt2_pair()[0], teacher, tok, cfg, tmp_path / "dense", kind="causal-lm", progress=False)
    assert "\n" not in str(err.value)

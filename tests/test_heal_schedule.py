"""The resumable iterative schedule (issue 11, point 3): two stages that each reconstruct then distill, killed
inside the second stage's distillation and resumed, end with the weights of an uninterrupted run, bit for bit."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tensorlm import Recipe, TensorLMError
from tensorlm.heal.schedule import SCHEDULE_FILE
from tensorlm.pipeline import run

TRAINER = sys.modules["tensorlm.distill.trainer"]
PIPELINE = sys.modules["tensorlm.pipeline"]
STEPS = 4


class Kill(RuntimeError):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


def two_stage_recipe(data: Path, lr: float = 3e-3) -> Recipe:
    heal = {"reconstruct": {"max_steps": 6, "batch_size": 2, "val_fraction": 0.25, "eval_every": 2}}
    distill = {"steps": STEPS, "lr": lr, "batch_size": 2, "seq_len": 32, "warmup": 0, "eval_every": 2,
               "save_every": 2, "val_size": 2, "text_dir": str(data / "lm_text")}
    stages = [{"name": "fc", "method": "lowrank", "targets": ["re:.*mlp\\.c_fc"], "options": {"rank": 4},
               "heal": heal, "distill": distill},
              {"name": "proj", "method": "lowrank", "targets": ["re:.*mlp\\.c_proj"], "options": {"rank": 4},
               "heal": heal, "distill": distill}]
    return Recipe.from_dict({"name": "two-stage", "calibration": {"samples": 8, "length": 32}, "stages": stages})


def counting(monkeypatch, target, name: str, kill_at: int | None = None) -> list:
    """Wrap ``target.name`` to count its calls, raising :class:`Kill` on call number ``kill_at``."""
    calls, inner = [], getattr(target, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        if kill_at is not None and len(calls) == kill_at:
            raise Kill("simulated kill")
        return inner(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)
    return calls


def test_a_run_killed_in_the_second_stages_distillation_resumes_to_the_same_weights(gpt2_folder_and_data, tmp_path,
                                                                                      monkeypatch):
    folder, data = gpt2_folder_and_data
    recipe = two_stage_recipe(data)
    straight = tmp_path / "straight"
    run(str(folder), recipe, straight, data_dir=data, eval_mode="none", seed=0)

    killed = tmp_path / "killed"
    with monkeypatch.context() as patch:  # dies in step 3 of stage 2, after its step-2 checkpoint
        counting(patch, TRAINER._Run, "_step", kill_at=STEPS + 3)
        with pytest.raises(Kill):
            run(str(folder), recipe, killed, data_dir=data, eval_mode="none", seed=0)
    work = Path(f"{killed}.partial")
    schedule = json.loads((work / SCHEDULE_FILE).read_text())
    assert [(e["stage"], e["phase"]) for e in schedule["done"]] == [("fc", "reconstruct"), ("fc", "distill"),
                                                                    ("proj", "reconstruct")]
    assert sorted(p.name for p in work.glob("checkpoint-phase-*")) == ["checkpoint-phase-001.pt",
                                                                       "checkpoint-phase-002.pt"]
    assert json.loads((work / "distill-proj" / "checkpoint.json").read_text())["step"] == 2
    assert not killed.exists()

    with pytest.raises(TensorLMError, match="another recipe") as err:  # a resume must be the same recipe
        run(str(folder), two_stage_recipe(data, lr=1e-3), killed, data_dir=data, eval_mode="none", resume=True,
            seed=0)
    assert "\n" not in str(err.value) and not killed.exists()

    with monkeypatch.context() as patch:
        steps = counting(patch, TRAINER._Run, "_step")
        reconstructions = counting(patch, PIPELINE, "reconstruct_stage")
        results = run(str(folder), recipe, killed, data_dir=data, eval_mode="none", resume=True, seed=0)
    assert len(steps) == STEPS - 2 and not reconstructions  # only what the kill left undone
    reference = json.loads((straight / "results.json").read_text())["stages"]
    assert [s["distill"]["steps"] for s in results.stages] == [s["distill"]["steps"] for s in reference] == [4, 4]
    timeless = [[[{k: v for k, v in b.items() if k != "seconds"} for b in s["reconstruct"]["blocks"]] for s in stages]
                for stages in (results.stages, reference)]
    assert timeless[0] == timeless[1]  # the recorded reports of the restored phases
    a, b = load_file(straight / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and any(".c_proj." in k for k in a)
    for name, tensor in a.items():
        assert torch.equal(b[name], tensor), name
    assert not work.exists()

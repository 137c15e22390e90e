"""nanochat/run.py: the step meter against a plain reference, the shared flags, when evaluations are due, saving and
resuming a run (loss scale included), device defaults, and main() leaving the process as it found it."""
import argparse
import copy
import gc
import json
import os
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from nanochat.common import UserError, all_reduce_sum
from nanochat.checkpoint_manager import complete_steps, save_checkpoint
from nanochat.optim import GradScaler
from nanochat.run import Run, RunState, StepMeter, add_checkpoint_flags, add_run_flags, check_resume_step, restore_process_state


def fresh_state():
    return {"smooth_train_loss": 0.0, "total_training_time": 0.0}


def test_meter_loss_is_the_debiased_ema_and_time_skips_warmup():
    losses, dts = [5.0, 4.0, 3.5, 3.0, 2.9, 2.7], [9.0, 1.0, 1.5, 2.0, 1.0, 3.0]
    meter = StepMeter(fresh_state(), warmup_steps=2)
    smooth = 0.0
    for step, (loss, dt) in enumerate(zip(losses, dts), 1):
        smooth = 0.9 * smooth + 0.1 * loss
        assert meter.update(step, dt, loss) == pytest.approx(smooth / (1 - 0.9 ** step))
    assert meter.update(1, 9.0, loss=None) is None  # a loop without a loss (RL) still counts its time
    assert meter.state["total_training_time"] == pytest.approx(sum(dts[2:]))


def test_meter_resumes_from_its_state():
    whole, first = StepMeter(fresh_state(), warmup_steps=1), StepMeter(fresh_state(), warmup_steps=1)
    for step in range(1, 4):
        whole.update(step, 0.5, 10.0 / step)
        first.update(step, 0.5, 10.0 / step)
    resumed = StepMeter(copy.deepcopy(first.state), warmup_steps=1)  # the state as saved in a checkpoint
    assert resumed.update(4, 0.5, 1.0) == whole.update(4, 0.5, 1.0)


def test_eta_is_the_timed_pace_times_the_steps_left_and_none_while_warming_up():
    meter = StepMeter(fresh_state(), warmup_steps=10)
    assert meter.eta(step=1, progress=1 / 100) is None and meter.eta(step=10, progress=10 / 100) is None
    assert meter.line(1, "00100", 0.01, 300.0).endswith("| eta after step 10 (compiling, warming up)")
    meter.state["total_training_time"] = 30.0  # 30 s over steps 11..20
    assert meter.eta(step=20, progress=20 / 100) == pytest.approx(80 * 3.0)
    assert meter.eta(step=20, progress=0.5) == pytest.approx(20 * 3.0)  # an epoch half done after 20 steps


def test_log_line_fields_and_order_and_mfu_only_with_a_known_peak():
    meter = StepMeter(fresh_state(), warmup_steps=0, tokens_per_step=4096, flops_per_token=1e6, peak_flops=1e12)
    meter.update(1, 0.5, 2.0)
    line = meter.line(1, "00004", 0.25, 0.5, before=["loss 2.000000"], after=["epoch 0"])
    assert line == "step 00001/00004 ( 25.0%) | loss 2.000000 | dt 500ms | tok/sec 8,192 | mfu 0.82 | epoch 0 | eta 0m01s"
    for peak in (None, float("inf")):  # a CPU; a GPU whose peak is unknown
        meter = StepMeter(fresh_state(), warmup_steps=0, tokens_per_step=4096, flops_per_token=1e6, peak_flops=peak)
        meter.update(1, 0.5, 2.0)
        assert "mfu" not in meter.line(1, "00004", 0.25, 0.5) and meter.mfu(0.5) is None
    plain = StepMeter(fresh_state(), warmup_steps=0)
    plain.update(1, 0.25)
    assert plain.line(1, "00002", 0.5, 0.25, before=["reward 0.5000"]) == \
        "step 00001/00002 ( 50.0%) | reward 0.5000 | dt 250ms | eta 0m00s"


def test_shared_flags_defaults_and_short_forms():
    parser = argparse.ArgumentParser()
    add_run_flags(parser)
    add_checkpoint_flags(parser, "sft", ["sft", "rl"])
    args = parser.parse_args(["-g", "d4", "-s", "7"])
    assert (args.run, args.device_type, args.save_every, args.keep_last, args.resume_from_step, args.dry_run) == \
        ("dummy", "", -1, None, -1, False)
    assert (args.source, args.model_tag, args.step) == ("sft", "d4", 7)
    with pytest.raises(SystemExit):
        parser.parse_args(["--keep-last=0"])


def test_all_reduce_sum_of_one_process_is_the_values():
    assert all_reduce_sum([3, 2.5, 0], torch.device("cpu")) == [3.0, 2.5, 0.0]


def test_resume_step_must_be_before_the_end():
    check_resume_step(0, 5)
    check_resume_step(4, 5)
    for step in (5, 9, -2):
        with pytest.raises(UserError, match=f"Cannot resume from step {step}: this run ends at step 5"):
            check_resume_step(step, 5)


def make_run(monkeypatch, device_defaults=None, **flags):
    """A Run on the CPU with the shared flags (defaults, or flags); conftest undoes compute_init's excepthook."""
    args = SimpleNamespace(**{"run": "dummy", "device_type": "cpu", "save_every": -1, "keep_last": None,
                              "resume_from_step": -1, "dry_run": False, **flags})
    return Run(args, "test", device_defaults)


def test_flags_left_unset_take_the_device_default_and_given_values_are_kept(monkeypatch):
    run = make_run(monkeypatch, {"eval_tokens": (1000, 10), "max_problems": (400, 20)}, eval_tokens=None, max_problems=7)
    assert (run.args.eval_tokens, run.args.max_problems) == (10, 7)  # a CPU's default; exactly what was asked
    assert run.user_config["eval_tokens"] == 10  # what the run records is what it used


@pytest.mark.parametrize("every, resume_from_step, first_step, due_steps", [
    (-1, -1, 0, []),  # never, not even at the end
    (0, -1, 0, [10]),  # only at the end
    (4, -1, 0, [0, 4, 8, 10]),  # every 4 steps from step 0, and at the end
    (4, -1, 1, [4, 8, 10]),  # from step 1 on (CORE, samples)
    (4, 4, 0, [8, 10]),  # resumed from step 4: it was evaluated before the interruption
    (0, 4, 0, [10]),
])
def test_evaluations_are_due_every_n_steps_and_at_the_end_but_never_twice(monkeypatch, every, resume_from_step,
                                                                          first_step, due_steps):
    run = make_run(monkeypatch, resume_from_step=resume_from_step)
    start = max(resume_from_step, 0)
    assert [s for s in range(start, 11) if run.due(every, s, s == 10, first_step)] == due_steps


def test_saves_are_due_every_n_steps_and_always_at_the_end(monkeypatch):
    for save_every, resumed, expected in [(-1, -1, [10]), (3, -1, [3, 6, 9, 10]), (3, 3, [6, 9, 10])]:
        run = make_run(monkeypatch, save_every=save_every, resume_from_step=resumed)
        assert [s for s in range(max(resumed, 0), 11) if run.save_due(s, s == 10)] == expected
    assert not make_run(monkeypatch, dry_run=True).save_due(10, True)


def trained_model_and_optimizer(seed):
    """A model and an optimizer with state (momentum) after one step: what a resume must restore."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def test_save_then_resume_restores_model_optimizer_loss_scale_and_state(tmp_path, monkeypatch):
    model, optimizer = trained_model_and_optimizer(0)
    scaler = GradScaler(enabled=True)
    scaler.scale, scaler.clean_steps = 512.0, 37  # fp16's loss scale after some overflows: it must come back too
    run = make_run(monkeypatch)
    state = run.state = RunState(step=3, model_config={"n_layer": 1}, user_config=run.user_config,
                                 dataloader_state_dict={"pq_idx": 1}, val_bpb=1.25)
    state.loop_state["curve"].append({"step": 3, "val_bpb": 1.25, "time": 0.0})
    run.save(str(tmp_path), state, model, optimizer, scaler)
    meta = json.loads((tmp_path / "meta_000003.json").read_text())
    assert set(meta["sha256"]) == {"model_000003.pt", "optim_000003_rank0.pt"}  # (save_checkpoint adds the hashes)
    assert {**meta, "sha256": None} == asdict(state) and meta["loss_scale"] == [512.0, 37]  # keys: RunState's fields

    fresh, fresh_optimizer = trained_model_and_optimizer(1)
    fresh_scaler = GradScaler(enabled=True)
    resumed = make_run(monkeypatch, resume_from_step=3, save_every=5)
    restored = resumed.resume(str(tmp_path), fresh, fresh_optimizer, fresh_scaler)
    assert restored == RunState(**{**asdict(state), "user_config": resumed.user_config}) and resumed.state is restored
    assert (fresh_scaler.scale, fresh_scaler.clean_steps) == (512.0, 37)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    for index, param_state in saved["state"].items():
        for key, value in param_state.items():
            assert torch.equal(value, loaded["state"][index][key]) if torch.is_tensor(value) else value == loaded["state"][index][key]

    # A shard of a 2-process run: this process holds only half of the optimizer, so it must refuse
    save_checkpoint(str(tmp_path), 3, model.state_dict(), {**saved, "world_size": 2}, {**meta, "sha256": None})
    with pytest.raises(UserError, match="saved by 2 process\\(es\\) and this run has 1: .* resume with 2"):
        resumed.resume(str(tmp_path), fresh, fresh_optimizer, fresh_scaler)


def test_keep_last_keeps_the_newest_and_the_resumed_step(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = make_run(monkeypatch, keep_last=2, resume_from_step=10)
    for step in [10, 20, 30, 40]:
        run.save(str(tmp_path), RunState(step=step), model, optimizer, GradScaler(enabled=False))
    steps = sorted(int(name[5:11]) for name in os.listdir(tmp_path) if name.startswith("meta_"))
    assert steps == [10, 30, 40]
    assert sorted(os.listdir(tmp_path)) == sorted(f"{kind}_{step:06d}{ext}" for step in steps for kind, ext in
                                                  [("model", ".pt"), ("meta", ".json"), ("optim", "_rank0.pt")])


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside_before_its_first_save(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    checkpoint_dir = tmp_path / "chatsft_checkpoints" / "mine"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    earlier = make_run(monkeypatch)
    for step in [50, 100]:
        earlier.save(str(checkpoint_dir), RunState(step=step), model, optimizer, GradScaler(enabled=False))
    # resuming the earlier run saves beside its checkpoints
    resumed = make_run(monkeypatch, resume_from_step=50)
    resumed.save(str(checkpoint_dir), RunState(step=60), model, optimizer, GradScaler(enabled=False))
    assert complete_steps(str(checkpoint_dir)) == [50, 60, 100]
    # a fresh run that stops earlier (step 20) must not leave step 100 of another run as the newest: moved aside
    capsys.readouterr()
    fresh = make_run(monkeypatch)
    for step in [10, 20]:
        fresh.save(str(checkpoint_dir), RunState(step=step), model, optimizer, GradScaler(enabled=False))
    assert complete_steps(str(checkpoint_dir)) == [10, 20]
    [aside] = (tmp_path / "replaced" / "chatsft_checkpoints").iterdir()
    assert aside.name.startswith("mine.") and complete_steps(str(aside)) == [50, 60, 100]
    assert f"held an earlier run's checkpoints (steps [50, 60, 100]): moved them to {aside}" in capsys.readouterr().out


def test_a_meta_with_keys_unknown_to_run_state_still_loads():
    meta = {"step": 7, "finished": True, "model_config": {"n_layer": 2}, "min_val_bpb": 1.5}  # (older base runs kept it)
    assert RunState.from_meta(meta) == RunState(step=7, finished=True, model_config={"n_layer": 2})


def test_main_leaves_the_process_as_it_found_it(monkeypatch):
    hook, enabled = sys.excepthook, gc.isenabled()

    def user_error_hook(*args):
        pass

    @restore_process_state
    def main(crash):  # what a stage does to the process (compute_init, base_train's gc), then maybe a crash
        sys.excepthook = user_error_hook
        gc.collect()
        gc.freeze()
        gc.disable()
        if crash:
            raise RuntimeError("crash")
        return "done"

    assert main(crash=False) == "done"
    assert sys.excepthook is hook and gc.isenabled() == enabled and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError, match="crash"):
        main(crash=True)
    assert gc.isenabled() == enabled and gc.get_freeze_count() == 0
    assert sys.excepthook is user_error_hook  # the error escaping main() is reported by the hook it installed

"""nanochat/stage.py: the step meter against a plain reference, its resumable state, the shared flags, saving."""
import argparse
import copy
import os
from types import SimpleNamespace

import pytest
import torch

from nanochat.common import all_reduce_sum
from nanochat.stage import StepMeter, add_checkpoint_flags, add_run_flags, save_run_checkpoint


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


def test_eta_is_the_timed_pace_times_the_steps_left():
    meter = StepMeter(fresh_state(), warmup_steps=10)
    assert meter.eta(step=5, progress=5 / 100, dt=2.0) == pytest.approx(95 * 2.0)  # before timing starts: dt
    meter.state["total_training_time"] = 30.0  # 30 s over steps 11..20
    assert meter.eta(step=20, progress=20 / 100, dt=9.0) == pytest.approx(80 * 3.0)
    assert meter.eta(step=20, progress=0.5, dt=9.0) == pytest.approx(20 * 3.0)  # an epoch half done after 20 steps


def test_log_line_fields_and_order():
    meter = StepMeter(fresh_state(), warmup_steps=0, tokens_per_step=4096, flops_per_token=1e6, peak_flops=1e12)
    meter.update(1, 0.5, 2.0)
    line = meter.line(1, "00004", 0.25, 0.5, before=["loss 2.000000"], after=["epoch 0"])
    assert line == "step 00001/00004 ( 25.0%) | loss 2.000000 | dt 500ms | tok/sec 8,192 | mfu 0.82 | epoch 0 | eta 0m01s"
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


def test_save_run_checkpoint_keeps_the_newest_and_the_resumed_step(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = SimpleNamespace(keep_last=2, resume_from_step=10)
    for step in [10, 20, 30, 40]:
        save_run_checkpoint(str(tmp_path), step, model, optimizer, {"step": step}, 0, args)
    steps = sorted(int(name[5:11]) for name in os.listdir(tmp_path) if name.startswith("meta_"))
    assert steps == [10, 30, 40]
    assert sorted(os.listdir(tmp_path)) == sorted(f"{kind}_{step:06d}{ext}" for step in steps for kind, ext in
                                                  [("model", ".pt"), ("meta", ".json"), ("optim", "_rank0.pt")])

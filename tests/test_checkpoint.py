"""Checkpoints: exact round-trips, crash safety of saves (kill -9 included), damaged files, cleanup and pruning,
older-checkpoint patching, finding the right checkpoint. (Resuming a run: test_run.py; the pipeline runner:
test_pipeline.py.)"""
import dataclasses
import logging
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import REPO_ROOT
from helpers import TINY_CONFIG
from nanochat import checkpoint_manager as cm
from nanochat.common import UserError, _host
from nanochat.gpt import GPTConfig, build_gpt


def make_model(vocab_size, seed=0, config_cls=GPTConfig, build=build_gpt, **overrides):
    """A tiny GPT whose every weight is random, so outputs depend on all of them."""
    config = config_cls(**{**TINY_CONFIG, "vocab_size": vocab_size, "n_kv_head": 1, "window_pattern": "SL", **overrides})
    model = build(config, "cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def meta_for(model, step):
    return {"step": step, "model_config": dataclasses.asdict(model.config), "val_bpb": 1.5}


@pytest.fixture
def setup(base_dir, tiny_tokenizer):
    """base_dir with the tiny tokenizer installed, a model, and its checkpoint dir."""
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    model = make_model(tiny_tokenizer.get_vocab_size())
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d2")
    return model, checkpoint_dir


def sample_ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("recipe", [{}, dict(smear=True, backout=True, qk_scale=1.2, rotary_base=100000.0, short_window=8)])
def test_save_load_round_trip(setup, recipe):
    model, checkpoint_dir = setup
    model = make_model(model.config.vocab_size, **recipe)
    optimizer_data = {"state": {0: {"exp_avg": torch.randn(3, 4)}}, "param_groups": [{"lr": 0.1, "kind": "adamw"}]}
    cm.save_checkpoint(checkpoint_dir, 5, model.state_dict(), optimizer_data, meta_for(model, 5))
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]

    model_data, loaded_optim, meta = cm.load_checkpoint(checkpoint_dir, 5, "cpu", load_optimizer=True)
    assert meta == meta_for(model, 5)
    assert model_data.keys() == model.state_dict().keys()
    assert all(torch.equal(model_data[k], v) for k, v in model.state_dict().items())
    assert torch.equal(loaded_optim["state"][0]["exp_avg"], optimizer_data["state"][0]["exp_avg"])
    assert loaded_optim["param_groups"] == optimizer_data["param_groups"]

    rebuilt, tokenizer, meta = cm.build_model(checkpoint_dir, 5, "cpu", phase="eval")
    assert not rebuilt.training and rebuilt.config == model.config
    assert tokenizer.get_vocab_size() == model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(rebuilt(sample_ids(model)), model(sample_ids(model)))
    assert cm.build_model(checkpoint_dir, 5, "cpu", phase="train")[0].training


def test_compiled_keys_and_bf16_tensors_load_on_cpu(setup):
    model, checkpoint_dir = setup
    # What a torch.compile'd CUDA run saves: keys under _orig_mod., embeddings in bf16.
    state = {f"_orig_mod.{k}": (v.bfloat16() if "wte" in k or "value_embeds" in k else v) for k, v in model.state_dict().items()}
    cm.save_checkpoint(checkpoint_dir, 1, state, None, meta_for(model, 1))
    rebuilt, _, _ = cm.build_model(checkpoint_dir, 1, "cpu", phase="eval")
    assert all(p.dtype == torch.float32 for p in rebuilt.parameters())
    expected = {k.removeprefix("_orig_mod."): v.float() for k, v in state.items()}
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in expected.items())


def test_weights_are_saved_in_fp32_and_load_into_any_compute_dtype(setup, monkeypatch):
    _, checkpoint_dir = setup
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    bf16_model = make_model(setup[0].config.vocab_size)  # embeddings stored in bf16, Linear weights fp32
    cm.save_checkpoint(checkpoint_dir, 1, bf16_model.state_dict(), None, meta_for(bf16_model, 1))
    saved = torch.load(os.path.join(checkpoint_dir, "model_000001.pt"))
    assert all(v.dtype == torch.float32 for v in saved.values())
    for dtype in ("bfloat16", "float32"):
        monkeypatch.setenv("NANOCHAT_DTYPE", dtype)
        rebuilt, _, _ = cm.build_model(checkpoint_dir, 1, "cpu", phase="eval")
        assert rebuilt.transformer.wte.weight.dtype == getattr(torch, dtype)  # the run's dtype, not the file's
        assert all(torch.equal(rebuilt.state_dict()[k].float(), v.float()) for k, v in bf16_model.state_dict().items())


def test_crash_mid_save_keeps_previous_checkpoint(setup, monkeypatch):
    model, checkpoint_dir = setup
    cm.save_checkpoint(checkpoint_dir, 1, model.state_dict(), {"x": torch.ones(2)}, meta_for(model, 1))
    real_save = torch.save

    def save_half_then_crash(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # a partly written file ...
        raise OSError("disk full")  # ... then the process dies

    monkeypatch.setattr(torch, "save", save_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        cm.save_checkpoint(checkpoint_dir, 2, make_model(model.config.vocab_size, seed=1).state_dict(), None,
                           meta_for(model, 2))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
    assert cm.find_last_step(checkpoint_dir) == 1
    rebuilt, _, _ = cm.build_model(checkpoint_dir, 1, "cpu", phase="eval")
    with torch.no_grad():
        assert torch.equal(rebuilt(sample_ids(model)), model(sample_ids(model)))


def test_crash_before_meta_leaves_an_incomplete_step_that_is_ignored(setup, monkeypatch):
    model, checkpoint_dir = setup
    cm.save_checkpoint(checkpoint_dir, 1, model.state_dict(), None, meta_for(model, 1))
    real_replace = os.replace

    def crash_on_meta(src, dst):
        if os.path.basename(dst).startswith("meta_"):
            raise KeyboardInterrupt  # killed between the weights and the meta
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(checkpoint_dir, 2, model.state_dict(), None, meta_for(model, 2))
    monkeypatch.setattr(os, "replace", real_replace)
    files = sorted(os.listdir(checkpoint_dir))
    assert files == ["meta_000001.json", "model_000001.pt", "model_000002.pt"]  # no temp file left behind
    assert cm.find_last_step(checkpoint_dir) == 1
    with pytest.raises(FileNotFoundError, match="incomplete"):
        cm.load_checkpoint(checkpoint_dir, 2, "cpu")
    # Stray temp files and weights without meta are never taken for a checkpoint.
    (open(os.path.join(checkpoint_dir, ".model_000009.pt.abc.tmp"), "wb")).close()
    (open(os.path.join(checkpoint_dir, ".meta_000009.json.abc.tmp"), "wb")).close()
    assert cm.find_last_step(checkpoint_dir) == 1

    # Re-saving an existing step marks it incomplete first: a crash then never pairs old meta with new weights.
    monkeypatch.setattr(os, "replace", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(checkpoint_dir, 1, make_model(model.config.vocab_size, seed=2).state_dict(), None,
                           meta_for(model, 1))
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        cm.find_last_step(checkpoint_dir)


def test_older_checkpoint_gets_neutral_defaults(setup, caplog):
    model, checkpoint_dir = setup
    old_model = make_model(model.config.vocab_size, window_pattern="L")
    state = old_model.state_dict()
    del state["resid_lambdas"], state["x0_lambdas"]  # written before these scalars existed
    meta = meta_for(old_model, 3)
    del meta["model_config"]["window_pattern"]  # written before sliding windows existed
    cm.save_checkpoint(checkpoint_dir, 3, state, None, meta)

    with caplog.at_level(logging.WARNING, logger="nanochat"):
        rebuilt, _, _ = cm.build_model(checkpoint_dir, 3, "cpu", phase="eval")
    assert "window_pattern" in caplog.text and "resid_lambdas" in caplog.text and "x0_lambdas" in caplog.text
    assert rebuilt.config.window_pattern == "L"
    # The old model had no scalars, i.e. a plain residual stream: resid 1, x0 0.
    with torch.no_grad():
        old_model.resid_lambdas.fill_(1.0)
        old_model.x0_lambdas.fill_(0.0)
        assert torch.equal(rebuilt(sample_ids(model)), old_model(sample_ids(model)))


# The last commit whose model code is the January architecture (no smear, backout, q/k scale...).
JANUARY_COMMIT = "eec6e3e"


def january_gpt_module(monkeypatch):
    """nanochat/gpt.py as that commit wrote it, as a module of its own (git keeps it: no copy in the repo)."""
    try:
        source = subprocess.run(["git", "show", f"{JANUARY_COMMIT}:nanochat/gpt.py"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"needs the repository's git history with commit {JANUARY_COMMIT} ({e})")
    module = types.ModuleType("january_gpt")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # (dataclasses look their module up)
    exec(compile(source, "january_gpt.py", "exec"), module.__dict__)
    return module


def test_checkpoint_written_by_the_january_code_gives_identical_logits(setup, monkeypatch):
    _, checkpoint_dir = setup
    january = january_gpt_module(monkeypatch)
    old_model = make_model(setup[0].config.vocab_size, config_cls=january.GPTConfig, build=january.build_gpt,
                           n_layer=3, window_pattern="SSL")
    cm.save_checkpoint(checkpoint_dir, 7, old_model.state_dict(), None, meta_for(old_model, 7))
    rebuilt, _, _ = cm.build_model(checkpoint_dir, 7, "cpu", phase="eval")
    assert not rebuilt.config.smear and not rebuilt.config.backout and rebuilt.config.qk_scale == 1.0
    ids = torch.randint(0, old_model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids), old_model(ids))  # bit for bit, short windows included


def test_missing_smear_and_backout_parameters_load_as_identity(setup, caplog):
    model, checkpoint_dir = setup
    new_model = make_model(model.config.vocab_size, smear=True, backout=True, qk_scale=1.2, ve_gate_channels=12)
    state = new_model.state_dict()
    del state["smear_gate.weight"], state["smear_lambda"], state["backout_lambda"]
    cm.save_checkpoint(checkpoint_dir, 4, state, None, meta_for(new_model, 4))
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        rebuilt, _, _ = cm.build_model(checkpoint_dir, 4, "cpu", phase="eval")
    assert "smear_lambda" in caplog.text and "backout_lambda" in caplog.text
    assert rebuilt.config == new_model.config
    with torch.no_grad():
        new_model.smear_lambda.zero_()  # no smear and no backout: what a model without them computes
        new_model.backout_lambda.zero_()
        assert torch.equal(rebuilt(sample_ids(model)), new_model(sample_ids(model)))


def test_vocab_size_mismatch_is_a_clear_error(setup):
    model, checkpoint_dir = setup
    other = make_model(model.config.vocab_size + 64)
    cm.save_checkpoint(checkpoint_dir, 1, other.state_dict(), None, meta_for(other, 1))
    with pytest.raises(UserError, match=rf"{model.config.vocab_size} tokens .* vocab_size {model.config.vocab_size + 64}"):
        cm.build_model(checkpoint_dir, 1, "cpu", phase="eval")


def test_find_largest_model(tmp_path):
    for tag in ["d4", "d20", "d12", "custom"]:
        (tmp_path / "a" / tag).mkdir(parents=True)
    assert cm.find_largest_model(str(tmp_path / "a")) == "d20"
    for tag, mtime in [("old", 1_000), ("newest", 3_000), ("middle", 2_000)]:
        (tmp_path / "b" / tag).mkdir(parents=True)
        os.utime(tmp_path / "b" / tag, (mtime, mtime))
    assert cm.find_largest_model(str(tmp_path / "b")) == "newest"
    with pytest.raises(FileNotFoundError):
        cm.find_largest_model(str(tmp_path / "missing"))


def test_load_model_picks_largest_tag_and_last_step(setup, base_dir):
    model, _ = setup
    stage_dir = base_dir / "chatsft_checkpoints"
    cm.save_checkpoint(str(stage_dir / "d2"), 10, model.state_dict(), None, meta_for(model, 10))
    newer = make_model(model.config.vocab_size, seed=3)
    cm.save_checkpoint(str(stage_dir / "d2"), 20, newer.state_dict(), None, meta_for(newer, 20))
    cm.save_checkpoint(str(stage_dir / "d1"), 99, model.state_dict(), None, meta_for(model, 99))
    loaded, _, meta = cm.load_model("sft", "cpu", phase="eval")  # the established three values
    assert meta["step"] == 20
    assert cm.find_checkpoint("sft")[1:] == ("d2", 20)  # what the defaults pick
    with torch.no_grad():
        assert torch.equal(loaded(sample_ids(model)), newer(sample_ids(model)))
    assert cm.load_model("sft", "cpu", phase="eval", model_tag="d1")[2] == meta_for(model, 99)
    assert cm.load_model("sft", "cpu", phase="eval", model_tag="d2", step=10)[2]["step"] == 10
    assert cm.find_checkpoint("sft", model_tag="d2", step=10) == (str(stage_dir / "d2"), "d2", 10)


def test_load_model_errors_say_what_to_run(base_dir):
    with pytest.raises(FileNotFoundError, match="scripts.base_train"):
        cm.load_model("base", "cpu", phase="eval")
    with pytest.raises(FileNotFoundError, match="scripts.chat_rl"):
        cm.load_model("rl", "cpu", phase="eval")
    with pytest.raises(ValueError, match="source must be one of"):
        cm.load_model("pretrain", "cpu", phase="eval")
    with pytest.raises(FileNotFoundError, match="scripts.chat_sft"):
        cm.find_checkpoint("sft")


# ---------------------------------------------------------------------------------------------------
# Damaged files, temp files of killed saves, pruning

def two_steps(checkpoint_dir, model):
    for step in (1, 2):
        cm.save_checkpoint(checkpoint_dir, step, model.state_dict(), {"x": torch.ones(2)}, meta_for(model, step))


@pytest.mark.parametrize("name, damage", [
    pytest.param("model_000002.pt", lambda data: b"", id="model-empty"),
    pytest.param("model_000002.pt", lambda data: data[: len(data) // 2], id="model-cut-short"),
    pytest.param("model_000002.pt", lambda data: bytes(len(data)), id="model-zeroed"),
    pytest.param("optim_000002_rank0.pt", lambda data: b"", id="optim-empty"),
    pytest.param("meta_000002.json", lambda data: b"", id="meta-empty"),
    pytest.param("meta_000002.json", lambda data: data[:-10], id="meta-cut-short"),
    pytest.param("meta_000002.json", lambda data: b'{"step": 2}', id="meta-without-model-config"),
])
def test_damaged_file_is_a_named_error(setup, name, damage):
    model, checkpoint_dir = setup
    two_steps(checkpoint_dir, model)
    path = os.path.join(checkpoint_dir, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))
    with pytest.raises(UserError) as info:
        cm.load_checkpoint(checkpoint_dir, 2, "cpu", load_optimizer=True)
    message = str(info.value)
    assert path in message and "step 2 cannot be loaded" in message and "(complete: 1)" in message, message
    assert "\n" not in message
    cm.load_checkpoint(checkpoint_dir, 1, "cpu", load_optimizer=True)  # the other step is untouched


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_stale_temp_files_are_removed(setup):
    model, checkpoint_dir = setup
    os.makedirs(checkpoint_dir)
    host = _host()
    stale = [f".model_000004.pt.{host}-{dead_pid()}.k2j4_x.tmp", f".optim_000004_rank1.pt.{host}-{dead_pid()}.a1.tmp",
             f".meta_000004.json.{host}-{dead_pid()}.zz9.tmp"]
    kept = [f".model_000005.pt.{host}-{os.getpid()}.abc.tmp",  # a live writer: this process
            f".model_000005.pt.{host}-{os.getppid()}.abc.tmp",
            f".model_000004.pt.other_node-{dead_pid()}.abc.tmp",  # another host's: its pid means nothing here
            "notes.txt"]
    for name in stale + kept:
        open(os.path.join(checkpoint_dir, name), "wb").close()
    cm.save_checkpoint(checkpoint_dir, 6, model.state_dict(), None, meta_for(model, 6))
    assert sorted(os.listdir(checkpoint_dir)) == sorted(kept + ["model_000006.pt", "meta_000006.json"])
    for name in stale:  # a load cleans up too
        open(os.path.join(checkpoint_dir, name), "wb").close()
    cm.load_checkpoint(checkpoint_dir, 6, "cpu")
    assert sorted(os.listdir(checkpoint_dir)) == sorted(kept + ["model_000006.pt", "meta_000006.json"])


# A process that saves step 1, then blocks while pickling step 2's `which` file: its temp file exists
# (torch.save writes once the pickle is done) when the test kills the process with SIGKILL.
KILLED_SAVE_SCRIPT = """
import sys, time, torch
from nanochat import checkpoint_manager as cm

class BlockWhilePickled:
    def __reduce__(self):
        print("writing", flush=True)
        time.sleep(600)

checkpoint_dir, which = sys.argv[1], sys.argv[2]
meta = {"step": 1, "model_config": {}}
cm.save_checkpoint(checkpoint_dir, 1, {"w": torch.arange(1000.0)}, {"m": torch.ones(3)}, meta)
model_data = {"w": torch.zeros(1000), "block": BlockWhilePickled() if which == "model" else None}
optim_data = {"m": torch.zeros(3), "block": BlockWhilePickled() if which == "optim" else None}
cm.save_checkpoint(checkpoint_dir, 2, model_data, optim_data, dict(meta, step=2))
"""


@pytest.mark.parametrize("which", ["model", "optim"])
@pytest.mark.slow
def test_kill_during_save_keeps_previous_step_and_next_start_cleans_up(tmp_path, which):
    checkpoint_dir = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE_SCRIPT, str(checkpoint_dir), which], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n"
    finally:
        child.kill()  # SIGKILL: no handler, no cleanup
        child.wait()
    temp_files = [name for name in os.listdir(checkpoint_dir) if name.endswith(".tmp")]
    assert len(temp_files) == 1 and temp_files[0].startswith(f".{which}_000002"), os.listdir(checkpoint_dir)
    assert cm.find_last_step(str(checkpoint_dir)) == 1
    model_data, optim_data, meta = cm.load_checkpoint(str(checkpoint_dir), 1, "cpu", load_optimizer=True)
    assert torch.equal(model_data["w"], torch.arange(1000.0)) and torch.equal(optim_data["m"], torch.ones(3))
    assert not any(name.endswith(".tmp") for name in os.listdir(checkpoint_dir))  # the load removed it


def test_prune_keeps_newest_steps_and_the_resumed_one(tmp_path, monkeypatch):
    checkpoint_dir = str(tmp_path)
    for step in range(1, 7):
        cm.save_checkpoint(checkpoint_dir, step, {"w": torch.ones(1)}, {"m": torch.ones(1)}, {"step": step})
    os.remove(cm.meta_path(checkpoint_dir, 3))  # an older step left incomplete by a crash
    os.remove(cm.meta_path(checkpoint_dir, 6))  # a newer one still being saved
    open(os.path.join(checkpoint_dir, f".model_000007.pt.{_host()}-{os.getpid()}.x.tmp"), "wb").close()
    removed = []
    real_remove = os.remove
    monkeypatch.setattr(os, "remove", lambda path: (removed.append(os.path.basename(path)), real_remove(path)))
    cm.prune_checkpoints(checkpoint_dir, keep_last=2, keep_steps=[1])
    assert cm.complete_steps(checkpoint_dir) == [1, 4, 5]
    assert sorted(os.listdir(checkpoint_dir)) == sorted(
        [f"{kind}_{step:06d}{ext}" for step in (1, 4, 5) for kind, ext in [("model", ".pt"), ("meta", ".json"),
                                                                           ("optim", "_rank0.pt")]]
        + ["model_000006.pt", "optim_000006_rank0.pt", f".model_000007.pt.{_host()}-{os.getpid()}.x.tmp"])
    assert sorted(removed) == ["meta_000002.json", "model_000002.pt", "model_000003.pt", "optim_000002_rank0.pt",
                               "optim_000003_rank0.pt"]
    assert removed.index("meta_000002.json") < removed.index("model_000002.pt")  # incomplete before it goes

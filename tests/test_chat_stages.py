"""
End-to-end runs of the chat training stages (chat_sft, chat_rl) on a tiny random model: each
completes, writes its checkpoint under its stage dir with the source model's config, logs its report
section, and SFT trains: the last logged loss is well below the first one. Resumed from a --save-every
checkpoint (one process or two), each ends on the same bits as the run that was not interrupted.

They run in-process (main(argv)), but for the two-rank runs (torchrun).

Why the loss test is meaningful and stable: a freshly initialised model has a near-zero lm_head, so
its first loss is ln(vocab_size) (uniform guessing). A handful of steps on a small, repeated set of
conversations must move it far below that; a broken loss mask, target shift or optimizer does not.
"""
import json
import math
import os
import re
import shutil
from dataclasses import asdict

import pytest
import torch

from conftest import TEST_DATA, run_torchrun
from helpers import DEVICE_BATCH_SIZE, MODEL_TAG, RESOLVED, make_tiny_checkpoint
from nanochat import pipeline
from nanochat.common import UserError
from nanochat.run import Run
from scripts import chat_rl, chat_sft

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The test data; NANOCHAT_DATA=embedded downloads nothing: MMLU auxiliary_train (hub-only) falls back to the
    local stand-in at once."""
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(TEST_DATA))
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")


def run_stage(main, args, base_dir, capsys, monkeypatch):
    """main(["--device-type=cpu", *args]) in-process against base_dir -> its output."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    main(["--device-type=cpu", *args])
    captured = capsys.readouterr()
    return captured.out + captured.err


def run_two_ranks(module, args, base_dir):
    returncode, output = run_torchrun("-m", module, "--device-type=cpu", *args, nproc=2, timeout=600,
                                      env={"NANOCHAT_BASE_DIR": str(base_dir)})
    assert returncode == 0, f"{module} failed:\n{output[-4000:]}"
    return output


def step_log(output, name):
    """{step: value of '| name X |'} of the per-step log lines."""
    return {int(s): float(v) for s, v in re.findall(rf"^step (\d+)/.*?\| {name} ([-0-9.naif]+) ", output, flags=re.MULTILINE)}


def logged(output, name):
    """Values of '| name X |' in the per-step log lines."""
    return list(step_log(output, name).values())


def read_meta(checkpoint_dir, step):
    assert (checkpoint_dir / f"model_{step:06d}.pt").exists()
    with open(checkpoint_dir / f"meta_{step:06d}.json") as f:
        return json.load(f)


def read_report_section(base_dir, slug):
    with open(base_dir / "report" / f"{slug}.json") as f:
        return json.load(f)["data"]


@pytest.mark.slow
def test_chat_sft_continues_the_base_run_and_lowers_masked_loss(base_dir, tiny_tokenizer, capsys, monkeypatch):
    config = make_tiny_checkpoint(base_dir, tiny_tokenizer, ["base_checkpoints"], with_optimizer=True)
    # Batch and LRs come from the base meta: 512 tokens/step of 2 rows x 128 = 2 micro-batches per step.
    # 40 conversations (4 per task entry) seen over and over: the loss must fall far below uniform guessing.
    num_steps = 8
    output = run_stage(chat_sft.main, ["--max-seq-len=128", f"--num-iterations={num_steps}", "--max-examples-per-task=4",
                                       "--eval-every=0", "--eval-tokens=512", "--chatcore-every=0",  # 0: only at the end
                                       "--chatcore-max-cat=4", "--chatcore-max-gen=1"], base_dir, capsys, monkeypatch)
    assert "Batch: 512 tokens/step = 2 rows x 128 x 1 ranks x 2 accumulation steps" in output
    assert "LRs of the source run: embedding_lr 0.25, unembedding_lr 0.02, matrix_lr 0.03, scalar_lr 0.4" in output
    assert "optimizer warm-started from" in output
    step_lines = [line for line in output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in step_lines] == [f"{s:05d}/{num_steps:05d}" for s in range(1, num_steps + 1)]
    losses = logged(output, "loss")
    assert losses[0] == pytest.approx(math.log(tiny_tokenizer.get_vocab_size()), abs=0.05)
    assert losses[-1] < losses[0] - 0.5, losses

    meta = read_meta(base_dir / "chatsft_checkpoints" / MODEL_TAG, num_steps)  # saved at the optimizer step count
    assert meta["model_config"] == asdict(config)
    assert meta["source"] == {"stage": "base", "model_tag": MODEL_TAG, "step": 0}
    assert meta["resolved"] == RESOLVED and meta["device_batch_size"] == DEVICE_BATCH_SIZE
    assert math.isfinite(meta["val_bpb"]) and meta["loss_scale"] == [2.0**16, 0]
    assert [p["step"] for p in meta["loop_state"]["curve"] if "val_bpb" in p or "chatcore" in p] == [num_steps] * 2
    assert set(meta["chatcore"]) == {"ChatCORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"}
    assert any(item.get("Number of iterations") == num_steps for item in read_report_section(base_dir, "chat-sft"))


@pytest.mark.slow
def test_chat_sft_stays_finite_on_micro_batches_without_assistant_tokens(base_dir, tiny_tokenizer, capsys, monkeypatch):
    """Rows of 9 tokens hold only the start of each conversation: for a GSM8K question that is all user
    tokens, so those micro-batches train nothing. The upstream bug divided by their zero count (NaN)."""
    from tasks.gsm8k import GSM8K
    _, mask = tiny_tokenizer.render_conversation(GSM8K(subset="main", split="train", data_dir=str(TEST_DATA))[0])
    assert sum(mask[:9]) == 0
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["base_checkpoints"])  # no optimizer state: a fresh one
    output = run_stage(chat_sft.main, ["--max-seq-len=8", "--device-batch-size=1", "--total-batch-size=16",
                                       "--max-examples-per-task=2", "--eval-every=-1", "--eval-tokens=16",
                                       "--chatcore-every=-1"], base_dir, capsys, monkeypatch)  # one pass over the mixture
    assert "starting a fresh optimizer" in output and "val bpb" not in output  # -1: never, not even at the end
    losses = logged(output, "loss")
    assert len(losses) >= 10 and all(math.isfinite(loss) for loss in losses), losses
    assert "(100.0%)" in [line for line in output.splitlines() if line.startswith("step ")][-1]
    weights = torch.load(base_dir / "chatsft_checkpoints" / MODEL_TAG / f"model_{len(losses):06d}.pt")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_chat_rl_logs_finite_reward(base_dir, tiny_tokenizer, capsys, monkeypatch):
    config = make_tiny_checkpoint(base_dir, tiny_tokenizer, ["chatsft_checkpoints"])
    output = run_stage(chat_rl.main, ["--num-iterations=2", "--examples-per-step=2", "--num-samples=4",
                                      "--device-batch-size=4", "--max-new-tokens=8", "--eval-every=0",
                                      "--eval-examples=2", "--eval-samples=2"], base_dir, capsys, monkeypatch)
    rewards = logged(output, "reward")
    assert len(rewards) == 2
    assert all(math.isfinite(r) and 0.0 <= r <= 1.0 for r in rewards), rewards
    assert len(re.findall(r"Step 00002 \| GSM8K test pass@1 \d+\.\d+% \| pass@2 \d+\.\d+%", output)) == 1
    assert "Step 00000 | GSM8K" not in output  # 0: only at the end

    meta = read_meta(base_dir / "chatrl_checkpoints" / MODEL_TAG, 2)
    assert meta["model_config"] == asdict(config)
    assert set(meta["val_pass_at_k"]) == {"pass@1", "pass@2"} and meta["loss_scale"] == [2.0**16, 0]


# ---------------------------------------------------------------------------------------------------
# Your own data: chat_sft --data FILE.jsonl[:passes] (--data-only), chat_rl --task FILE.jsonl

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


CHATS = [[{"role": "user", "content": f"What is your favourite number, robot {i}?"},
          {"role": "assistant", "content": f"My favourite number is {i}."}] for i in range(6)]


@pytest.mark.slow
def test_chat_sft_adds_your_conversations_to_the_mixture_or_trains_on_them_alone(base_dir, tiny_tokenizer, tmp_path,
                                                                                capsys, monkeypatch):
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["base_checkpoints"])
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    common = ["--max-seq-len=128", "--num-iterations=2", "--max-examples-per-task=4", "--eval-every=-1",
              "--chatcore-every=-1", "--dry-run"]
    standard = run_stage(chat_sft.main, common, base_dir, capsys, monkeypatch)
    added = run_stage(chat_sft.main, common + [f"--data={chats}:3"], base_dir, capsys, monkeypatch)
    alone = run_stage(chat_sft.main, common[:-1] + [f"--data={chats}", "--data-only", "--out-tag=mine"], base_dir, capsys,
                      monkeypatch)  # saved beside the pipeline's own SFT model, under its own tag

    def mixture(output):  # "Train mixture: 36 conversations (SmolTalk 4, MMLU 4 x3, ...)" -> [(name, size, passes)]
        listing = re.search(r"Train mixture: [\d,]+ conversations \((.*)\); val", output).group(1)
        return [(name, int(size), int(passes or 1)) for name, size, passes in re.findall(r"(\S+) (\d+)(?: x(\d+))?", listing)]

    assert mixture(added) == mixture(standard) + [("chats.jsonl", 4, 3)]  # 3 passes over the (capped) file
    assert [name for name, _, _ in mixture(standard)][:3] == ["SmolTalk", "MMLU", "GSM8K"]
    assert mixture(alone) == [("chats.jsonl", 4, 1)]
    assert len(logged(alone, "loss")) == 2
    assert read_meta(base_dir / "chatsft_checkpoints" / "mine", 2)["source"]["model_tag"] == MODEL_TAG


@pytest.mark.slow
def test_chat_sft_tunes_an_sft_model_further_into_a_folder_of_its_own(base_dir, tiny_tokenizer, tmp_path, capsys,
                                                                        monkeypatch):
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["chatsft_checkpoints"], with_optimizer=True)
    source = base_dir / "chatsft_checkpoints" / MODEL_TAG
    before = sorted(os.listdir(source))
    chats = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    for flags, message in [([], "-i sft tunes an SFT model further: name the result with --out-tag"),
                           ([f"--out-tag={MODEL_TAG}"], f"--out-tag {MODEL_TAG} is the source's own folder")]:
        with pytest.raises(SystemExit) as info:
            chat_sft.main(["--device-type=cpu", "-i", "sft", *flags])
        assert info.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
    output = run_stage(chat_sft.main, ["-i", "sft", f"--data={chats}:2", "--out-tag=tuned", "--max-seq-len=128",
                                       "--num-iterations=2", "--max-examples-per-task=4", "--eval-every=-1",
                                       "--chatcore-every=-1"], base_dir, capsys, monkeypatch)
    assert f"optimizer warm-started from {source} step 0" in output
    assert read_meta(base_dir / "chatsft_checkpoints" / "tuned", 2)["source"] == {"stage": "sft", "model_tag": MODEL_TAG,
                                                                                 "step": 0}
    assert sorted(os.listdir(source)) == before  # the source is left as it was
    # and so is the pipeline's own report section: a side model gets a section of its own
    assert {path.name for path in (base_dir / "report").glob("chat-sft*.md")} == {"chat-sft-tuned.md"}


@pytest.mark.slow
def test_a_bad_conversation_line_stops_chat_sft_before_anything_trains(base_dir, tiny_tokenizer, tmp_path, capsys,
                                                                       monkeypatch):
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["base_checkpoints"])
    bad = write_jsonl(tmp_path / "chats.jsonl", CHATS[:2] + [[{"role": "assistant", "content": "I speak first"}]] + CHATS)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    for flags, message in [([f"--data={bad}"], "chats.jsonl line 3: "), (["--data-only"], "--data-only needs"),
                           ([f"--data={tmp_path / 'missing.jsonl'}"], "missing.jsonl: no such file"),
                           (["--out-tag=../escape"], "--out-tag must be a folder name")]:
        with pytest.raises(SystemExit) as info:
            chat_sft.main(["--device-type=cpu", *flags])
        assert info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (base_dir / "chatsft_checkpoints").exists()


@pytest.mark.slow
def test_chat_rl_trains_on_your_questions_with_their_reward(base_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["chatsft_checkpoints"])
    questions = write_jsonl(tmp_path / "sums.jsonl", [{"question": f"{i} + {i}?", "answer": 2 * i} for i in range(8)])
    output = run_stage(chat_rl.main, [f"--task={questions}", "--num-iterations=2", "--examples-per-step=2",
                                      "--num-samples=2", "--device-batch-size=2", "--max-new-tokens=4", "--eval-every=0",
                                      "--eval-examples=2", "--eval-samples=2"], base_dir, capsys, monkeypatch)
    assert "2 steps x 2 questions x 2 samples" in output and "which it also trains on" in output
    assert len(re.findall(r"Step 00002 \| sums.jsonl pass@1 \d+\.\d+% \| pass@2", output)) == 1
    assert all(0.0 <= r <= 1.0 for r in logged(output, "reward")) and len(logged(output, "reward")) == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "1 + 1?", "answer": 2}, {"question": "no answer"}])
    with pytest.raises(SystemExit):
        chat_rl.main(["--device-type=cpu", f"--task={bad}"])
    assert "bad.jsonl line 2: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Resume: one run against the same run interrupted after a --save-every checkpoint and resumed from it


def copy_interrupted_run(base_dir, new_dir, stage_dirs, stage_dir, step):
    """new_dir: the tokenizer, the source checkpoints and, of stage_dir, only `step` (as if the run died after it)."""
    shutil.copytree(base_dir / "tokenizer", new_dir / "tokenizer")
    for source_dir in stage_dirs:
        shutil.copytree(base_dir / source_dir, new_dir / source_dir)
    (new_dir / stage_dir / MODEL_TAG).mkdir(parents=True)
    for path in (base_dir / stage_dir / MODEL_TAG).glob(f"*_{step:06d}*"):
        shutil.copy(path, new_dir / stage_dir / MODEL_TAG / path.name)


def assert_same_final_checkpoint(dir_a, dir_b, step, rank=0):
    a, b = torch.load(dir_a / f"model_{step:06d}.pt"), torch.load(dir_b / f"model_{step:06d}.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU
    a, b = torch.load(dir_a / f"optim_{step:06d}_rank{rank}.pt"), torch.load(dir_b / f"optim_{step:06d}_rank{rank}.pt")
    for index in a["state"]:
        for key, value in a["state"][index].items():
            assert torch.equal(value, b["state"][index][key]) if torch.is_tensor(value) else value == b["state"][index][key]
    # the same meta, but for the flags (one has --resume-from-step) and the times
    comparable = lambda meta: {**meta, "user_config": None, "loop_state": {
        **meta["loop_state"], "total_training_time": None, "curve": [{**p, "time": None} for p in meta["loop_state"]["curve"]]}}
    assert comparable(read_meta(dir_a, step)) == comparable(read_meta(dir_b, step))


@pytest.mark.slow
def test_chat_sft_resumes_exactly_where_it_was_saved(base_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    """An epoch horizon (the LR follows the packed fraction of the mixture, the packer holds conversations
    between steps): the resumed run must rebuild all of it to end on the same bits, without evaluating the
    step it resumed from again (its val bpb came back with the checkpoint)."""
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["base_checkpoints"], with_optimizer=True)
    args = ["--max-seq-len=128", "--max-examples-per-task=3", "--warmdown-ratio=1.0", "--eval-every=2", "--eval-tokens=512",
            "--chatcore-every=-1", "--save-every=2"]
    output = run_stage(chat_sft.main, args, base_dir, capsys, monkeypatch)
    checkpoints = base_dir / "chatsft_checkpoints" / MODEL_TAG
    last = max(int(p.name[5:11]) for p in checkpoints.glob("meta_*.json"))
    assert last >= 5 and (checkpoints / "meta_000002.json").exists()  # a few steps past the resume point
    meta2 = read_meta(checkpoints, 2)
    assert not meta2["finished"] and read_meta(checkpoints, last)["finished"]
    assert 0 < meta2["loop_state"]["progress"] < 1 and meta2["data_states"][0]["pending"]

    resumed_dir = tmp_path / "resumed"
    copy_interrupted_run(base_dir, resumed_dir, ["base_checkpoints"], "chatsft_checkpoints", 2)
    resumes = []  # every stage resumes through Run.resume, and nothing else
    monkeypatch.setattr(Run, "resume", lambda self, *args, real=Run.resume: resumes.append(1) or real(self, *args))
    resumed = run_stage(chat_sft.main, args + ["--resume-from-step=2"], resumed_dir, capsys, monkeypatch)
    assert resumes == [1]
    full, again = step_log(output, "loss"), step_log(resumed, "loss")
    assert sorted(again) == list(range(3, last + 1))
    assert {s: full[s] for s in again} == again
    assert "Step 00002 | val bpb" in output and "Step 00002 | val bpb" not in resumed
    assert_same_final_checkpoint(checkpoints, resumed_dir / "chatsft_checkpoints" / MODEL_TAG, last)

    # The end of the run cannot be resumed: the same refusal as pretraining (one line in a real process)
    with pytest.raises(UserError, match=f"Cannot resume from step {last}: this run ends at step {last}"):
        run_stage(chat_sft.main, args + [f"--resume-from-step={last}"], base_dir, capsys, monkeypatch)


@pytest.mark.slow
def test_chat_sft_resumes_exactly_on_two_ranks(base_dir, tiny_tokenizer, tmp_path):
    """Each rank packs its own conversations: the checkpoint holds both ranks' data positions and
    optimizer shards, and the resumed pair of processes ends on the same bits as the uninterrupted pair."""
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["base_checkpoints"])  # a 1-process optimizer state: a fresh one
    args = ["--max-seq-len=128", "--device-batch-size=1", "--total-batch-size=512", "--max-examples-per-task=3",
            "--warmdown-ratio=1.0", "--eval-every=-1", "--eval-tokens=256", "--chatcore-every=-1", "--save-every=2"]
    output = run_two_ranks("scripts.chat_sft", args, base_dir)
    checkpoints = base_dir / "chatsft_checkpoints" / MODEL_TAG
    last = max(int(p.name[5:11]) for p in checkpoints.glob("meta_*.json"))
    data_states = read_meta(checkpoints, 2)["data_states"]
    assert last >= 4 and len(data_states) == 2 and data_states[0]["cursor"] % 2 == 0 and data_states[1]["cursor"] % 2 == 1

    resumed_dir = tmp_path / "resumed"
    copy_interrupted_run(base_dir, resumed_dir, ["base_checkpoints"], "chatsft_checkpoints", 2)
    resumed = run_two_ranks("scripts.chat_sft", args + ["--resume-from-step=2"], resumed_dir)
    full, again = step_log(output, "loss"), step_log(resumed, "loss")
    assert sorted(again) == list(range(3, last + 1)) and again == {s: full[s] for s in again}
    for rank in (0, 1):
        assert_same_final_checkpoint(checkpoints, resumed_dir / "chatsft_checkpoints" / MODEL_TAG, last, rank)


@pytest.mark.slow
def test_chat_rl_resumes_exactly_and_a_rerun_skips_it(base_dir, tiny_tokenizer, tmp_path, capsys, monkeypatch):
    """
    Interrupted after step 2, the run script's way of continuing (the pipeline runner) resumes from step 2 and
    ends on the same bits, evaluating step 2 only once; run again, it skips the finished stage. A random model
    earns no reward, so
    the policy gradient is 0: weight decay moves the weights instead, by the step's LR, and the sampled
    answers (their lengths are logged) depend on those weights and on the step's seeds.
    """
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["chatsft_checkpoints"])
    args = ["--num-iterations=4", "--examples-per-step=2", "--num-samples=2", "--device-batch-size=2", "--max-new-tokens=8",
            "--eval-every=2", "--eval-examples=2", "--eval-samples=2", "--weight-decay=0.5", "--save-every=2"]
    output = run_stage(chat_rl.main, args, base_dir, capsys, monkeypatch)
    checkpoints = base_dir / "chatrl_checkpoints" / MODEL_TAG
    before, after = torch.load(checkpoints / "model_000002.pt"), torch.load(checkpoints / "model_000004.pt")
    assert not all(torch.equal(before[key], after[key]) for key in before)  # steps 3 and 4 changed the model

    resumed_dir = tmp_path / "resumed"
    copy_interrupted_run(base_dir, resumed_dir, ["chatsft_checkpoints"], "chatrl_checkpoints", 2)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(resumed_dir))
    command = pipeline.train("rl", MODEL_TAG, ["chat_rl", *args], print)  # what the runner would run
    assert command == ["chat_rl", *args, "--resume-from-step=2"] and "resuming from step 2" in capsys.readouterr().out
    resumed = run_stage(chat_rl.main, command[1:], resumed_dir, capsys, monkeypatch)
    full, again = step_log(output, "answer length"), step_log(resumed, "answer length")
    assert sorted(again) == [3, 4] and again == {s: full[s] for s in again}
    assert re.findall(r"Step (\d+) \| GSM8K", output) == ["00000", "00002", "00004"]
    assert re.findall(r"Step (\d+) \| GSM8K", resumed) == ["00004"]
    assert_same_final_checkpoint(checkpoints, resumed_dir / "chatrl_checkpoints" / MODEL_TAG, 4)
    assert pipeline.train("rl", MODEL_TAG, ["chat_rl", *args], print) is None  # run again: finished, skipped

"""
Damaged inputs (tokenizer files, pretraining shards, checkpoint meta and weights): each one is a UserError whose
message is one line naming the file and what is wrong with it, never a traceback or a model that loads and talks
garbage. Checkpoint files are checked against the sha256 hashes their meta recorded at save.
"""
import hashlib
import io
import json
import os
import pickle
import random
import string
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch

from conftest import REPO_ROOT, run_torchrun
from helpers import MODEL_TAG, make_tiny_checkpoint
from nanochat import checkpoint_manager as cm
from nanochat import dataset
from nanochat.common import UserError
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.tokenizer import get_token_bytes, get_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rewrite(path, damage):
    """Replace the file's bytes by damage(its bytes)."""
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(damage(data))


def flip(data, offset, count=64):
    """data with `count` bytes from offset inverted."""
    data = bytearray(data)
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    return bytes(data)


def raises_one_line(path, call):
    """call() must raise a UserError whose message is one line naming path -> the message."""
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    return message


EMPTY = lambda data: b""
TRUNCATED = lambda data: data[:len(data) // 2]
GARBAGE = lambda data: random.Random(0).randbytes(len(data))


# ---------------------------------------------------------------------------------------------------
# Tokenizer files

@pytest.fixture
def tokenizer_dir(base_dir, tiny_tokenizer):
    tiny_tokenizer.save(str(base_dir / "tokenizer"))
    return base_dir / "tokenizer"


def encoding_without_bos():
    return tiktoken.Encoding(name="other", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={"<|endoftext|>": 256})


@pytest.mark.parametrize("damage, problem", [
    (EMPTY, "is empty (0 bytes)"),
    (TRUNCATED, "cannot be read"),
    (GARBAGE, "cannot be read"),
    (lambda data: pickle.dumps({"merges": [1, 2]}), "holds a dict, not a tiktoken.Encoding"),
    (lambda data: pickle.dumps(encoding_without_bos()), "has no <|bos|> token"),
], ids=["empty", "truncated", "garbage", "wrong-type", "not-ours"])
def test_damaged_tokenizer_pkl(tokenizer_dir, damage, problem):
    path = tokenizer_dir / "tokenizer.pkl"
    rewrite(path, damage)
    message = raises_one_line(path, get_tokenizer)
    assert problem in message and "scripts.tok_train" in message


@pytest.mark.parametrize("damage, problem", [
    (EMPTY, "is empty (0 bytes)"),
    (TRUNCATED, "cannot be read"),
    (GARBAGE, "cannot be read"),
    (lambda data: pickle.dumps([3, 4, 5], protocol=2), "cannot be read"),  # a pickle, not a torch file
    (lambda data: tensor_bytes({"lengths": torch.ones(3, dtype=torch.int32)}), "holds a dict, not a 1-D integer tensor"),
    (lambda data: tensor_bytes([1, 2, 3]), "holds a list, not a 1-D integer tensor"),
    (lambda data: tensor_bytes(torch.ones(5)), "holds a (5,) torch.float32 tensor, not a 1-D integer tensor"),
    (lambda data: tensor_bytes(torch.ones(2, 3, dtype=torch.int32)), "holds a (2, 3) torch.int32 tensor"),
    (lambda data: tensor_bytes(torch.tensor([1, -2, 3], dtype=torch.int32)), "holds negative byte counts"),
], ids=["empty", "truncated", "garbage", "pickled-list", "dict", "list", "float", "2-d", "negative"])
def test_damaged_token_bytes(tokenizer_dir, damage, problem):
    path = tokenizer_dir / "token_bytes.pt"
    rewrite(path, damage)
    assert problem in raises_one_line(path, get_token_bytes)


def tensor_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# Pretraining shards, read by dataset iteration (tok_train, tok_eval) and by the training dataloader

def random_texts(count, seed):
    """Documents of random letters: zstd cannot shrink them much, so every byte of a page carries text."""
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_letters + "    ", k=rng.randint(200, 600))) for _ in range(count)]


def write_shard(path, table, row_group_size=16):
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def damage_a_page(path):
    """Invert 64 bytes in the middle of row group 1's column chunk (its compressed page data)."""
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    rewrite(path, lambda data: flip(data, start + column.total_compressed_size // 2))


@pytest.fixture
def shards(base_dir):
    """Three shards of 64 documents in base_dir/base_data: two train, one val -> the path of train shard 1."""
    data_dir = base_dir / "base_data"
    data_dir.mkdir()
    for i in range(3):
        write_shard(data_dir / dataset.shard_name(i), pa.table({"text": random_texts(64, seed=i)}))
    return data_dir / dataset.shard_name(1)


SHARD_DAMAGE = {
    "empty": lambda path: rewrite(path, EMPTY),
    "truncated": lambda path: rewrite(path, TRUNCATED),
    "garbage": lambda path: rewrite(path, GARBAGE),
    "damaged-page": damage_a_page,
    "text-not-strings": lambda path: write_shard(path, pa.table({"text": list(range(64))})),
    "no-text-column": lambda path: write_shard(path, pa.table({"body": random_texts(64, seed=1)})),
    "null-documents": lambda path: write_shard(path, pa.table({"text": random_texts(40, seed=1) + [None] * 24})),
}
SHARD_PROBLEMS = {"empty": "is not a readable parquet file", "truncated": "is not a readable parquet file",
                  "garbage": "is not a readable parquet file", "damaged-page": "row group 1 cannot be read",
                  "text-not-strings": "has no string column 'text' (columns: text: int64)",
                  "no-text-column": "has no string column 'text' (columns: body: string)",
                  "null-documents": "has 8 null document(s) in 'text'"}


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_damaged_shard_in_dataset_iteration(shards, damage):
    SHARD_DAMAGE[damage](shards)
    message = raises_one_line(shards, lambda: list(dataset.parquets_iter_batched("train")))
    assert SHARD_PROBLEMS[damage] in message and "python -m nanochat.dataprep" in message
    assert len(list(dataset.parquets_iter_batched("val"))) == 4  # the other shards still read


@pytest.mark.parametrize("damage", ["truncated", "damaged-page", "text-not-strings"])
def test_damaged_shard_in_the_training_loader(shards, tiny_tokenizer, damage):
    SHARD_DAMAGE[damage](shards)
    batches = tokenizing_distributed_data_loader_bos_bestfit(tiny_tokenizer, 2, 32, "train", buffer_size=1000)
    message = raises_one_line(shards, lambda: next(batches))  # raised on the loader's thread, re-raised here
    assert SHARD_PROBLEMS[damage] in message


def test_damaged_page_goes_unnoticed_without_the_check(shards):
    """The page damage above is real: pyarrow itself fails on it (and the check only names the file)."""
    damage_a_page(shards)
    parquet_file = pq.ParquetFile(shards)
    parquet_file.read_row_group(0)  # row group 0 is intact
    with pytest.raises((OSError, pa.ArrowException, UnicodeDecodeError)):
        parquet_file.read_row_group(1).column("text").to_pylist()


# ---------------------------------------------------------------------------------------------------
# Checkpoint meta: config fields

@pytest.fixture
def checkpoint(base_dir, tiny_tokenizer):
    """A tiny base checkpoint (step 0, with an optimizer shard) -> its directory."""
    make_tiny_checkpoint(base_dir, tiny_tokenizer, ["base_checkpoints"], with_optimizer=True)
    return base_dir / "base_checkpoints" / MODEL_TAG


def edit_meta(checkpoint_dir, edit):
    path = cm.meta_path(str(checkpoint_dir), 0)
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)
    return path


def set_config(key, value):
    return lambda meta: meta["model_config"].__setitem__(key, value)


@pytest.mark.parametrize("edit, problem", [
    (set_config("n_layer", "two"), "model_config.n_layer is 'two', not a positive int"),
    (set_config("n_head", 0), "model_config.n_head is 0, not a positive int"),
    (set_config("vocab_size", 1024.5), "model_config.vocab_size is 1024.5, not a positive int"),
    (set_config("n_embd", True), "model_config.n_embd is True, not a positive int"),
    (set_config("smear", "yes"), "model_config.smear is 'yes', not a bool"),
    (set_config("rotary_base", -1), "model_config.rotary_base is -1, not a positive number"),
    (set_config("short_window", -8), "model_config.short_window is -8, not a non-negative int"),
    (set_config("window_pattern", "SXL"), "window_pattern must be a string of 'S' and 'L'"),
    (set_config("n_kv_head", 3), "n_kv_head (3) must divide n_head (2)"),
    (lambda meta: meta["model_config"].pop("sequence_len"), "model_config lacks sequence_len"),
    (lambda meta: [meta["model_config"].pop(k) for k in ("vocab_size", "n_embd")], "model_config lacks vocab_size, n_embd"),
    (lambda meta: meta.__setitem__("model_config", "d2"), "has no model_config"),
], ids=["n_layer-str", "n_head-zero", "vocab-float", "n_embd-bool", "smear-str", "rotary-negative", "window-negative",
        "window-pattern", "kv-heads", "no-sequence_len", "no-vocab-no-embd", "config-not-a-dict"])
def test_bad_meta_field_is_one_line_naming_the_meta_file(checkpoint, edit, problem):
    path = edit_meta(checkpoint, edit)
    message = raises_one_line(path, lambda: cm.build_model(str(checkpoint), 0, "cpu", phase="eval"))
    assert problem in message


def test_meta_that_does_not_fit_the_weights_names_both_files(checkpoint):
    edit_meta(checkpoint, set_config("n_embd", 128))  # valid on its own, but the saved tensors are 64 wide
    model_file = cm.model_path(str(checkpoint), 0)
    message = raises_one_line(model_file, lambda: cm.build_model(str(checkpoint), 0, "cpu", phase="eval"))
    assert "does not fit the model_config of meta_000000.json (size mismatch for" in message


def test_later_config_fields_may_be_missing(checkpoint):
    """Fields added after the first checkpoints (GQA, windows, the 2026 recipe) default to what those models had."""
    later = ["n_kv_head", "window_pattern", "rotary_base", "qk_scale", "short_window", "ve_gate_channels",
             "ve_gate_scale", "smear", "backout"]
    edit_meta(checkpoint, lambda meta: [meta["model_config"].pop(key) for key in later])
    model, _, _ = cm.build_model(str(checkpoint), 0, "cpu", phase="eval")
    assert model.config.n_kv_head == model.config.n_head and model.config.window_pattern == "L"


# ---------------------------------------------------------------------------------------------------
# Checkpoint weights and optimizer shards: sha256 recorded at save, checked on load

def test_meta_records_the_sha256_of_every_file(checkpoint):
    with open(cm.meta_path(str(checkpoint), 0)) as f:
        recorded = json.load(f)["sha256"]
    names = ["model_000000.pt", "optim_000000_rank0.pt"]
    assert sorted(recorded) == names
    for name in names:  # what `sha256sum FILE` prints
        assert recorded[name] == hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
    _, _, meta = cm.load_checkpoint(str(checkpoint), 0, "cpu", load_optimizer=True)
    assert "sha256" not in meta  # the caller gets the meta it saved


def flip_inside_a_tensor(path, tensor):
    """Invert 64 bytes in the middle of `tensor`'s data inside the saved file (found by its bytes)."""
    data = open(path, "rb").read()
    offset = data.find(tensor.numpy().tobytes())
    assert offset > 0
    rewrite(path, lambda data: flip(data, offset + tensor.numel() * tensor.element_size() // 2))


def test_flipped_bytes_in_the_model_file_are_caught(checkpoint, monkeypatch):
    path = cm.model_path(str(checkpoint), 0)
    weight = torch.load(path)["transformer.wte.weight"]
    flip_inside_a_tensor(path, weight)
    damaged = torch.load(path)  # torch itself loads the damaged file without a word ...
    assert not torch.equal(damaged["transformer.wte.weight"], weight)

    problem = "does not have the sha256 its meta recorded"
    for load in [lambda: cm.load_checkpoint(str(checkpoint), 0, "cpu", load_optimizer=True),  # resuming
                 lambda: cm.build_model(str(checkpoint), 0, "cpu", phase="train"),  # a stage trains on from it
                 lambda: cm.load_model("base", "cpu", phase="train")]:
        assert problem in raises_one_line(path, load)
    # Evaluation and chat skip the check (it about doubles a load) unless asked
    cm.build_model(str(checkpoint), 0, "cpu", phase="eval")
    monkeypatch.setenv("NANOCHAT_VERIFY_CHECKPOINTS", "1")
    assert problem in raises_one_line(path, lambda: cm.load_model("base", "cpu", phase="eval"))
    monkeypatch.setenv("NANOCHAT_VERIFY_CHECKPOINTS", "yes")
    with pytest.raises(UserError, match="NANOCHAT_VERIFY_CHECKPOINTS='yes' is not understood"):
        cm.load_model("base", "cpu", phase="eval")


def test_flipped_bytes_in_the_optimizer_shard_are_caught_at_resume(checkpoint):
    path = cm.optim_path(str(checkpoint), 0, 0)
    state = torch.load(path)["state"]
    flip_inside_a_tensor(path, max((v for s in state.values() for v in s.values() if torch.is_tensor(v)),
                                   key=torch.Tensor.numel))
    message = raises_one_line(path, lambda: cm.load_checkpoint(str(checkpoint), 0, "cpu", load_optimizer=True))
    assert "does not have the sha256 its meta recorded" in message and "step 0 cannot be loaded" in message


def test_a_file_meta_has_no_hash_for_is_refused(checkpoint):
    """An optimizer shard left from an earlier save of the step, not part of the one meta describes."""
    edit_meta(checkpoint, lambda meta: meta["sha256"].pop("optim_000000_rank0.pt"))
    path = cm.optim_path(str(checkpoint), 0, 0)
    message = raises_one_line(path, lambda: cm.load_checkpoint(str(checkpoint), 0, "cpu", load_optimizer=True))
    assert "has no sha256 in meta_000000.json" in message


def test_checkpoints_saved_before_hashes_load_unchecked(checkpoint):
    edit_meta(checkpoint, lambda meta: meta.pop("sha256"))
    model_data, optimizer_data, _ = cm.load_checkpoint(str(checkpoint), 0, "cpu", load_optimizer=True)
    assert optimizer_data is not None
    edit_meta(checkpoint, lambda meta: meta.__setitem__("sha256", "abc"))
    assert "is not a dict of file hashes" in raises_one_line(
        cm.meta_path(str(checkpoint), 0), lambda: cm.load_checkpoint(str(checkpoint), 0, "cpu"))


# Two ranks save one checkpoint: each writes its optimizer shard, rank 0 the model and a meta with all three hashes;
# then each rank resumes from it, checking the file it reads.
TWO_RANK_SAVE = """
import sys, torch
import torch.distributed as dist
from nanochat import checkpoint_manager as cm
from nanochat.common import compute_init, compute_cleanup
_, rank, _, world_size, _ = compute_init("cpu")
checkpoint_dir = sys.argv[1]
model_data = {"w": torch.arange(1000.0)}
optimizer_data = {"m": torch.full((100,), float(rank)), "world_size": world_size}
cm.save_checkpoint(checkpoint_dir, 3, model_data, optimizer_data, {"step": 3, "model_config": {}}, rank=rank)
dist.barrier()  # rank 0 wrote meta
loaded_model, loaded_optimizer, _ = cm.load_checkpoint(checkpoint_dir, 3, "cpu", load_optimizer=True, rank=rank)
assert torch.equal(loaded_model["w"], model_data["w"]) and torch.equal(loaded_optimizer["m"], optimizer_data["m"])
print(f"rank {rank} resumed", flush=True)
compute_cleanup()
"""


@pytest.mark.slow
def test_two_ranks_record_every_shard_hash(tmp_path):
    script = tmp_path / "two_rank_save.py"
    script.write_text(TWO_RANK_SAVE)
    checkpoint_dir = tmp_path / "ckpt"
    returncode, output = run_torchrun(script, checkpoint_dir, nproc=2)
    assert returncode == 0 and "rank 0 resumed" in output and "rank 1 resumed" in output, output[-3000:]
    recorded = json.loads((checkpoint_dir / "meta_000003.json").read_text())["sha256"]
    names = ["model_000003.pt", "optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    assert sorted(recorded) == names
    for name in names:
        assert recorded[name] == hashlib.sha256((checkpoint_dir / name).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Real scripts: one line on stderr, no traceback

def run_script(module, *args, env):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env}, timeout=300)


@pytest.mark.slow
def test_base_train_with_a_damaged_tokenizer_prints_one_line(tokenizer_dir, base_dir):
    path = tokenizer_dir / "tokenizer.pkl"
    rewrite(path, TRUNCATED)
    result = run_script("scripts.base_train", "--depth=2", "--device-type=cpu", env={"NANOCHAT_BASE_DIR": str(base_dir)})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert result.stderr.startswith(f"base_train.py: error: Tokenizer file {path} cannot be read"), result.stderr


@pytest.mark.slow
def test_base_loss_with_a_flipped_model_file_names_it(checkpoint, base_dir):
    path = cm.model_path(str(checkpoint), 0)
    flip_inside_a_tensor(path, torch.load(path)["lm_head.weight"])
    result = run_script("scripts.base_loss", "--device-type=cpu",
                        env={"NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_VERIFY_CHECKPOINTS": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"base_loss.py: error: Checkpoint file {path} does not "
                                                             f"have the sha256 its meta recorded"), result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", ["scripts.tok_train", "scripts.tok_eval"])
def test_the_tokenizer_scripts_name_a_damaged_shard_in_one_line(script, tokenizer_dir, base_dir):
    """They need no device (no compute_init), yet a damaged shard is the same one line as in every other script."""
    shards = base_dir / "base_data"
    shards.mkdir()
    for i in range(2):
        (shards / f"shard_{i:05d}.parquet").write_bytes(GARBAGE(b"x" * 4096))
    result = run_script(script, env={"NANOCHAT_BASE_DIR": str(base_dir)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"{script.split('.')[1]}.py: error: Damaged shard: "), result.stderr

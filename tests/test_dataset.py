"""Shards: where they are read from (the data order), listing, split, iteration order; the CLI delegation."""
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, TEST_DATA
from nanochat import dataset

TEST_SHARDS = sorted((TEST_DATA / "pretrain").glob("shard_*.parquet"))


def shard_texts(path):
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def write_parquet(path, texts, row_group_size=4):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def all_row_groups(paths):
    """Every row group of the files, in order: the global index is the position in this list."""
    groups = []
    for path in paths:
        parquet_file = pq.ParquetFile(path)
        groups += [parquet_file.read_row_group(i).column("text").to_pylist() for i in range(parquet_file.num_row_groups)]
    return groups


@pytest.fixture
def test_data(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(TEST_DATA))


# -----------------------------------------------------------------------------
# listing and iteration

def test_listing_and_split(test_data):
    assert dataset.get_data_dir() == str(TEST_DATA / "pretrain")
    assert dataset.list_parquet_files() == [str(p) for p in TEST_SHARDS]
    train = [t for texts in dataset.parquets_iter_batched("train") for t in texts]
    val = [t for texts in dataset.parquets_iter_batched("val") for t in texts]
    assert train == [t for path in TEST_SHARDS[:-1] for t in shard_texts(path)]
    assert val == shard_texts(TEST_SHARDS[-1])


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("step", [1, 3, 8])
def test_start_step_partition_row_groups_globally(test_data, split, step):
    expected = all_row_groups(TEST_SHARDS[:-1] if split == "train" else TEST_SHARDS[-1:])
    for start in range(step):
        got = list(dataset.parquets_iter_batched(split, start=start, step=step))
        assert got == expected[start::step]


def test_iter_row_groups_after_skips_up_to_that_row_group(test_data):
    everything = list(dataset.iter_row_groups("train"))
    pq_idx, rg_idx, _ = everything[10]
    resumed = list(dataset.iter_row_groups("train", after=(pq_idx, rg_idx)))
    assert resumed == everything[11:]


def test_listing_ignores_temp_and_foreign_files(tmp_path):
    for name in ["shard_00000.parquet", "shard_00002.parquet"]:
        write_parquet(tmp_path / name, ["a", "b"])
    for name in ["shard_00001.parquet.tmp123_456", "other.parquet", "shard_1.parquet", "shard_00003.parquet.part"]:
        (tmp_path / name).write_bytes(b"partial")
    assert dataset.list_parquet_files(str(tmp_path)) == [str(tmp_path / "shard_00000.parquet"), str(tmp_path / "shard_00002.parquet")]


def test_get_data_dir_follows_the_data_order(base_dir, tmp_path, monkeypatch):
    download_dir, offline_dir = base_dir / "base_data", base_dir / "base_data_offline"
    assert dataset.get_data_dir() == str(download_dir)  # nothing anywhere: where downloads go
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")
    assert dataset.get_data_dir() == str(REPO_ROOT / "data" / "pretrain")  # the embedded sample, when asked for
    offline_dir.mkdir()
    write_parquet(offline_dir / "shard_00000.parquet", ["x"])
    assert dataset.get_data_dir() == str(offline_dir)  # what the base dir holds beats the embedded sample
    download_dir.mkdir()
    write_parquet(download_dir / "shard_00000.parquet", ["x"])
    assert dataset.get_data_dir() == str(download_dir)  # downloaded shards beat the offline corpus
    tree = tmp_path / "tree"
    (tree / "pretrain").mkdir(parents=True)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tree))
    assert dataset.get_data_dir() == str(download_dir)  # a data tree without shards is passed over
    write_parquet(tree / "pretrain" / "shard_00000.parquet", ["x"])
    assert dataset.get_data_dir() == str(tree / "pretrain")  # NANOCHAT_DATA_DIR beats everything


@pytest.mark.parametrize("num_shards", [0, 1])
def test_too_few_shards_error_names_the_fixes(base_dir, num_shards):
    data_dir = base_dir / "base_data"
    data_dir.mkdir()
    for i in range(num_shards):
        write_parquet(data_dir / dataset.shard_name(i), ["x"])
    with pytest.raises(FileNotFoundError) as info:
        next(dataset.parquets_iter_batched("train"))
    message = str(info.value)
    for fix in ["-n 8", "--from-dir", "--build-from", "NANOCHAT_DATA_DIR", "NANOCHAT_DATA=embedded"]:
        assert fix in message


@pytest.mark.slow  # a fresh interpreter importing pyarrow
def test_dataset_module_runs_the_prep_cli_and_the_embedded_sample_downloads_nothing(base_dir):
    env = {**os.environ, "NANOCHAT_DATA": "embedded", "NANOCHAT_DATA_URL": "http://127.0.0.1:9/unreachable"}
    result = subprocess.run([sys.executable, "-m", "nanochat.dataset", "-n", "8"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "nothing to download" in result.stdout and not (base_dir / "base_data").exists()
    assert result.stdout.count("Data: the embedded sample") == 1



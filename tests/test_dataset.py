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
    climbmix_dir, local_dir, offline_dir = base_dir / "base_data_climbmix", base_dir / "base_data", base_dir / "base_data_offline"
    assert dataset.get_data_dir() == str(climbmix_dir)  # nothing anywhere: where the default set downloads
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")
    assert dataset.get_data_dir() == str(REPO_ROOT / "data" / "pretrain")  # the embedded sample, when asked for
    for directory in (offline_dir, local_dir, climbmix_dir):  # each beats the ones before it
        directory.mkdir()
        write_parquet(directory / "shard_00000.parquet", ["x"])
        assert dataset.get_data_dir() == str(directory)
    tree = tmp_path / "tree"
    (tree / "pretrain").mkdir(parents=True)
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tree))
    assert dataset.get_data_dir() == str(climbmix_dir)  # a data tree without shards is passed over
    write_parquet(tree / "pretrain" / "shard_00000.parquet", ["x"])
    assert dataset.get_data_dir() == str(tree / "pretrain")  # NANOCHAT_DATA_DIR beats everything


def test_shards_outside_the_default_set_folder_are_read_with_one_warning_line(base_dir, capsys):
    climbmix_dir, local_dir = base_dir / "base_data_climbmix", base_dir / "base_data"
    climbmix_dir.mkdir()  # e.g. a ClimbMix download that failed
    local_dir.mkdir()  # FineWeb-Edu shards, or shards from --from-dir / --build-from
    for i in range(3):
        write_parquet(local_dir / dataset.shard_name(i), ["x"])
    capsys.readouterr()
    assert dataset.get_data_dir() == str(local_dir) and dataset.get_data_dir() == str(local_dir)
    warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, warnings  # once per process, not once per lookup
    assert f"no ClimbMix 400B shards (the default set) in {climbmix_dir}" in warnings[0]
    assert f"the 3 shards in {local_dir}" in warnings[0] and "python -m nanochat.dataprep -n" in warnings[0]
    write_parquet(climbmix_dir / dataset.shard_name(0), ["x"])
    assert dataset.get_data_dir() == str(climbmix_dir)  # ClimbMix shards, when there, win without a word
    assert "WARNING" not in capsys.readouterr().out


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
    assert "nothing to download" in result.stdout and os.listdir(base_dir) == []
    assert result.stdout.count("Data: the embedded sample") == 1



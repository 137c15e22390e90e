"""Shards: listing, split, iteration order, building, linking, downloading (local HTTP server), offline corpus."""
import collections
import gzip
import http.server
import json
import os
import socket
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SHARED_DATA
from nanochat import dataset

SHARED_SHARDS = sorted((SHARED_DATA / "pretrain").glob("shard_*.parquet"))


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
def shared_data(monkeypatch, base_dir):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(SHARED_DATA))


@pytest.fixture
def no_data_env(monkeypatch, base_dir):
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    return base_dir


# -----------------------------------------------------------------------------
# listing and iteration

def test_listing_and_split_on_shared_shards(shared_data):
    assert dataset.get_data_dir() == str(SHARED_DATA / "pretrain")
    assert dataset.list_parquet_files() == [str(p) for p in SHARED_SHARDS]
    train = [t for texts in dataset.parquets_iter_batched("train") for t in texts]
    val = [t for texts in dataset.parquets_iter_batched("val") for t in texts]
    assert train == [t for path in SHARED_SHARDS[:-1] for t in shard_texts(path)]
    assert val == shard_texts(SHARED_SHARDS[-1])


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("step", [1, 3, 8])
def test_start_step_partition_row_groups_globally(shared_data, split, step):
    expected = all_row_groups(SHARED_SHARDS[:-1] if split == "train" else SHARED_SHARDS[-1:])
    for start in range(step):
        got = list(dataset.parquets_iter_batched(split, start=start, step=step))
        assert got == expected[start::step]


def test_iter_row_groups_after_skips_up_to_that_row_group(shared_data):
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


def test_get_data_dir_priority(no_data_env, tmp_path, monkeypatch):
    download_dir, offline_dir = no_data_env / "base_data", no_data_env / "base_data_offline"
    assert dataset.get_data_dir() == str(download_dir)  # nothing anywhere: where downloads go
    offline_dir.mkdir()
    write_parquet(offline_dir / "shard_00000.parquet", ["x"])
    assert dataset.get_data_dir() == str(offline_dir)  # only the fallback corpus exists
    download_dir.mkdir()
    write_parquet(download_dir / "shard_00000.parquet", ["x"])
    assert dataset.get_data_dir() == str(download_dir)  # downloaded shards beat the fallback
    flat = tmp_path / "flat"
    flat.mkdir()
    write_parquet(flat / "shard_00000.parquet", ["x"])
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(flat))
    assert dataset.get_data_dir() == str(flat)  # NANOCHAT_DATA_DIR holding shards directly
    (flat / "pretrain").mkdir()
    write_parquet(flat / "pretrain" / "shard_00000.parquet", ["x"])
    assert dataset.get_data_dir() == str(flat / "pretrain")  # the shared-data layout wins
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "empty"))
    assert dataset.get_data_dir() == str(download_dir)  # an env dir without shards is skipped


@pytest.mark.parametrize("num_shards", [0, 1])
def test_too_few_shards_error_names_the_fixes(no_data_env, num_shards):
    data_dir = no_data_env / "base_data"
    data_dir.mkdir()
    for i in range(num_shards):
        write_parquet(data_dir / dataset.shard_name(i), ["x"])
    with pytest.raises(FileNotFoundError) as info:
        next(dataset.parquets_iter_batched("train"))
    message = str(info.value)
    assert "-n 8" in message and "--from-dir" in message and "--build-from" in message and "NANOCHAT_DATA_DIR" in message


# -----------------------------------------------------------------------------
# building shards from local files, linking existing ones

def make_source_tree(root):
    """Files of every supported kind; returns the documents in the order read_documents must yield them."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "b.txt").write_text("second file\nwith two lines", encoding="utf-8")
    (root / "dir" / "a.txt").write_text("first file, sorted before b", encoding="utf-8")
    (root / "dir" / "notes.csv").write_text("ignored: not a document format")
    with gzip.open(root / "dir" / "sub" / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write("gzipped text ünïcödé")
    jsonl_docs = [f"json doc {i}" for i in range(5)]
    (root / "d.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(jsonl_docs)) + "\n\n")
    gz_docs = [f"gz json doc {i}" for i in range(3)]
    with gzip.open(root / "e.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in gz_docs))
    parquet_docs = [f"parquet doc {i}" for i in range(11)]
    write_parquet(root / "f.parquet", parquet_docs, row_group_size=3)
    paths = [str(root / "dir"), str(root / "d.jsonl"), str(root / "e.jsonl.gz"), str(root / "f.parquet")]
    expected = ["first file, sorted before b", "second file\nwith two lines", "gzipped text ünïcödé"] + jsonl_docs + gz_docs + parquet_docs
    return paths, expected


def test_read_documents_order_and_formats(tmp_path):
    paths, expected = make_source_tree(tmp_path)
    assert list(dataset.read_documents(paths)) == expected


@pytest.mark.parametrize("num_docs,docs_per_shard,docs_per_row_group", [(22, 5, 3), (7, 100, 2), (100, 10, 4), (2, 1, 1)])
def test_write_shards_round_trip(tmp_path, num_docs, docs_per_shard, docs_per_row_group):
    texts = [f"document {i} " * (i % 7 + 1) for i in range(num_docs)]
    paths = dataset.write_shards(iter(texts + ["", "  \n"]), str(tmp_path / "out"), docs_per_row_group, docs_per_shard)
    assert paths == dataset.list_parquet_files(str(tmp_path / "out"))
    shards = [shard_texts(p) for p in paths]
    assert [t for shard in shards for t in shard] == texts  # order kept, empty documents dropped
    assert len(shards) >= 2 and all(1 <= len(s) <= docs_per_shard for s in shards)
    assert len(shards[-1]) == min(docs_per_shard, max(1, num_docs // 10))  # the val shard
    assert all(len(s) == docs_per_shard for s in shards[:-2])  # only the last train shard may be short
    for path in paths:
        metadata = pq.ParquetFile(path).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert all(size == docs_per_row_group for size in sizes[:-1]) and 1 <= sizes[-1] <= docs_per_row_group
        dataset.check_shard(path)


def test_build_cli_round_trip_and_refusals(tmp_path, capsys):
    paths, expected = make_source_tree(tmp_path / "src")
    out = tmp_path / "out"
    argv = ["--build-from", *paths, "--out-dir", str(out), "--docs-per-row-group", "3", "--docs-per-shard", "4"]
    assert dataset.main(argv) == 0
    files = dataset.list_parquet_files(str(out))
    assert [t for f in files for t in shard_texts(f)] == expected
    assert len(shard_texts(files[-1])) == len(expected) // 10
    assert dataset.main(argv) == 1  # never mixes with existing shards
    assert "already holds shards" in capsys.readouterr().err
    assert dataset.main(["--build-from", str(tmp_path / "src" / "dir" / "notes.csv"), "--out-dir", str(tmp_path / "o2")]) == 1
    assert "supported are" in capsys.readouterr().err
    assert dataset.main(["--build-from", str(tmp_path / "src" / "dir" / "a.txt"), "--out-dir", str(tmp_path / "o3")]) == 1
    assert "at least 2" in capsys.readouterr().err


def test_link_shards_from_dir(tmp_path, no_data_env):
    src = tmp_path / "mine"
    src.mkdir()
    contents = {name: [f"{name} doc {i}" for i in range(5)] for name in ["b.parquet", "a.parquet", "c.parquet"]}
    for name, texts in contents.items():
        write_parquet(src / name, texts)
    assert dataset.main(["--from-dir", str(src)]) == 0
    assert dataset.main(["--from-dir", str(src)]) == 0  # re-running is harmless
    files = dataset.list_parquet_files()
    assert files == [str(no_data_env / "base_data" / dataset.shard_name(i)) for i in range(3)]
    assert [shard_texts(f) for f in files] == [contents[n] for n in ["a.parquet", "b.parquet", "c.parquet"]]
    pq.write_table(pa.table({"content": ["no text column"]}), src / "d.parquet")
    with pytest.raises(ValueError, match="no string column 'text'"):
        dataset.link_shards(str(src), str(tmp_path / "other"))


def test_link_shards_keeps_shard_names_and_finds_pretrain(tmp_path):
    dest = tmp_path / "dest"
    dataset.link_shards(str(SHARED_DATA), str(dest))  # the shared-data root: its pretrain/ holds the shards
    assert [os.path.basename(f) for f in dataset.list_parquet_files(str(dest))] == [p.name for p in SHARED_SHARDS]
    assert shard_texts(dest / SHARED_SHARDS[-1].name) == shard_texts(SHARED_SHARDS[-1])


# -----------------------------------------------------------------------------
# downloading, against a local HTTP server

class ShardServer:
    """Serves shards over HTTP on 127.0.0.1; some names misbehave on purpose."""

    def __init__(self, files, dest):
        self.files, self.dest = files, dest
        self.requests = collections.Counter()
        self.drop_first, self.drop_always, self.stall = set(), set(), set()
        self.final_name_present_during_partial = []  # checked while a partial file is being received
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests[name] += 1
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                drop = name in server.drop_always or (name in server.drop_first and server.requests[name] == 1)
                if drop or name in server.stall:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    time.sleep(0.2)  # let the client write what it got
                    server.final_name_present_during_partial.append(os.path.exists(os.path.join(server.dest, name)))
                    if name in server.stall:
                        time.sleep(3)
                    return  # HTTP/1.0: the connection closes here, mid-file
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def make_remote(tmp_path, count):
    remote = tmp_path / "remote"
    remote.mkdir()
    files = {}
    for i in range(count):
        write_parquet(remote / dataset.shard_name(i), [f"remote shard {i} doc {j} " * 50 for j in range(40)])
        files[dataset.shard_name(i)] = (remote / dataset.shard_name(i)).read_bytes()
    return files


def leftovers(dest):
    return [name for name in os.listdir(dest) if not dataset.SHARD_RE.fullmatch(name)]


@pytest.fixture
def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data"  # nothing listens there: connection refused


def test_download_retries_a_dropped_connection(tmp_path):
    files = make_remote(tmp_path, 4)
    dest = tmp_path / "dest"
    with ShardServer(files, str(dest)) as server:
        server.drop_first = {dataset.shard_name(1), dataset.shard_name(3)}
        dataset.download_shards(dataset.shard_indices(2, max_shard=3), str(dest), server.url, workers=3, backoff=0.05)
    assert sorted(os.listdir(dest)) == [dataset.shard_name(i) for i in (0, 1, 3)]  # first 2 + the last (val)
    for name in os.listdir(dest):
        assert (dest / name).read_bytes() == files[name]
    assert server.requests == {dataset.shard_name(0): 1, dataset.shard_name(1): 2, dataset.shard_name(3): 2}
    assert server.final_name_present_during_partial == [False, False]


def test_download_failure_leaves_no_partial_file(tmp_path):
    files = make_remote(tmp_path, 3)
    dest = tmp_path / "dest"
    with ShardServer(files, str(dest)) as server:
        server.drop_always = {dataset.shard_name(2)}
        with pytest.raises(dataset.DownloadError) as info:
            dataset.download_shards([0, 1, 2], str(dest), server.url, workers=1, attempts=3, backoff=0.01)
    assert f"{server.url}/{dataset.shard_name(2)}" in str(info.value) and "after 3 attempt(s)" in str(info.value)
    assert "--from-dir" in str(info.value) and "NANOCHAT_DATA_DIR" in str(info.value)
    assert server.requests[dataset.shard_name(2)] == 3
    assert server.final_name_present_during_partial == [False] * 3
    assert not (dest / dataset.shard_name(2)).exists() and leftovers(dest) == []
    for name in os.listdir(dest):  # what did arrive is complete
        assert (dest / name).read_bytes() == files[name]


def test_download_skips_present_shards_and_does_not_retry_404(tmp_path):
    files = make_remote(tmp_path, 3)
    dest = tmp_path / "dest"
    dest.mkdir()
    write_parquet(dest / dataset.shard_name(0), ["already here"])
    with ShardServer(files, str(dest)) as server:
        dataset.download_shards([0, 1, 2], str(dest), server.url, backoff=0.01)
        assert server.requests[dataset.shard_name(0)] == 0
        with pytest.raises(dataset.DownloadError, match="HTTP 404"):
            dataset.download_shards([7], str(dest), server.url, attempts=5, backoff=0.01)
        assert server.requests[dataset.shard_name(7)] == 1
    assert shard_texts(dest / dataset.shard_name(0)) == ["already here"]


def test_download_stalled_server_times_out(tmp_path):
    files = make_remote(tmp_path, 1)
    dest = tmp_path / "dest"
    with ShardServer(files, str(dest)) as server:
        server.stall = {dataset.shard_name(0)}
        t0 = time.time()
        with pytest.raises(dataset.DownloadError, match="timed out"):
            dataset.download_shards([0], str(dest), server.url, attempts=1, timeout=0.5)
        assert time.time() - t0 < 2.5
    assert leftovers(dest) == [] and not (dest / dataset.shard_name(0)).exists()


def test_unreachable_url_fails_fast_with_a_clear_message(tmp_path, closed_port_url, capsys, no_data_env):
    t0 = time.time()
    with pytest.raises(dataset.DownloadError) as info:
        dataset.download_shards([0, 1, 2, 3], str(tmp_path / "dest"), closed_port_url, workers=2, attempts=3, backoff=0.05)
    assert time.time() - t0 < 5
    assert closed_port_url in str(info.value) and "Connection refused" in str(info.value)
    assert dataset.main(["-n", "2", "--base-url", closed_port_url, "--attempts", "1"]) == 1
    err = capsys.readouterr().err
    assert "--from-dir" in err and "--fallback-offline" in err and "Traceback" not in err


# -----------------------------------------------------------------------------
# offline corpus and ensure_data

def test_offline_corpus_builds_valid_shards(tmp_path, capsys):
    paths = dataset.build_offline_corpus(str(tmp_path / "offline"), max_chars=300_000, docs_per_row_group=16, docs_per_shard=64)
    assert "OFFLINE FALLBACK CORPUS" in capsys.readouterr().out
    assert len(paths) >= 2 and paths == dataset.list_parquet_files(str(tmp_path / "offline"))
    texts = [t for path in paths for t in shard_texts(path)]
    for path in paths:
        dataset.check_shard(path)
    assert len(set(texts)) == len(texts)  # deduplicated
    assert all(len(t) >= dataset.MIN_DOC_CHARS for t in texts)
    assert 300_000 <= sum(map(len, texts)) < 300_000 + dataset.MAX_FILE_BYTES
    assert any("def " in t or "class " in t for t in texts)  # docstrings of modules are in


def test_ensure_data_priority(tmp_path, monkeypatch, no_data_env, closed_port_url, capsys):
    with pytest.raises(dataset.DownloadError):
        dataset.ensure_data(2, base_url=closed_port_url, attempts=1)
    offline = dataset.ensure_data(2, fallback_offline=True, base_url=closed_port_url, attempts=1, offline_max_chars=100_000)
    assert offline == str(no_data_env / "base_data_offline")
    assert dataset.get_data_dir() == offline and len(dataset.list_parquet_files()) >= 2
    assert "OFFLINE FALLBACK CORPUS" in capsys.readouterr().out
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(SHARED_DATA))  # local data beats both, with no network use
    assert dataset.ensure_data(2, fallback_offline=True, base_url=closed_port_url) == str(SHARED_DATA / "pretrain")

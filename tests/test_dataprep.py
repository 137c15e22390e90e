"""
Getting shards: building from local text (atomic, errors naming file and line), linking, downloading
against a local HTTP server (retries, stalls, Ctrl-C, killed downloads), the offline corpus, ensure_data.
"""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, TEST_DATA, FileServer
from nanochat import dataprep, dataset
from nanochat.common import TEMP_FILE_RE, _host


def shard_texts(path):
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def write_parquet(path, texts, row_group_size=4):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


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
    assert list(dataprep.read_documents(paths)) == expected


@pytest.mark.parametrize("num_docs,docs_per_shard,docs_per_row_group", [(22, 5, 3), (7, 100, 2), (100, 10, 4), (2, 1, 1)])
def test_write_shards_round_trip(tmp_path, num_docs, docs_per_shard, docs_per_row_group):
    texts = [f"document {i} " * (i % 7 + 1) for i in range(num_docs)]
    paths = dataprep.write_shards(iter(texts + ["", "  \n"]), str(tmp_path / "out"), docs_per_row_group, docs_per_shard)
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
    assert dataprep.main(argv) == 0
    files = dataset.list_parquet_files(str(out))
    assert [t for f in files for t in shard_texts(f)] == expected
    assert len(shard_texts(files[-1])) == len(expected) // 10
    assert dataprep.main(argv) == 1  # never mixes with existing shards
    assert "already holds shards" in capsys.readouterr().err
    assert dataprep.main(["--build-from", str(tmp_path / "src" / "dir" / "notes.csv"), "--out-dir", str(tmp_path / "o2")]) == 1
    assert "supported are" in capsys.readouterr().err
    assert dataprep.main(["--build-from", str(tmp_path / "src" / "dir" / "a.txt"), "--out-dir", str(tmp_path / "o3")]) == 1
    assert "at least 2" in capsys.readouterr().err


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_build_that_fails_half_way_leaves_nothing_where_training_reads(tmp_path, base_dir, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"text": f"good doc {i}"}) + "\n" for i in range(50)))
    (src / "b.jsonl").write_text(json.dumps({"text": "fine"}) + "\n\n" + '{"text": "cut off' + "\n")
    (base_dir / "base_data").mkdir()  # empty: e.g. a download that failed
    argv = ["--build-from", str(src), "--docs-per-shard", "4", "--docs-per-row-group", "2"]
    assert dataprep.main(argv) == 1  # 12 shards were written before b.jsonl line 3 failed
    assert "b.jsonl line 3: bad JSON" in one_line_error(capsys)
    assert os.listdir(base_dir) == ["base_data"] and os.listdir(base_dir / "base_data") == []  # no temp folder either
    (src / "b.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    assert dataprep.main(argv) == 0  # the fixed input builds (nothing half-built is in the way)
    assert len(dataset.list_parquet_files()) == 13 and os.listdir(base_dir) == ["base_data"]


def truncated_gzip(path):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200)))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name, write, message", [
    ("bad.jsonl", lambda p: p.write_text('{"text": "a"}\n{"text": b}\n'), "bad.jsonl line 2: bad JSON"),
    ("notext.jsonl", lambda p: p.write_text('{"text": "a"}\n\n["a list"]\n'), "notext.jsonl line 3: expected a JSON object"),
    ("latin1.txt", lambda p: p.write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1")), "latin1.txt line 3: not UTF-8"),
    ("latin1.jsonl", lambda p: p.write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1")), "latin1.jsonl line 2: not UTF-8"),
    ("plain.txt.gz", lambda p: p.write_text("not gzip at all"), "plain.txt.gz line 1: cannot read it"),
    ("cut.jsonl.gz", truncated_gzip, "cut.jsonl.gz line "),
    ("missing.txt", lambda p: None, "missing.txt: no such file"),
])
def test_bad_input_names_the_file_and_line(tmp_path, base_dir, capsys, name, write, message):
    write(tmp_path / name)
    assert dataprep.main(["--build-from", str(tmp_path / name)]) == 1
    assert message in one_line_error(capsys)
    assert os.listdir(base_dir) == []


def test_link_shards_from_dir(tmp_path, base_dir):
    src = tmp_path / "mine"
    src.mkdir()
    contents = {name: [f"{name} doc {i}" for i in range(5)] for name in ["b.parquet", "a.parquet", "c.parquet"]}
    for name, texts in contents.items():
        write_parquet(src / name, texts)
    assert dataprep.main(["--from-dir", str(src)]) == 0
    assert dataprep.main(["--from-dir", str(src)]) == 0  # re-running is harmless
    files = dataset.list_parquet_files()
    assert files == [str(base_dir / "base_data" / dataset.shard_name(i)) for i in range(3)]
    assert [shard_texts(f) for f in files] == [contents[n] for n in ["a.parquet", "b.parquet", "c.parquet"]]
    pq.write_table(pa.table({"content": ["no text column"]}), src / "d.parquet")
    with pytest.raises(ValueError, match="no string column 'text'"):
        dataprep.link_shards(str(src), str(tmp_path / "other"))


def test_link_shards_keeps_shard_names_and_finds_pretrain(tmp_path):
    dest = tmp_path / "dest"
    dataprep.link_shards(str(TEST_DATA), str(dest))  # a data tree's root: its pretrain/ holds the shards
    shards = sorted((TEST_DATA / "pretrain").glob("shard_*.parquet"))
    assert [os.path.basename(f) for f in dataset.list_parquet_files(str(dest))] == [p.name for p in shards]
    assert shard_texts(dest / shards[-1].name) == shard_texts(shards[-1])


# -----------------------------------------------------------------------------
# downloading, against a local HTTP server

def make_remote(tmp_path, count):
    remote = tmp_path / "remote"
    remote.mkdir(parents=True)
    files = {}
    for i in range(count):
        write_parquet(remote / dataset.shard_name(i), [f"remote shard {i} doc {j} " * 50 for j in range(40)])
        files[dataset.shard_name(i)] = (remote / dataset.shard_name(i)).read_bytes()
    return files


def leftovers(dest):
    return [name for name in os.listdir(dest) if not dataset.SHARD_RE.fullmatch(name)]


def test_download_retries_a_dropped_connection(tmp_path):
    files = make_remote(tmp_path, 4)
    dest = tmp_path / "dest"
    with FileServer(files, str(dest)) as server:
        server.drop_first = {dataset.shard_name(1), dataset.shard_name(3)}
        dataprep.download_shards(dataprep.shard_indices(2, max_shard=3), str(dest), server.url, workers=3, backoff=0.05)
    assert sorted(os.listdir(dest)) == [dataset.shard_name(i) for i in (0, 1, 3)]  # first 2 + the last (val)
    for name in os.listdir(dest):
        assert (dest / name).read_bytes() == files[name]
    assert server.requests == {dataset.shard_name(0): 1, dataset.shard_name(1): 2, dataset.shard_name(3): 2}
    assert server.final_name_present_during_partial == [False, False]


def test_download_failure_leaves_no_partial_file(tmp_path):
    files = make_remote(tmp_path, 3)
    dest = tmp_path / "dest"
    with FileServer(files, str(dest)) as server:
        server.drop_always = {dataset.shard_name(2)}
        with pytest.raises(dataprep.DownloadError) as info:
            dataprep.download_shards([0, 1, 2], str(dest), server.url, workers=1, attempts=3, backoff=0.01)
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
    with FileServer(files, str(dest)) as server:
        dataprep.download_shards([0, 1, 2], str(dest), server.url, backoff=0.01)
        assert server.requests[dataset.shard_name(0)] == 0
        with pytest.raises(dataprep.DownloadError, match="HTTP 404"):
            dataprep.download_shards([7], str(dest), server.url, attempts=5, backoff=0.01)
        assert server.requests[dataset.shard_name(7)] == 1
    assert shard_texts(dest / dataset.shard_name(0)) == ["already here"]


def test_download_stalled_server_times_out(tmp_path):
    files = make_remote(tmp_path, 1)
    dest = tmp_path / "dest"
    with FileServer(files, str(dest)) as server:
        server.stall = {dataset.shard_name(0)}
        t0 = time.time()
        with pytest.raises(dataprep.DownloadError, match="timed out"):
            dataprep.download_shards([0], str(dest), server.url, attempts=1, timeout=0.5)
        assert time.time() - t0 < 2.5
    assert leftovers(dest) == [] and not (dest / dataset.shard_name(0)).exists()


def test_unreachable_url_fails_fast_with_a_clear_message(tmp_path, closed_port_url, capsys, base_dir):
    t0 = time.time()
    with pytest.raises(dataprep.DownloadError) as info:
        dataprep.download_shards([0, 1, 2, 3], str(tmp_path / "dest"), closed_port_url, workers=2, attempts=3, backoff=0.05)
    assert time.time() - t0 < 5
    assert closed_port_url in str(info.value) and "Connection refused" in str(info.value)
    assert dataprep.main(["-n", "2", "--base-url", closed_port_url, "--attempts", "1"]) == 1
    err = capsys.readouterr().err
    assert "--from-dir" in err and "NANOCHAT_DATA=embedded" in err and "Traceback" not in err


# -----------------------------------------------------------------------------
# the shard sets: ClimbMix (the default) and FineWeb-Edu, each with its own URL, val shard and folder

def serve_set(monkeypatch, tmp_path, name, num_train, val_index):
    """A FileServer holding train shards 0..num_train-1 and shard val_index, the set `name` pointed at it."""
    files = make_remote(tmp_path / name, num_train)
    write_parquet(tmp_path / "val.parquet", [f"{name} val doc {j}" for j in range(10)])
    files[dataset.shard_name(val_index)] = (tmp_path / "val.parquet").read_bytes()
    server = FileServer(files)
    monkeypatch.setitem(dataset.SHARD_SETS, name, dataset.SHARD_SETS[name]._replace(url=server.url))
    return server, files


@pytest.mark.parametrize("name, argv, folder, val_index", [
    ("climbmix", [], "base_data_climbmix", 6542),  # the default
    ("fineweb-edu", ["--source", "fineweb-edu"], "base_data", 1822),
])
def test_each_set_downloads_the_asked_shards_and_its_val_shard_into_its_folder(
        tmp_path, base_dir, monkeypatch, closed_port_url, capsys, name, argv, folder, val_index):
    for other in dataset.SHARD_SETS:  # a download from another set's URL fails
        monkeypatch.setitem(dataset.SHARD_SETS, other, dataset.SHARD_SETS[other]._replace(url=closed_port_url))
    server, files = serve_set(monkeypatch, tmp_path, name, 3, val_index)
    with server:
        assert dataprep.main(["-n", "2", *argv, "--attempts", "1"]) == 0, capsys.readouterr().err
    expected = [dataset.shard_name(i) for i in (0, 1, val_index)]
    assert server.requests == {shard: 1 for shard in expected}
    assert os.listdir(base_dir) == [folder] and sorted(os.listdir(base_dir / folder)) == expected
    for shard in expected:
        assert (base_dir / folder / shard).read_bytes() == files[shard]
    assert dataset.split_files("val") == [str(base_dir / folder / dataset.shard_name(val_index))]
    assert "Note: training reads" not in capsys.readouterr().out  # training reads what was just downloaded


def test_asking_for_more_shards_than_the_set_has_downloads_all_once(tmp_path, base_dir, monkeypatch, capsys):
    server, files = serve_set(monkeypatch, tmp_path, "climbmix", 3, 3)
    monkeypatch.setitem(dataset.SHARD_SETS, "climbmix", dataset.SHARD_SETS["climbmix"]._replace(max_shard=3))
    with server:
        for _ in range(2):  # the second run finds everything there
            assert dataprep.main(["-n", "10"]) == 0
    assert "ClimbMix 400B has 3 train shards: downloading all of them" in capsys.readouterr().out
    assert server.requests == {name: 1 for name in files}
    assert dataset.list_parquet_files() == [str(base_dir / "base_data_climbmix" / name) for name in sorted(files)]


# -----------------------------------------------------------------------------
# offline corpus and ensure_data

def test_offline_corpus_builds_valid_shards(tmp_path, capsys):
    paths = dataprep.build_offline_corpus(str(tmp_path / "offline"), max_chars=300_000, docs_per_row_group=16, docs_per_shard=64)
    assert "OFFLINE CORPUS" in capsys.readouterr().out
    assert len(paths) >= 2 and paths == dataset.list_parquet_files(str(tmp_path / "offline"))
    texts = [t for path in paths for t in shard_texts(path)]
    for path in paths:
        dataset.check_shard(path)
    assert len(set(texts)) == len(texts)  # deduplicated
    assert all(len(t) >= dataprep.MIN_DOC_CHARS for t in texts)
    assert 300_000 <= sum(map(len, texts)) < 300_000 + dataprep.MAX_FILE_BYTES
    assert any("def " in t or "class " in t for t in texts)  # docstrings of modules are in


def test_ensure_data_downloads_only_when_no_local_source_has_shards(tmp_path, monkeypatch, base_dir, closed_port_url):
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")  # asked for: nothing to download (the URL is dead)
    assert dataprep.ensure_data(2, base_url=closed_port_url) == str(REPO_ROOT / "data" / "pretrain")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(TEST_DATA))  # a data tree with shards: nothing to download
    assert dataprep.ensure_data(2, base_url=closed_port_url) == str(TEST_DATA / "pretrain")
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    monkeypatch.setenv("NANOCHAT_DATA", "")  # (set, empty: unset, this base dir would remember the embedded sample)
    with pytest.raises(dataprep.DownloadError, match="NANOCHAT_DATA=embedded"):  # else: download, naming the fix
        dataprep.ensure_data(2, base_url=closed_port_url, attempts=1)
    write_parquet(tmp_path / "a.parquet", ["x"])
    write_parquet(tmp_path / "b.parquet", ["y"])
    dataprep.link_shards(str(tmp_path))  # into base_data, FineWeb-Edu's folder
    files = make_remote(tmp_path, 3)
    with FileServer(files) as server:  # a resumed download keeps what is there
        assert dataprep.ensure_data(2, "fineweb-edu", base_url=server.url, max_shard=2) == str(base_dir / "base_data")
        assert server.requests == {dataset.shard_name(2): 1}
        # ClimbMix, the default, is not in base_data: it downloads into its own folder
        assert dataprep.ensure_data(2, base_url=server.url, max_shard=2) == str(base_dir / "base_data_climbmix")
    assert server.requests == {dataset.shard_name(i): 1 for i in range(3)} | {dataset.shard_name(2): 2}
    assert dataset.shard_names(base_dir / "base_data_climbmix") == [dataset.shard_name(i) for i in range(3)]


# -----------------------------------------------------------------------------
# Ctrl-C and kill -9 during a download, against a server that stalls mid-file

PROGRAMS = {  # a download in a subprocess, the way users start them: the parallel shard CLI, and one file
    "shards": lambda url, dest: [sys.executable, "-m", "nanochat.dataprep", "-n", "2", "--max-shard", "2", "--base-url", url],
    "one file": lambda url, dest: [sys.executable, "-c", "import sys; from nanochat.datasource import download_once; "
                                   "download_once(sys.argv[1] + '/shard_00000.parquet', sys.argv[2] + '/file.bin')", url, dest],
}


def start_stalled_download(program, tmp_path, base_dir):
    """A download whose transfers are all half done, the rest never comes; -> (process, server, dest dir)."""
    files = make_remote(tmp_path, 3)
    dest = base_dir / "base_data_climbmix" if program == "shards" else base_dir
    server = FileServer(files, stall_seconds=60).__enter__()
    server.stall = set(files)
    # SIGINT as a terminal gives it: a shell without job control (CI, a script run with &) starts
    # children with SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    process = subprocess.Popen(PROGRAMS[program](server.url, str(dest)), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (dest.is_dir() and any(TEMP_FILE_RE.match(name) for name in os.listdir(dest))):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    time.sleep(0.3)  # the first half of the bytes is in the temp file
    return process, server, dest


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.slow
def test_ctrl_c_stops_a_download_at_once_leaving_no_partial_file(tmp_path, base_dir, program):
    """
    The transfers stall for 60 s and a read times out after 30 s: a download that did not act on Ctrl-C would sit
    in one of those. Acting on it takes well under a second on an idle machine; most of the bound is for the
    interpreter's exit on a loaded one (2.1 s seen with 2 cores shared by a dozen processes).
    """
    process, server, dest = start_stalled_download(program, tmp_path, base_dir)
    try:
        t0 = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        process.kill()
        server.__exit__()
    assert elapsed < 10.0, (elapsed, err)
    assert process.returncode in (130, -signal.SIGINT), err
    assert [name for name in os.listdir(dest) if not name.endswith(".lock")] == []  # no partial file anywhere
    if program == "shards":
        assert "Traceback" not in err and "Interrupted" in err


@pytest.mark.slow
def test_temp_files_of_a_killed_download_are_removed_at_the_next_start(tmp_path, base_dir):
    process, server, dest = start_stalled_download("shards", tmp_path, base_dir)
    process.kill()  # kill -9: no chance to clean up
    process.wait()
    server.__exit__()
    left = [name for name in os.listdir(dest) if TEMP_FILE_RE.match(name)]
    assert left and not dataset.list_parquet_files(str(dest))  # partial files, under temp names only
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_temp = dest / f".shard_00001.parquet.{_host()}-{alive.pid}.1.tmp"  # another process still downloading
        live_temp.write_bytes(b"in progress")
        files = make_remote(tmp_path / "again", 3)
        with FileServer(files) as server:
            dataprep.download_shards([0, 1, 2], str(dest), server.url)
        assert sorted(os.listdir(dest)) == sorted([live_temp.name] + [dataset.shard_name(i) for i in range(3)])
    finally:
        alive.kill()
        alive.wait()

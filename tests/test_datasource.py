"""The data order (NANOCHAT_DATA_DIR, base dir, embedded sample, download), the one downloader, temp-file cleanup."""
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO_ROOT, FileServer
from nanochat import datasource
from nanochat.common import _host, temp_path


@pytest.fixture(autouse=True)
def fresh_announcements():
    datasource.announce.cache_clear()  # each test sees its own "Data: ..." lines


def test_find_data_order_and_one_line_per_source(tmp_path, base_dir, monkeypatch, capsys):
    tree = tmp_path / "tree"
    (tree / "words").mkdir(parents=True)
    need = ("words/words_alpha.txt.gz", ("words_alpha.txt",))
    assert datasource.find_data(*need) is None  # nothing anywhere, the sample not asked for: download
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")
    assert datasource.find_data(*need) == str(REPO_ROOT / "data" / "words" / "words_alpha.txt.gz")
    (base_dir / "words_alpha.txt").write_text("a\n")
    assert datasource.find_data(*need) == str(base_dir / "words_alpha.txt")  # the base dir beats the sample
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tree))
    assert datasource.find_data(*need) == str(base_dir / "words_alpha.txt")  # a tree without the file: passed over
    (tree / "words" / "words_alpha.txt.gz").write_text("b\n")
    assert datasource.find_data(*need) == str(tree / "words" / "words_alpha.txt.gz")  # NANOCHAT_DATA_DIR first
    assert datasource.find_data("chat/gsm8k/train.jsonl.gz") == str(REPO_ROOT / "data" / "chat" / "gsm8k" / "train.jsonl.gz")
    assert datasource.find_data(*need) and datasource.find_data("chat/gsm8k/test.jsonl.gz")  # asked again: no new line
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"Data: the embedded sample in {REPO_ROOT / 'data'} (NANOCHAT_DATA=embedded; for the CPU demo and "
                     f"tests only; NANOCHAT_DATA= to download instead)", f"Data: the base dir {base_dir}",
                     f"Data: NANOCHAT_DATA_DIR={tree}"]


def test_a_base_dir_filled_from_the_embedded_sample_remembers_it(base_dir, monkeypatch, capsys):
    """A stage of the CPU demo rerun by hand, without NANOCHAT_DATA=embedded, must read what the demo read
    (it used to retry downloads for 23 s and end in tracebacks)."""
    need = "chat/gsm8k/train.jsonl.gz"
    assert not datasource.embedded_requested() and datasource.find_data(need) is None
    datasource.remember_embedded_setting()  # (tok_train's call) without NANOCHAT_DATA=embedded: nothing to remember
    assert os.listdir(base_dir) == []
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")
    assert datasource.find_data(need) == str(REPO_ROOT / "data" / need) and os.listdir(base_dir) == []  # reads only
    datasource.remember_embedded_setting()
    monkeypatch.delenv("NANOCHAT_DATA")
    assert datasource.embedded_requested() and datasource.find_data(need) == str(REPO_ROOT / "data" / need)
    datasource.announce.cache_clear()
    datasource.find_data(need)
    assert f"{base_dir / datasource.EMBEDDED_MARKER} says this base dir was filled from it" in capsys.readouterr().out
    monkeypatch.setenv("NANOCHAT_DATA", "")  # set, empty: download instead
    assert not datasource.embedded_requested() and datasource.find_data(need) is None


def test_bad_settings_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", "embeded")
    with pytest.raises(ValueError, match="NANOCHAT_DATA='embeded' is not understood"):
        datasource.find_data("words/words_alpha.txt.gz")
    monkeypatch.delenv("NANOCHAT_DATA")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        datasource.find_data("words/words_alpha.txt.gz")


def test_download_once_downloads_once_for_many_ranks(tmp_path):
    with FileServer({"f.bin": b"x" * 100_000}) as server:
        paths = []
        threads = [threading.Thread(target=lambda: paths.append(datasource.download_once(f"{server.url}/f.bin", str(tmp_path / "f.bin"))))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert paths == [str(tmp_path / "f.bin")] * 4 and server.requests == {"f.bin": 1}
    assert (tmp_path / "f.bin").read_bytes() == b"x" * 100_000


def test_download_checks_content_retries_and_names_the_fix(base_dir):
    def must_start_with_y(path):
        with open(path, "rb") as f:
            if f.read(1) != b"y":
                raise ValueError("not the expected content")

    with FileServer({"f.bin": b"x" * 1000}) as server:
        with pytest.raises(datasource.DownloadError) as info:
            datasource.download(f"{server.url}/f.bin", str(base_dir / "f.bin"), attempts=3, backoff=0.01,
                                on_complete=must_start_with_y)
        assert server.requests["f.bin"] == 3 and "not the expected content" in str(info.value)
        with pytest.raises(datasource.DownloadError, match="HTTP 404") as info:
            datasource.download(f"{server.url}/missing", str(base_dir / "g.bin"), attempts=5, backoff=0.01)
        assert server.requests["missing"] == 1  # not there: no retry
    assert "NANOCHAT_DATA_DIR" in str(info.value) and "NANOCHAT_DATA=embedded" in str(info.value)
    assert os.listdir(base_dir) == []


def test_the_embedded_sample_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA", "embedded")
    with FileServer({"f.bin": b"x"}) as server:
        with pytest.raises(datasource.DownloadError, match=r"\(NANOCHAT_DATA=embedded\) downloads nothing: set NANOCHAT_DATA= "):
            datasource.download_once(f"{server.url}/f.bin", str(tmp_path / "f.bin"))
    assert server.requests == {}


def test_remove_temp_files_keeps_live_processes_files(base_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert temp_path(str(base_dir / "a.parquet")) == str(base_dir / f".a.parquet.{_host()}-{os.getpid()}.{threading.get_ident()}.tmp")
        names = {"dead": f".a.parquet.{_host()}-{dead.pid}.7.tmp", "dead_dir": f".base_data.{_host()}-{dead.pid}.7.tmp",
                 "alive": f".b.parquet.{_host()}-{alive.pid}.7.tmp", "mine": f".c.parquet.{_host()}-{os.getpid()}.7.tmp",
                 "other_host": f".d.parquet.elsewhere-{dead.pid}.7.tmp",  # its pid means nothing here
                 "other": "notes.tmp", "shard": "shard_00000.parquet"}
        for key, name in names.items():
            if key == "dead_dir":
                (base_dir / name / "inner").mkdir(parents=True)
            else:
                (base_dir / name).write_text(key)
        datasource.remove_temp_files(str(base_dir))
        assert sorted(os.listdir(base_dir)) == sorted(names[k] for k in ["alive", "mine", "other_host", "other", "shard"])
        datasource.remove_temp_files(str(base_dir), stale_only=False)
        assert sorted(os.listdir(base_dir)) == sorted(names[k] for k in ["alive", "other_host", "other", "shard"])
    finally:
        alive.kill()
        alive.wait()

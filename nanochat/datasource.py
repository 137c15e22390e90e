"""
Where every piece of data comes from, and the one downloader.

A data tree is a folder laid out as pretrain/ (parquet shards), eval_bundle/, chat/<task>/ and words/.
Every stage looks for what it needs in this order, and the first match wins:
  1. $NANOCHAT_DATA_DIR, a data tree, when the variable is set (e.g. a full local copy, offline);
  2. what the base dir already holds: earlier downloads, or files put there by hand;
  3. the embedded sample, the data tree data/ shipped in the repo, only when NANOCHAT_DATA=embedded (or a
     base dir that a run with it filled: see embedded_requested). It is a few MB, enough for the CPU demo
     and the tests and far too small for a real model, so a run takes it only when asked to
     (runs/runcpu.sh and the tests ask), never as a silent fallback;
  4. a download (shards, eval bundle, word list; the Hugging Face hub for chat tasks). With
     NANOCHAT_DATA=embedded nothing is downloaded.
The first time a process takes data from a source it prints one line saying which ("Data: ...").

Downloads stream to a temp file named after the process (common.temp_path), are checked, then renamed: a
file under its final name is complete. Temp files of processes that were killed are removed at the next start.
"""

import functools
import http.client
import os
import threading
import urllib.error
import urllib.request

from nanochat.common import get_base_dir, print0, remove_temp_files, temp_path

EMBEDDED_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
EMBEDDED_MARKER = "data_from_embedded_sample"  # in the base dir: see embedded_requested
OFFLINE_HINT = ("Offline? Set NANOCHAT_DATA_DIR to a local data tree (pretrain/, eval_bundle/, chat/, words/), "
                "or NANOCHAT_DATA=embedded for the small sample in the repo's data/ (CPU demo and tests only).")


def embedded_requested():
    """
    True when this run takes the embedded sample: NANOCHAT_DATA=embedded, or NANOCHAT_DATA unset and a base
    dir that a run with NANOCHAT_DATA=embedded filled (remember_embedded_setting), so that a stage of the CPU
    demo resumed by hand reads the data the demo read. NANOCHAT_DATA= (set, empty) never takes it.
    """
    value = os.environ.get("NANOCHAT_DATA")
    if value is None:
        return os.path.exists(os.path.join(get_base_dir(), EMBEDDED_MARKER))
    if value not in ("", "embedded"):
        raise ValueError(f"NANOCHAT_DATA={value!r} is not understood: set it to 'embedded' for the sample in "
                         f"{EMBEDDED_DATA_DIR}, or unset it")
    return value == "embedded"


@functools.cache  # one line per source and process
def announce(source):
    print0(f"Data: {source}")


def find_data(tree_path, base_names=(), present=os.path.exists):
    """
    The path of a piece of data, in the order of the module docstring, or None: download it then.
    tree_path: its place in a data tree ("chat/gsm8k/train.jsonl.gz"); base_names: its names in the
    base dir ("words_alpha.txt"), none for data the base dir never holds; present(path): usable?
    """
    candidates = []
    root = os.environ.get("NANOCHAT_DATA_DIR")
    if root:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"NANOCHAT_DATA_DIR={root} is not a directory: point it at a data tree, or unset it")
        candidates.append((f"NANOCHAT_DATA_DIR={root}", os.path.join(root, tree_path)))
    base_dir = get_base_dir()
    candidates += [(f"the base dir {base_dir}", os.path.join(base_dir, name)) for name in base_names]
    if embedded_requested():
        why = "NANOCHAT_DATA=embedded" if os.environ.get("NANOCHAT_DATA") else \
            f"{os.path.join(base_dir, EMBEDDED_MARKER)} says this base dir was filled from it"
        candidates.append((f"the embedded sample in {EMBEDDED_DATA_DIR} ({why}; for the CPU demo and tests only; "
                           f"NANOCHAT_DATA= to download instead)", os.path.join(EMBEDDED_DATA_DIR, tree_path)))
    for source, path in candidates:
        if present(path):
            announce(source)
            return path
    return None


def remember_embedded_setting():
    """
    For the stage that starts filling a base dir (tok_train): under NANOCHAT_DATA=embedded, mark the base dir
    (EMBEDDED_MARKER, an empty file) so that every later stage on it takes the embedded sample too.
    """
    if os.environ.get("NANOCHAT_DATA") == "embedded":
        open(os.path.join(get_base_dir(), EMBEDDED_MARKER), "w").close()


# -----------------------------------------------------------------------------
# Downloading

class DownloadError(RuntimeError):
    """A download failed for good; the message says which URL, why, and how to do without it."""


def _fetch(url, tmp_path, timeout, abort):
    """Stream url into tmp_path; stop between chunks when abort is set; complain when bytes are missing."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp_path, "wb") as f:
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read1(1 << 16):  # whatever has arrived, so abort is seen within one recv
            if abort.is_set():
                raise InterruptedError("download stopped")
            f.write(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise OSError(f"connection closed after {received} of {expected} bytes")


def download(url, path, attempts=5, timeout=30, backoff=1.0, on_complete=None, abort=None):
    """
    Download url to path, or raise DownloadError. Streams to a temp file, runs on_complete(temp path)
    (to check the content: raise ValueError when bad; or to unpack it), then renames, so path is
    complete or absent. Retries with exponential backoff, except on a 4xx answer (the file is not
    there). timeout (seconds) bounds every connect and read: a stalled server cannot hang us. Setting
    abort (a threading.Event) stops it at the next chunk or retry, leaving no temp file.
    """
    tmp_path = temp_path(path)
    abort = abort or threading.Event()
    for attempt in range(1, max(1, attempts) + 1):
        try:
            _fetch(url, tmp_path, timeout, abort)
            if on_complete is not None:
                on_complete(tmp_path)
            os.replace(tmp_path, path)
            return path
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
            if 400 <= e.code < 500 and e.code != 429:
                break
        except (OSError, ValueError, http.client.HTTPException) as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        if attempt >= attempts or abort.wait(backoff * 2 ** (attempt - 1)):
            break
    raise DownloadError(f"Download of {url} failed: {reason} (after {attempt} attempt(s)). {OFFLINE_HINT}")


def download_once(url, path, on_complete=None):
    """
    download() for a file that every rank may ask for at the same time: the first process to take the
    lock downloads it, the others wait on the lock and then find it. Returns path.
    """
    from filelock import FileLock
    if os.path.exists(path):
        return path
    if embedded_requested():
        raise DownloadError(f"{path} is not there, and the embedded sample (NANOCHAT_DATA=embedded) downloads nothing: "
                            f"set NANOCHAT_DATA= (empty) to download {url}")
    with FileLock(path + ".lock"):
        if not os.path.exists(path):
            remove_temp_files(os.path.dirname(path))
            print(f"Downloading {url} -> {path}", flush=True)
            download(url, path, on_complete=on_complete)
    return path


def load_hub_dataset(path, name=None, split=None):
    """A Hugging Face hub dataset, for when there is no local copy. Fails with a message naming the offline fix."""
    if embedded_requested():
        raise RuntimeError(f"{path} (config {name}, split {split}) is not in the embedded sample, and "
                           "the embedded sample (NANOCHAT_DATA=embedded) downloads nothing: set NANOCHAT_DATA= (empty) "
                           "to use the Hugging Face hub")
    announce("the Hugging Face hub")
    try:
        from datasets import load_dataset  # imported here: only the hub path needs it, and it is slow to import
        return load_dataset(path, name, split=split)
    except Exception as e:
        raise RuntimeError(
            f"Could not load {path} (config {name}, split {split}) from the Hugging Face hub: {e}\n{OFFLINE_HINT}"
        ) from e

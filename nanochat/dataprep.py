"""
Getting pretraining shards (reading them is nanochat/dataset.py):

  python -m nanochat.dataprep -n 8                 # first 8 ClimbMix shards + its val shard (parallel, resumable)
  python -m nanochat.dataprep -n 8 --source fineweb-edu   # the same from FineWeb-Edu
  python -m nanochat.dataprep --from-dir DIR       # link (or copy) existing parquet shards
  python -m nanochat.dataprep --build-from a.txt docs/ b.jsonl.gz c.parquet  # shards from your own text
  python -m nanochat.dataprep --offline-corpus     # shards from the docs of the installed Python

`-n` downloads nothing when $NANOCHAT_DATA_DIR or the embedded sample (NANOCHAT_DATA=embedded)
supplies the shards. Everything is written under a temp name and renamed when complete, so training
never reads a partial shard; Ctrl-C stops within a second or two and keeps the complete shards.
"""

import argparse
import ast
import gzip
import hashlib
import json
import os
import queue
import random
import re
import shutil
import site
import sys
import sysconfig
import threading
import time
import zlib

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import remove_temp_files, temp_path
from nanochat.datasource import DownloadError, download
from nanochat.dataset import (DEFAULT_SHARD_SET, SHARD_RE, SHARD_SETS, check_shard, download_dir, find_shard_dir,
                              local_dir, loud, offline_corpus_dir, shard_name, shard_names)

SHARD_HINT = ("Other ways to get shards: python -m nanochat.dataprep --from-dir DIR (existing shards) or "
              "--build-from FILES (your own text). Re-running resumes: complete shards are kept.")


# -----------------------------------------------------------------------------
# Downloading

def shard_indices(num_shards, max_shard):
    """The first num_shards train shards (-1: all) plus the last shard, which is val."""
    num_train = max_shard if num_shards < 0 else min(num_shards, max_shard)
    return list(range(num_train)) + [max_shard]


def download_shards(indices, data_dir, base_url, workers=4, attempts=5, backoff=1.0, timeout=30):
    """
    Download shards in parallel, skipping those present. The first shard that fails for good stops
    the others. The workers are daemon threads, not a concurrent.futures pool, which would wait for
    every transfer in flight: on Ctrl-C they are told to stop, get a second to clean up, and the temp
    files still open are removed here.
    """
    from tqdm import tqdm
    os.makedirs(data_dir, exist_ok=True)
    remove_temp_files(data_dir)  # left by a download that was killed
    todo = queue.Queue()
    for index in indices:
        if not os.path.exists(os.path.join(data_dir, shard_name(index))):
            todo.put(index)
    num_todo = todo.qsize()
    print(f"Downloading {num_todo} shard(s) from {base_url} to {data_dir} ({len(indices) - num_todo} already present)")
    abort, done = threading.Event(), queue.Queue()

    def worker():
        while not abort.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            name = shard_name(index)
            try:
                download(f"{base_url.rstrip('/')}/{name}", os.path.join(data_dir, name), attempts, timeout, backoff,
                         on_complete=check_shard, abort=abort)
                done.put(None)
            except Exception as e:  # handed to the main thread
                done.put(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(workers, num_todo)))]
    for thread in threads:
        thread.start()
    try:
        with tqdm(total=num_todo, unit="shard") as bar:
            for _ in range(num_todo):
                error = done.get()
                if isinstance(error, DownloadError):
                    raise DownloadError(f"{error} {SHARD_HINT}") from error
                if error is not None:
                    raise error
                bar.update(1)
    except BaseException:  # a failure, or Ctrl-C
        abort.set()
        deadline = time.monotonic() + 1.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        remove_temp_files(data_dir, stale_only=False)
        raise
    return data_dir


def ensure_data(num_shards, shard_set=DEFAULT_SHARD_SET, base_url=None, max_shard=None, workers=4, attempts=5,
                timeout=30):
    """
    Shards for a run, in the data order: when $NANOCHAT_DATA_DIR or the embedded sample supplies them,
    nothing to do; otherwise download num_shards (+ val) of the set (a name in SHARD_SETS) into its
    folder of the base dir, keeping those there. base_url and max_shard default to the set's.
    """
    data_dir = find_shard_dir()
    if data_dir not in (None, download_dir(), local_dir(), offline_corpus_dir()):
        print(f"Using the {len(shard_names(data_dir))} shards in {data_dir}: nothing to download")
        return data_dir
    source = SHARD_SETS[shard_set]
    max_shard = source.max_shard if max_shard is None else max_shard
    if num_shards > max_shard:
        print(f"{source.title} has {max_shard} train shards: downloading all of them")
    return download_shards(shard_indices(num_shards, max_shard), download_dir(shard_set), base_url or source.url,
                           workers, attempts, timeout=timeout)


# -----------------------------------------------------------------------------
# Reusing existing shards

def link_shards(src_dir, data_dir=None):
    """
    Make the parquet files of src_dir (or src_dir/pretrain) the shards of data_dir (default
    base_dir/base_data): symlinks where possible, else copies. Files keep their names when they are
    all shard_NNNNN.parquet, otherwise they are numbered in sorted order (the last one is val).
    """
    data_dir = data_dir or local_dir()
    if not os.path.isdir(src_dir):
        raise FileNotFoundError(f"--from-dir {src_dir} is not a directory")
    if not any(f.endswith(".parquet") for f in os.listdir(src_dir)) and os.path.isdir(os.path.join(src_dir, "pretrain")):
        src_dir = os.path.join(src_dir, "pretrain")
    sources = sorted(f for f in os.listdir(src_dir) if f.endswith(".parquet"))
    if len(sources) < 2:
        raise ValueError(f"--from-dir {src_dir} holds {len(sources)} parquet file(s); need at least 2 (the last is val)")
    names = sources if all(SHARD_RE.fullmatch(f) for f in sources) else [shard_name(i) for i in range(len(sources))]
    for source in sources:
        check_shard(os.path.join(src_dir, source))
    foreign = set(shard_names(data_dir)) - set(names)
    if foreign:
        raise FileExistsError(f"{data_dir} already holds other shards ({len(foreign)}); remove them first, "
                              f"or point NANOCHAT_DATA_DIR at a data tree instead")
    os.makedirs(data_dir, exist_ok=True)
    remove_temp_files(data_dir)
    for source, name in zip(sources, names):
        src, dst = os.path.abspath(os.path.join(src_dir, source)), os.path.join(data_dir, name)
        if os.path.exists(dst):
            continue
        tmp = temp_path(dst)
        try:
            os.symlink(src, tmp)
        except OSError:  # no symlinks on this filesystem
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    print(f"{len(sources)} shard(s) from {src_dir} are now in {data_dir}")
    return data_dir


# -----------------------------------------------------------------------------
# Building shards from local text

BUILD_EXTENSIONS = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")


def _expand_paths(paths):
    for path in paths:
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                for filename in sorted(filenames):
                    if filename.lower().endswith(BUILD_EXTENSIONS):
                        yield os.path.join(dirpath, filename)
        elif not os.path.exists(path):
            raise ValueError(f"{path}: no such file or directory")
        elif path.lower().endswith(BUILD_EXTENSIONS):
            yield path
        else:
            raise ValueError(f"Cannot read documents from {path}: supported are {', '.join(BUILD_EXTENSIONS)} and directories")


def _numbered_lines(path):
    """(line number, bytes) of a text file, decompressed when .gz; a broken file is named with the line."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    line_number = 0
    try:
        with opener(path, "rb") as f:
            for line_number, line in enumerate(f, 1):
                yield line_number, line
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path} line {line_number + 1}: cannot read it ({e})") from e


def _decode(path, line_number, line):
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} line {line_number}: not UTF-8 text (byte {e.start + 1} of the line); "
                         f"convert the file to UTF-8 first") from e


def _jsonl_texts(path):
    for line_number, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(_decode(path, line_number, line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {line_number}: bad JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path} line {line_number}: expected a JSON object with a string field 'text'")
        yield record["text"]


def _parquet_texts(path):
    check_shard(path)
    try:
        parquet_file = pq.ParquetFile(path)
        for rg_idx in range(parquet_file.num_row_groups):
            yield from parquet_file.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from e


def read_documents(paths):
    """
    Documents of local files, in order: a .txt file is one document; a .jsonl file has one document
    per line in its "text" field; a .parquet file has one per row of its "text" column; .gz is
    decompressed; directories are walked recursively in sorted order. Bad input raises ValueError
    naming the file and line.
    """
    for path in _expand_paths(paths):
        lower = path.lower()
        if lower.endswith(".parquet"):
            yield from _parquet_texts(path)
        elif lower.endswith((".txt", ".txt.gz")):
            yield "".join(_decode(path, n, line) for n, line in _numbered_lines(path))
        else:
            yield from _jsonl_texts(path)


def _write_shards_into(texts, out_dir, docs_per_row_group, docs_per_shard):
    paths, pending, current = [], [], []  # pending: the newest full shard, held back in case it is the last

    def write(docs):
        paths.append(os.path.join(out_dir, shard_name(len(paths))))
        table = pa.table({"text": pa.array(docs, type=pa.string())})
        pq.write_table(table, paths[-1], row_group_size=docs_per_row_group, compression="zstd")

    for text in texts:
        if not text.strip():
            continue
        current.append(text)
        if len(current) == docs_per_shard:
            if pending:
                write(pending)
            pending, current = current, []
    tail = pending + current
    total = len(paths) * docs_per_shard + len(tail)
    num_val = min(docs_per_shard, max(1, total // 10))
    train_tail, val = tail[:len(tail) - num_val], tail[len(tail) - num_val:]
    if not paths and not train_tail:
        raise ValueError(f"Only {total} non-empty document(s): need at least 2 (one train, one val)")
    for i in range(0, len(train_tail), docs_per_shard):
        write(train_tail[i:i + docs_per_shard])
    write(val)
    return paths, total, len(val)


def write_shards(texts, out_dir, docs_per_row_group=1024, docs_per_shard=8192):
    """
    Write documents (empty ones dropped) into shards of docs_per_shard docs, in order. The val shard
    (last) holds the last min(docs_per_shard, total // 10) docs, so it is a full shard for large
    inputs and about a tenth of the data for small ones. The shards are built in a temp folder
    beside out_dir that becomes out_dir only when all are written: bad input half-way (or Ctrl-C)
    leaves nothing where training reads. Returns the shard paths.
    """
    if docs_per_row_group < 1 or docs_per_shard < 1:
        raise ValueError("--docs-per-row-group and --docs-per-shard must be positive")
    out_dir = os.path.abspath(out_dir)
    remove_temp_files(out_dir)  # of downloads that were killed
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        what = "shards" if shard_names(out_dir) else "other files"
        raise FileExistsError(f"{out_dir} already holds {what}; remove them or choose another --out-dir")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    remove_temp_files(os.path.dirname(out_dir))  # folders of builds that were killed
    tmp_dir = temp_path(out_dir)
    os.makedirs(tmp_dir)
    try:
        paths, total, num_val = _write_shards_into(texts, tmp_dir, docs_per_row_group, docs_per_shard)
        os.replace(tmp_dir, out_dir)  # an empty out_dir is replaced too
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"Wrote {total:,} documents into {len(paths)} shards in {out_dir} (val: {num_val:,} docs)")
    return [os.path.join(out_dir, os.path.basename(p)) for p in paths]


# -----------------------------------------------------------------------------
# The offline corpus: documentation shipped with the installed Python and packages

MIN_DOC_CHARS = 200  # shorter texts are mostly boilerplate (top_level.txt, one-line docstrings)
MAX_FILE_BYTES = 2_000_000  # larger files are data (word lists, generated tables), not prose
DOC_FILE_EXTENSIONS = (".rst", ".md", ".txt")
SKIP_DIRS = {"__pycache__", "test", "tests", "node_modules", ".git"}


def _module_docstrings(path):
    """One document per module: its docstring, then those of its classes and functions."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, ValueError, OSError, RecursionError):
        return ""
    parts = [os.path.basename(path)]
    if doc := ast.get_docstring(tree):
        parts.append(doc)
    for node in _definitions(tree.body):
        if doc := ast.get_docstring(node):
            parts.append(f"{'class' if isinstance(node, ast.ClassDef) else 'def'} {node.name}:\n{doc}")
    return "\n\n".join(parts) if len(parts) > 1 else ""


def _definitions(statements):
    """Classes and functions among statements, nested ones included. Expressions are never visited
    (unlike ast.walk, which spends most of its time there)."""
    for node in statements:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                yield from _definitions(block)


def _read_doc_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return ""


def _documentation_roots():
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages(), os.path.join(sys.prefix, "share")]
    return [r for i, r in enumerate(roots) if os.path.isdir(r) and r not in roots[:i]]


def offline_documents(max_chars=100_000_000):
    """Deduplicated documents from docstrings and .rst/.md/.txt/METADATA files, up to max_chars in total."""
    seen_files, seen_texts, total = set(), set(), 0
    for root in _documentation_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for filename in sorted(filenames):
                path = os.path.join(dirpath, filename)
                real = os.path.realpath(path)
                if real in seen_files or not os.path.isfile(real) or os.path.getsize(real) > MAX_FILE_BYTES:
                    continue
                seen_files.add(real)
                if filename.endswith(".py"):
                    text = _module_docstrings(path)
                elif filename.endswith(DOC_FILE_EXTENSIONS) or filename == "METADATA":
                    text = _read_doc_file(path)
                else:
                    continue
                text = re.sub(r"\n{3,}", "\n\n", text.strip())
                digest = hashlib.sha1(text.encode("utf-8", "replace")).digest()
                if len(text) < MIN_DOC_CHARS or digest in seen_texts:
                    continue
                seen_texts.add(digest)
                yield text
                total += len(text)
                if total >= max_chars:
                    return


def build_offline_corpus(out_dir=None, max_chars=100_000_000, docs_per_row_group=128, docs_per_shard=4096):
    """
    Shards from offline_documents, shuffled with a fixed seed so val is a sample of everything. The
    whole documentation of a typical environment is ~50M chars / ~15k docs (a few CPU-minutes to
    scan); small row groups give its val shard (~10%) enough row groups for 8 ranks.
    """
    from tqdm import tqdm
    out_dir = out_dir or offline_corpus_dir()
    print(loud("Building the OFFLINE CORPUS from the documentation of the installed Python and packages. It is "
               "small and unlike web text: fine for smoke tests, useless for a real model."))
    t0 = time.time()
    docs = list(tqdm(offline_documents(max_chars), desc="offline corpus", unit=" docs"))
    random.Random(42).shuffle(docs)
    paths = write_shards(docs, out_dir, docs_per_row_group, docs_per_shard)
    print(f"Offline corpus: {len(docs):,} documents, {sum(map(len, docs)):,} chars in {time.time() - t0:.0f}s")
    return paths


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Get pretraining shards (see the module docstring).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("-n", "--num-files", type=int, help="download the first N train shards (+ the val shard); -1 = all")
    mode.add_argument("--from-dir", help="use the existing parquet shards in DIR (linked, or copied)")
    mode.add_argument("--build-from", nargs="+", metavar="PATH", help="build shards from .txt/.jsonl(.gz)/.parquet files or dirs")
    mode.add_argument("--offline-corpus", action="store_true", help="build shards from the installed Python's documentation")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--source", choices=SHARD_SETS, default=DEFAULT_SHARD_SET, help="the set -n downloads")
    parser.add_argument("--base-url", default=os.environ.get("NANOCHAT_DATA_URL"),
                        help="a mirror of the set (or $NANOCHAT_DATA_URL); default: the set's own")
    parser.add_argument("--max-shard", type=int, default=None, help="index of the last (val) shard; default: the set's")
    parser.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up")
    parser.add_argument("--timeout", type=float, default=30, help="seconds without progress before a try fails")
    parser.add_argument("--out-dir", default=None, help="output dir of --build-from/--offline-corpus/--from-dir")
    parser.add_argument("--docs-per-row-group", type=int, default=None, help="default 1024 (128 for --offline-corpus)")
    parser.add_argument("--docs-per-shard", type=int, default=None, help="default 8192 (4096 for --offline-corpus)")
    parser.add_argument("--max-chars", type=int, default=100_000_000, help="size cap of the offline corpus")
    args = parser.parse_args(argv)
    try:
        if args.num_files is not None:
            written_dir = ensure_data(args.num_files, args.source, args.base_url, args.max_shard, args.num_workers,
                                      args.attempts, args.timeout)
        elif args.from_dir:
            written_dir = link_shards(args.from_dir, args.out_dir)
        elif args.build_from:
            written_dir = args.out_dir or local_dir()
            write_shards(read_documents(args.build_from), written_dir, args.docs_per_row_group or 1024, args.docs_per_shard or 8192)
        else:
            written_dir = args.out_dir or offline_corpus_dir()
            build_offline_corpus(written_dir, args.max_chars, args.docs_per_row_group or 128, args.docs_per_shard or 4096)
    except (DownloadError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted: nothing partial is left where training reads (a download keeps its complete shards: "
              "re-run to resume)", file=sys.stderr)
        return 130
    reading_dir = find_shard_dir() or download_dir()
    if os.path.abspath(written_dir) != os.path.abspath(reading_dir):
        print(f"Note: training reads shards from {reading_dir}, not from {written_dir} "
              f"(see the data order in nanochat/datasource.py)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

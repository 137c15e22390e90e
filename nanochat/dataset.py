"""
Pretraining shards: find them, iterate them, and get them (download, reuse, build).

A shard is a parquet file `shard_00000.parquet` ... with one string column `text`, one document per
row, in row groups (1024 docs by default; any size works). The LAST shard is validation, all others
are train.

Where the shards are read from (get_data_dir), first match wins:
  $NANOCHAT_DATA_DIR/pretrain, $NANOCHAT_DATA_DIR, base_dir/base_data (downloads and --from-dir),
  base_dir/base_data_offline (the fallback corpus; only when base_data holds no shards).

Getting shards:
  python -m nanochat.dataset -n 8                     # first 8 shards + the val shard (parallel, resumable)
  python -m nanochat.dataset -n 8 --fallback-offline  # "ensure data", what runs/runcpu.sh calls:
                                                      #   $NANOCHAT_DATA_DIR -> download -> offline corpus
  python -m nanochat.dataset --from-dir DIR           # link (or copy) existing parquet shards
  python -m nanochat.dataset --build-from a.txt docs/ b.jsonl.gz c.parquet  # shards from your own text
  python -m nanochat.dataset --offline-corpus         # shards from the docs of the installed Python
The Python entry point for the run scripts is ensure_data(num_shards, fallback_offline=True).
"""

import argparse
import ast
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import site
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import lru_cache

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir, print0

# FineWeb-Edu 100B, reshuffled and repackaged as ~250M-char shards; the last one (index 1822) is val.
DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822
SHARD_RE = re.compile(r"shard_\d{5}\.parquet")  # fullmatch: temp files (".tmp" suffix) never match
DATA_SOURCES_HELP = ("Get shards with `python -m nanochat.dataset` and one of: -n 8 (download), --from-dir DIR "
                     "(existing shards), --build-from FILES (your own text), --offline-corpus (docs of the installed "
                     "Python); or set NANOCHAT_DATA_DIR to a directory holding (pretrain/)shard_*.parquet.")


def shard_name(index):
    return f"shard_{index:05d}.parquet"


# -----------------------------------------------------------------------------
# Finding and reading shards

def _shard_names(directory):
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if SHARD_RE.fullmatch(name))


def _env_data_dir():
    """The directory of shards under $NANOCHAT_DATA_DIR, or None."""
    root = os.environ.get("NANOCHAT_DATA_DIR")
    if not root:
        return None
    for directory in (os.path.join(root, "pretrain"), root):
        if _shard_names(directory):
            return directory
    return None


def download_dir():
    return os.path.join(get_base_dir(), "base_data")


def offline_corpus_dir():
    # A separate directory so that fallback shards are never mistaken for downloaded ones
    # (a resumed download skips shards that are present under the same name).
    return os.path.join(get_base_dir(), "base_data_offline")


@lru_cache(maxsize=None)  # once per process and directory
def _warn_fallback_corpus(directory):
    print0(_loud(f"Training data comes from the OFFLINE FALLBACK CORPUS in {directory}: documentation of the "
                f"installed Python packages, not web text. Models trained on it are for smoke tests only."))


def get_data_dir():
    """The directory the shards are read from (see the module docstring for the order)."""
    env_dir = _env_data_dir()
    if env_dir:
        return env_dir
    if not _shard_names(download_dir()) and _shard_names(offline_corpus_dir()):
        _warn_fallback_corpus(offline_corpus_dir())
        return offline_corpus_dir()
    return download_dir()


def list_parquet_files(data_dir=None):
    """Sorted full paths of the complete shards in data_dir (default get_data_dir())."""
    data_dir = data_dir or get_data_dir()
    return [os.path.join(data_dir, name) for name in _shard_names(data_dir)]


def split_files(split, data_dir=None):
    """The shards of a split: 'train' = all but the last, 'val' = the last."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = data_dir or get_data_dir()
    files = list_parquet_files(data_dir)
    if len(files) < 2:
        raise FileNotFoundError(f"Found {len(files)} pretraining shard(s) in {data_dir}; need at least 2 "
                                f"(the last one is the val split). {DATA_SOURCES_HELP}")
    return files[:-1] if split == "train" else files[-1:]


def iter_row_groups(split, start=0, step=1, after=None):
    """
    Yield (pq_idx, rg_idx, texts) for the row groups with global index start, start+step, ...
    The global index counts row groups across all files of the split, so ranks stay balanced even
    when files have fewer row groups than there are ranks. after=(pq_idx, rg_idx) skips every row
    group up to and including that one (resuming).
    """
    global_idx = 0
    for pq_idx, path in enumerate(split_files(split)):
        parquet_file = pq.ParquetFile(path)
        for rg_idx in range(parquet_file.num_row_groups):
            mine = global_idx >= start and (global_idx - start) % step == 0
            if mine and (after is None or (pq_idx, rg_idx) > tuple(after)):
                table = parquet_file.read_row_group(rg_idx, columns=["text"])
                yield pq_idx, rg_idx, table.column("text").to_pylist()
            global_idx += 1


def parquets_iter_batched(split, start=0, step=1):
    """Yield the texts of one row group at a time: row groups start, start+step, ... of the split."""
    for _, _, texts in iter_row_groups(split, start, step):
        yield texts


def check_shard(path):
    """Raise ValueError unless path is a readable parquet file with a string column 'text'."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({e})") from e
    text_type = schema.field("text").type if "text" in schema.names else None
    if text_type is None or not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise ValueError(f"{path} has no string column 'text' (schema: {schema}); shards need one document per row in 'text'")


# -----------------------------------------------------------------------------
# Downloading

class DownloadError(RuntimeError):
    """A shard could not be downloaded; the message says which URL, why, and what to do instead."""


def _download_failed(url, reason):
    return DownloadError(
        f"Download of {url} failed: {reason}.\nIf this machine is offline or the URL is wrong (--base-url or "
        f"$NANOCHAT_DATA_URL), use local data instead: set NANOCHAT_DATA_DIR to a directory of shards, "
        f"run `python -m nanochat.dataset --from-dir DIR` or `--build-from FILES`, or fall back to the offline "
        f"corpus with `--fallback-offline`. Re-running resumes: complete shards are kept.")


def _fetch(url, tmp_path, timeout):
    """Stream url into tmp_path; raise OSError when the connection ends before Content-Length bytes."""
    with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp_path, "wb") as f:
        expected = response.headers.get("Content-Length")
        received = 0
        while chunk := response.read(1 << 20):
            f.write(chunk)
            received += len(chunk)
    if expected is not None and received != int(expected):
        raise OSError(f"connection closed after {received} of {expected} bytes")


def download_shard(index, data_dir, base_url=DEFAULT_BASE_URL, attempts=5, backoff=1.0, timeout=30, abort=None):
    """
    Download one shard unless present. Written to a temp name, validated, then renamed, so a shard
    under its final name is always complete. Retries with exponential backoff; timeout (seconds)
    bounds every connect and read so a stalled server cannot hang us. abort (a threading.Event) stops
    the retries early when another shard has already failed for good.
    """
    name = shard_name(index)
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        return path
    url = f"{base_url.rstrip('/')}/{name}"
    tmp_path = f"{path}.tmp{os.getpid()}_{threading.get_ident()}"
    abort = abort or threading.Event()
    for attempt in range(max(1, attempts)):
        try:
            _fetch(url, tmp_path, timeout)
            check_shard(tmp_path)
            os.replace(tmp_path, path)
            return path
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
            if 400 <= e.code < 500 and e.code != 429:  # the file is not there: retrying will not help
                break
        except (OSError, ValueError, http.client.HTTPException) as e:
            reason = f"{type(e).__name__}: {e}"
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)
        if attempt + 1 >= attempts or abort.wait(backoff * 2 ** attempt):
            break
    raise _download_failed(url, f"{reason} (after {attempt + 1} attempt(s))")


def shard_indices(num_shards, max_shard=MAX_SHARD):
    """The first num_shards train shards (-1: all) plus the last shard, which is val."""
    num_train = max_shard if num_shards < 0 else min(num_shards, max_shard)
    return list(range(num_train)) + [max_shard]


def download_shards(indices, data_dir, base_url=DEFAULT_BASE_URL, workers=4, attempts=5, backoff=1.0, timeout=30):
    """Download shards in parallel, skipping those present; the first shard that fails for good stops the rest."""
    from tqdm import tqdm
    os.makedirs(data_dir, exist_ok=True)
    todo = [i for i in indices if not os.path.exists(os.path.join(data_dir, shard_name(i)))]
    print(f"Downloading {len(todo)} shard(s) from {base_url} to {data_dir} ({len(indices) - len(todo)} already present)")
    abort = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(total=len(todo), unit="shard") as bar:
        futures = [pool.submit(download_shard, i, data_dir, base_url, attempts, backoff, timeout, abort) for i in todo]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:
            abort.set()
            for future in futures:
                future.cancel()
            raise
    return data_dir


# -----------------------------------------------------------------------------
# Reusing existing shards

def link_shards(src_dir, data_dir=None):
    """
    Make the parquet files of src_dir (or src_dir/pretrain) the shards of data_dir (default
    base_dir/base_data): symlinks where possible, else copies. Files keep their names when they are
    all shard_NNNNN.parquet, otherwise they are numbered in sorted order (the last one is val).
    """
    data_dir = data_dir or download_dir()
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
    foreign = set(_shard_names(data_dir)) - set(names)
    if foreign:
        raise FileExistsError(f"{data_dir} already holds other shards ({len(foreign)}); remove them first, "
                              f"or point NANOCHAT_DATA_DIR at {src_dir} instead")
    os.makedirs(data_dir, exist_ok=True)
    for source, name in zip(sources, names):
        src, dst = os.path.abspath(os.path.join(src_dir, source)), os.path.join(data_dir, name)
        if os.path.exists(dst):
            continue
        tmp = f"{dst}.tmp{os.getpid()}"
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
        elif path.lower().endswith(BUILD_EXTENSIONS):
            yield path
        else:
            raise ValueError(f"Cannot read documents from {path}: supported are {', '.join(BUILD_EXTENSIONS)} and directories")


def read_documents(paths):
    """
    Documents of local files, in order: a .txt file is one document; a .jsonl file has one document
    per line in its "text" field; a .parquet file has one per row of its "text" column; .gz is
    decompressed; directories are walked recursively in sorted order.
    """
    for path in _expand_paths(paths):
        lower = path.lower()
        if lower.endswith(".parquet"):
            check_shard(path)
            parquet_file = pq.ParquetFile(path)
            for rg_idx in range(parquet_file.num_row_groups):
                yield from parquet_file.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()
            continue
        opener = gzip.open if lower.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if lower.endswith((".txt", ".txt.gz")):
                yield f.read()
                continue
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{line_number}: expected a JSON object with a string field 'text'")
                yield record["text"]


def write_shards(texts, out_dir, docs_per_row_group=1024, docs_per_shard=8192):
    """
    Write documents (empty ones dropped) into shards of docs_per_shard docs, in order. The val shard
    (last) holds the last min(docs_per_shard, total // 10) docs, so it is a full shard for large
    inputs and about a tenth of the data for small ones. Returns the shard paths.
    """
    if docs_per_row_group < 1 or docs_per_shard < 1:
        raise ValueError("--docs-per-row-group and --docs-per-shard must be positive")
    if _shard_names(out_dir):
        raise FileExistsError(f"{out_dir} already holds shards; remove them or choose another --out-dir")
    os.makedirs(out_dir, exist_ok=True)
    paths, pending, current = [], [], []  # pending: the newest full shard, held back in case it is the last

    def write(docs):
        paths.append(os.path.join(out_dir, shard_name(len(paths))))
        table = pa.table({"text": pa.array(docs, type=pa.string())})
        pq.write_table(table, paths[-1] + ".tmp", row_group_size=docs_per_row_group, compression="zstd")
        os.replace(paths[-1] + ".tmp", paths[-1])

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
    print(f"Wrote {total:,} documents into {len(paths)} shards in {out_dir} (val: {len(val):,} docs)")
    return paths


# -----------------------------------------------------------------------------
# The offline fallback corpus: documentation shipped with the installed Python and packages

MIN_DOC_CHARS = 200  # shorter texts are mostly boilerplate (top_level.txt, one-line docstrings)
MAX_FILE_BYTES = 2_000_000  # larger files are data (word lists, generated tables), not prose
DOC_FILE_EXTENSIONS = (".rst", ".md", ".txt")
SKIP_DIRS = {"__pycache__", "test", "tests", "node_modules", ".git"}


def _loud(message):
    bar = "!" * 100
    return f"\n{bar}\n!!! WARNING: {message}\n{bar}\n"


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
    print(_loud("No pretraining data available: building the OFFLINE FALLBACK CORPUS from the documentation of "
                "the installed Python and packages. It is small and unlike web text: fine for smoke tests and "
                "the CPU demo, useless for a real model. For real data: download, --from-dir or NANOCHAT_DATA_DIR."))
    t0 = time.time()
    docs = list(tqdm(offline_documents(max_chars), desc="offline corpus", unit=" docs"))
    random.Random(42).shuffle(docs)
    paths = write_shards(docs, out_dir, docs_per_row_group, docs_per_shard)
    print(f"Offline corpus: {len(docs):,} documents, {sum(map(len, docs)):,} chars in {time.time() - t0:.0f}s")
    return paths


# -----------------------------------------------------------------------------
# Ensure data: what the run scripts call

def ensure_data(num_shards, fallback_offline=False, base_url=DEFAULT_BASE_URL, max_shard=MAX_SHARD, workers=4,
                attempts=5, timeout=30, offline_max_chars=100_000_000):
    """
    Make pretraining shards available and return their directory, in this priority:
    $NANOCHAT_DATA_DIR (if it holds shards) -> download num_shards (+ val) -> the offline corpus
    (only with fallback_offline, and only when no downloaded shard would get mixed with it).
    """
    env_dir = _env_data_dir()
    if env_dir:
        print(f"Using the {len(_shard_names(env_dir))} shards in {env_dir} (NANOCHAT_DATA_DIR): nothing to download")
        return env_dir
    try:
        return download_shards(shard_indices(num_shards, max_shard), download_dir(), base_url, workers, attempts, timeout=timeout)
    except DownloadError as e:
        if not fallback_offline:
            raise
        if _shard_names(download_dir()):
            raise DownloadError(f"{e}\nShards already downloaded in {download_dir()} are not mixed with the offline "
                                f"corpus: re-run to resume the download, or delete that directory to fall back.") from e
        print(f"{e}\nFalling back to the offline corpus.")
    if not _shard_names(offline_corpus_dir()):
        build_offline_corpus(offline_corpus_dir(), offline_max_chars)
    _warn_fallback_corpus(offline_corpus_dir())
    return offline_corpus_dir()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Get pretraining shards (see the module docstring).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("-n", "--num-files", type=int, help="download the first N train shards (+ the val shard); -1 = all")
    mode.add_argument("--from-dir", help="use the existing parquet shards in DIR (linked, or copied)")
    mode.add_argument("--build-from", nargs="+", metavar="PATH", help="build shards from .txt/.jsonl(.gz)/.parquet files or dirs")
    mode.add_argument("--offline-corpus", action="store_true", help="build shards from the installed Python's documentation")
    parser.add_argument("--fallback-offline", action="store_true", help="with -n: use the offline corpus if the download fails")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", default=os.environ.get("NANOCHAT_DATA_URL", DEFAULT_BASE_URL), help="(or $NANOCHAT_DATA_URL)")
    parser.add_argument("--max-shard", type=int, default=MAX_SHARD, help="index of the last (val) shard of the remote set")
    parser.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up")
    parser.add_argument("--timeout", type=float, default=30, help="seconds without progress before a try fails")
    parser.add_argument("--out-dir", default=None, help="output dir of --build-from/--offline-corpus/--from-dir")
    parser.add_argument("--docs-per-row-group", type=int, default=None, help="default 1024 (128 for --offline-corpus)")
    parser.add_argument("--docs-per-shard", type=int, default=None, help="default 8192 (4096 for --offline-corpus)")
    parser.add_argument("--max-chars", type=int, default=100_000_000, help="size cap of the offline corpus (also with --fallback-offline)")
    args = parser.parse_args(argv)
    try:
        if args.num_files is not None:
            written_dir = ensure_data(args.num_files, args.fallback_offline, args.base_url, args.max_shard,
                                      args.num_workers, args.attempts, args.timeout, args.max_chars)
        elif args.from_dir:
            written_dir = link_shards(args.from_dir, args.out_dir)
        elif args.build_from:
            written_dir = args.out_dir or download_dir()
            write_shards(read_documents(args.build_from), written_dir, args.docs_per_row_group or 1024, args.docs_per_shard or 8192)
        else:
            written_dir = args.out_dir or offline_corpus_dir()
            build_offline_corpus(written_dir, args.max_chars, args.docs_per_row_group or 128, args.docs_per_shard or 4096)
    except (DownloadError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if os.path.abspath(written_dir) != os.path.abspath(get_data_dir()):
        print(f"Note: training reads shards from {get_data_dir()}, not from {written_dir} "
              f"(NANOCHAT_DATA_DIR and base_dir/base_data take precedence)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Pretraining shards: find them and read them. (Getting them: nanochat/dataprep.py.)

A shard is a parquet file `shard_00000.parquet` ... with one string column `text`, one document per
row, in row groups (1024 docs by default; any size works). The LAST shard is validation, all others
are train.

The shards are read from the first of these that holds any (the data order of nanochat/datasource.py):
$NANOCHAT_DATA_DIR/pretrain, base_dir/base_data_climbmix (ClimbMix downloads, the default set),
base_dir/base_data (FineWeb-Edu downloads, --from-dir, --build-from; read with a warning, since ClimbMix
was not there), base_dir/base_data_offline (--offline-corpus), the embedded sample data/pretrain
(NANOCHAT_DATA=embedded).

`python -m nanochat.dataset ...` is the same command as `python -m nanochat.dataprep ...`.
"""

import os
import re
import sys
from functools import lru_cache
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, get_base_dir, print0
from nanochat.datasource import find_data

SHARD_RE = re.compile(r"shard_\d{5}\.parquet")  # fullmatch: temp files (".tmp" suffix) never match
DATA_SOURCES_HELP = ("Get shards with `python -m nanochat.dataprep` and one of: -n 8 (download), --from-dir DIR "
                     "(existing shards), --build-from FILES (your own text), --offline-corpus (docs of the installed "
                     "Python); or set NANOCHAT_DATA_DIR to a data tree holding pretrain/shard_*.parquet; or "
                     "NANOCHAT_DATA=embedded for the small sample in the repo's data/ (CPU demo and tests only).")


class ShardSet(NamedTuple):
    """A pretraining set that downloads: shard_00000 ... shard_{max_shard} at url, the last one val."""
    title: str  # for messages
    folder: str  # its folder in the base dir
    url: str
    max_shard: int


# Both are reshuffled and repackaged as shards of ~250M chars (~100 MB) in row groups of 1024 docs.
# ClimbMix is the default: the 2026 recipe and its time to GPT-2's CORE were measured on it (~150 of
# its shards cover a GPT-2-sized run). FineWeb-Edu keeps the folder it always had, so shards
# downloaded before ClimbMix stay usable.
SHARD_SETS = {
    "climbmix": ShardSet("ClimbMix 400B", "base_data_climbmix",
                         "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
    "fineweb-edu": ShardSet("FineWeb-Edu 100B", "base_data",
                            "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
}
DEFAULT_SHARD_SET = "climbmix"
LOCAL_FOLDER = SHARD_SETS["fineweb-edu"].folder  # --from-dir and --build-from put shards here, as they always did
OFFLINE_FOLDER = "base_data_offline"  # apart, so that a resumed download never takes them for its own shards
SHARD_FOLDERS = (SHARD_SETS[DEFAULT_SHARD_SET].folder, LOCAL_FOLDER, OFFLINE_FOLDER)  # the base dir's, in the data order


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def shard_names(directory):
    """Sorted names of the complete shards in directory (none when it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if SHARD_RE.fullmatch(name))


def download_dir(shard_set=DEFAULT_SHARD_SET):
    return os.path.join(get_base_dir(), SHARD_SETS[shard_set].folder)


def local_dir():
    return os.path.join(get_base_dir(), LOCAL_FOLDER)


def offline_corpus_dir():
    return os.path.join(get_base_dir(), OFFLINE_FOLDER)


def loud(message):
    bar = "!" * 100
    return f"\n{bar}\n!!! WARNING: {message}\n{bar}\n"


@lru_cache(maxsize=None)  # once per process and directory
def _warn_offline_corpus(directory):
    print0(loud(f"Training data comes from the OFFLINE CORPUS in {directory}: documentation of the installed "
                f"Python packages, not web text. Models trained on it are for smoke tests only."))


@lru_cache(maxsize=None)  # once per process and directory
def _warn_not_default_set(directory):
    default = SHARD_SETS[DEFAULT_SHARD_SET]
    print0(f"WARNING: no {default.title} shards (the default set) in {download_dir()}: training reads the "
           f"{len(shard_names(directory))} shards in {directory} (FineWeb-Edu, or your own). "
           f"To get {default.title}: python -m nanochat.dataprep -n N")


def find_shard_dir():
    """The directory the shards are read from (see the module docstring), or None when none holds any."""
    return find_data("pretrain", SHARD_FOLDERS, present=shard_names)


def get_data_dir():
    """find_shard_dir(), with a warning when that is not the default set's; else where the default set downloads."""
    data_dir = find_shard_dir()
    if data_dir == offline_corpus_dir():
        _warn_offline_corpus(data_dir)
    elif data_dir == local_dir():
        _warn_not_default_set(data_dir)
    return data_dir or download_dir()


def list_parquet_files(data_dir=None):
    """Sorted full paths of the complete shards in data_dir (default get_data_dir())."""
    data_dir = data_dir or get_data_dir()
    return [os.path.join(data_dir, name) for name in shard_names(data_dir)]


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
    group up to and including that one (resuming). A damaged shard is a UserError naming it.
    """
    global_idx = 0
    for pq_idx, path in enumerate(split_files(split)):
        try:
            parquet_file = check_shard(path)
        except ValueError as e:
            raise damaged_shard(str(e)) from e
        for rg_idx in range(parquet_file.num_row_groups):
            mine = global_idx >= start and (global_idx - start) % step == 0
            if mine and (after is None or (pq_idx, rg_idx) > tuple(after)):
                yield pq_idx, rg_idx, read_texts(parquet_file, rg_idx, path)
            global_idx += 1


def parquets_iter_batched(split, start=0, step=1):
    """Yield the texts of one row group at a time: row groups start, start+step, ... of the split."""
    for _, _, texts in iter_row_groups(split, start, step):
        yield texts


def check_shard(path):
    """-> pq.ParquetFile(path), or ValueError saying what is wrong: it must be parquet with a string column 'text'."""
    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({first_sentence(e)})") from e
    schema = parquet_file.schema_arrow
    text_type = schema.field("text").type if "text" in schema.names else None
    if text_type is None or not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        columns = ", ".join(f"{field.name}: {field.type}" for field in schema)
        raise ValueError(f"{path} has no string column 'text' (columns: {columns}); shards need one document per "
                         f"row in 'text'")
    return parquet_file


def read_texts(parquet_file, rg_idx, path):
    """The documents of one row group of an open shard; a UserError naming the shard when its bytes are damaged."""
    try:
        column = parquet_file.read_row_group(rg_idx, columns=["text"]).column("text")
        texts = column.to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:  # an overwritten page fails to decompress or decode
        problem = f"{type(e).__name__}: {first_sentence(e)}"
        raise damaged_shard(f"{path} row group {rg_idx} cannot be read ({problem})") from e
    if column.null_count:
        raise damaged_shard(f"{path} row group {rg_idx} has {column.null_count} null document(s) in 'text'")
    return texts


def damaged_shard(problem):
    return UserError(f"Damaged shard: {problem}. Replace it: delete it and run `python -m nanochat.dataprep -n N` "
                     f"again (downloads only missing shards), or rebuild the shards you made with --build-from")


def first_sentence(error):
    return str(error).strip().split("\n")[0].split(". ")[0]  # pyarrow adds "Either the file is corrupted or ..."


if __name__ == "__main__":
    from nanochat.dataprep import main
    sys.exit(main())

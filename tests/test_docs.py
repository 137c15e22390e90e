"""
docs/ against the code: the flag tables are what the parsers say, and every file, function and environment
variable the pages name exists.
"""
import ast
import re

import pytest

from conftest import REPO_ROOT
from dev import gen_flags

DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
LIBRARY_MODULES = {path.stem for path in (REPO_ROOT / "nanochat").glob("*.py")}
FILE_SUFFIXES = {"pkl", "pt", "md", "json", "jsonl", "py", "html", "csv", "txt", "gz", "yaml", "parquet", "sh"}


def defined_names(path):
    """Every class, function, method and module-level constant defined in a Python file, dotted: {"Run", "Run.save", ...}."""
    names = set()

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(prefix + child.name)
                visit(child, prefix + child.name + ".")
            elif isinstance(child, (ast.Assign, ast.AnnAssign)) and not prefix:
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                names.update(t.id for t in targets if isinstance(t, ast.Name))

    visit(ast.parse(path.read_text()), "")
    return names


def test_flag_tables_are_what_the_parsers_say():
    text = (REPO_ROOT / "docs" / "flags.md").read_text()
    assert gen_flags.render(text) == text, "docs/flags.md is stale: run `python -m dev.gen_flags`"


def test_the_tables_document_every_flag_and_its_default():
    # a reference reading of two parsers: one built at import (tok_train), one inside main() (chat_web)
    tables = gen_flags.generate()
    assert "| `--vocab-size` | 32768 | vocabulary size, special tokens included |" in tables
    assert "| `-p`, `--port` | 8000 | port to listen on |" in tables
    # a device-dependent default reads as the help says, not as this machine resolves it
    assert re.search(r"\| `--eval-tokens` \| - \| tokens of the val split .*80 x 524,288 on a GPU", tables)
    # a default read from the environment is documented unset, whatever this shell has
    assert "| `--api-key` | - |" in tables


def test_every_script_with_flags_has_a_table():
    with_parsers = {f"scripts.{path.stem}" for path in (REPO_ROOT / "scripts").glob("*.py")
                    if "ArgumentParser(" in path.read_text()}
    assert with_parsers and with_parsers <= set(gen_flags.MODULES), sorted(with_parsers - set(gen_flags.MODULES))


def test_check_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "flags.md"
    stale.write_text(f"# hand-written\n{gen_flags.BEGIN}\n| `--depth` | 12 | old |\n{gen_flags.END}\nmore\n")
    monkeypatch.setattr(gen_flags, "FLAGS_MD", str(stale))
    assert gen_flags.main(["--check"]) == 1
    assert gen_flags.main([]) == 0  # rewrites the generated part only
    fresh = stale.read_text()
    assert fresh.startswith("# hand-written\n") and fresh.endswith("\nmore\n") and "| old |" not in fresh
    assert gen_flags.main(["--check"]) == 0


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_path_a_page_names_exists(page):
    text = page.read_text()
    paths = re.findall(r"(?<![\w/.<-])((?:nanochat|scripts|tasks|dev|runs|tests|docs)/[\w./-]*\w/?)", text)
    missing = [p for p in paths if not (REPO_ROOT / p).exists() and not (REPO_ROOT / "docs" / p).exists()]
    assert not missing, f"{page.name} names files that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_library_function_a_page_names_exists(page):
    """`module.name` and `module.Class.method` of nanochat/ modules, as the pages write them."""
    missing = []
    for module, name in re.findall(r"`(\w+)\.([\w.]+)`", page.read_text()):
        if name.split(".")[-1] in FILE_SUFFIXES:  # a file name: tokenizer.pkl, report.md
            continue
        if module in LIBRARY_MODULES and name not in defined_names(REPO_ROOT / "nanochat" / f"{module}.py"):
            missing.append(f"{module}.{name}")
    assert not missing, f"{page.name} names what nanochat/ does not define: {missing}"


def test_the_architecture_table_names_what_each_file_defines():
    section = (REPO_ROOT / "docs" / "architecture.md").read_text().split("## Where each mechanism lives")[1].split("\n## ")[0]
    rows = [line.split("|")[1:4] for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) > 20
    missing = []
    for _, files, names in rows:
        defined = set().union(*(defined_names(REPO_ROOT / f) for f in re.findall(r"`([\w/]+\.py)`", files)))
        missing += [name for name in re.findall(r"`([\w.]+)`", names) if name not in defined]
    assert not missing, f"docs/architecture.md's table names what its files do not define: {missing}"


def test_every_environment_variable_the_code_reads_is_documented():
    flags_md = (REPO_ROOT / "docs" / "flags.md").read_text()
    sources = [p for d in ("nanochat", "scripts", "tasks") for p in (REPO_ROOT / d).glob("*.py")]
    sources += list((REPO_ROOT / "runs").glob("*.sh"))
    read = {name for path in sources for name in re.findall(r"\bNANOCHAT_[A-Z0-9_]+", path.read_text())}
    assert read, "no NANOCHAT_ variable found: the search is broken"
    undocumented = sorted(name for name in read if f"`{name}`" not in flags_md)
    assert not undocumented, f"docs/flags.md's environment table lacks {undocumented}"

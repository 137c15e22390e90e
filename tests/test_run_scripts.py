"""
The GPU run scripts' command lines, without a GPU: each script runs in a copy of runs/ whose setup.sh does
nothing and whose .venv/bin/activate puts fakes first on PATH. The fakes (python, torchrun, nvidia-smi) log
their arguments and succeed, so the log is the sequence of commands the script would run.
"""
import os
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

FAKE = '#!/usr/bin/env bash\necho "{name} $*" >> "$FAKE_LOG"\n'


def run_script(tmp_path, script, memory_mib=81559, **env):
    """(exit code, output, [logged command lines]) of `bash runs/SCRIPT` with the fakes (nvidia-smi: one GPU with
    memory_mib MiB, an H100 by default)."""
    repo, fakes = tmp_path / "repo", tmp_path / "fakes"
    (repo / "runs").mkdir(parents=True)
    for name in (script, "torchrun.sh"):
        shutil.copy(REPO_ROOT / "runs" / name, repo / "runs" / name)
    (repo / "runs" / "setup.sh").write_text('echo "setup: (fake)"\n')
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text(f'export PATH="{fakes}:$PATH"\n')
    fakes.mkdir()
    for name in ("python", "torchrun"):
        (fakes / name).write_text(FAKE.format(name=name))
    (fakes / "nvidia-smi").write_text(f"#!/bin/sh\necho {memory_mib}\n")  # (its memory.total query)
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    log = tmp_path / "commands.log"
    log.touch()
    base_env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC")}
    result = subprocess.run(["bash", f"runs/{script}"], cwd=repo, capture_output=True, text=True, timeout=60,
                            env={**base_env, "FAKE_LOG": str(log), "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
                                 "HOME": str(tmp_path), "PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}", **env})
    return result.returncode, result.stdout + result.stderr, log.read_text().splitlines()


def launches(commands):
    """Each torchrun invocation (also when a stage wrapper runs it) -> (launcher options, the module it runs)."""
    found = []
    for line in commands:
        words = shlex.split(line)
        if "torchrun" in words:
            words = words[words.index("torchrun") + 1:]
            module = words.index("-m")
            found.append((" ".join(words[:module]), words[module + 1]))
    return found


SINGLE_NODE = "--standalone --nproc_per_node=8"
TWO_NODES = "--nnodes=2 --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 --rdzv_conf=timeout=1800 --nproc_per_node=4"


@pytest.mark.parametrize("env, options", [({}, SINGLE_NODE), ({"NNODES": "1"}, SINGLE_NODE),
                                          ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "NPROC": "4"}, TWO_NODES)])
def test_the_speedrun_launches_every_stage_standalone_or_through_a_rendezvous(tmp_path, env, options):
    code, out, commands = run_script(tmp_path, "speedrun.sh", **env)
    assert code == 0, out
    assert launches(commands) == [(options, module) for module in
                                  ("scripts.base_train", "scripts.base_loss", "scripts.base_eval", "scripts.chat_sft", "scripts.chat_eval")]
    base_train = next(line for line in commands if "scripts.base_train" in line)
    assert "--depth=24" in base_train and "--fp8" in base_train and "--device-type=cuda" in base_train


@pytest.mark.parametrize("script", ["run1000.sh", "miniseries.sh", "scaling_laws.sh"])
def test_every_gpu_script_uses_the_same_launcher(tmp_path, script):
    code, out, commands = run_script(tmp_path, script, NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NPROC="4")
    assert code == 0, out
    assert launches(commands) and {options for options, _ in launches(commands)} == {TWO_NODES}


@pytest.mark.parametrize("env, problem", [
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "got ''"),  # no NODE_RANK
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"}, "got '2'"),  # ranks are 0 and 1
    ({"NNODES": "2", "NODE_RANK": "0"}, "(the address of node 0; got '')"),
    ({"NNODES": "two", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1"}, "NNODES=two needs"),
])
def test_a_bad_multi_node_setting_stops_before_anything_runs(tmp_path, env, problem):
    code, out, commands = run_script(tmp_path, "speedrun.sh", **env)
    assert code == 1 and commands == [], out
    assert out.startswith("runs/speedrun.sh: NNODES=") and problem in out and out.count("\n") == 1


@pytest.mark.parametrize("memory_mib, rows", [(81559, 32), (46068, 16), (24564, 8), (16384, 4)])
def test_single_gpu_runs_one_process_with_rows_for_the_memory(tmp_path, memory_mib, rows):
    code, out, commands = run_script(tmp_path, "single_gpu.sh", memory_mib=memory_mib)
    assert code == 0, out
    assert launches(commands) == []
    base_train = next(line for line in commands if "scripts.base_train" in line)
    assert f"python -m scripts.base_train --depth=12 --device-batch-size={rows} " in base_train  # (through the stage wrapper)
    assert "--device-type=cuda" in base_train


def test_single_gpu_refuses_a_small_card(tmp_path):
    code, out, commands = run_script(tmp_path, "single_gpu.sh", memory_mib=8192)
    assert code == 1 and commands == [] and "this GPU has 8192 MiB; the pipeline needs one with >= 16 GB" in out

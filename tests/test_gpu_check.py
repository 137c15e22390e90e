"""
dev/gpu_check.sh --cpu-dry-run: every part of the GPU check runs (at tiny sizes, on the CPU, with the interpreter
running these tests) and appends its JSON line; --time-limit skips the parts that would not fit.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TEST_DATA


def gpu_check(*args, timeout=60):
    return subprocess.run(["bash", "dev/gpu_check.sh", "--cpu-dry-run", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})


def test_a_part_that_does_not_fit_the_time_left_is_skipped_and_named(tmp_path):
    result = gpu_check("--only", "env,decode", "--time-limit", "5", f"--json={tmp_path / 'out.jsonl'}", f"--log={tmp_path / 'log'}")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(line["part"], line["status"]) for line in lines] == [("env", "skipped"), ("decode", "skipped")]
    assert lines[1]["reason"].endswith("budget 70 s: rerun with --only decode")


def test_an_unknown_part_is_refused(tmp_path):
    result = gpu_check("--only", "env,speed", f"--log={tmp_path / 'log'}")
    assert result.returncode == 2 and "unknown part(s) speed; the parts: env, train_bf16" in result.stderr


@pytest.mark.slow
def test_every_part_runs_on_the_cpu_and_reports_as_it_finishes(tmp_path):
    summary_path = tmp_path / "out.jsonl"
    result = gpu_check("--only", "all", f"--data-dir={TEST_DATA}", f"--json={summary_path}", f"--log={tmp_path / 'log'}",
                       timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [json.loads(line) for line in summary_path.read_text().splitlines()]
    parts = {line["part"]: line for line in lines}
    assert list(parts) == ["env", "train_bf16", "train_fp8", "attention", "decode", "tests_fp8", "train_L", "train_d12",
                           "tests", "optimizer"]
    assert result.stdout.count("GPU_CHECK {") == len(lines)  # each line is printed too
    assert parts["env"]["device"] == "cpu" and parts["env"]["fa3"] == "not used here: no CUDA device"
    assert parts["env"]["python"] == ".".join(map(str, sys.version_info[:3]))  # the interpreter the tests run on
    for name in ("train_bf16", "train_L", "train_d12"):
        run = parts[name]
        assert run["status"] == "ok" and run["tok_per_sec"] > 0 and run["peak_memory_mib"] > 0
        assert run["graphs_compiled"] == 0 and run["recompiles"] == 0  # eager in a dry run
        assert run["attention"] == "Attention backend: sdpa (FA3: no CUDA device)"
    assert parts["train_L"]["window_pattern"] == "L"
    assert parts["train_fp8"]["status"] == "skipped" and "--fp8 needs an NVIDIA GPU" in parts["train_fp8"]["skipped"]
    attention = parts["attention"]
    assert attention["flex_vs_sdpa_full"]["out"] < 1e-5 and attention["flex_vs_sdpa_window32"]["out"] < 1e-5
    assert attention["flex_window32_ms"] > 0 and attention["sdpa_full_ms"] > 0
    decode = parts["decode"]
    assert decode["greedy_agreement_batch2"] == "8/8 steps identical" and decode["recompiles_in_timed_runs"] == 0
    assert decode["compiled_batch2"]["cuda_graph_replays"] == 0 and decode["graphs_compiled"] >= 1
    assert parts["tests_fp8"]["collected"] > 10 and parts["tests"]["collected"] > 10
    assert parts["optimizer"]["backend"] == "gloo" and parts["optimizer"]["max_abs_diff"] == 0.0
    assert all(line["budget_s"] > 0 for line in lines)
    assert "===== optimizer:" in (tmp_path / "log").read_text()

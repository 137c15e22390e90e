"""dev/gpu_check.sh --cpu-dry-run: every part of the GPU check runs (at tiny sizes, on the CPU) and reports."""
import json
import os
import subprocess

import pytest

from conftest import REPO_ROOT, TEST_DATA


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(["bash", "dev/gpu_check.sh", "--cpu-dry-run", f"--data-dir={TEST_DATA}", f"--json={summary_path}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads(summary_path.read_text())
    assert summary["device"] == "cpu" and "skipped" in summary["tests"]
    attention = summary["fa3"]
    assert attention["fa3_loaded"] is False and attention["fa3_status"] == "no CUDA device"
    assert attention["flex_vs_sdpa_window-1"]["out"] < 1e-5 and attention["flex_vs_sdpa_window64"]["out"] < 1e-5
    for name in ("d2_SSSL", "d2_L"):
        run = summary["base_train"][name]
        assert run["tok_per_sec"] > 0 and run["peak_memory_mib"] > 0 and run["graphs_compiled"] == 0
        assert run["backend"] == "Attention backend: sdpa (FA3: no CUDA device)"
    engine = summary["engine"]
    assert engine["greedy_agreement_batch1"] == engine["greedy_agreement_batch2"] == "8/8 steps identical"
    assert engine["eager_batch1"]["ms_per_step"] > 0 and engine["compiled_batch2"]["cuda_graph_replays"] == 0
    assert summary["optimizer"]["backend"] == "gloo" and summary["optimizer"]["max_abs_diff"] == 0.0

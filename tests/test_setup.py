"""
runs/setup.sh picks the torch build the machine's NVIDIA driver runs. Its --dry-run prints the decision and
installs nothing; here it runs under a fake `nvidia-smi` first on PATH, one per kind of node.
"""
import os
import subprocess

import pytest

from conftest import REPO_ROOT


def dry_run(tmp_path, nvidia_smi=None):
    """Output and exit code of `setup.sh --dry-run`; nvidia_smi: the fake's shell body, or None for no nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\n" + nvidia_smi + "\n")
        fake.chmod(0o755)
    # the system dirs, minus any real nvidia-smi: only the fake (or none) answers
    path = [str(bin_dir)] + [d for d in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "nvidia-smi"))]
    venv_before = sorted(os.listdir(REPO_ROOT / ".venv")) if (REPO_ROOT / ".venv").exists() else None
    result = subprocess.run(["bash", "runs/setup.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PATH": os.pathsep.join(path), "NANOCHAT_TORCH_VERSION": "2.13.0"})
    venv_after = sorted(os.listdir(REPO_ROOT / ".venv")) if (REPO_ROOT / ".venv").exists() else None
    assert venv_after == venv_before  # a dry run touches nothing
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("driver, cuda, index", [
    ("535.183.01", "12.8", "https://download.pytorch.org/whl/cu128"),  # common on H100 images: CUDA 13 would not run
    ("570.124.06", "12.8", "https://download.pytorch.org/whl/cu128"),
    ("580.95.05", "13.0", "PyPI"),  # PyPI's default build needs exactly this
])
def test_driver_picks_the_cuda_build(tmp_path, driver, cuda, index):
    code, out = dry_run(tmp_path, f'echo "{driver}, 9.0"')
    assert code == 0, out
    assert out.strip() == (f"setup: NVIDIA GPU (driver {driver}, compute capability 9.0) -> torch 2.13.0 for CUDA {cuda} "
                           f"from {index}")


@pytest.mark.parametrize("nvidia_smi", [
    None,  # no NVIDIA tools at all
    'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9',  # tools, no GPU
    'echo "No devices were found"; exit 6',
])
def test_no_gpu_picks_the_cpu_build(tmp_path, nvidia_smi):
    code, out = dry_run(tmp_path, nvidia_smi)
    assert code == 0 and out.strip() == "setup: no NVIDIA GPU -> CPU build of torch 2.13.0", out


def test_too_old_driver_stops_with_the_fix(tmp_path):
    code, out = dry_run(tmp_path, 'echo "470.256.02, 8.0"')
    assert code == 1 and "driver 470.256.02 is too old" in out and "upgrade the driver" in out

"""
runs/setup.sh picks the torch build the machine's NVIDIA driver runs. Its --dry-run prints the decision and
installs nothing; here it runs under a fake `nvidia-smi` first on PATH, one per kind of node. Then whole
installs with a fake venv (the torch wheel check, FA3 on Hopper, wandb), and a real venv made by a python3
without ensurepip, as on a bare Ubuntu image.
"""
import os
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------ a whole (fake) install
# setup.sh copied into an empty repo whose .venv/bin/python is a fake: it logs every call, answers `pip index
# versions torch` from FAKE_INDEX, installs nothing, and reports FA3 and wandb as the test says.

FAKE_VENV_PYTHON = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
case "$*" in
    "-m pip index versions torch"*) printf '%b\n' "$FAKE_INDEX"; [ -n "$FAKE_INDEX" ];;
    "-m pip "*) exit 0;;
    *fa3_status*) echo "$FAKE_FA3" >&2;;
    *wandb*) exit "$FAKE_WANDB_EXIT";;
    *"torch.__version__.split"*) exit 1;;  # no torch installed yet
    *platform.machine*) echo "Python 3.12 on x86_64";;
esac
"""


def fake_setup(tmp_path, nvidia_smi, index="", fa3="loaded", wandb_exit=0, **env):
    """(exit code, output, the fake python's calls) of setup.sh in an empty repo with the fake venv."""
    repo = tmp_path / "repo"
    (repo / "runs").mkdir(parents=True)
    (repo / "runs" / "setup.sh").write_text((REPO_ROOT / "runs" / "setup.sh").read_text())
    (repo / "pyproject.toml").write_text((REPO_ROOT / "pyproject.toml").read_text())
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"
    python.write_text(FAKE_VENV_PYTHON)
    python.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + nvidia_smi + "\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    path = [str(bin_dir)] + [d for d in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "nvidia-smi"))]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "WANDB_"))}
    result = subprocess.run(["bash", "runs/setup.sh"], cwd=repo, capture_output=True, text=True, timeout=60,
                            env={**base_env, "PATH": os.pathsep.join(path), "FAKE_LOG": str(log), "FAKE_INDEX": index,
                                 "FAKE_FA3": fa3, "FAKE_WANDB_EXIT": str(wandb_exit), **env})
    return result.returncode, result.stdout + result.stderr, log.read_text().splitlines()


def pip_installs(calls):
    return [call for call in calls if call.startswith("-m pip install")]


CU128 = "https://download.pytorch.org/whl/cu128"


def test_a_missing_torch_wheel_stops_before_anything_is_installed(tmp_path):
    code, out, calls = fake_setup(tmp_path, 'echo "550.54.15, 9.0"',
                                  index="torch (2.12.0+cu128)\nAvailable versions: 2.12.0+cu128, 2.11.0+cu128")
    assert code == 1, out
    assert f"-m pip index versions torch --index-url {CU128}" in calls and pip_installs(calls) == []
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"setup: FAILED: {CU128} has no torch 2.13.0+cu128 for Python 3.12 on x86_64 (")
    assert "(it has 2.12.0+cu128, 2.11.0+cu128)" in last and "NANOCHAT_TORCH_VERSION=<version>" in last


def test_an_unreachable_index_says_what_it_answered(tmp_path):
    code, out, calls = fake_setup(tmp_path, 'echo "580.95.05, 9.0"', index="ERROR: No matching distribution found for torch")
    assert code == 1 and pip_installs(calls) == [], out
    assert "setup: FAILED: PyPI has no torch 2.13.0 for Python" in out and "(ERROR: No matching distribution" in out


@pytest.mark.parametrize("driver, wheel, index", [("550.54.15", "2.13.0+cu128", f" --index-url {CU128}"),
                                                  ("580.95.05", "2.13.0", "")])
def test_the_checked_build_is_the_one_installed(tmp_path, driver, wheel, index):
    listing = f"torch (2.15.0)\nAvailable versions: 2.15.0, {wheel}, 2.12.0"
    code, out, calls = fake_setup(tmp_path, f'echo "{driver}, 8.0"', index=listing)
    assert code == 0, out
    assert pip_installs(calls) == [f"-m pip install torch=={wheel}{index}", "-m pip install -e .[dev,hf,gpu]"]
    assert not any("fa3_status" in call for call in calls)  # not a Hopper GPU: no FA3
    assert (tmp_path / "repo" / ".venv" / ".nanochat-installed").exists()


HOPPER_OK = dict(nvidia_smi='echo "580.95.05, 9.0"', index="torch (2.13.0)\nAvailable versions: 2.13.0")


def test_hopper_stops_without_fa3_unless_told_to_go_on(tmp_path):
    reason = "ModuleNotFoundError: No module named 'kernels'"
    code, out, _ = fake_setup(tmp_path / "a", **HOPPER_OK, fa3=reason)
    assert code == 1
    assert out.strip().splitlines()[-1] == (
        f"setup: FAILED: FA3 did not load on this Hopper GPU ({reason}), and training would run on the slower "
        "FlexAttention. Fix that, or go on without FA3: NANOCHAT_ALLOW_NO_FA3=1 bash <the same script>")
    code, out, _ = fake_setup(tmp_path / "b", **HOPPER_OK, fa3=reason, NANOCHAT_ALLOW_NO_FA3="1")
    assert code == 0 and f"setup: FA3 did not load ({reason}); going on without it" in out, out
    code, out, _ = fake_setup(tmp_path / "c", **HOPPER_OK)
    assert code == 0 and "setup: FA3 loaded" in out, out


def test_a_wandb_run_installs_wandb_and_needs_a_login(tmp_path):
    code, out, calls = fake_setup(tmp_path / "a", **HOPPER_OK, WANDB_RUN="speedrun")
    assert code == 0 and "-m pip install -e .[dev,hf,wandb,gpu]" in calls, out
    code, out, _ = fake_setup(tmp_path / "b", **HOPPER_OK, WANDB_RUN="speedrun", wandb_exit=1)
    assert code == 1 and "WANDB_RUN=speedrun logs to wandb, but this machine has no wandb API key" in out
    code, out, calls = fake_setup(tmp_path / "c", **HOPPER_OK, WANDB_RUN="speedrun", WANDB_MODE="offline", wandb_exit=1)
    assert code == 0 and not any("wandb.login" in call for call in calls), out
    code, out, calls = fake_setup(tmp_path / "d", **HOPPER_OK, WANDB_RUN="dummy")
    assert code == 0 and "-m pip install -e .[dev,hf,gpu]" in calls, out


# ------------------------------------------------------------------ a bare Ubuntu image: no python3-venv

DEBIAN_PYTHON = r"""#!/usr/bin/env bash
# python3 as Debian/Ubuntu ship it without python3-venv: `-m venv` stops halfway, leaving a venv without pip
if [ "$1 $2" = "-m venv" ] && [[ " $* " != *" --without-pip "* ]]; then
    "$REAL_PYTHON" -m venv --without-pip "${@: -1}"
    echo "The virtual environment was not created successfully because ensurepip is not available." >&2
    exit 1
fi
exec "$REAL_PYTHON" "$@"
"""


@pytest.mark.slow
def test_a_python_without_ensurepip_still_gets_a_venv_with_pip(tmp_path):
    import ensurepip
    from conftest import FileServer
    wheels = list((Path(ensurepip.__file__).parent / "_bundled").glob("pip-*-py3-none-any.whl"))
    if not wheels:
        pytest.skip("this Python bundles no pip wheel to serve")
    repo = tmp_path / "repo"
    (repo / "runs").mkdir(parents=True)
    (repo / "runs" / "setup.sh").write_text((REPO_ROOT / "runs" / "setup.sh").read_text())
    (repo / "pyproject.toml").write_text("")
    python = tmp_path / "python3"
    python.write_text(DEBIAN_PYTHON)
    python.chmod(0o755)
    # torch comes from an index with no build for this Python: setup stops there, after making the venv
    (tmp_path / "simple" / "torch").mkdir(parents=True)
    (tmp_path / "simple" / "torch" / "index.html").write_text('<a href="torch-2.13.0+cpu-cp27-cp27mu-linux_x86_64.whl">w</a>')
    page = f'<a href="{wheels[0].name}#sha256=0">{wheels[0].name}</a>'.encode()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "NANOCHAT_", "VIRTUAL_ENV"))}
    with FileServer({"": page, wheels[0].name: wheels[0].read_bytes()}) as server:
        result = subprocess.run(["bash", "runs/setup.sh"], cwd=repo, capture_output=True, text=True, timeout=300, env={
            **env, "PYTHON": str(python), "REAL_PYTHON": sys.executable, "PIP_INDEX_URL": server.url,
            "PIP_CONFIG_FILE": os.devnull, "NANOCHAT_TORCH_INDEX": (tmp_path / "simple").as_uri()})
    out = result.stdout + result.stderr
    assert f"no python3-venv?) -> a venv without pip, and pip's wheel from {server.url}" in out
    version = wheels[0].name.split("-")[1]
    pip = subprocess.run([repo / ".venv" / "bin" / "python", "-m", "pip", "--version"], capture_output=True, text=True)
    assert pip.returncode == 0 and pip.stdout.startswith(f"pip {version} from {repo / '.venv'}"), pip.stdout + pip.stderr
    assert result.returncode == 1 and "has no torch 2.13.0+cpu for Python" in out.strip().splitlines()[-1], out


# ------------------------------------------------------------------ FA3 after setup: the cache, not the hub

def test_fa3_loads_from_the_local_cache_and_asks_the_hub_only_when_it_is_not_there(monkeypatch):
    """setup.sh fetches FA3 once; every later load (8 ranks x every launch) must not depend on a network call."""
    from types import SimpleNamespace
    import huggingface_hub.constants as hub
    import nanochat.flash_attention as fa
    kernel = SimpleNamespace()
    for cached, user_offline, expected in ((True, False, [True]), (False, False, [True, False]), (False, True, [True])):
        calls = []

        def get_kernel(repo_id, version):
            calls.append(hub.HF_HUB_OFFLINE)  # what `kernels` sees: offline = cache only
            if hub.HF_HUB_OFFLINE and not cached:
                raise FileNotFoundError("not in the local cache")
            return kernel

        monkeypatch.setitem(sys.modules, "kernels", SimpleNamespace(get_kernel=get_kernel))
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", user_offline)
        if cached or not user_offline:
            assert fa._get_fa3_kernel() is kernel
        else:
            with pytest.raises(FileNotFoundError):
                fa._get_fa3_kernel()
        assert calls == expected and hub.HF_HUB_OFFLINE == user_offline

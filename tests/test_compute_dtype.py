"""
The device and dtype decisions of nanochat/common.py: the compute-dtype rule per machine, its override, the
peak-FLOPs table behind MFU, and the one-line errors and allocator setting of compute_init.
"""
import os
import subprocess
import sys

import pytest
import torch

from nanochat import common
from nanochat.common import compute_choice, get_compute_dtype, get_peak_flops

from conftest import REPO_ROOT


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a given machine: machine(cpu="AVX2", flags=[]) or machine(cuda=(9, 0))."""
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)

    def pretend(cpu="AVX512", flags=(), cuda=(9, 0)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cpu)
        monkeypatch.setattr(common, "cpu_bf16_flags", lambda: sorted(flags))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: cuda)
    return pretend


@pytest.mark.parametrize("cpu, flags, dtype, compile", [
    ("AVX512", ["avx512_bf16"], torch.bfloat16, True),  # Zen 4/5, Cooper Lake: native bf16 dot products
    ("AVX512", ["amx_bf16", "avx512_bf16"], torch.bfloat16, True),  # Sapphire Rapids and later
    ("AVX512", [], torch.float32, False),  # Skylake-X: bf16 only emulated, slower than fp32
    ("AVX2", [], torch.float32, False),  # bf16 matmuls ~100x slower than fp32
    ("AVX2", ["avx512_bf16"], torch.float32, False),  # torch would not use the instructions (AVX2 kernels)
])
def test_cpu_rule(machine, cpu, flags, dtype, compile):
    machine(cpu=cpu, flags=flags)
    choice = compute_choice("cpu")
    assert (choice.dtype, choice.orth_dtype, choice.compile) == (dtype, dtype, compile)
    assert cpu in choice.reason


@pytest.mark.parametrize("capability, dtype", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 0), torch.float32)])
def test_cuda_rule(machine, capability, dtype):
    machine(cuda=capability)
    choice = compute_choice("cuda")
    assert (choice.dtype, choice.orth_dtype, choice.compile) == (dtype, dtype, True)
    assert compute_choice("mps").dtype == torch.float32


def test_env_overrides_the_dtype_only(machine, monkeypatch):
    machine(cpu="AVX512", flags=["avx512_bf16"])
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    choice = compute_choice("cpu")
    assert choice.dtype == choice.orth_dtype == torch.float32  # an fp32 run is fp32 throughout
    assert not choice.compile  # compiling pays on a CPU only in bf16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    assert compute_choice("cuda").dtype == torch.float16 and compute_choice("cuda").orth_dtype == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    with pytest.raises(common.UserError, match="NANOCHAT_DTYPE='bf16' is not a compute dtype: use one of bfloat16"):
        get_compute_dtype("cpu")


def test_cpu_flags_are_read_from_cpuinfo():
    flags = common.cpu_bf16_flags()
    assert set(flags) <= {"avx512_bf16", "amx_bf16"}
    if os.path.exists("/proc/cpuinfo"):
        assert ("avx512_bf16" in flags) == (" avx512_bf16" in open("/proc/cpuinfo").read())


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),  # the NVL part is not the SXM one
    ("NVIDIA H800", 989e12), ("NVIDIA H800 PCIe", 756e12), ("NVIDIA H20", 148e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA B200", 2.25e15), ("NVIDIA GB200", 2.5e15), ("NVIDIA B300 SXM6 AC", 2.25e15),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA A10", 125e12),
    ("NVIDIA A30", 165e12), ("NVIDIA A40", 149.7e12),
    ("NVIDIA L4", 121e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12),  # L40 is not an L4, L40S not an L40
    ("NVIDIA RTX 6000 Ada Generation", 364e12), ("NVIDIA RTX A6000", 154.8e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
])
def test_peak_flops_exact_names_first(name, flops):
    assert get_peak_flops(name) == flops


@pytest.mark.parametrize("name", ["NVIDIA A10G", "Tesla V100-SXM2-32GB", "NVIDIA GeForce GTX 1080", "cpu"])
def test_unknown_device_reads_inf_not_a_neighbour(name):
    assert get_peak_flops(name) == float("inf")  # A10G is not an A10: no figure beats a wrong one


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
@pytest.mark.slow
def test_cuda_without_a_gpu_is_one_line():
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", "--device-type=cuda"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--device-type=cuda but torch" in lines[0] and "runs/setup.sh" in lines[0]


@pytest.mark.slow
def test_allocator_setting_before_cuda_starts():
    code = "import os; from nanochat.common import compute_init; compute_init('cpu'); print(os.environ['PYTORCH_ALLOC_CONF'])"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    for own_setting, expected in [(None, "expandable_segments:True"), ("max_split_size_mb:512", "max_split_size_mb:512")]:
        if own_setting:
            env["PYTORCH_ALLOC_CONF"] = own_setting  # a user's own setting is kept
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                timeout=120)
        assert result.stdout.strip().splitlines()[-1] == expected, result.stderr

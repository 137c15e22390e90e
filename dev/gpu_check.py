"""
The whole GPU verification in one call (dev/gpu_check.sh runs it), ending with a JSON summary:
  tests      the test files of the GPU path (GPU-only tests included)
  fa3        FA3 loaded or why not; every attention backend that serves CUDA against SDPA
  base_train 30 steps at d12 and d20, seq 2048, window patterns SSSL and L: tok/s, MFU, peak memory,
             graphs compiled, attention backend
  engine     d20 decoding, eager vs compiled step, batch 1 and 32: ms per step, CUDA-graph replays, greedy agreement
  optimizer  DistMuonAdamW over NCCL at world size 1 against MuonAdamW in one process
--cpu-dry-run runs the same parts on the CPU at tiny sizes (the test suite does this, so the script cannot rot);
--only runs some parts (a rerun of what failed, on a short device lease).
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TEST_FILES = ["tests/test_attention.py", "tests/test_gpt.py", "tests/test_optim.py", "tests/test_engine.py",
                  "tests/test_common.py"]
# (GPU, --cpu-dry-run): the sizes differ, the code paths do not
SIZES = {
    "depths": ([12, 20], [2]), "seq_len": (2048, 128), "steps": (30, 4), "device_batch": (32, 2),
    "vocab": (32768, 512), "tokenizer_chars": (20_000_000, 1_000_000),
    "decode_depth": (20, 2), "decode_batches": ([1, 32], [1, 2]), "prompt": (64, 8), "new_tokens": (64, 8),
    "optim_depth": (12, 2),
}


def run_tests(sizes, device):
    if device == "cpu":
        return {"skipped": "dry run (this check runs inside the test suite)"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TEST_FILES],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300).stdout
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|error)", out.splitlines()[-1])}
    return {**counts, "failures": re.findall(r"^FAILED (\S+)", out, re.M)}


def check_attention(sizes, device):
    """Each backend that can serve CUDA calls (FA3 when loaded, FlexAttention) against SDPA, forward and backward."""
    from nanochat import flash_attention as fa
    result = {"fa3_loaded": fa.HAS_FA3, "fa3_status": fa._fa3_status, "fa3_kernel": f"{fa.FA3_REPO} v{fa.FA3_VERSION}"}
    T = sizes["seq_len"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    # (FlexAttention has no backward on a CPU: the dry run compares outputs only)
    q, k, v = (torch.randn(2, T, 4, 64, device=device, dtype=dtype, generator=gen).requires_grad_(device == "cuda")
               for _ in range(3))

    def attend(backend, window):
        fa._override_impl = backend
        try:
            y = fa.flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window)
            grads = torch.autograd.grad(y.float().square().sum(), (q, k, v)) if y.requires_grad else []
        finally:
            fa._override_impl = None
        return [y, *grads]

    for backend in (["fa3"] if fa.HAS_FA3 else []) + ["flex"]:
        for window in [(-1, -1), (T // 2, 0)]:
            ours, ref = attend(backend, window), attend("sdpa", window)
            errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, ref)]
            result[f"{backend}_vs_sdpa_window{window[0]}"] = dict(zip(["out", "dq", "dk", "dv"], errors))
    return result


def train_tokenizer(sizes, env):
    subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--max-chars={sizes['tokenizer_chars']}",
                    f"--vocab-size={sizes['vocab']}"], cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)


# base_train in a child process that prints dynamo's counters when it is done: how many graphs were compiled
TRAIN_WITH_COUNTERS = ("import json, runpy, sys; from torch._dynamo.utils import counters; sys.argv[0] = 'base_train'; "
                       "runpy.run_module('scripts.base_train', run_name='__main__'); "
                       "print('DYNAMO ' + json.dumps({k: dict(v) for k, v in counters.items() if k in ('stats', 'graph_break')}))")


def check_base_train(sizes, device, env):
    results = {}
    T, B, steps = sizes["seq_len"], sizes["device_batch"], sizes["steps"]
    for depth in sizes["depths"]:
        for pattern in ("SSSL", "L"):
            args = [f"--depth={depth}", f"--max-seq-len={T}", f"--window-pattern={pattern}", f"--num-iterations={steps}",
                    f"--device-batch-size={B}", f"--total-batch-size={B * T}", "--eval-every=-1", f"--eval-tokens={B * T}",
                    "--core-metric-every=-1", "--sample-every=-1", f"--device-type={device}", f"--model-tag=check"]
            if device == "cpu":
                args += ["--head-dim=64", "--compile=0"]  # (compiling is covered by the test suite on CPU)
            started = time.time()
            proc = subprocess.run([sys.executable, "-c", TRAIN_WITH_COUNTERS, *args], cwd=REPO_ROOT, env=env,
                                  capture_output=True, text=True, timeout=600)
            shutil.rmtree(os.path.join(env["NANOCHAT_BASE_DIR"], "base_checkpoints"), ignore_errors=True)
            name = f"d{depth}_{pattern}"
            if proc.returncode != 0:
                results[name] = {"error": (proc.stdout + proc.stderr)[-2000:]}
                continue
            out = proc.stdout
            rows = re.findall(r"tok/sec ([\d,]+)(?: \| mfu ([\d.]+))?", out)  # (no mfu where the peak is unknown: CPUs)
            timed = rows[len(rows) // 3:]  # past compilation and warm-up
            mfus = sorted(float(m) for _, m in timed if m)
            dynamo = json.loads(re.search(r"^DYNAMO (.*)$", out, re.M).group(1))
            results[name] = {
                "tok_per_sec": sorted(int(t.replace(",", "")) for t, _ in timed)[len(timed) // 2],
                "mfu_percent": mfus[len(mfus) // 2] if mfus else None,
                "peak_memory_mib": int(re.search(r"Peak memory: (\d+) MiB", out).group(1)),
                "graphs_compiled": dynamo.get("stats", {}).get("unique_graphs", 0),
                "graph_breaks": sum(dynamo.get("graph_break", {}).values()),
                "backend": re.search(r"^(Attention backend: .*|WARNING: FA3 .*)$", out, re.M).group(1)[:160],
                "seconds": round(time.time() - started, 1),
            }
    return results


def check_engine(sizes, device):
    """Greedy decoding of a random model (blocks made non-trivial), eager against the compiled step."""
    from dev.bench_engine import NoTokenizer
    from nanochat.common import synchronize
    from nanochat.engine import Engine
    from nanochat.gpt import build_gpt, config_for_depth
    torch.manual_seed(0)
    config = config_for_depth(sizes["decode_depth"], sizes["vocab"], sizes["seq_len"],
                              head_dim=128 if device == "cuda" else 64)
    model = build_gpt(config, device).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # (zero at init: every block would be the identity)
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    prompt = torch.randint(0, config.vocab_size, (sizes["prompt"],), generator=torch.Generator().manual_seed(0)).tolist()
    new_tokens, results, streams = sizes["new_tokens"], {}, {}
    for compile in (False, True):
        engine = Engine(model, NoTokenizer(config.vocab_size), compile=compile)
        for batch in sizes["decode_batches"]:
            def generate():
                return [column for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0)]
            generate()  # warm-up (compiles the step)
            synchronize(device)
            started = time.perf_counter()
            streams[compile, batch] = generate()
            synchronize(device)
            elapsed = time.perf_counter() - started
            with torch.profiler.profile() as prof:  # a separate run: the profiler slows eager steps down
                generate()
            replays = sum(e.count for e in prof.key_averages() if "GraphLaunch" in e.key)
            results[f"{'compiled' if compile else 'eager'}_batch{batch}"] = {
                "ms_per_step": round(1000 * elapsed / new_tokens, 3), "cuda_graph_replays": replays}
    for batch in sizes["decode_batches"]:
        eager, compiled = streams[False, batch], streams[True, batch]
        same = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), len(eager))
        results[f"greedy_agreement_batch{batch}"] = f"{same}/{len(eager)} steps identical"
    return results


def check_optimizer(sizes, device):
    """DistMuonAdamW's collectives (NCCL on a GPU) at world size 1 must reproduce MuonAdamW exactly."""
    import torch.distributed as dist
    from nanochat.common import synchronize
    from nanochat.gpt import build_gpt, config_for_depth
    from nanochat.optim import DistMuonAdamW, MuonAdamW
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1, **({"device_id": torch.device("cuda", 0)} if device == "cuda" else {}))
    try:
        config = config_for_depth(sizes["optim_depth"], sizes["vocab"], sizes["seq_len"])
        models = [build_gpt(config, device) for _ in range(2)]
        models[1].load_state_dict(models[0].state_dict())
        optimizers = [DistMuonAdamW(models[0].setup_optimizer().param_groups), MuonAdamW(models[1].setup_optimizer().param_groups)]
        times = {0: [], 1: []}
        for step in range(4):
            gen = torch.Generator(device=device).manual_seed(step)
            grads = [torch.randn(p.shape, device=device, generator=gen).to(p.dtype) for p in models[0].parameters()]
            for i, (model, optimizer) in enumerate(zip(models, optimizers)):
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
                started = time.perf_counter()
                optimizer.step()
                synchronize(device)
                times[i].append(time.perf_counter() - started)
        max_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*(m.parameters() for m in models)))
        return {"backend": dist.get_backend(), "max_abs_diff": max_diff,
                "step_ms_dist": round(1000 * min(times[0][1:]), 2), "step_ms_single": round(1000 * min(times[1][1:]), 2)}
    finally:
        dist.destroy_process_group()


def has_error(result):
    return isinstance(result, dict) and ("error" in result or any(has_error(v) for v in result.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="the same checks on the CPU at tiny sizes")
    parser.add_argument("--only", type=str, default="tests,fa3,base_train,engine,optimizer", help="comma-separated parts")
    parser.add_argument("--data-dir", type=str, default="", help="data tree with pretrain/ shards (default: .whl/data, "
                        "else $NANOCHAT_DATA_DIR, else ../shared/data)")
    parser.add_argument("--json", type=str, default="", help="also write the summary to this file")
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible to torch; use --cpu-dry-run to check the script on a CPU")
    sizes = {name: gpu if device == "cuda" else cpu for name, (gpu, cpu) in SIZES.items()}
    if device == "cpu":
        os.environ.setdefault("NANOCHAT_DTYPE", "float32")  # quick on any CPU: no bf16 compiles in a dry run
    data_dir = args.data_dir or next(d for d in (os.path.join(REPO_ROOT, ".whl", "data"), os.environ.get("NANOCHAT_DATA_DIR"),
                                                 os.path.join(REPO_ROOT, "..", "shared", "data")) if d and os.path.isdir(d))
    base_dir = tempfile.mkdtemp(prefix="gpu_check_")
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "NANOCHAT_DATA_DIR": data_dir, "PYTHONUNBUFFERED": "1"}
    os.environ.update(NANOCHAT_BASE_DIR=base_dir, NANOCHAT_DATA_DIR=data_dir)

    from nanochat.common import compute_choice, get_device_name
    choice = compute_choice(device)
    summary = {"device": get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
               "compute": f"{choice.dtype} / orthogonalization {choice.orth_dtype} / compile {choice.compile}: {choice.reason}"}
    checks = {"tests": lambda: run_tests(sizes, device), "fa3": lambda: check_attention(sizes, device),
              "base_train": lambda: train_tokenizer(sizes, env) or check_base_train(sizes, device, env),
              "engine": lambda: check_engine(sizes, device), "optimizer": lambda: check_optimizer(sizes, device)}
    for name in args.only.split(","):
        started = time.time()
        try:
            summary[name] = checks[name]()
        except Exception as e:  # noqa: BLE001 - a failing check is a finding: report it and run the others
            summary[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        summary[name]["seconds"] = round(time.time() - started, 1)
        print(f"gpu_check: {name} done in {summary[name]['seconds']} s", flush=True)
        if args.json:  # after every part: a run stopped at its time limit keeps what it measured
            with open(args.json, "w") as f:
                f.write(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(base_dir, ignore_errors=True)
    print(json.dumps(summary, indent=1))
    failed = [name for name in args.only.split(",") if has_error(summary[name]) or summary[name].get("failed")]
    sys.exit(f"gpu_check: problems in {', '.join(failed)}" if failed else 0)


if __name__ == "__main__":
    main()

"""
The GPU verification, sized for a short lease of one H100/H200 with no network (dev/gpu_check.sh runs it).
Each part runs in a process of its own and, the moment it ends, appends one JSON line to --json and prints it
(`GPU_CHECK {...}`): a command stopped at its time limit keeps every part that finished. --time-limit skips a
part that would not fit in the time left (its line says so: rerun it with --only).

part        default  budget  measures
env         yes       15 s   GPU, driver, Python, torch, compute dtype; FA3: loaded, or "not available offline"
train_bf16  yes      100 s   base_train d20 SSSL, seq 2048, 16 rows, 20 steps: tok/s, MFU, peak memory, graphs, recompiles
train_fp8   yes       90 s   the same with --fp8: tok/s against train_bf16
attention   yes       50 s   each CUDA backend (FA3 when loaded, FlexAttention) against SDPA, fwd+bwd; their fwd+bwd ms
decode      yes       70 s   d20 decoding, eager vs compiled step (CUDA graphs), batch 1 and 32: ms/step, greedy agreement
tests_fp8   yes       60 s   tests/test_fp8.py
train_L     no       100 s   base_train d20 with window pattern L (all layers full): SSSL should be no slower
train_d12   no        80 s   base_train d12: tok/s, MFU, one graph per shape
tests       no       200 s   the CUDA tests: tests/test_attention.py and the cuda cases of test_engine/optim/dataloader
optimizer   no        30 s   DistMuonAdamW over NCCL at world size 1 against MuonAdamW
The default set adds up to 385 s (<= 7 minutes with start-up); the rest to 410 s, a second call.

Budgets are estimates for one H100, cold (no compile cache), never yet measured. A training part: the model's
and optimizer's cold compiles (~60 s, the larger share; guessed from compiles of this size elsewhere) + start-up
and the data loader (~15 s; the --cpu-dry-run's process start, import and first batch take ~10 s on a 2-core
CPU) + 20 steps x 2.9e9 FLOPs/token (d20) x 32,768 tokens at 40% of 989 TFLOP/s = 5 s. train_fp8 reuses the
optimizer's compiled graphs from the inductor cache. Decode compiles one CUDA-graph step per batch size.
All figures are FlexAttention's unless env says FA3 loaded: this machine cannot fetch FA3 from the hub.

--cpu-dry-run runs every part on the CPU at tiny sizes (the test suite does this, so the script cannot rot);
the tests parts only collect there, and --fp8 stops at its CPU check.
"""

import argparse
import glob
import json
import logging
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRIED = os.path.join(REPO_ROOT, ".whl")  # what dev/gpu_check_prepare.sh built: wheels, tokenizer/

# name -> (budget in seconds on one H100, in the default set, what runs it)
PARTS = {
    "env": (15, True, "child"), "train_bf16": (100, True, "child"), "train_fp8": (90, True, "child"),
    "attention": (50, True, "child"), "decode": (70, True, "child"), "tests_fp8": (60, True, "pytest"),
    "train_L": (100, False, "child"), "train_d12": (80, False, "child"), "tests": (200, False, "pytest"),
    "optimizer": (30, False, "child"),
}
TRAIN_RUNS = {  # part -> (depth, window pattern, fp8)
    "train_bf16": (20, "SSSL", False), "train_fp8": (20, "SSSL", True), "train_L": (20, "L", False), "train_d12": (12, "SSSL", False),
}
TEST_SELECTIONS = {  # part -> pytest arguments: every test that touches CUDA
    "tests_fp8": ["tests/test_fp8.py"],
    "tests": ["tests/test_attention.py", "tests/test_engine.py", "tests/test_optim.py", "tests/test_dataloader.py",
              "-k", "test_attention or cuda"],
}
# (GPU, --cpu-dry-run): the sizes differ, the code paths do not
SIZES = {
    # 16 rows as the speedrun at d24: 32 might not fit d20 next to its state on 80 GB (~2.4 GiB per row eager, dev/LOG.md)
    "seq_len": (2048, 128), "rows": (16, 2), "steps": (20, 5), "timed_from_step": (5, 2), "vocab": (32768, 512),
    "tokenizer_chars": (20_000_000, 1_000_000), "attention_shape": ((8, 10, 128), (1, 2, 64)), "window": (512, 32),
    "attention_iters": (20, 2), "decode_depth": (20, 2), "decode_batches": ([1, 32], [2]), "prompt": (64, 8),
    "new_tokens": (64, 8), "optim_depth": (12, 2),
}


def result_line(result):
    print("GPU_CHECK_RESULT " + json.dumps(result), flush=True)


class RecompileCounter(logging.Handler):
    """Counts torch.compile's recompilations (its `recompiles` log) and keeps the first reasons."""

    def __init__(self):
        super().__init__()
        import torch
        torch._logging.set_logs(recompiles=True)
        self.logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        self.logger.addHandler(self)
        self.events = []  # (tag given by the caller at the time, first line of the reason)
        self.tag = None

    def emit(self, record):
        message = record.getMessage()
        if "Recompiling function" in message:
            self.events.append((self.tag, " ".join(message.split())[:200]))

    def summary(self):
        import torch._dynamo.utils as dynamo
        return {"graphs_compiled": dynamo.counters["stats"].get("unique_graphs", 0),
                "graph_breaks": sum(dynamo.counters["graph_break"].values()),
                "recompiles": len(self.events), "recompile_reasons": [reason for _, reason in self.events[:3]]}


# -----------------------------------------------------------------------------
# The parts, each in its own process (python -m dev.gpu_check --part NAME)

def part_env(sizes, device):
    import platform
    import torch
    from nanochat import flash_attention as fa
    from nanochat.common import compute_choice, get_device_name, get_peak_flops
    choice = compute_choice(device)
    result = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "device": get_device_name(device),
              "compute": f"{choice.dtype} / orthogonalization {choice.orth_dtype} / compile {choice.compile}: {choice.reason}"}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        result.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                      driver=smi.stdout.strip(), peak_bf16_tflops=get_peak_flops(result["device"]) / 1e12)
    status = fa.fa3_status()
    hopper = device == "cuda" and torch.cuda.get_device_capability()[0] == 9
    if status == "loaded":
        result["fa3"] = "loaded"
    elif hopper:  # the FA3 kernels come from the Hugging Face hub, which a lent device cannot reach
        result["fa3"] = "not available offline"
        result["fa3_detail"] = f"{status}; every attention figure in this run is FlexAttention's, not FA3's"
    else:
        result["fa3"] = f"not used here: {status}"
    return result


def part_train(sizes, device, part):
    """base_train in this process with no final checkpoint and no final evaluation (neither is measured here)."""
    import torch
    import nanochat.loss_eval
    import nanochat.run
    depth, pattern, fp8 = TRAIN_RUNS[part]
    if device == "cpu":
        depth = 2
    T, rows, steps = sizes["seq_len"], sizes["rows"], sizes["steps"]
    args = [f"--depth={depth}", f"--max-seq-len={T}", f"--window-pattern={pattern}", f"--num-iterations={steps}",
            f"--device-batch-size={rows}", f"--total-batch-size={rows * T}", "--eval-every=-1", "--core-metric-every=-1",
            "--sample-every=-1", f"--device-type={device}", "--model-tag=gpu_check"] + (["--fp8"] if fp8 else [])
    if device == "cpu":
        args += ["--head-dim=64", "--compile=0"]  # (compiling is covered by the test suite on CPU)
    nanochat.run.Run.save = lambda *a, **k: None  # a d20 checkpoint is 9 GB of disk writes
    nanochat.loss_eval.evaluate_bpb = lambda *a, **k: float("nan")  # the final eval would compile another graph
    lines, counter = [], RecompileCounter()

    class Tee:  # base_train's output, kept to read its figures, and shown as it goes
        def write(self, text):
            sys.__stdout__.write(text)
            for line in text.splitlines():
                lines.append(line)
                step = re.match(r"step (\d+)/", line)
                if step:
                    counter.tag = int(step.group(1))  # recompiles after this line happen in step tag + 1
            return len(text)

        def flush(self):
            sys.__stdout__.flush()

    sys.argv, sys.stdout = ["base_train", *args], Tee()
    try:
        runpy.run_module("scripts.base_train", run_name="__main__")
    except SystemExit as e:
        if fp8 and device == "cpu" and "--fp8 needs" in str(e):
            return {"skipped": str(e)}  # the dry run: the flags parse, and --fp8 refuses a CPU
        raise
    finally:
        sys.stdout = sys.__stdout__
    out = "\n".join(lines)
    rows_seen = [(int(s), int(t.replace(",", "")), float(m) if m else None)  # (no mfu where the peak is unknown: CPUs)
                 for s, t, m in re.findall(r"step (\d+)/\d+ .*? tok/sec ([\d,]+)(?: \| mfu ([\d.]+))?", out)]
    timed = [(t, m) for s, t, m in rows_seen if s > sizes["timed_from_step"]]  # past compilation and warm-up
    median = lambda values: sorted(values)[len(values) // 2]
    summary = counter.summary()
    backend = re.search(r"^(Attention backend: .*|WARNING: FA3 .*)$", out, re.M)
    return {"depth": depth, "window_pattern": pattern, "fp8": fp8, "rows": rows, "seq_len": T,
            "tok_per_sec": median([t for t, _ in timed]),
            "mfu_percent": median([m for _, m in timed]) if all(m is not None for _, m in timed) else None,
            "peak_memory_mib": int(re.search(r"Peak memory: (\d+) MiB", out).group(1)),
            "graphs_compiled": summary["graphs_compiled"], "graph_breaks": summary["graph_breaks"],
            "recompiles_after_step_1": sum(1 for tag, _ in counter.events if tag is not None and tag >= 1),
            "recompiles": summary["recompiles"], "recompile_reasons": summary["recompile_reasons"],
            "attention": backend.group(1)[:160] if backend else "?"}


def part_attention(sizes, device):
    """Each backend that serves CUDA training (FA3 when loaded, FlexAttention) against SDPA: outputs and
    gradients, and the fwd+bwd time of each at a sliding window and at full causal attention."""
    import torch
    from nanochat import flash_attention as fa
    from nanochat.common import synchronize
    counter = RecompileCounter()
    B, H, D = sizes["attention_shape"]
    T, W = sizes["seq_len"], sizes["window"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    # (FlexAttention has no backward on a CPU: the dry run compares outputs only)
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, generator=gen).requires_grad_(device == "cuda")
               for _ in range(3))
    windows = {"full": (-1, -1), f"window{W}": (W, 0)}
    fa.prepare(device, T, list(windows.values()))  # the block masks, built eagerly as the model does

    def attend(backend, window):
        fa._override_impl = backend
        try:
            if backend == "flex" and device == "cuda":  # fast only inside compiled code, as in the model (eager on a CPU)
                return torch.compile(lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True, window_size=window))(q, k, v)
            return fa.flash_attn_func(q, k, v, causal=True, window_size=window)
        finally:
            fa._override_impl = None

    def outputs(backend, window):
        y = attend(backend, window)
        return [y, *(torch.autograd.grad(y.float().square().sum(), (q, k, v)) if y.requires_grad else [])]

    def ms_per_fwd_bwd(backend, window):
        for _ in range(2):  # warm-up (compiles)
            outputs(backend, window)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(sizes["attention_iters"]):
            outputs(backend, window)
        synchronize(device)
        return round(1000 * (time.perf_counter() - started) / sizes["attention_iters"], 3)

    result = {"shape_btdh": [B, T, H, D], "fa3_loaded": fa.HAS_FA3}
    for backend in (["fa3"] if fa.HAS_FA3 else []) + ["flex"]:
        for name, window in windows.items():
            ours, ref = outputs(backend, window), outputs("sdpa", window)
            errors = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, ref)]
            result[f"{backend}_vs_sdpa_{name}"] = dict(zip(["out", "dq", "dk", "dv"], errors))
    for backend in (["fa3"] if fa.HAS_FA3 else []) + ["flex", "sdpa"]:
        for name, window in windows.items():
            result[f"{backend}_{name}_ms"] = ms_per_fwd_bwd(backend, window)
    return {**result, **counter.summary()}


def part_decode(sizes, device):
    """Greedy decoding of a random model (blocks made non-trivial), eager against the compiled step."""
    import torch
    from dev.bench_engine import NoTokenizer
    from nanochat.common import synchronize
    from nanochat.engine import Engine
    from nanochat.gpt import build_gpt, config_for_depth
    counter = RecompileCounter()
    torch.manual_seed(0)
    config = config_for_depth(sizes["decode_depth"], sizes["vocab"], sizes["seq_len"], head_dim=128 if device == "cuda" else 64)
    model = build_gpt(config, device).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # (zero at init: every block would be the identity)
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    prompt = torch.randint(0, config.vocab_size, (sizes["prompt"],), generator=torch.Generator().manual_seed(0)).tolist()
    new_tokens, results, streams = sizes["new_tokens"], {"depth": sizes["decode_depth"]}, {}
    for compiled in (False, True):
        engine = Engine(model, NoTokenizer(config.vocab_size), compile=compiled)
        for batch in sizes["decode_batches"]:
            def generate():
                return [column for column, _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0)]
            counter.tag = f"warm-up {batch}"
            generate()  # warm-up (compiles the step)
            counter.tag = f"timed {batch}"
            synchronize(device)
            started = time.perf_counter()
            streams[compiled, batch] = generate()
            synchronize(device)
            elapsed = time.perf_counter() - started
            with torch.profiler.profile() as prof:  # a separate run: the profiler slows eager steps down
                generate()
            replays = sum(e.count for e in prof.key_averages() if "GraphLaunch" in e.key)
            results[f"{'compiled' if compiled else 'eager'}_batch{batch}"] = {
                "ms_per_step": round(1000 * elapsed / new_tokens, 3), "cuda_graph_replays": replays}
    for batch in sizes["decode_batches"]:
        eager, compiled = streams[False, batch], streams[True, batch]
        same = next((i for i, (a, b) in enumerate(zip(eager, compiled)) if a != b), len(eager))
        results[f"greedy_agreement_batch{batch}"] = f"{same}/{len(eager)} steps identical"
    results["recompiles_in_timed_runs"] = sum(1 for tag, _ in counter.events if str(tag).startswith("timed"))
    return {**results, **counter.summary()}


def part_optimizer(sizes, device):
    """DistMuonAdamW's collectives (NCCL on a GPU) at world size 1 must reproduce MuonAdamW exactly."""
    import torch
    import torch.distributed as dist
    from nanochat.common import synchronize
    from nanochat.gpt import build_gpt, config_for_depth
    from nanochat.optim import DistMuonAdamW, MuonAdamW
    counter = RecompileCounter()
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
        return {"backend": dist.get_backend(), "max_abs_diff": max_diff, "step_ms_dist": round(1000 * min(times[0][1:]), 2),
                "step_ms_single": round(1000 * min(times[1][1:]), 2), **counter.summary()}
    finally:
        dist.destroy_process_group()


def run_part(name, device):
    """The child: one part, its result as the last line."""
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU visible to torch; --cpu-dry-run checks the script on a CPU")
    sizes = {key: gpu if device == "cuda" else cpu for key, (gpu, cpu) in SIZES.items()}
    if name in TRAIN_RUNS:
        result = part_train(sizes, device, name)
    else:
        result = {"env": part_env, "attention": part_attention, "decode": part_decode, "optimizer": part_optimizer}[name](sizes, device)
    result_line(result)


# -----------------------------------------------------------------------------
# The parent: prepares, runs each part with its budget, writes a JSON line per part

def carried_site(python_tag):
    """Unpack the carried wheels this Python can use (.whl/*-cpXY-*.whl, pure-Python ones) into a folder for
    PYTHONPATH; None when there are none. Unpacking (a wheel is a zip) needs no pip and no network."""
    wheels = [w for w in glob.glob(os.path.join(CARRIED, "*.whl"))
              if f"-{python_tag}-" in os.path.basename(w) or "-py3-none-any" in w or "-abi3-" in w]
    if not wheels:
        return None
    site = tempfile.mkdtemp(prefix="gpu_check_site_")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(site)
    return site


def prepare_tokenizer(base_dir, device, env):
    """The tokenizer base_train reads: the one gpu_check_prepare.sh trained, else trained now."""
    prepared = os.path.join(CARRIED, "tokenizer")
    target = os.path.join(base_dir, "tokenizer")
    vocab, chars = (SIZES["vocab"][device == "cpu"], SIZES["tokenizer_chars"][device == "cpu"])
    if device == "cuda" and os.path.isfile(os.path.join(prepared, "tokenizer.pkl")):
        shutil.copytree(prepared, target)
        return "prepared"
    subprocess.run([sys.executable, "-m", "scripts.tok_train", f"--max-chars={chars}", f"--vocab-size={vocab}"],
                   cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=600)
    return f"trained here (vocab {vocab}, {chars:,} chars)"


def pytest_result(name, output, dry_run):
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|selected|deselected|xfailed)\b",
                                                       "\n".join(output.splitlines()[-3:]))}
    if dry_run:
        collected = len(re.findall(r"^tests/\S+::\S+", output, re.M))
        return {"collected": collected, "note": "dry run: collected only"} if collected else {"error": output[-2000:]}
    result = {**counts, "failures": re.findall(r"^FAILED (\S+)", output, re.M),
              "recompiles": output.count("Recompiling function")}
    if not counts or counts.get("failed") or counts.get("error") or counts.get("errors"):
        result["error"] = "tests failed" if counts else output[-2000:]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="every part on the CPU at tiny sizes")
    parser.add_argument("--only", type=str, default="", help="comma-separated parts (default: the default set; 'all': every part)")
    parser.add_argument("--time-limit", type=float, default=0, help="seconds this run may take; a part whose budget no longer "
                        "fits is skipped (0 = no limit)")
    parser.add_argument("--data-dir", type=str, default=os.path.join(REPO_ROOT, "data"), help="data tree with pretrain/ shards")
    parser.add_argument("--json", type=str, default="", help="append one JSON line per part to this file")
    parser.add_argument("--log", type=str, default="", help="append every part's output to this file")
    parser.add_argument("--part", type=str, default="", help=argparse.SUPPRESS)  # (the child's side)
    args = parser.parse_args()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cpu":
        os.environ.setdefault("NANOCHAT_DTYPE", "float32")  # quick on any CPU: no bf16 matmuls in a dry run
    if args.part:
        return run_part(args.part, device)

    started = time.time()
    names = [n for n, (_, default, _) in PARTS.items() if default] if not args.only else \
        list(PARTS) if args.only == "all" else args.only.split(",")
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts: {', '.join(PARTS)}")
    base_dir = tempfile.mkdtemp(prefix="gpu_check_")
    env = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "NANOCHAT_DATA_DIR": args.data_dir, "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1"}  # (no network: `kernels`, if present, reads only its cache)
    site = carried_site(f"cp{sys.version_info[0]}{sys.version_info[1]}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, site, os.environ.get("PYTHONPATH")) if p)
    log_path = args.log or tempfile.mkstemp(prefix="gpu_check_", suffix=".log")[1]
    log = open(log_path, "a")
    tokenizer = None
    results = []

    def report(result):
        results.append(result)
        line = json.dumps(result)
        print("GPU_CHECK " + line, flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(line + "\n")

    for name in names:
        budget, _, kind = PARTS[name]
        left = args.time_limit - (time.time() - started) if args.time_limit else float("inf")
        if left < budget:
            report({"part": name, "status": "skipped", "budget_s": budget,
                    "reason": f"{left:.0f} s left of --time-limit, budget {budget} s: rerun with --only {name}"})
            continue
        part_started = time.time()
        if name in TRAIN_RUNS and tokenizer is None:
            tokenizer = prepare_tokenizer(base_dir, device, env)
        if kind == "pytest":
            command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TEST_SELECTIONS[name]]
            command += ["--collect-only"] if device == "cpu" else []
        else:
            command = [sys.executable, "-m", "dev.gpu_check", "--part", name]
            command += ["--cpu-dry-run"] if device == "cpu" else []
        log.write(f"\n===== {name}: {' '.join(command)}\n")
        log.flush()
        with tempfile.TemporaryFile("w+") as output:
            child = subprocess.Popen(command, cwd=REPO_ROOT, env={**env, "TORCH_LOGS": "recompiles"} if kind == "pytest" else env,
                                     stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            timeout = min(max(2 * budget, budget + 60), left) if device == "cuda" else 900
            try:
                child.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)  # with its compile workers
                child.wait()
                timed_out = True
            output.seek(0)
            text = output.read()
        log.write(text)
        log.flush()
        if kind == "pytest":
            result = pytest_result(name, text, device == "cpu")
        else:
            found = re.findall(r"^GPU_CHECK_RESULT (.*)$", text, re.M)
            result = json.loads(found[-1]) if found else {"error": text[-2000:] or f"exit code {child.returncode}"}
        if timed_out:
            result = {"error": f"stopped after {timeout:.0f} s (budget {budget} s); its output is in the log", **result}
        if name == "train_fp8" and "tok_per_sec" in result:
            bf16 = next((r for r in results if r.get("part") == "train_bf16" and "tok_per_sec" in r), None)
            if bf16:
                result["speedup_vs_bf16"] = round(result["tok_per_sec"] / bf16["tok_per_sec"], 3)
        status = "error" if "error" in result else "skipped" if "skipped" in result else "ok"
        report({"part": name, "status": status, "seconds": round(time.time() - part_started, 1), "budget_s": budget,
                **({"tokenizer": tokenizer} if name in TRAIN_RUNS else {}), **result})
    log.close()
    shutil.rmtree(base_dir, ignore_errors=True)
    if site:
        shutil.rmtree(site, ignore_errors=True)
    print(f"gpu_check: {len(results)} parts in {time.time() - started:.0f} s: " +
          ", ".join(f"{r['part']} {r['status']} ({r.get('seconds', 0):.0f}/{r['budget_s']} s)" for r in results) +
          f"; log: {log_path}")
    failed = [r["part"] for r in results if r["status"] == "error"]
    sys.exit(f"gpu_check: problems in {', '.join(failed)} (details: the JSON lines and the log)" if failed else 0)


if __name__ == "__main__":
    main()

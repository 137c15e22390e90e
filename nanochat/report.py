"""
The run report: every stage logs a section, `python -m nanochat.report generate` assembles report.md.

  python -m nanochat.report reset      # at the start of a run: environment header, old sections removed
  python -m nanochat.report generate   # at the end: report.md (+ a copy in the current dir) and plots

Everything lives in base_dir/report/: header.md/.json, one <section>.md (readable) and <section>.json
(the same data, for the summary table and the plots) per stage, report.md and the curve PNGs.
A stage logs with get_report().log(section="Base model training", data=[{...}, "text", ...], curve=[...]);
the optional curve (points {step, train_loss and/or val_bpb, time (seconds of training)}) is plotted.
"""

import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time

import torch

from nanochat.common import atomic_write, get_base_dir, get_dist_info

# Pipeline order of the sections in report.md (sections with other names follow, in logging order).
SECTION_ORDER = [
    "Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss", "Base model evaluation",
    "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl",
]
# Summary table: which section feeds each column, and the metrics (matched as a key prefix) of each row.
SUMMARY_COLUMNS = {"BASE": "Base model evaluation", "SFT": "Chat evaluation sft", "RL": "Chat evaluation rl"}
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
# Rough on-demand cloud prices (USD per GPU-hour, late 2025); the report states the one it used.
GPU_HOURLY_USD = [("H100", 3.0), ("H200", 3.5), ("B200", 5.0), ("A100", 1.8)]
DEFAULT_GPU_HOURLY_USD = 2.0


def slugify(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def to_jsonable(value):
    """Tensors and numpy scalars become plain numbers; anything else unknown becomes its str()."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def format_value(value):
    """Compact: 4 significant digits for floats, thousands separators for ints."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def section_markdown(section, data, timestamp, curve):
    lines = [f"## {section}", f"timestamp: {datetime.datetime.fromtimestamp(timestamp):%Y-%m-%d %H:%M:%S}", ""]
    for item in data:
        if isinstance(item, dict):
            lines += [f"- {key}: {format_value(value)}" for key, value in item.items()]
        else:
            lines.append(str(item))
        lines.append("")
    if curve:
        lines += [f"Training curve: {len(curve)} points (plotted in the summary)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The environment header

def run_command(args):
    """stdout of a command run in the repo (git then describes the code that ran), '' if it fails."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info():
    commit = run_command(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = bool(run_command(["git", "status", "--porcelain", "--untracked-files=no"]))
    gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {
        "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        "start_time": time.time(),
        "git_commit": commit + (" (uncommitted changes)" if dirty else ""),
        "git_branch": run_command(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown",
        "hostname": socket.gethostname(),
        "gpu_name": torch.cuda.get_device_name(0) if gpu_count else "none",
        "gpu_count": gpu_count,
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def header_markdown(env):
    rows = "\n".join(f"- {key}: {format_value(value)}" for key, value in env.items() if key != "start_time")
    return f"# nanochat training report\n\nGenerated from the sections each stage logged.\n\n## Environment\n\n{rows}\n"


# ---------------------------------------------------------------------------------------------------
# Summary table, cost and plots

def find_metric(data, metric):
    """(key, value) of the first logged key that names `metric` (e.g. 'CORE (18/22 tasks)' for 'CORE')."""
    for item in data:
        if isinstance(item, dict):
            for key, value in item.items():
                if key.lower().startswith(metric.lower()) and isinstance(value, (int, float)):
                    return key, value
    return None, None


def summary_table(sections):
    """Markdown table: metrics down, stages across, '-' where a stage did not report a metric."""
    lines = ["| Metric | " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * (len(SUMMARY_COLUMNS) + 1)]
    for metric in SUMMARY_METRICS:
        name, cells = metric, []
        for section in SUMMARY_COLUMNS.values():
            key, value = find_metric(sections.get(section, {}).get("data", []), metric)
            cells.append("-" if value is None else f"{value:.4f}")
            if key and key.endswith(")"):  # keep a partial score's label, e.g. 'CORE (18/22 tasks)'
                name = key
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_estimate(env, wall_clock_s):
    """Markdown lines: total wall clock and an estimated cost from GPU-hours at a stated hourly price."""
    lines = [f"- Total wall clock time: {wall_clock_s / 3600:.2f} h ({wall_clock_s:.0f} s, from reset to the last section)"]
    if not env.get("gpu_count"):
        lines.append("- Cost estimate: no GPU (CPU run)")
        return lines
    price = next((usd for name, usd in GPU_HOURLY_USD if name in env["gpu_name"]), DEFAULT_GPU_HOURLY_USD)
    gpu_hours = env["gpu_count"] * wall_clock_s / 3600
    lines.append(f"- Cost estimate: {gpu_hours:.2f} GPU-hours x ${price:.2f}/GPU-hour (assumed on-demand price for "
                 f"{env['gpu_name']}) = ${gpu_hours * price:.2f}")
    return lines


def plot_curves(section, curve, out_path):
    """Every metric of the curve (train_loss, val_bpb, reward, ...) against step and against wall-clock time."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    metrics = list(dict.fromkeys(key for p in curve for key in p if key not in ("step", "time")))
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.5 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        points = [p for p in curve if p.get(metric) is not None]
        for col, x_key in enumerate(["step", "time"]):
            ax = axes[row][col]
            ax.plot([p.get(x_key, 0) / (60 if x_key == "time" else 1) for p in points], [p[metric] for p in points])
            ax.set_xlabel("step" if x_key == "step" else "training time (min)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    fig.suptitle(section)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------

class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir
        os.makedirs(report_dir, exist_ok=True)

    def log(self, section, data, curve=None):
        """Write (or replace, when a stage re-runs) the section: markdown to read, json to summarize and plot."""
        timestamp = time.time()
        data, curve = to_jsonable(list(data)), to_jsonable(list(curve or []))
        slug = slugify(section)  # each file whole or not at all: a stage killed while logging leaves the old section
        markdown = section_markdown(section, data, timestamp, curve).encode("utf-8")
        payload = json.dumps({"section": section, "timestamp": timestamp, "data": data, "curve": curve}, indent=1)
        atomic_write(os.path.join(self.report_dir, f"{slug}.md"), lambda f: f.write(markdown))
        atomic_write(os.path.join(self.report_dir, f"{slug}.json"), lambda f: f.write(payload.encode("utf-8")))
        return os.path.join(self.report_dir, f"{slug}.md")

    def reset(self):
        """Start a new run: remove the old sections and report, write the environment header."""
        for name in os.listdir(self.report_dir):
            if name.endswith((".md", ".json", ".png")):
                os.remove(os.path.join(self.report_dir, name))
        env = environment_info()
        with open(os.path.join(self.report_dir, "header.md"), "w", encoding="utf-8") as f:
            f.write(header_markdown(env))
        with open(os.path.join(self.report_dir, "header.json"), "w", encoding="utf-8") as f:
            json.dump(env, f, indent=1)
        print(f"Reset report in {self.report_dir}")

    def load_sections(self):
        """section name -> {"section", "timestamp", "data"} for every logged section."""
        sections = {}
        for name in os.listdir(self.report_dir):
            if name.endswith(".json") and name != "header.json":
                with open(os.path.join(self.report_dir, name), encoding="utf-8") as f:
                    entry = json.load(f)
                sections[entry["section"]] = entry
        return sections

    def generate(self):
        """Assemble report.md (header, sections in pipeline order, summary, plots); also copy it to the cwd."""
        header_path = os.path.join(self.report_dir, "header.json")
        env = {}
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                env = json.load(f)
        sections = self.load_sections()
        ordered = [s for s in SECTION_ORDER if s in sections]
        ordered += sorted(set(sections) - set(ordered), key=lambda s: sections[s]["timestamp"])

        parts = []
        if os.path.exists(os.path.join(self.report_dir, "header.md")):
            with open(os.path.join(self.report_dir, "header.md"), encoding="utf-8") as f:
                parts.append(f.read())
        else:
            parts.append("# nanochat training report\n\n(no header: run `python -m nanochat.report reset` at the start)\n")
        for section in ordered:
            with open(os.path.join(self.report_dir, f"{slugify(section)}.md"), encoding="utf-8") as f:
                parts.append(f.read())

        summary = ["## Summary", "", summary_table(sections), ""]
        if sections and "start_time" in env:
            wall_clock_s = max(entry["timestamp"] for entry in sections.values()) - env["start_time"]
            summary += cost_estimate(env, wall_clock_s) + [""]
        for section in ordered:
            if sections[section].get("curve"):
                png_name = f"{slugify(section)}-curves.png"
                plot_curves(section, sections[section]["curve"], os.path.join(self.report_dir, png_name))
                summary += [f"![{section} curves]({png_name})", ""]
        parts.append("\n".join(summary))

        report_path = os.path.join(self.report_dir, "report.md")
        with open(report_path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(parts))
        shutil.copyfile(report_path, "report.md")
        print(f"Generated {report_path} (copied to ./report.md)")
        return report_path


class DummyReport:
    """What ranks other than 0 get: logging is a no-op."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass

    def generate(self, *args, **kwargs):
        pass


def get_report():
    _, rank, _, _ = get_dist_info()
    return Report(os.path.join(get_base_dir(), "report")) if rank == 0 else DummyReport()


if __name__ == "__main__":
    commands = {"reset": lambda: get_report().reset(), "generate": lambda: get_report().generate()}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit("usage: python -m nanochat.report reset|generate")
    commands[sys.argv[1]]()

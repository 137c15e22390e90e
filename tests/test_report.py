"""The run report: sections in pipeline order, the summary table, curves, cost, reset and non-zero ranks."""
import json

import pytest

from nanochat import report as report_module
from nanochat.report import DummyReport, Report, get_report


@pytest.fixture
def report(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # generate copies report.md to the current dir
    return get_report()


def log_pipeline(report):
    """What a run's stages log, deliberately out of pipeline order."""
    report.log(section="Chat evaluation sft", data=[{"ARC-Easy": 0.3125, "MMLU": 0.27, "ChatCORE (first 50 problems per task)": 0.051}])
    report.log(section="Base model evaluation", data=[{"Step": 300, "CORE (18/22 tasks)": 0.1234},
                                                      {"arc_easy": "accuracy 0.4000, centered +0.2000"}])
    curve = [{"step": s, "train_loss": 9.0 - s / 100, "time": 2.0 * s} for s in range(1, 301)]
    curve += [{"step": s, "val_bpb": 3.5 - s / 300, "time": 2.0 * s} for s in (0, 100, 200, 300)]
    report.log(section="Base model training", data=[{"depth": 4, "lr": 0.02}, {"Minimum validation bpb": 2.5}], curve=curve)
    report.log(section="Tokenizer training", data=["Trained on local shards.", {"vocab_size": 8192, "train_time": 12.25}])
    report.log(section="Chat evaluation rl", data=[{"ARC-Easy": 0.25, "GSM8K": 0.0}])


def test_generate_assembles_sections_summary_and_plots(report, base_dir, tmp_path):
    report.reset()
    log_pipeline(report)
    report.generate()
    text = (base_dir / "report" / "report.md").read_text()
    assert (tmp_path / "report.md").read_text() == text

    order = ["# nanochat training report", "## Tokenizer training", "## Base model training", "## Base model evaluation",
             "## Chat evaluation sft", "## Chat evaluation rl", "## Summary"]
    positions = [text.index(heading) for heading in order]
    assert positions == sorted(positions)
    assert "- vocab_size: 8,192" in text and "- train_time: 12.25" in text and "Trained on local shards." in text
    assert "- lr: 0.02" in text and "Training curve: 304 points" in text

    assert "| Metric | BASE | SFT | RL |" in text
    assert "| CORE (18/22 tasks) | 0.1234 | - | - |" in text
    assert "| ARC-Easy | - | 0.3125 | 0.2500 |" in text
    assert "| ARC-Challenge | - | - | - |" in text
    assert "| MMLU | - | 0.2700 | - |" in text
    assert "| GSM8K | - | - | 0.0000 |" in text
    assert "| ChatCORE (first 50 problems per task) | - | 0.0510 | - |" in text  # a subset's score keeps its label

    png = base_dir / "report" / "base-model-training-curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![Base model training curves](base-model-training-curves.png)" in text
    assert "Total wall clock time" in text


def test_cost_estimate_from_gpu_hours(report, base_dir):
    report.log(section="Base model training", data=[{"depth": 20}])
    section = json.loads((base_dir / "report" / "base-model-training.json").read_text())
    hours = 2.5
    env = {"start_time": section["timestamp"] - hours * 3600, "gpu_count": 8, "gpu_name": "NVIDIA H100 80GB HBM3"}
    (base_dir / "report" / "header.json").write_text(json.dumps(env))
    report.generate()
    text = (base_dir / "report" / "report.md").read_text()
    assert f"{8 * hours:.2f} GPU-hours x $3.00/GPU-hour" in text and f"= ${8 * hours * 3.0:.2f}" in text
    assert "no header" in text  # reset was never run: said so instead of failing


def test_reset_writes_environment_and_clears_old_sections(report, base_dir):
    report.log(section="Chat SFT", data=[{"old": 1}])
    report.generate()
    report.reset()
    names = sorted(p.name for p in (base_dir / "report").iterdir())
    assert names == ["header.json", "header.md"]
    header = (base_dir / "report" / "header.md").read_text()
    env = json.loads((base_dir / "report" / "header.json").read_text())
    for key in ["git_commit", "gpu_name", "gpu_count", "cpu_name", "cpu_count", "python", "torch", "date"]:
        assert f"- {key}: " in header and key in env
    report.generate()
    assert "## Chat SFT" not in (base_dir / "report" / "report.md").read_text()


def test_relogging_a_section_replaces_it(report, base_dir):
    report.log(section="Base model loss", data=[{"val bpb": 3.0}])
    report.log(section="Base model loss", data=[{"val bpb": 2.0}])
    report.generate()
    text = (base_dir / "report" / "report.md").read_text()
    assert text.count("## Base model loss") == 1 and "- val bpb: 2" in text and "- val bpb: 3" not in text


def test_values_are_stored_as_plain_json(report, base_dir):
    import torch
    report.log(section="Chat SFT", data=[{"loss": torch.tensor(1.5), "shape": (2, 3), "obj": object}])
    data = json.loads((base_dir / "report" / "chat-sft.json").read_text())["data"]
    assert data[0]["loss"] == 1.5 and data[0]["shape"] == [2, 3] and isinstance(data[0]["obj"], str)


def test_other_ranks_get_a_dummy_report(base_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rank1 = get_report()
    assert isinstance(rank1, DummyReport)
    rank1.log(section="Base model training", data=[{"x": 1}])
    assert not (base_dir / "report").exists()
    monkeypatch.setenv("RANK", "0")
    assert isinstance(get_report(), Report)


def test_format_value():
    assert report_module.format_value(1234567) == "1,234,567"
    assert report_module.format_value(0.123456) == "0.1235"
    assert report_module.format_value(3.0e9) == "3.0000e+09"
    assert report_module.format_value(True) == "True" and report_module.format_value("d20") == "d20"

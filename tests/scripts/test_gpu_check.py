"""The prepared GPU check (issue 29) runs on CPU with a tiny shape, so it cannot rot before a GPU is lent:
every section prints numbers and lands in the JSON, fp32 reports equality with the naive method, and the
path it takes imports neither Hydra, omegaconf nor gguf (a bare PyTorch machine has none of them).
Also the dtype default it relies on: `auto` is bf16 on a GPU, fp32 on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_and_reports_every_section(tmp_path):
    from patchscan.models.loading import builtin_tokenizer

    tokenizer = tmp_path / "tokenizer"  # the files a GPU machine is carried (no model package there)
    builtin_tokenizer().save_pretrained(tokenizer)
    out = tmp_path / "out"
    args = ["--device", "cpu", "--shape", "tiny", "--budget-s", "60", "--out", str(out), "--tokenizer", str(tokenizer)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for section in ("correctness", "speed", "memory", "done"):
        assert f"section={section}" in proc.stdout, section
    data = json.loads((out / "gpu_check.json").read_text())
    rows = data["rows"]
    assert not [r for r in rows if r["section"] in ("skipped", "stopped")], rows
    exact = [r for r in rows if r["section"] == "correctness" and r["dtype"] == "float32"]
    assert len(exact) == 2 and all(r["checked"] > 0 and r["equal"] == r["checked"] for r in exact), exact
    bf16 = [r for r in rows if r["section"] == "correctness" and r["dtype"] == "bfloat16"]
    assert len(bf16) == 2 and all(0 <= r["equal_share"] <= 1 for r in bf16)
    speed = [r for r in rows if r["section"] == "speed" and "runs" in r]
    assert len(speed) == 4
    assert all(r["runs_per_s"] > 0 and r["TFLOPs"] > 0 and r["speedup_vs_hf_loop"] > 0 for r in speed), speed
    assert all(r["gen_tokens_per_s"] > 0 for r in speed if "generation" in r["row"] or "entity" in r["row"])
    memory = [r for r in rows if r["section"] == "memory"]
    assert len(memory) == 4 and all(r["peak_GiB"] > 0 and r["dry_run_estimate_GiB"] > r["weights_GiB"] for r in memory)
    assert data["meta"]["heavy_modules"] == []  # sys.modules at the end: no hydra, omegaconf, gguf
    table = (out / "gpu_check.md").read_text()
    assert all(f"## {s}" in table for s in ("correctness", "speed", "memory")) and "| runs_per_s |" in table


def test_auto_dtype_is_bf16_on_a_gpu_and_fp32_on_a_cpu():
    from patchscan.models.loading import load_model, resolve_dtype

    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(None, torch.device("cuda:0")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32  # asked for: kept
    view = load_model({"source": "tiny", "arch": "llama", "name": "tiny_llama", "device": "cpu", "dtype": "auto"})
    assert view.dtype == torch.float32

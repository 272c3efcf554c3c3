"""`python -m bench.accuracy --quick` (and `--quick --ablation`) on the real backbone: the CI smoke run of the
LPT-or-LoRA benchmark. Marked slow (real backbone, training) and network (the mr dataset comes from the registry)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.common import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.network]

METHODS = ["probe", "full", "prompt", "lora", "lpt-npg", "lpt-mppg", "lpt-appg"]


def run_bench(tmp_path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, "-m", "bench.accuracy", "--quick", "--no-wait", "--out", str(out), *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()) | {"stdout": done.stdout}


def test_quick_table_has_every_method_in_both_regimes(tmp_path):
    result = run_bench(tmp_path)
    assert result["complete"] is True
    mr = result["results"]["mr"]
    for regime, seeds in (("full", 1), ("fewshot", 2)):
        assert list(mr[regime]) == METHODS
        for method, summary in mr[regime].items():
            assert summary["seeds"] == seeds and len(summary["runs"]) == seeds
            for run in summary["runs"]:
                assert 0.0 <= run["test"]["accuracy"] <= 1.0, (regime, method)
                assert 0.0 <= run["test"]["ece"] <= 1.0, (regime, method)
                assert math.isfinite(run["test"]["log_loss"])
            if regime == "fewshot":
                assert all(run["train_size"] == 16 and run["dev_size"] == 16 for run in summary["runs"])
    sizes = {m: mr["full"][m]["trainable_parameters"] for m in METHODS}
    # The well-known sizes on MiniLM (h = 384, 6 layers, 2 labels): LoRA r=8 on query and value is 6 x 2 x 2 x 8 x
    # 384 plus the head; NPG is d=128 in, L x h out; full fine-tuning is the whole encoder.
    head = 384 * 2 + 2
    assert sizes["lora"] == 6 * 2 * 2 * 8 * 384 + head
    assert sizes["lpt-npg"] == (384 * 128 + 128) + (128 * 5 * 384 + 5 * 384) + head
    assert sizes["probe"] == head
    assert sizes["prompt"] == 20 * 384 + head
    assert sizes["full"] > 22_000_000
    # Adapter bytes are fp32 tensors plus a small safetensors header.
    for method in ("lora", "lpt-npg", "prompt"):
        assert 4 * sizes[method] < mr["full"][method]["adapter_bytes"] < 4 * sizes[method] + 4096, method
    assert "few-shot" in result["stdout"] and "| lpt-npg" in result["stdout"]


def test_quick_ablation_rows_and_choice(tmp_path):
    result = run_bench(tmp_path, "--ablation")
    ablation = result["ablation"]
    configs = [(r["prompt_layer"], r["prompt_length"], r["bottleneck"]) for r in ablation["rows"]]
    # One knob at a time around the default (k=3, L=5, d=128): the layers, then the lengths, then the bottleneck.
    assert configs == [(1, 5, 128), (3, 5, 128), (3, 1, 128), (3, 5, 32)]
    by = {c: r for c, r in zip(configs, ablation["rows"], strict=True)}
    # Compute grows with the prompt's length and with the number of layers it widens.
    assert by[(1, 5, 128)]["relative_compute"] > by[(3, 5, 128)]["relative_compute"] > by[(3, 1, 128)][
        "relative_compute"] > 1.0
    assert by[(3, 5, 32)]["adapter_bytes"] < by[(3, 5, 128)]["adapter_bytes"] / 3
    for row in ablation["rows"]:
        assert row["rows_per_second"] > 0 and row["measured_relative_throughput"] > 0
    choice = ablation["choice"]
    best = max(by[c]["dev"]["accuracy"] for c in configs if c[2] == 128)
    assert choice["best_by_dev"]["dev_accuracy"] == best
    assert choice["default"]["prompt_layer"] == 3 and choice["default"]["prompt_length"] == 5

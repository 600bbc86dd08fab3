"""bench.py --smoke and --gpu --smoke run every code path of the benchmarks (tiny sizes) and write complete tables."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_every_row(tmp_path):
    out = tmp_path / "b.md"
    run = subprocess.run([sys.executable, "bench.py", "--smoke", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    table = out.read_text()
    assert "failed" not in table
    for row in ("preprocessing.process_case", "sliding window, ours", "MONAI sliding_window_inference",
                "predict.py end to end", "random-init gpu-profile checkpoint", "train step memory, CPU",
                "train step, ours", "ReferenceNet", "forward (eval, no grad), ours", "run_pipeline.py --all",
                "GPU train step", "train step, cross-decoder attention on", "train step, cross-decoder attention off",
                "data path alone (data.batches)", "train loop, data + step"):
        assert f"| {row}" in table or row in table, row
    data_rows = [l for l in table.splitlines() if l.startswith("| data path alone")]
    assert len(data_rows) == 8  # 2 shapes x augmentation off/on x 0/2 workers
    assert "SMOKE" in table.splitlines()[0]  # tiny-size numbers are labelled as meaningless


def test_bench_gpu_smoke_runs_the_device_check_on_the_cpu(tmp_path):
    out, js = tmp_path / "g.md", tmp_path / "g.json"
    out.write_text("# Benchmarks\n\nthe CPU table\n")
    run = subprocess.run([sys.executable, "bench.py", "--gpu", "--smoke", "--out", str(out), "--json", str(js)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    assert "the CPU table" in text and text.count("<!-- bench.py --gpu: begin -->") == 1  # a section, not a new file
    assert "failed" not in text and "skipped" not in text and "not measured on a GPU" in text
    records = json.loads(js.read_text())["rows"]
    steps = [r for r in records if r["benchmark"] == "GPU train step"]
    assert {(r["dtype"], r["checkpointing"], r["channels_last"]) for r in steps} == {
        (d, c, l) for d in ("bf16", "fp16") for c in (False, True) for l in (False, True)}
    names = {r["benchmark"] for r in records}
    assert {"GPU data path alone (data.batches)", "GPU train loop, fed by data.batches",
            "gpu profile smoke run, run_pipeline.py --preprocess --train --eval", "gpu profile smoke run, predict.py"} <= names
    assert all(r["busy_pct"] > 0 for r in records if "busy_pct" in r)

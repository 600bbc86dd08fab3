"""analyze.py renders a report from a tiny fake run, from a half-finished run, and from nothing at all."""
import csv
import json
import re
import sys
import types
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

import analyze
import config


def point_config_at(monkeypatch, root):
    """Every folder setting under `root`, as a run with OUTPUT_ROOT=root would have."""
    root = Path(root)
    for name, sub in (("PROCESSED_DIR", "processed"), ("CHECKPOINT_DIR", "checkpoints"), ("LOG_DIR", "logs"),
                      ("EVAL_DIR", "evaluation_results"), ("ANALYSIS_DIR", "analysis")):
        monkeypatch.setattr(config, name, root / sub)
    monkeypatch.setattr(config, "OUTPUT_ROOT", root)
    monkeypatch.setattr(config, "DATA_ROOT", root / "data")


def write_logs(root):
    logs = root / "logs"
    logs.mkdir(parents=True)
    epochs = [
        {"epoch": 1, "train_loss": 1.20, "val_loss": None, "lr": 0.01, "epoch_time_s": 31.5, "patches_per_s": 2.6,
         "peak_mem_mb": 812.0, "val_dice": {o: None for o in config.ORGANS}, "val_dice_mean": None,
         "val_false_organs": {}, "best": False},
        {"epoch": 2, "train_loss": 0.91, "val_loss": 0.95, "lr": 0.007, "epoch_time_s": 40.2, "patches_per_s": 2.5,
         "peak_mem_mb": 830.5, "val_dice": {"prostate": 0.41, "bladder": 0.72, "rectum": None},
         "val_dice_mean": 0.565, "val_false_organs": {"prostate": 1, "bladder": 0, "rectum": 0}, "best": True},
        {"epoch": 3, "train_loss": 0.77, "val_loss": None, "lr": 0.003, "epoch_time_s": 30.9, "patches_per_s": 2.7,
         "peak_mem_mb": 829.0, "val_dice": {o: None for o in config.ORGANS}, "val_dice_mean": None,
         "val_false_organs": {}, "best": False},
    ]
    text = "\n".join(json.dumps(e) for e in epochs) + "\n{\"epoch\": 4, \"train_lo"  # half-written last line
    (logs / "train_log.jsonl").write_text(text)
    run = {"settings": dict(config.settings(), EPOCHS=3, DATA_ROOT=str(root / "data")),
           "argv": ["run_pipeline.py", "--all"], "git_commit": "abc1234", "torch_version": "2.13.0",
           "device": "cpu", "profile": "cpu", "start_time": "2026-01-01T10:00:00", "end_time": "2026-01-01T10:02:00",
           "best_epoch": 2, "train_seconds": 102.6}
    (logs / "run.json").write_text(json.dumps(run))


def write_processed(root):
    cases = root / "processed" / "cases"
    entries = []
    for i, (sex, spacing) in enumerate((("m", [0.8, 0.8, 2.5]), ("f", [0.7, 0.7, 3.0]), ("m", [0.9, 0.9, 1.25]))):
        case_id = f"BDMAP_{i:08d}"
        organs = {"prostate": {"present": sex == "m", "volume_ml": 25.0 + i if sex == "m" else 0.0},
                  "bladder": {"present": True, "volume_ml": 150.0 + 20 * i},
                  "rectum": {"present": True, "volume_ml": 60.0 + 5 * i}}
        (cases / case_id).mkdir(parents=True)
        (cases / case_id / "meta.json").write_text(json.dumps({"case_id": case_id, "original_spacing": spacing,
                                                               "organs": organs}))
        entries.append({"case_id": case_id, "ok": True})
    manifest = {"settings": {"TARGET_SPACING": [3.0, 3.0, 3.0]}, "cases": entries,
                "skipped": [{"case_id": "BDMAP_00000099", "reason": "ct.nii.gz: not a NIfTI file"}], "stats": {}}
    (root / "processed" / "manifest.json").write_text(json.dumps(manifest))
    # phantom marker per the contract: DATA_ROOT/BDMAP_*/meta.json exists for the phantom only
    (root / "data" / "BDMAP_00000000").mkdir(parents=True)
    (root / "data" / "BDMAP_00000000" / "meta.json").write_text("{}")


def write_evaluation(root):
    ev = root / "evaluation_results"
    ev.mkdir(parents=True)
    summary = {"checkpoint": "checkpoints/best_model.pth", "n_cases": 3, "empty_rule": "absent organs excluded",
               "mean_dice_present": 0.6543, "organs": {}}
    for k, organ in enumerate(config.ORGANS):
        summary["organs"][organ] = {
            "n_present": 2 + (k > 0),
            "dice": {"mean": 0.7123 + k / 100, "std": 0.0456, "median": 0.7201, "q1": 0.65, "q3": 0.77, "n": 3},
            "hd95": {"mean": 8.765, "std": 1.5, "median": 8.0, "q1": 7.0, "q3": 9.5, "n": 3},
            "nsd2": {"mean": 0.8111, "std": 0.05, "median": 0.82, "q1": 0.79, "q3": 0.84, "n": 3},
            "detection": {"tp": 2, "fp": 1 if organ == "prostate" else 0, "fn": 0, "tn": 0},
            "false_organ_volumes_ml": [3.25] if organ == "prostate" else []}
    (ev / "summary_statistics.json").write_text(json.dumps(summary))
    fields = ["case_id"] + [f"{m}_{o}" for o in config.ORGANS for m in ("status", "dice", "hd95", "nsd2")]
    with open(ev / "metrics_per_case.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for i in range(3):
            row = {"case_id": f"BDMAP_{i:08d}"}
            for organ in config.ORGANS:
                row.update({f"status_{organ}": "present_detected", f"dice_{organ}": 0.7 + i / 50,
                            f"hd95_{organ}": 8.0, f"nsd2_{organ}": 0.8})
            if i == 1:
                row.update({"status_prostate": "false_organ", "dice_prostate": "", "hd95_prostate": "",
                            "nsd2_prostate": ""})
            writer.writerow(row)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name in ("dice_boxplot.png", "overlay_bladder_median.png"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        fig.savefig(ev / name)
        plt.close(fig)
    (ev / "evaluation_report.md").write_text("# eval\n")


def link_targets(md):
    """Targets of markdown images and links."""
    return [urllib.parse.unquote(t) for t in re.findall(r"\]\(([^)]+)\)", md)]


def assert_links_exist(report):
    md = report.read_text()
    for target in link_targets(md):
        assert (report.parent / target).is_file(), f"report links a missing file: {target}"
    html = report.with_suffix(".html").read_text()
    for target in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert (report.parent / urllib.parse.unquote(target)).is_file(), target
    return md


def test_full_fake_run(tmp_path, monkeypatch):
    point_config_at(monkeypatch, tmp_path)
    write_logs(tmp_path)
    write_processed(tmp_path)
    write_evaluation(tmp_path)
    report = analyze.analyze()
    assert report == tmp_path / "analysis" / "report.md"
    md = assert_links_exist(report)
    assert len(link_targets(md)) >= 13  # 8 own figures, 2 evaluation PNGs, 3 evaluation files
    for name in ("loss_curves", "dice_scores", "learning_rate", "throughput", "memory", "organ_presence",
                 "spacing_histograms", "organ_volumes"):
        assert (tmp_path / "analysis" / f"{name}.png").is_file(), name
        assert f"{name}.png" in md
    # evaluation numbers, detection, false organs, eval figures linked from their own folder
    assert "0.712 ± 0.046" in md and "0.720 [0.650, 0.770]" in md
    assert "8.77 ± 1.50" in md and "0.811 ± 0.050" in md
    assert "0.654" in md
    assert re.search(r"\| prostate \| 2 \| 0 \| 1 \| 0 \| 3\.2 \|", md) and "false organs in total: **1**" in md
    assert "../evaluation_results/dice_boxplot.png" in md and "overlay_bladder_median.png" in md
    # data, run, training facts
    assert "not a NIfTI file" in md and "Cases preprocessed: **3**" in md
    assert "abc1234" in md and "2.13.0" in md
    assert "Best epoch: **2**" in md and "**0.565**" in md and "1 min 43 s" in md
    assert "1 unreadable line(s)" in md  # the half-written log line is named, not fatal
    # caveats
    assert "never as Dice 1.0" in md and "organ-present cases only" in md
    assert "synthetic phantom" in md and "Not a medical device" in md
    assert "<table>" in report.with_suffix(".html").read_text()


def test_logs_only_says_evaluation_missing(tmp_path, monkeypatch):
    point_config_at(monkeypatch, tmp_path)
    write_logs(tmp_path)
    report = analyze.analyze(tmp_path / "elsewhere")
    assert report.parent == tmp_path / "elsewhere"
    md = assert_links_exist(report)
    assert "Evaluation is missing" in md
    assert "preprocessing has not run" in md
    assert (tmp_path / "elsewhere" / "loss_curves.png").is_file()
    assert not (tmp_path / "elsewhere" / "organ_presence.png").exists()


def test_empty_run_still_renders(tmp_path, monkeypatch):
    point_config_at(monkeypatch, tmp_path)
    report = analyze.analyze()
    md = assert_links_exist(report)
    assert "training has not run yet" in md and "Evaluation is missing" in md
    assert "Not a medical device" in md
    assert not list(report.parent.glob("*.png"))


def test_training_still_running_and_odd_inputs(tmp_path, monkeypatch):
    """No run.json end time, a log with no validation at all, a corrupt summary, meta with flat keys."""
    point_config_at(monkeypatch, tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train_log.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 0.9, "lr": 0.01}))
    (tmp_path / "logs" / "run.json").write_text(json.dumps({"start_time": "2026-01-01T10:00:00", "device": "cpu"}))
    (tmp_path / "evaluation_results").mkdir()
    (tmp_path / "evaluation_results" / "summary_statistics.json").write_text("{not json")
    case = tmp_path / "processed" / "cases" / "c1"
    case.mkdir(parents=True)
    (case / "meta.json").write_text(json.dumps({"spacing": [1, 1, 5], "organ_ml": {"bladder": 100.0, "rectum": 0}}))
    (tmp_path / "processed" / "manifest.json").write_text(json.dumps({"cases": [{"case_id": "c1", "ok": True}]}))
    md = assert_links_exist(analyze.analyze())
    assert "still running or was interrupted" in md
    assert "No validation Dice logged yet" in md
    assert "summary_statistics.json` unreadable" in md
    assert not (tmp_path / "analysis" / "dice_scores.png").exists()
    assert "| bladder | 1 | 0 | 0 |" in md and "| rectum | 0 | 1 | 0 |" in md


def test_case_record_spacing_from_affine():
    rec = analyze.case_record({"case_id": "x"}, {"affine": np.diag([0.8, 0.8, 2.0, 1.0]).tolist()})
    assert rec["spacing"] == pytest.approx([0.8, 0.8, 2.0])
    assert all(rec["organs"][o] == (None, None) for o in config.ORGANS)


def test_all_zero_or_one_dice_is_flagged():
    rows = [{f"dice_{o}": v for o in config.ORGANS} for v in ("1.0", "0.0", "1.0")]
    assert "exactly 0 or 1" in analyze.suspicious_dice({"rows": rows})
    rows[0]["dice_bladder"] = "0.83"
    assert analyze.suspicious_dice({"rows": rows}) is None


def test_cli_output_root_override_and_bad_setting(tmp_path, capsys):
    analyze.main([f"--OUTPUT_ROOT={tmp_path}"])
    assert (tmp_path / "analysis" / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="NO_SUCH_SETTING"):
        analyze.main(["--NO_SUCH_SETTING=1"])


def test_table_from_csv_when_summary_missing_and_phantom_preview(tmp_path, monkeypatch):
    """Without summary_statistics.json the tables come from metrics_per_case.csv; phantom.preview() is used."""
    point_config_at(monkeypatch, tmp_path)
    write_processed(tmp_path)
    write_evaluation(tmp_path)
    (tmp_path / "evaluation_results" / "summary_statistics.json").unlink()
    calls = []

    def preview(data_dir, out_png):
        calls.append(Path(data_dir))
        Path(out_png).write_bytes(b"\x89PNG\r\n\x1a\n")

    monkeypatch.setitem(sys.modules, "phantom", types.SimpleNamespace(preview=preview))
    md = assert_links_exist(analyze.analyze())
    # prostate: present in cases 0 and 2 (Dice 0.70, 0.74), a false organ in case 1
    assert "| prostate | 2 | 0.720 ± 0.028 | 0.720 [0.710, 0.730] |" in md
    assert re.search(r"\| prostate \| 2 \| 0 \| 1 \| 0 \| – \|", md)
    assert "| bladder | 3 | 0.720 ± 0.020 |" in md
    assert calls == [tmp_path / "data"] and "phantom_preview.png" in md


def test_generalisation_section_reads_the_heldout_summary(tmp_path, monkeypatch):
    import config
    import analyze
    monkeypatch.setattr(config, "EVAL_DIR", tmp_path / "eval")
    assert "Not run" in "\n".join(analyze.section_generalisation(tmp_path))
    held = tmp_path / "eval" / "heldout"
    held.mkdir(parents=True)
    organ = {"n_present": 3, "dice": {"mean": 0.8, "std": 0.1, "median": 0.82, "q1": 0.7, "q3": 0.9, "n": 3},
             "detection": {"tp": 3, "fn": 0, "fp": 2, "tn": 1}, "false_organ_volumes_ml": [1.5, 76.8]}
    (held / "summary_statistics.json").write_text(json.dumps(
        {"n_cases": 6, "data_root": "x", "empty_cases": ["/a/chest.nii.gz"], "organs": {"bladder": organ}}))
    text = "\n".join(analyze.section_generalisation(tmp_path))
    assert "chest.nii.gz" in text and "76.8" in text and "0.800 ± 0.100" in text

"""One cheap end-to-end run of every stage: phantom -> preprocess -> train -> eval -> analyze."""
import csv
import json

import config
import run_pipeline


def test_all_stages_on_a_tiny_phantom(tmp_path, capsys):
    argv = ["--all", f"--OUTPUT_ROOT={tmp_path}", f"--DATA_ROOT={tmp_path / 'data'}", "--PHANTOM_CASES=5",
            "--TARGET_SPACING=6,6,6", "--PATCH_SIZE=16,16,16", "--BASE_CHANNELS=4", "--DEPTH=3", "--EPOCHS=2",
            "--ITERS_PER_EPOCH=2", "--BATCH_SIZE=1", "--VAL_EVERY=1", "--NUM_WORKERS=1", "--HELDOUT_CASES=2"]
    # DATA_ROOT is not the default folder: an empty one is an error, so seed it like a user would.
    import phantom
    phantom.generate_dataset(tmp_path / "data", 5, 0, "demo", 1)
    assert run_pipeline.main(argv) == 0
    out = capsys.readouterr().out
    assert "Summary" in out and "organ-present cases only" in out

    for rel in ("processed/manifest.json", "processed/splits.json", "checkpoints/best_model.pth",
                "checkpoints/checkpoint_last.pth", "logs/train_log.jsonl", "logs/run.json",
                "evaluation_results/metrics_per_case.csv", "evaluation_results/summary_statistics.json",
                "evaluation_results/evaluation_report.md", "analysis/report.md", "analysis/loss_curves.png",
                "data_heldout/phantom.json", "evaluation_results/heldout/summary_statistics.json"):
        assert (tmp_path / rel).is_file(), rel
    rows = list(csv.DictReader(open(tmp_path / "evaluation_results" / "metrics_per_case.csv")))
    assert rows
    for row in rows:  # an absent organ never carries a Dice
        for organ in ("prostate", "bladder", "rectum"):
            if row[f"status_{organ}"] in ("correctly_absent", "false_organ"):
                assert row[f"dice_{organ}"] == ""
    stats = json.loads((tmp_path / "evaluation_results" / "summary_statistics.json").read_text())
    assert set(stats["organs"]) == {"prostate", "bladder", "rectum"}
    assert len((tmp_path / "logs" / "train_log.jsonl").read_text().splitlines()) == 2
    heldout = json.loads((tmp_path / "evaluation_results" / "heldout" / "summary_statistics.json").read_text())
    assert heldout["n_cases"] == 2 + len(config.EMPTY_CTS)  # ood-style phantoms + real CTs with nothing to find
    assert json.loads((tmp_path / "data_heldout" / "phantom.json").read_text())["style"] == "ood"
    assert "held out" in out


def test_default_data_root_gets_the_phantom(tmp_path, monkeypatch, capsys):
    import config
    monkeypatch.setattr(config, "DEFAULT_DATA_ROOT", tmp_path / "data")
    monkeypatch.setattr(config, "DATA_ROOT", tmp_path / "data")
    monkeypatch.setattr(config, "PHANTOM_CASES", 2)
    monkeypatch.setattr(config, "NUM_WORKERS", 1)
    root = run_pipeline.ensure_data()
    assert sorted(p.name for p in root.glob("BDMAP_*")) == ["BDMAP_00000001", "BDMAP_00000002"]
    assert "generating the synthetic pelvic CT phantom" in capsys.readouterr().out

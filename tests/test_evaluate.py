"""evaluate.py on two tiny hand-made cases with a random tiny checkpoint: files, schema, empty cells, plots."""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

import config
import metrics
import status
from test_predict import tiny_checkpoint, write_ct  # noqa: F401  (fixture)


def write_case(root, case_id, code, with_prostate):
    ct_path = write_ct(root / case_id / "ct.nii.gz", code, shape=(21, 19, 11))
    ct = nib.load(str(ct_path))
    seg = root / case_id / "segmentations"
    seg.mkdir()
    for organ in config.ORGANS:
        mask = np.zeros(ct.shape, np.uint8)
        if organ == "bladder":
            mask[8:14, 7:13, 3:8] = 1
        if organ == "prostate" and with_prostate:
            mask[9:12, 9:12, 1:3] = 1
        nib.save(nib.Nifti1Image(mask, ct.affine), str(seg / f"{organ}.nii.gz"))


def test_evaluate_writes_contract_files(tmp_path, tiny_checkpoint, monkeypatch):  # noqa: F811
    import evaluate

    config.AMP = False
    root = tmp_path / "data"
    write_case(root, "BDMAP_00000001", "LPS", with_prostate=True)
    write_case(root, "BDMAP_00000002", "RAS", with_prostate=False)
    config.DATA_ROOT = root
    config.PROCESSED_DIR = tmp_path / "processed"
    config.EVAL_DIR = tmp_path / "eval"
    config.PROCESSED_DIR.mkdir()
    (config.PROCESSED_DIR / "splits.json").write_text(json.dumps(
        {"seed": 0, "train": [], "val": [], "test": ["BDMAP_00000001", "BDMAP_00000002", "BDMAP_00000404"]}))

    summary = evaluate.evaluate(tiny_checkpoint)

    out = config.EVAL_DIR
    assert summary["n_cases"] == 2 and [f["case_id"] for f in summary["failed"]] == ["BDMAP_00000404"]
    assert summary["empty_rule"] == metrics.EMPTY_RULE
    assert json.loads((out / "summary_statistics.json").read_text())["organs"]["bladder"]["n_present"] == 2
    with open(out / "metrics_per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == metrics.csv_columns(config.ORGANS) + status.csv_columns(config.ORGANS)
    assert {r["pred_status_bladder"] for r in rows} <= set(status.STATUSES)
    absent = next(r for r in rows if r["case_id"] == "BDMAP_00000002")
    assert absent["status_prostate"] in ("correctly_absent", "false_organ")
    assert absent["dice_prostate"] == "" and absent["hd95_prostate"] == ""  # not defined: empty, never 1 or 999
    for name in ("dice_boxplot", "hd95_boxplot", "dice_vs_hausdorff", "volume_agreement", "overlay_bladder_best"):
        assert (out / f"{name}.png").stat().st_size > 1000
    report = (out / "evaluation_report.md").read_text()
    assert metrics.EMPTY_RULE in report and "BDMAP_00000404" in report
    pred = nib.load(str(out / "predictions" / "BDMAP_00000001.nii.gz"))
    assert pred.shape == (21, 19, 11)


def test_missing_checkpoint_is_one_line(tmp_path):
    import evaluate

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate.evaluate(tmp_path / "nothing.pth")


def test_any_labelled_folder_and_empty_cts_without_splits(tmp_path, tiny_checkpoint):  # noqa: F811
    """--data-root scores every case of a folder (no preprocessing, no splits.json); --empty CTs count every
    predicted voxel as a false organ and never carry a Dice."""
    import evaluate

    config.AMP = False
    root = tmp_path / "other"
    write_case(root, "BDMAP_00000007", "LAS", with_prostate=True)
    write_case(root, "BDMAP_00000008", "RAS", with_prostate=False)
    chest = write_ct(tmp_path / "chest.nii.gz", "LPS", shape=(17, 15, 13))
    config.PROCESSED_DIR = tmp_path / "no_processed"  # must not be needed
    out = tmp_path / "heldout"
    assert evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--empty", str(chest),
                          "--out", str(out), "--no-plots"]) is None
    summary = json.loads((out / "summary_statistics.json").read_text())
    assert summary["n_cases"] == 3 and summary["organs"]["bladder"]["n_present"] == 2
    with open(out / "metrics_per_case.csv") as fh:
        rows = {r["case_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"BDMAP_00000007", "BDMAP_00000008", "chest"}
    for organ in config.ORGANS:
        assert rows["chest"][f"status_{organ}"] in ("correctly_absent", "false_organ")
        assert rows["chest"][f"dice_{organ}"] == ""
    with pytest.raises(SystemExit, match="nowhere: data root not found"):
        evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data-root", str(tmp_path / "nowhere")])


def test_a_scan_without_a_pelvis_costs_no_forward_pass(tmp_path, tiny_checkpoint, monkeypatch):  # noqa: F811
    """No femoral heads (the tiny cases have no bone): the status rule removes every organ, so evaluate runs no
    net over the scan; with STATUS_CLEAR_NOT_IMAGED off the predictions stay, so then it does."""
    import evaluate
    import inference

    config.AMP = False
    calls = []
    real = inference.predict_case
    monkeypatch.setattr(inference, "predict_case", lambda *a, **k: calls.append(1) or real(*a, **k))
    root = tmp_path / "data"
    write_case(root, "BDMAP_00000001", "LPS", with_prostate=True)
    chest = write_ct(tmp_path / "chest.nii.gz", "LPS", shape=(17, 15, 13))
    for clear, expected in ((True, 0), (False, 2)):
        calls.clear()
        config.STATUS_CLEAR_NOT_IMAGED = clear
        out = tmp_path / f"eval_{clear}"
        evaluate.main(["--checkpoint", str(tiny_checkpoint), "--data-root", str(root), "--empty", str(chest),
                       "--out", str(out), "--no-plots"])
        assert len(calls) == expected
        with open(out / "metrics_per_case.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == 2 and {r[f"pred_status_{o}"] for r in rows for o in config.ORGANS} == {"not_imaged"}
        if clear:
            assert not np.asarray(nib.load(str(out / "predictions" / "BDMAP_00000001.nii.gz")).dataobj).any()

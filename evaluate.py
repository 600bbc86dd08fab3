"""Evaluate a checkpoint on the test split, in the ORIGINAL image space of every case.

Usage:
    python evaluate.py                                   # checkpoints/best_model.pth on the test split
    python evaluate.py --checkpoint PATH --split val [--NAME=value ...]
    python evaluate.py --data-root DIR [--empty CT ...] --out DIR   # every case of any labelled folder, plus
                                                         # CTs with no pelvic organ in them (chest scans ...)

For each case: original CT -> prepare_ct (RAS, resample, crop) -> sliding-window segment -> restore_labels
(back onto the original grid) -> metrics against the original masks with the header spacing. The net and the
geometry settings (TARGET_SPACING, PATCH_SIZE, HU_CLIP) come from the checkpoint, not from today's config.
Writes to config.EVAL_DIR: metrics_per_case.csv, summary_statistics.json, evaluation_report.md, predictions/
(<case>.nii.gz label maps on the original grid) and PNG plots (box plots, Dice vs HD95, volume agreement,
best/median/worst overlays per organ).
"""
import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

import config
import inference
import metrics
import status
from fileio import pyplot, save_figure, save_nifti_atomic, write_text_atomic

DISPLAY_HU = (-200, 400)  # overlay window (HU)
OVERLAY_MARGIN_MM = 40.0  # context around the organ in the overlays
COLORS = {"prostate": "tab:orange", "bladder": "tab:blue", "rectum": "tab:green"}


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
def data_root():
    """The data root recorded by preprocessing in processed/manifest.json, else config.DATA_ROOT."""
    manifest = Path(config.PROCESSED_DIR) / "manifest.json"
    if manifest.is_file():
        try:
            root = json.loads(manifest.read_text()).get("data_root")
        except ValueError:
            root = None
        if root and Path(root).is_dir():
            return Path(root)
    return Path(config.DATA_ROOT)


def split_cases(split):
    path = Path(config.PROCESSED_DIR) / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no splits (run preprocessing first: python run_pipeline.py --preprocess)")
    splits = json.loads(path.read_text())
    if split not in splits:
        raise ValueError(f"{path}: no split named {split!r} (have {', '.join(k for k in splits if k != 'seed')})")
    if not splits[split]:
        raise ValueError(f"{path}: the {split} split is empty")
    return list(splits[split])


def header_spacing(img):
    """Voxel size (mm) along the array axes, from the image header."""
    return tuple(float(z) for z in img.header.get_zooms()[:3])


# --------------------------------------------------------------------------------------------
# Tables and report
# --------------------------------------------------------------------------------------------
def _cell(value):
    if value is None:
        return ""  # not defined (see metrics.EMPTY_RULE), never a made-up number
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_csv(rows, path, organs):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    cols = metrics.csv_columns(organs) + status.csv_columns(organs)
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in cols])
    write_text_atomic(path, buf.getvalue())


def _fmt_stats(s, digits=3):
    if not s or s["n"] == 0:
        return "–"
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}<br>{s['median']:.{digits}f} "
            f"[{s['q1']:.{digits}f}–{s['q3']:.{digits}f}] (n={s['n']})")


def report_markdown(summary, rows, failed, notes, plots, organs):
    lines = ["# Evaluation report", "",
             f"Checkpoint: `{summary['checkpoint']}`  ", f"Split: {summary.get('split')}, "
             f"{summary['n_cases']} cases evaluated" + (f", {len(failed)} failed" if failed else "") + ".  ",
             "Metrics are computed on each case's original grid with the header spacing (mm). "
             "Statistics are over organ-present cases: mean ± std, then median [IQR], n.", ""]
    if notes:
        lines += ["Settings taken from the checkpoint: " + "; ".join(notes), ""]
    dec = summary.get("decisions")
    if dec:
        lines += ["Clean-up decided on the validation split in training (from the checkpoint): logit offset "
                  + (", ".join(f"{o} {v:+g}" for o, v in dec["logit_offset"].items()) or "none")
                  + f"; largest component {'on' if dec['largest_component'] else 'off'}; absent below "
                  + (", ".join(f"{o} {v:g} mL" for o, v in dec["min_organ_ml"].items()) or "– (no presence rule)"), ""]
    lines += ["## Accuracy (organ-present cases)", "",
              "| Organ | present | Dice | HD95 (mm) | NSD @ 2 mm |", "|---|---|---|---|---|"]
    for organ in organs:
        e = summary["organs"][organ]
        lines.append(f"| {organ} | {e['n_present']} | {_fmt_stats(e['dice'])} | {_fmt_stats(e['hd95'], 1)} | "
                     f"{_fmt_stats(e['nsd2'])} |")
    mean = summary.get("mean_dice_present")
    lines += ["", f"Mean Dice over organs (each organ's mean over its present cases): "
                  f"{'–' if mean is None else f'{mean:.3f}'}", "",
              "## Detection (presence in reference vs prediction)", "",
              "| Organ | TP (present, detected) | FN (missed) | FP (false organ) | TN (correctly absent) | "
              "false-organ volumes (mL) |", "|---|---|---|---|---|---|"]
    for organ in organs:
        d = summary["organs"][organ]["detection"]
        vols = ", ".join(f"{v:.1f}" for v in summary["organs"][organ]["false_organ_volumes_ml"]) or "–"
        lines.append(f"| {organ} | {d['tp']} | {d['fn']} | {d['fp']} | {d['tn']} | {vols} |")
    lines += ["", "## Rule for absent organs", "", metrics.EMPTY_RULE, "",
              "Surface distances use surface voxels (mask minus its face-connected erosion) and Euclidean "
              "distances in mm; HD95 is the larger of the two directed 95th percentiles.", ""]
    if failed:
        lines += ["## Failed cases", ""] + [f"- {cid}: {reason}" for cid, reason in failed] + [""]
    lines += ["## Per case (Dice; empty = not defined)", "", "| Case | " + " | ".join(organs) + " |",
              "|---|" + "---|" * len(organs)]
    for row in rows:
        cells = []
        for organ in organs:
            d = row[f"dice_{organ}"]
            cells.append(f"{row[f'status_{organ}']}" + ("" if d is None else f" {d:.3f}"))
        lines.append(f"| {row['case_id']} | " + " | ".join(cells) + " |")
    if summary.get("status"):
        lines += [""] + status.report_markdown(summary["status"])
    if plots:
        lines += ["", "## Figures", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _values(rows, organ, name, statuses=("present_detected", "missed")):
    return [r[f"{name}_{organ}"] for r in rows
            if r[f"status_{organ}"] in statuses and r[f"{name}_{organ}"] is not None]


def boxplot(rows, organs, name, ylabel, path, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(organs), 4))
    data = [_values(rows, o, name) for o in organs]
    rng = np.random.default_rng(0)
    positions = [i + 1 for i, d in enumerate(data) if d]
    if positions:  # none when nothing was detected (e.g. every organ not imaged)
        ax.boxplot([d for d in data if d], positions=positions, widths=0.5, showfliers=False)
    for i, (organ, d) in enumerate(zip(organs, data), start=1):
        if d:
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(d)), d, s=14, color=COLORS.get(organ, "k"), alpha=0.7,
                       label=f"{organ} cases", zorder=3)
    ax.set_xticks(range(1, len(organs) + 1))
    ax.set_xticklabels([f"{o}\n(n={len(d)})" for o, d in zip(organs, data)])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if name == "dice":
        ax.set_ylim(-0.03, 1.03)
    ax.grid(axis="y", alpha=0.3)
    if any(data):
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no organ-present case", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, path)


def dice_vs_hd95(rows, organs, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for organ in organs:
        pts = [(r[f"hd95_{organ}"], r[f"dice_{organ}"]) for r in rows if r[f"status_{organ}"] == "present_detected"]
        if pts:
            x, y = zip(*pts)
            ax.scatter(x, y, s=18, color=COLORS.get(organ), label=f"{organ} (n={len(pts)})")
    ax.set_xlabel("HD95 (mm)")
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Dice vs HD95 per case (detected organs)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_figure(fig, path)


def volume_agreement(rows, organs, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 1.0
    markers = {"present_detected": "o", "missed": "v", "false_organ": "^"}
    for organ in organs:
        for status, marker in markers.items():
            pts = [(r[f"vol_ref_ml_{organ}"], r[f"vol_pred_ml_{organ}"])
                   for r in rows if r[f"status_{organ}"] == status]
            if pts:
                x, y = zip(*pts)
                top = max(top, max(x), max(y))
                ax.scatter(x, y, s=20, marker=marker, color=COLORS.get(organ),
                           label=f"{organ}" + ("" if status == "present_detected" else f" ({status})"))
    ax.plot([0, top * 1.05], [0, top * 1.05], "k--", lw=1, label="identity")
    ax.set_xlim(-0.03 * top, top * 1.05)  # a little room below 0 so missed / false organs stay visible
    ax.set_ylim(-0.03 * top, top * 1.05)
    ax.set_aspect("equal")
    ax.set_xlabel("reference volume (mL)")
    ax.set_ylabel("predicted volume (mL)")
    ax.set_title("Volume agreement per case")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)


def _to_ras(array, affine):
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    return nio.apply_orientation(array, transform)


def overlay(ct_img, ref, pred, organ, title, path):
    """Axial, coronal and sagittal slices through the organ (reference centroid, else prediction) with
    reference (green) and predicted (red) contours; radiological convention (patient right on the left)."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    affine = ct_img.affine
    ct = _to_ras(np.asanyarray(ct_img.dataobj).astype(np.float32), affine)
    ref, pred = _to_ras(ref.astype(np.uint8), affine), _to_ras(pred.astype(np.uint8), affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(nio.io_orientation(affine)[:, 0])]
    focus = ref if ref.any() else pred if pred.any() else None
    centre = (np.round(np.argwhere(focus).mean(0)).astype(int) if focus is not None
              else np.asarray(ct.shape) // 2)
    both = (ref | pred) if focus is not None else np.ones(ct.shape, bool)
    idx = np.argwhere(both)
    lo, hi = idx.min(0), idx.max(0)
    margin = np.ceil(OVERLAY_MARGIN_MM / spacing).astype(int)
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin + 1, ct.shape)
    views = [("axial", 2, (0, 1), "right – left (mm)", "posterior – anterior (mm)"),
             ("coronal", 1, (0, 2), "right – left (mm)", "inferior – superior (mm)"),
             ("sagittal", 0, (1, 2), "posterior – anterior (mm)", "inferior – superior (mm)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (name, axis, (a, b), xlabel, ylabel) in zip(axes, views):
        sl = [slice(None)] * 3
        sl[axis] = int(centre[axis])
        sl[a], sl[b] = slice(lo[a], hi[a]), slice(lo[b], hi[b])
        sl = tuple(sl)
        extent = [lo[a] * spacing[a], hi[a] * spacing[a], lo[b] * spacing[b], hi[b] * spacing[b]]
        ax.imshow(ct[sl].T, cmap="gray", vmin=DISPLAY_HU[0], vmax=DISPLAY_HU[1], origin="lower", extent=extent,
                  interpolation="nearest")
        for mask, color in ((ref, "lime"), (pred, "red")):
            m = mask[sl].T
            if m.any() and m.min() != m.max():
                ax.contour(m, levels=[0.5], colors=color, linewidths=1.2, origin="lower", extent=extent)
        if axis != 0:
            ax.invert_xaxis()  # radiological: patient right on the viewer's left
        ax.set_title(f"{name} (slice {int(centre[axis])})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    handles = [Line2D([], [], color="lime", label=f"reference {organ}"),
               Line2D([], [], color="red", label=f"predicted {organ}")]
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.11, 1, 0.95))
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, bbox_to_anchor=(0.5, 0.0))
    save_figure(fig, path)


def pick_overlay_cases(rows, organ):
    """{"best", "median", "worst"} -> case_id by Dice over organ-present cases (fewer when fewer cases)."""
    scored = sorted(((r[f"dice_{organ}"], r["case_id"]) for r in rows
                     if r[f"status_{organ}"] in ("present_detected", "missed")), key=lambda t: (t[0], t[1]))
    if not scored:
        return {}
    return {"best": scored[-1][1], "median": scored[(len(scored) - 1) // 2][1], "worst": scored[0][1]}


def make_plots(rows, organs, out_dir, root, pred_dir):
    """Write every PNG; returns their file names (relative to out_dir)."""
    import preprocessing

    out_dir = Path(out_dir)
    names = []
    boxplot(rows, organs, "dice", "Dice", out_dir / "dice_boxplot.png", "Dice per organ (organ-present cases)")
    boxplot(rows, organs, "hd95", "HD95 (mm)", out_dir / "hd95_boxplot.png", "HD95 per organ (detected cases)")
    dice_vs_hd95(rows, organs, out_dir / "dice_vs_hausdorff.png")
    volume_agreement(rows, organs, out_dir / "volume_agreement.png")
    names += ["dice_boxplot.png", "hd95_boxplot.png", "dice_vs_hausdorff.png", "volume_agreement.png"]
    by_id = {r["case_id"]: r for r in rows}
    cache = {}
    for organ in organs:
        for rank, cid in pick_overlay_cases(rows, organ).items():
            if cid not in cache:
                case = preprocessing.read_case(Path(root) / cid)
                cache = {cid: (case, np.asanyarray(nib.load(str(Path(pred_dir) / f"{cid}.nii.gz")).dataobj))}
            case, pred = cache[cid]
            k = organs.index(organ) + 1
            ref = case["masks"][organ]
            ref = np.zeros(pred.shape, bool) if ref is None else ref != 0
            dice = by_id[cid][f"dice_{organ}"]
            title = f"{organ}, {rank} case {cid}: Dice {dice:.3f}" if dice is not None else f"{organ} {rank} {cid}"
            name = f"overlay_{organ}_{rank}.png"
            overlay(case["ct"], ref, pred == k, organ, title, out_dir / name)
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def _read_empty_case(path):
    """A CT known to hold none of the organs (e.g. a chest scan): every predicted voxel is a false organ."""
    import preprocessing

    ct = preprocessing.load_ct(path)
    return {"ct": ct, "masks": {o: np.zeros(ct.shape, np.uint8) for o in config.ORGANS}}


def evaluate(checkpoint=None, split="test", plots=True, show_progress=None, data_root_dir=None, empty=(),
             out_dir=None):
    """Evaluate `checkpoint` (default CHECKPOINT_DIR/best_model.pth); returns the summary dict.

    Cases: the `split` of processed/splits.json, or, with `data_root_dir`, every case folder of that labelled
    AbdomenAtlas-layout folder (no preprocessing or splits needed); plus the `empty` CT files, scored as cases
    with no organ at all (the generalisation check's real chest CTs). Writes metrics_per_case.csv,
    summary_statistics.json, evaluation_report.md, predictions/ and the PNGs to `out_dir` (default
    config.EVAL_DIR). A case that cannot be read is listed as failed (report and summary), not fatal.
    """
    import preprocessing
    from tqdm import tqdm

    device = inference.pick_device()
    inference.keep_freed_memory()
    model, ckpt, ckpt_path = inference.load_model(checkpoint, device)
    changed = inference.use_checkpoint_settings(ckpt)
    organs = tuple(ckpt["model_config"].get("organs", config.ORGANS))
    if tuple(organs) != tuple(config.ORGANS):
        print(f"note: checkpoint organs {organs} (current config has {tuple(config.ORGANS)})")
    thresholds = status.thresholds_of(ckpt)
    if data_root_dir is not None:
        root = Path(data_root_dir)
        case_ids = [d.name for d in preprocessing.find_cases(root)]
        split = f"all of {root}"
    elif split:
        case_ids, root = split_cases(split), data_root()
    else:
        case_ids, root = [], data_root()
    jobs = [(cid, root / cid, preprocessing.read_case) for cid in case_ids]
    jobs += [(Path(path).name.split(".")[0], Path(path), _read_empty_case) for path in empty]
    if not jobs:
        raise ValueError("evaluate: no cases to evaluate (give a split, --data-root or --empty)")
    out_dir = Path(out_dir or config.EVAL_DIR)
    pred_dir = out_dir / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    if show_progress is None:
        show_progress = sys.stderr.isatty()

    rows, failed = [], []
    t0 = time.time()
    for cid, path, read in tqdm(jobs, desc=f"evaluate {split}", unit="case", disable=not show_progress):
        try:
            case = read(path)
            prepared = inference.prepare_case(case["ct"])  # resampled CT and femoral heads, for both steps
            if prepared["pelvis"].get("found") or not config.STATUS_CLEAR_NOT_IMAGED:
                pred = inference.predict_case(model, case["ct"], device, prepared)
            else:  # no pelvis: the status rule would remove every organ, and no metric reads what it removed
                pred = np.zeros(case["ct"].shape[:3], np.uint8)
            pred, assessment = status.assess(case["ct"], pred, model, device, thresholds, organs, prepared)
        except (preprocessing.CaseError, FileNotFoundError) as exc:
            failed.append((cid, str(exc)))
            print(f"evaluate: skipped {cid}: {exc}")
            continue
        ct = case["ct"]
        save_nifti_atomic(nib.Nifti1Image(pred, ct.affine), pred_dir / f"{cid}.nii.gz")
        rows.append(metrics.case_metrics(pred, case["masks"], header_spacing(ct), case_id=cid, organs=organs))
        rows[-1].update(status.row_fields(assessment, status.true_status(path, case["masks"], organs), organs))

    summary = metrics.summarize(rows, organs=organs, checkpoint=ckpt_path)
    summary.update(split=split, data_root=str(root), empty_cases=[str(p) for p in empty],
                   failed=[{"case_id": c, "reason": r} for c, r in failed],
                   seconds=time.time() - t0, checkpoint_epoch=ckpt.get("epoch"),
                   settings_from_checkpoint={k: list(v[1]) for k, v in changed.items()},
                   decisions={"logit_offset": dict(config.ORGAN_LOGIT_OFFSET),
                              "largest_component": inference.keep_largest_on(config.LARGEST_COMPONENT),
                              "min_organ_ml": dict(config.MIN_ORGAN_ML)},
                   status=status.summarize(rows, organs))
    write_csv(rows, out_dir / "metrics_per_case.csv", organs)
    write_text_atomic(out_dir / "summary_statistics.json", json.dumps(summary, indent=2))
    names = make_plots(rows, organs, out_dir, root, pred_dir) if plots and rows else []
    notes = [f"{k} = {list(v[1])} (config: {list(v[0])})" for k, v in changed.items()]
    write_text_atomic(out_dir / "evaluation_report.md", report_markdown(summary, rows, failed, notes, names, organs))
    mean = summary["mean_dice_present"]
    print(f"evaluate: {len(rows)} cases ({len(failed)} failed) -> {out_dir}; mean Dice over present organs "
          f"{'n/a' if mean is None else f'{mean:.3f}'}")
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: CHECKPOINT_DIR/best_model.pth")
    parser.add_argument("--split", default="test", help="split of processed/splits.json (default test)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="evaluate every case folder of this labelled AbdomenAtlas-layout folder instead")
    parser.add_argument("--empty", type=Path, nargs="+", default=[], metavar="CT",
                        help="CT files with none of the organs in them (chest scans...): any voxel is a false organ")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default EVAL_DIR)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    args, rest = parser.parse_known_args(argv)
    try:
        config.configure(rest)
        split = None if (args.data_root or args.empty) and args.split == "test" else args.split
        evaluate(args.checkpoint, split, plots=not args.no_plots, data_root_dir=args.data_root, empty=args.empty,
                 out_dir=args.out)
    except (ValueError, FileNotFoundError) as exc:  # SettingError, CaseError, bad checkpoint: one line
        sys.exit(f"evaluate: {exc}")


if __name__ == "__main__":
    main()

"""Figures and one report that say what a run did: data, settings, training, evaluation, caveats.

Usage:
    python analyze.py                      # reads logs/, processed/, evaluation_results/; writes analysis/
    python analyze.py --OUTPUT_ROOT=/runs/a  # same, for another run folder (any config.py setting works)

Reads only files on disk (logs/train_log.jsonl, logs/run.json, processed/manifest.json and the per-case
meta.json, evaluation_results/summary_statistics.json, metrics_per_case.csv and its PNGs). Every input is
optional: a missing or unreadable one is named in the report's "Missing" list instead of stopping the run,
so this works while training is still running or before evaluation. Output: ANALYSIS_DIR/report.md, a
report.html made from it (no extra dependency) and the PNG figures the report links with relative paths.
"""
import csv
import datetime
import html
import json
import math
import os
import re
import sys
import urllib.parse
from pathlib import Path

import numpy as np

import config
import fileio
from fileio import pyplot as _plt, write_text_atomic

ABSENT_RULE = ("An organ absent from the reference is reported as absent (correctly absent, or a false organ "
               "when the model predicts one), never as Dice 1.0; Dice, HD95 and NSD are averaged over "
               "organ-present cases only.")
DPI = 110
RUN_SETTINGS = ("TARGET_SPACING", "PATCH_SIZE", "BATCH_SIZE", "EPOCHS", "ITERS_PER_EPOCH", "LR", "WEIGHT_DECAY",
                "BASE_CHANNELS", "DEPTH", "ATTENTION", "AMP", "AUGMENT", "VAL_EVERY", "SEED", "HU_CLIP",
                "SW_OVERLAP", "TTA_MIRROR", "LARGEST_COMPONENT", "DATA_ROOT")
EVAL_FIGURES = ("dice_boxplot.png", "hd95_boxplot.png", "dice_vs_hausdorff.png", "volume_agreement.png")


# --- Reading inputs (every reader returns None / [] and a note instead of raising) ----------

def read_json(path, missing):
    """Parsed JSON from `path`, or None with a line appended to `missing`."""
    path = Path(path)
    if not path.is_file():
        missing.append(f"`{path.name}` not found ({path})")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        missing.append(f"`{path.name}` unreadable ({path}): {str(err).splitlines()[0]}")
        return None


def read_jsonl(path, missing):
    """List of dicts from a JSON-lines file; bad lines (e.g. a half-written last line) are skipped and counted."""
    path = Path(path)
    if not path.is_file():
        missing.append(f"`{path.name}` not found ({path})")
        return []
    rows, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        missing.append(f"`{path.name}`: {bad} unreadable line(s) skipped")
    return rows


def read_csv(path, missing):
    """Rows of a CSV as dicts (strings), or [] with a note."""
    path = Path(path)
    if not path.is_file():
        missing.append(f"`{path.name}` not found ({path})")
        return []
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error) as err:
        missing.append(f"`{path.name}` unreadable ({path}): {err}")
        return []


def to_float(value):
    """float or None for '', None, NaN, inf and text that is no number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def first_key(mapping, names, default=None):
    """Value of the first of `names` found in `mapping` or in a dict nested one level down (names in order of
    preference, so a nested "original_spacing" wins over a top-level "spacing")."""
    if not isinstance(mapping, dict):
        return default
    nested = [v for v in mapping.values() if isinstance(v, dict)]
    for name in names:
        for level in [mapping] + nested:
            if level.get(name) is not None:
                return level[name]
    return default


def case_record(entry, meta):
    """One case's dataset facts: {"case_id", "spacing" (x, y, z mm) or None, "organs": {organ: (present, mL)}}.

    Producers are free in how they nest meta.json, so this looks for the usual names: an "organs" dict of
    per-organ dicts, or flat per-organ dicts named like "organ_ml" / "presence".
    """
    merged = dict(entry or {})
    merged.update(meta or {})
    spacing = first_key(merged, ("original_spacing", "spacing_original", "source_spacing", "spacing"))
    if spacing is None and first_key(merged, ("affine", "original_affine")) is not None:
        try:
            aff = np.asarray(first_key(merged, ("original_affine", "affine")), dtype=float)
            spacing = np.linalg.norm(aff[:3, :3], axis=0).tolist()
        except (ValueError, IndexError, TypeError):
            spacing = None
    try:
        spacing = [float(s) for s in spacing][:3] if spacing is not None else None
        if spacing is not None and len(spacing) != 3:
            spacing = None
    except (TypeError, ValueError):
        spacing = None
    organs = {}
    per_organ = merged.get("organs") if isinstance(merged.get("organs"), dict) else {}
    for organ in config.ORGANS:
        info = per_organ.get(organ) if isinstance(per_organ.get(organ), dict) else {}
        ml = to_float(first_key(info, ("volume_ml", "ml", "mL", "vol_ml", "volume")))
        present = info.get("present", info.get("presence"))
        for name in ("organ_ml", "volumes_ml", "volume_ml", "organ_volumes_ml"):
            if ml is None and isinstance(merged.get(name), dict):
                ml = to_float(merged[name].get(organ))
        for name in ("organs_present", "presence", "present", "organ_present"):
            if present is None and isinstance(merged.get(name), dict):
                present = merged[name].get(organ)
        voxels = to_float(first_key(info, ("voxels", "voxel_count", "n_voxels")))
        if present is None and (ml is not None or voxels is not None):
            present = (ml or 0) > 0 or (voxels or 0) > 0
        organs[organ] = (None if present is None else bool(present), ml)
    return {"case_id": merged.get("case_id", "?"), "spacing": spacing, "organs": organs}


def load_dataset(missing):
    """(manifest dict or None, list of case records) from PROCESSED_DIR."""
    manifest = read_json(Path(config.PROCESSED_DIR) / "manifest.json", missing)
    if not isinstance(manifest, dict):
        return None, []
    records = []
    for entry in manifest.get("cases") or []:
        if not isinstance(entry, dict) or entry.get("ok") is False:
            continue
        meta_path = Path(config.PROCESSED_DIR) / "cases" / str(entry.get("case_id")) / "meta.json"
        meta = None
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                missing.append(f"`{meta_path}` unreadable")
        records.append(case_record(entry, meta if isinstance(meta, dict) else None))
    return manifest, records


def load_inputs():
    """Everything the report uses, as one dict; `missing` lists what was not there."""
    missing = []
    log = read_jsonl(Path(config.LOG_DIR) / "train_log.jsonl", missing)
    log = sorted((r for r in log if to_float(r.get("epoch")) is not None), key=lambda r: to_float(r["epoch"]))
    run = read_json(Path(config.LOG_DIR) / "run.json", missing)
    manifest, records = load_dataset(missing)
    summary = read_json(Path(config.EVAL_DIR) / "summary_statistics.json", missing)
    rows = read_csv(Path(config.EVAL_DIR) / "metrics_per_case.csv", missing)
    inputs = {"log": log, "run": run if isinstance(run, dict) else None,
              "manifest": manifest, "records": records,
              "summary": summary if isinstance(summary, dict) else None, "rows": rows, "missing": missing}
    inputs["phantom"] = is_phantom(inputs)
    return inputs


# --- Figures ---------------------------------------------------------------------------------

def save_figure(fig, path):
    """Lay out, write atomically and close a figure."""
    fig.tight_layout()
    return fileio.save_figure(fig, path, DPI)


def series(log, key, organ=None):
    """(epochs, values) of one log field, dropping epochs where it is null."""
    xs, ys = [], []
    for row in log:
        value = row.get(key)
        if organ is not None:
            value = value.get(organ) if isinstance(value, dict) else None
        value = to_float(value)
        if value is not None:
            xs.append(to_float(row["epoch"]))
            ys.append(value)
    return xs, ys


def _line(ax, xs, ys, label, **kw):
    """Line plus markers (dropped on long runs, where they only clutter); a single point still shows."""
    ax.plot(xs, ys, marker="o" if len(xs) <= 40 else None, markersize=3.5, label=label, **kw)


def _epoch_axis(ax, log):
    """Whole-number epoch ticks over every logged epoch, so sparse series (validation) sit in context."""
    from matplotlib.ticker import MaxNLocator
    epochs = [to_float(r["epoch"]) for r in log]
    ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def _from_zero(ax, ys):
    """y axis from 0 with headroom above the largest value."""
    if ys:
        ax.set_ylim(0, max(ys) * 1.12 or 1)


def plot_loss(log, out):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        xs, ys = series(log, key)
        if xs:
            _line(ax, xs, ys, label)
    ax.set(ylabel="loss (as logged by train.py)", title="Training and validation loss")
    _epoch_axis(ax, log)
    ax.legend()
    return save_figure(fig, out)


def plot_dice(log, out):
    """Per-organ validation Dice and their mean; None when no epoch has a validation Dice."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for organ in config.ORGANS:
        xs, ys = series(log, "val_dice", organ)
        if xs:
            _line(ax, xs, ys, organ)
            drawn = True
    xs, ys = series(log, "val_dice_mean")
    if xs:
        _line(ax, xs, ys, "mean (organ-present)", color="black", linestyle="--", linewidth=2)
        drawn = True
    if not drawn:
        _plt().close(fig)
        return None
    ax.set(ylabel="Dice (organ-present validation cases)", ylim=(0, 1.02), title="Validation Dice per organ")
    _epoch_axis(ax, log)
    ax.legend(loc="lower right")
    return save_figure(fig, out)


def plot_single(log, key, ylabel, title, out):
    xs, ys = series(log, key)
    if not xs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    _line(ax, xs, ys, ylabel)
    _from_zero(ax, ys)
    ax.set(ylabel=ylabel, title=title)
    _epoch_axis(ax, log)
    return save_figure(fig, out)


def plot_throughput(log, out):
    time_x, time_y = series(log, "epoch_time_s")
    rate_x, rate_y = series(log, "patches_per_s")
    if not time_x and not rate_x:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    _line(ax1, time_x, time_y, "epoch time")
    ax1.set(ylabel="epoch time (s)", title="Time per epoch (incl. validation)")
    _line(ax2, rate_x, rate_y, "patches/s", color="tab:green")
    ax2.set(ylabel="training patches per second", title="Training throughput")
    for ax, ys in ((ax1, time_y), (ax2, rate_y)):
        _epoch_axis(ax, log)
        _from_zero(ax, ys)
    return save_figure(fig, out)


def plot_organ_presence(records, out):
    counts = {o: [sum(1 for r in records if r["organs"][o][0] is True),
                  sum(1 for r in records if r["organs"][o][0] is False)] for o in config.ORGANS}
    if not any(sum(c) for c in counts.values()):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(config.ORGANS))
    for shift, idx, label, color in ((-0.2, 0, "present", "tab:blue"), (0.2, 1, "absent (all-zero mask)", "tab:gray")):
        values = [counts[o][idx] for o in config.ORGANS]
        bars = ax.bar(x + shift, values, width=0.4, label=label, color=color)
        ax.bar_label(bars, padding=2)
    from matplotlib.ticker import MaxNLocator
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xticks(x, config.ORGANS)
    ax.set(ylabel="cases", title=f"Organ presence in {len(records)} preprocessed cases")
    ax.set_ylim(0, max(max(c) for c in counts.values()) * 1.15 + 1)
    ax.legend()
    return save_figure(fig, out)


def plot_spacing(records, out):
    spacings = np.array([r["spacing"] for r in records if r["spacing"] is not None], dtype=float)
    if spacings.size == 0:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    from matplotlib.ticker import MaxNLocator
    bins = min(20, max(5, len(spacings) // 2))
    ax1.hist(spacings[:, :2].mean(axis=1), bins=bins, color="tab:blue", edgecolor="white")
    ax1.set(xlabel="in-plane voxel size, mean of x and y (mm)", ylabel="cases", title="In-plane spacing")
    ax2.hist(spacings[:, 2], bins=bins, color="tab:orange", edgecolor="white")
    ax2.set(xlabel="slice spacing z (mm)", ylabel="cases", title="Slice thickness (spacing along z)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, axis="y")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, out)


def plot_volumes(records, out):
    """One panel per organ (volumes differ ten-fold between organs, so each gets its own axis)."""
    data = {o: [r["organs"][o][1] for r in records if r["organs"][o][0] and r["organs"][o][1] is not None]
            for o in config.ORGANS}
    organs = [o for o in config.ORGANS if data[o]]
    if not organs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(organs), figsize=(3.4 * len(organs) + 0.8, 4), squeeze=False)
    rng = np.random.default_rng(0)  # jitter only; fixed so figures are reproducible
    for ax, organ, color in zip(axes[0], organs, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        values = data[organ]
        ax.boxplot([values], widths=0.5, showfliers=False, medianprops={"color": "black"})
        ax.scatter(1 + rng.uniform(-0.15, 0.15, len(values)), values, s=14, alpha=0.7, color=color)
        ax.set_xticks([1], [f"{organ} (n={len(values)})"])
        ax.set(ylabel="volume (mL)", title=organ)
        ax.set_ylim(0, max(values) * 1.15 or 1)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Organ volumes in cases where the organ is present")
    return save_figure(fig, out)


def make_figures(inputs, out_dir):
    """All figures that the inputs allow; {name: Path} for those written."""
    log, records = inputs["log"], inputs["records"]
    jobs = {}
    if log:
        jobs.update({
            "loss_curves": lambda p: plot_loss(log, p),
            "dice_scores": lambda p: plot_dice(log, p),
            "learning_rate": lambda p: plot_single(log, "lr", "learning rate", "Learning-rate schedule", p),
            "throughput": lambda p: plot_throughput(log, p),
            "memory": lambda p: plot_single(log, "peak_mem_mb", "peak memory (MB)",
                                            "Peak memory per epoch (device or process)", p),
        })
    if records:
        jobs.update({
            "organ_presence": lambda p: plot_organ_presence(records, p),
            "spacing_histograms": lambda p: plot_spacing(records, p),
            "organ_volumes": lambda p: plot_volumes(records, p),
        })
    figures = {}
    for name, job in jobs.items():
        path = Path(out_dir) / f"{name}.png"
        try:
            result = job(path)
        except Exception as err:  # a figure must never cost the report; the reason goes into it
            inputs["missing"].append(f"figure `{name}.png` failed: {type(err).__name__}: {err}")
            result = None
        if result is not None:
            figures[name] = Path(result)
    return figures


# --- Facts for the report --------------------------------------------------------------------

def settings_of(inputs):
    """(settings dict, where it came from): the run record wins, then the manifest, then today's config."""
    run, manifest = inputs["run"] or {}, inputs["manifest"] or {}
    if isinstance(run.get("settings"), dict):
        return run["settings"], "run.json"
    if isinstance(manifest.get("settings"), dict) and manifest["settings"]:
        return manifest["settings"], "manifest.json (preprocessing settings only)"
    return config.settings(), "current config.py (no run record found)"


def is_phantom(inputs):
    """True / False when the inputs tell whether the data root was the synthetic phantom, else None."""
    manifest, run = inputs["manifest"] or {}, inputs["run"] or {}
    for source in (manifest, manifest.get("settings") or {}, run, manifest.get("stats") or {}):
        if not isinstance(source, dict):
            continue
        for key in ("phantom", "is_phantom"):
            if isinstance(source.get(key), bool):
                return source[key]
        kind = source.get("data_source") or source.get("dataset")
        if isinstance(kind, str) and kind:
            return "phantom" in kind.lower()
    settings, _ = settings_of(inputs)
    root = Path(str(settings.get("DATA_ROOT") or manifest.get("data_root") or config.DATA_ROOT))
    if (root / "phantom.json").is_file():  # the phantom's own marker in its data root
        return True
    cases = sorted(root.glob("BDMAP_*")) if root.is_dir() else []
    if cases:  # the contract: a case-level meta.json is written by the phantom only
        return any((c / "meta.json").is_file() for c in cases)
    return None


def training_facts(inputs):
    """Best epoch, best mean validation Dice, time, epochs run vs planned, and whether the run finished."""
    log, run = inputs["log"], inputs["run"] or {}
    settings, _ = settings_of(inputs)
    scored = [(to_float(r.get("val_dice_mean")), r) for r in log]
    scored = [(d, r) for d, r in scored if d is not None]
    best_row = max(scored, key=lambda t: t[0])[1] if scored else None
    flagged = [r for r in log if r.get("best") is True]
    if run.get("best_epoch") is not None:
        best_epoch = run["best_epoch"]
    elif flagged:
        best_epoch = flagged[-1]["epoch"]
    else:
        best_epoch = best_row["epoch"] if best_row else None
    best_dice = None
    for row in log:
        if best_epoch is not None and to_float(row.get("epoch")) == to_float(best_epoch):
            best_dice = to_float(row.get("val_dice_mean"))
    if best_dice is None and best_row is not None:
        best_dice = to_float(best_row.get("val_dice_mean"))
    seconds = to_float(run.get("train_seconds"))
    if seconds is None and log:
        seconds = sum(to_float(r.get("epoch_time_s")) or 0.0 for r in log)
    return {"best_epoch": best_epoch, "best_dice": best_dice, "seconds": seconds,
            "epochs_run": len(log), "epochs_planned": settings.get("EPOCHS"),
            "last_epoch": log[-1].get("epoch") if log else None,
            "finished": bool(run.get("end_time")), "best_row": best_row}


def stats_from_values(values):
    values = np.array([v for v in values if v is not None], dtype=float)
    if values.size == 0:
        return {"n": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "median": float(median), "q1": float(q1), "q3": float(q3), "n": int(values.size)}


def organ_stats(inputs):
    """{organ: {"n_present", "dice", "hd95", "nsd2", "detection"}} from summary_statistics.json, filled in from
    metrics_per_case.csv where the summary lacks a field (or is missing)."""
    summary_organs = (inputs["summary"] or {}).get("organs") or {}
    rows = inputs["rows"]
    out = {}
    for organ in config.ORGANS:
        entry = dict(summary_organs.get(organ) or {})
        statuses = [r.get(f"status_{organ}", "") for r in rows]
        present = [r for r, s in zip(rows, statuses) if s in ("present_detected", "missed")]
        for metric in ("dice", "hd95", "nsd2"):
            if not isinstance(entry.get(metric), dict) and rows:
                entry[metric] = stats_from_values([to_float(r.get(f"{metric}_{organ}")) for r in present])
        if entry.get("n_present") is None and rows:
            entry["n_present"] = len(present)
        if not isinstance(entry.get("detection"), dict) and rows:
            entry["detection"] = {"tp": statuses.count("present_detected"), "fn": statuses.count("missed"),
                                  "fp": statuses.count("false_organ"), "tn": statuses.count("correctly_absent")}
        if entry.get("false_organ_volumes_ml") is None and rows:
            entry["false_organ_volumes_ml"] = [to_float(r.get(f"vol_pred_ml_{organ}")) for r, s in
                                               zip(rows, statuses) if s == "false_organ"]
        out[organ] = entry
    return out


def suspicious_dice(inputs):
    """A warning when every per-case Dice is exactly 0 or 1 -- the signature of a model that predicts nothing
    scored with an empty-equals-perfect rule (what voided the original README's 0.88)."""
    values = [to_float(r.get(f"dice_{o}")) for r in inputs["rows"] for o in config.ORGANS]
    values = [v for v in values if v is not None]
    if len(values) >= 4 and all(v in (0.0, 1.0) for v in values):
        return ("Every per-case Dice is exactly 0 or 1. That usually means empty predictions or a scoring bug, "
                "not a perfect or useless model; check the predictions before trusting these numbers.")
    return None


# --- Markdown --------------------------------------------------------------------------------

def fmt(value, digits=3):
    value = to_float(value)
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def fmt_stats(stats, digits=3):
    """'mean ± std' and 'median [q1, q3]' cells from a stats dict."""
    if not isinstance(stats, dict) or to_float(stats.get("mean")) is None:
        return "–", "–"
    return (f"{fmt(stats.get('mean'), digits)} ± {fmt(stats.get('std'), digits)}",
            f"{fmt(stats.get('median'), digits)} [{fmt(stats.get('q1'), digits)}, {fmt(stats.get('q3'), digits)}]")


def fmt_duration(seconds):
    seconds = to_float(seconds)
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def table(header, rows):
    """Markdown table lines; '|' inside cells escaped."""
    def cell(value):
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def link_target(path, out_dir):
    """Relative, URL-quoted path from the report folder to `path`."""
    rel = os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())
    return urllib.parse.quote(rel.replace(os.sep, "/"))


def image(path, out_dir, alt):
    return [f"![{alt}]({link_target(path, out_dir)})", ""]


def section_data(inputs, figures, out_dir):
    lines = ["## Data", ""]
    manifest, records = inputs["manifest"], inputs["records"]
    if manifest is None:
        return lines + ["_No `processed/manifest.json`: preprocessing has not run (or wrote elsewhere). "
                        "Run `python run_pipeline.py --preprocess`._", ""]
    skipped = [s for s in manifest.get("skipped") or [] if isinstance(s, dict)]
    failed = [c for c in manifest.get("cases") or [] if isinstance(c, dict) and c.get("ok") is False]
    lines += [f"- Cases preprocessed: **{len(records)}**; skipped: **{len(skipped) + len(failed)}**."]
    spacings = [r["spacing"] for r in records if r["spacing"] is not None]
    if spacings:
        arr = np.array(spacings)
        lines.append(f"- Source spacing: in-plane {arr[:, :2].min():.2f}–{arr[:, :2].max():.2f} mm, "
                     f"slices {arr[:, 2].min():.2f}–{arr[:, 2].max():.2f} mm.")
    target = (manifest.get("settings") or {}).get("TARGET_SPACING")
    if target is not None:
        lines.append(f"- Resampled to {target} mm (x, y, z) for the model.")
    lines.append("")
    if skipped or failed:
        rows = [(s.get("case_id", "?"), s.get("reason", "no reason given")) for s in skipped + failed]
        lines += ["Skipped cases:", ""] + table(("case", "reason"), rows)
    if records:
        rows = []
        for organ in config.ORGANS:
            flags = [r["organs"][organ][0] for r in records]
            vols = stats_from_values([r["organs"][organ][1] for r in records if r["organs"][organ][0]])
            median = (f"{fmt(vols['median'], 1)} [{fmt(vols['q1'], 1)}, {fmt(vols['q3'], 1)}]"
                      if vols["n"] else "–")
            rows.append((organ, flags.count(True), flags.count(False), flags.count(None), median))
        lines += table(("organ", "present", "absent", "unknown", "volume mL, median [IQR] (present)"), rows)
    for name, alt in (("organ_presence", "Organ presence"), ("spacing_histograms", "Spacing histograms"),
                      ("organ_volumes", "Organ volumes"), ("phantom_preview", "Phantom preview")):
        if name in figures:
            lines += image(figures[name], out_dir, alt)
    return lines


def section_run(inputs):
    run = inputs["run"] or {}
    settings, source = settings_of(inputs)
    lines = ["## Settings and run record", ""]
    if not run:
        why = "an older train.py, or training not started" if inputs["log"] else "training has not started here"
        lines += [f"_No `logs/run.json` ({why}). Settings below are from {source}._", ""]
    device = run.get("device")
    if isinstance(device, dict):
        device = ", ".join(f"{k}: {v}" for k, v in device.items())
    commit = run.get("git_commit") or run.get("commit") or run.get("git")
    if isinstance(commit, dict):
        commit = commit.get("commit") or json.dumps(commit)
    argv = run.get("argv")
    facts = [("profile", run.get("profile") or settings.get("PROFILE")), ("device", device),
             ("git commit", commit), ("torch", run.get("torch_version") or run.get("torch")),
             ("command", " ".join(argv) if isinstance(argv, list) else argv),
             ("started", run.get("start_time")), ("ended", run.get("end_time")), ("settings from", source)]
    if run:
        lines += table(("item", "value"), [(k, f"`{v}`" if k in ("git commit", "command") and v else (v or "–"))
                                           for k, v in facts])
    lines += table(("setting", "value"), [(k, settings[k]) for k in RUN_SETTINGS if k in settings])
    return lines


def section_training(inputs, figures, out_dir):
    lines = ["## Training", ""]
    if not inputs["log"]:
        return lines + ["_No training log (`logs/train_log.jsonl`): training has not run yet._", ""]
    facts = training_facts(inputs)
    planned = facts["epochs_planned"]
    if inputs["run"] is None:
        status = "no run record (`logs/run.json`), so whether it finished is unknown"
    elif facts["finished"]:
        status = "finished"
    else:
        status = "no end time recorded: training is still running or was interrupted"
    lines += [f"- Epochs logged: **{facts['epochs_run']}**" + (f" of {planned} planned" if planned else "")
              + f" (last: {facts['last_epoch']}); {status}.",
              f"- Best epoch: **{facts['best_epoch'] if facts['best_epoch'] is not None else '–'}**, "
              f"best mean validation Dice (organ-present cases): **{fmt(facts['best_dice'])}**.",
              f"- Training time: **{fmt_duration(facts['seconds'])}**.", ""]
    best = facts["best_row"]
    if best and isinstance(best.get("val_dice"), dict):
        false = best.get("val_false_organs") if isinstance(best.get("val_false_organs"), dict) else {}
        lines += table(("organ", f"val Dice at epoch {best.get('epoch')}", "false organs in val"),
                       [(o, fmt(best["val_dice"].get(o)), false.get(o, "–")) for o in config.ORGANS])
    if facts["best_dice"] is None:
        lines += ["_No validation Dice logged yet (validation runs every VAL_EVERY epochs)._", ""]
    for name, alt in (("loss_curves", "Loss curves"), ("dice_scores", "Validation Dice"),
                      ("learning_rate", "Learning rate"), ("throughput", "Throughput"), ("memory", "Peak memory")):
        if name in figures:
            lines += image(figures[name], out_dir, alt)
    return lines


def section_evaluation(inputs, out_dir):
    lines = ["## Evaluation on the test split", ""]
    summary, rows = inputs["summary"], inputs["rows"]
    if summary is None and not rows:
        return lines + ["_Evaluation is missing: no `evaluation_results/summary_statistics.json` or "
                        "`metrics_per_case.csv`. Run `python run_pipeline.py --eval`._", ""]
    summary = summary or {}
    n_cases = summary.get("n_cases", len(rows) if rows else None)
    lines.append(f"- Test cases: **{n_cases if n_cases is not None else '–'}**; checkpoint: "
                 f"`{summary.get('checkpoint', '–')}`; mean Dice over organ-present cases: "
                 f"**{fmt(summary.get('mean_dice_present'))}**.")
    if summary.get("empty_rule"):
        lines.append(f"- Rule used by evaluation: {summary['empty_rule']}")
    lines.append("")
    warning = suspicious_dice(inputs)
    if warning:
        lines += [f"> **Warning.** {warning}", ""]
    stats = organ_stats(inputs)
    metric_rows = []
    for organ in config.ORGANS:
        entry = stats[organ]
        cells = [organ, entry.get("n_present", "–")]
        for metric, digits in (("dice", 3), ("hd95", 2), ("nsd2", 3)):
            cells += fmt_stats(entry.get(metric), digits)
        metric_rows.append(cells)
    lines += ["Accuracy over organ-present cases (HD95 in mm; NSD at 2 mm tolerance):", ""]
    lines += table(("organ", "n present", "Dice mean ± std", "Dice median [IQR]", "HD95 mean ± std",
                    "HD95 median [IQR]", "NSD@2mm mean ± std", "NSD@2mm median [IQR]"), metric_rows)
    det_rows = []
    for organ in config.ORGANS:
        det = stats[organ].get("detection") or {}
        vols = [to_float(v) for v in stats[organ].get("false_organ_volumes_ml") or []]
        vols = [v for v in vols if v is not None]
        false_count = det.get("fp", len(vols)) if det else (len(vols) if rows else "–")
        det_rows.append((organ, det.get("tp", "–"), det.get("fn", "–"), false_count, det.get("tn", "–"),
                         f"{np.median(vols):.1f}" if vols else "–"))
    total_false = sum(r[3] for r in det_rows if isinstance(r[3], int))
    lines += ["Detection per organ and case (present = reference mask not empty). A false organ is a "
              f"prediction where the reference has none; false organs in total: **{total_false}**.", ""]
    lines += table(("organ", "TP (present, found)", "FN (present, missed)", "FP (false organ)",
                    "TN (correctly absent)", "false-organ volume mL (median)"), det_rows)
    links = [f"[{p.name}]({link_target(p, out_dir)})" for p in
             (Path(config.EVAL_DIR) / "metrics_per_case.csv", Path(config.EVAL_DIR) / "evaluation_report.md",
              Path(config.EVAL_DIR) / "summary_statistics.json") if p.is_file()]
    if links:
        lines += ["Files: " + ", ".join(links), ""]
    pngs = sorted(Path(config.EVAL_DIR).glob("*.png"))
    known = [Path(config.EVAL_DIR) / n for n in EVAL_FIGURES if (Path(config.EVAL_DIR) / n).is_file()]
    overlays = [p for p in pngs if p.name.startswith("overlay_")]
    others = [p for p in pngs if p not in known and p not in overlays]
    for png in known + others:
        lines += image(png, out_dir, png.stem.replace("_", " "))
    if overlays:
        lines += ["### Overlays (reference vs prediction)", ""]
        for png in overlays:
            lines += image(png, out_dir, png.stem.replace("_", " "))
    return lines


def section_generalisation(out_dir):
    """Where the model was never trained: held-out-style phantoms and real CTs with no pelvic organ."""
    path = Path(config.EVAL_DIR) / "heldout" / "summary_statistics.json"
    lines = ["## Generalisation check (held out: never used to train, tune or pick a checkpoint)", ""]
    if not path.is_file():
        return lines + ["_Not run: no `evaluation_results/heldout/summary_statistics.json` "
                        "(`python run_pipeline.py --eval` writes it; HELDOUT_CASES=0 and no EMPTY_CTS skip it)._", ""]
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return lines + [f"_Unreadable: `{path}`._", ""]
    empty = summary.get("empty_cases") or []
    lines += [f"- {summary.get('n_cases', '–')} cases: held-out-style phantoms of `{summary.get('data_root', '–')}` "
              f"and {len(empty)} real CTs that hold no pelvic organ"
              + (f" ({', '.join(Path(e).name for e in empty)})" if empty else "") + ".", ""]
    rows = []
    for organ, e in (summary.get("organs") or {}).items():
        det = e.get("detection") or {}
        vols = e.get("false_organ_volumes_ml") or []
        rows.append((organ, e.get("n_present", "–"), *fmt_stats(e.get("dice"), 3), det.get("fn", "–"),
                     det.get("fp", "–"), ", ".join(f"{v:.1f}" for v in vols) or "–"))
    lines += table(("organ", "n present", "Dice mean ± std", "Dice median [IQR]", "missed", "false organs",
                    "false-organ volumes mL"), rows)
    link = Path(config.EVAL_DIR) / "heldout" / "evaluation_report.md"
    if link.is_file():
        lines += [f"Per case: [{link.name}]({link_target(link, out_dir)})", ""]
    return lines


def section_caveats(inputs):
    phantom = inputs["phantom"]
    lines = ["## Caveats", ""]
    if phantom is True:
        lines.append("- **Trained and tested on the synthetic phantom**, not on patient CT. These numbers show "
                     "that the pipeline runs end to end; accuracy on real scans is not measured here.")
    elif phantom is None:
        lines.append("- Could not tell from the manifest or run record whether the data was the synthetic "
                     "phantom or real CT; read the numbers with that in mind.")
    lines += [f"- Absent-organ rule: {ABSENT_RULE}",
              "- Validation Dice during training is a quick check on the validation split; the test-split "
              "table above is the result to quote.",
              "- **Not a medical device.** For research and teaching; not for diagnosis or treatment planning.",
              ""]
    return lines


def render_markdown(inputs, figures, out_dir):
    """The whole report as one markdown string."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = ["# Pelvic organ segmentation: run report", "",
             f"Generated {now} by `analyze.py` from `{config.PROCESSED_DIR}`, `{config.LOG_DIR}` and "
             f"`{config.EVAL_DIR}`.", ""]
    stages = [("data", inputs["manifest"] is not None), ("training log", bool(inputs["log"])),
              ("evaluation", inputs["summary"] is not None or bool(inputs["rows"]))]
    lines += ["Stages found: " + ", ".join(f"{name} {'✓' if ok else '✗ (missing)'}" for name, ok in stages), ""]
    if inputs["phantom"]:
        lines += ["> Results below come from the **synthetic phantom**; performance on real CT is not measured.",
                  ""]
    lines += section_data(inputs, figures, out_dir)
    lines += section_run(inputs)
    lines += section_training(inputs, figures, out_dir)
    lines += section_evaluation(inputs, out_dir)
    lines += section_generalisation(out_dir)
    lines += section_caveats(inputs)
    if inputs["missing"]:
        lines += ["## Missing or unreadable inputs", ""] + [f"- {m}" for m in inputs["missing"]] + [""]
    return "\n".join(lines)


# --- Minimal markdown -> HTML (only the constructs render_markdown writes) ---------------------

def inline_html(text):
    text = html.escape(text, quote=False)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f'<img src="{m[2]}" alt="{m[1]}">', text)
    text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", lambda m: f'<a href="{m[2]}">{m[1]}</a>', text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<![\w*])_([^_]+?)_(?![\w*])", r"<em>\1</em>", text)


def split_row(line):
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def markdown_to_html(md, title="Run report"):
    body, i, lines = [], 0, md.splitlines()
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{inline_html(line[level:].strip())}</h{level}>")
        elif line.startswith("| "):
            header = split_row(line)
            i += 2  # skip the |---| line
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_row(lines[i]))
                i += 1
            head = "".join(f"<th>{inline_html(c)}</th>" for c in header)
            rows_html = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in r) + "</tr>" for r in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline_html(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith("> "):
            body.append(f"<blockquote>{inline_html(line[2:])}</blockquote>")
        elif line.strip():
            body.append(f"<p>{inline_html(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #bbb;padding:3px 8px;"
             "text-align:left}th{background:#eee}img{max-width:100%;display:block;margin:0.5em 0 1.5em}"
             "blockquote{border-left:4px solid #d9822b;margin:1em 0;padding:0.3em 1em;background:#fff6ea}"
             "code{background:#f3f3f3;padding:0 3px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- Entry points ----------------------------------------------------------------------------


def phantom_preview(inputs, out_dir):
    """analysis/phantom_preview.png via phantom.preview() when the data is the phantom; None otherwise."""
    if inputs["phantom"] is not True:
        return None
    settings, _ = settings_of(inputs)
    out = Path(out_dir) / "phantom_preview.png"
    try:
        import phantom
        phantom.preview(Path(str(settings.get("DATA_ROOT") or config.DATA_ROOT)), out)
    except (ImportError, AttributeError):
        return None
    except Exception as err:  # a preview is a nicety; say why it is absent and carry on
        inputs["missing"].append(f"phantom preview failed: {type(err).__name__}: {err}")
        return None
    return out if out.is_file() else None


def analyze(out_dir=None):
    """Write figures, report.md and report.html to `out_dir` (default config.ANALYSIS_DIR); returns report.md."""
    out_dir = Path(out_dir or config.ANALYSIS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = load_inputs()
    figures = make_figures(inputs, out_dir)
    preview = phantom_preview(inputs, out_dir)
    if preview is not None:
        figures["phantom_preview"] = preview
    md = render_markdown(inputs, figures, out_dir)
    report = write_text_atomic(out_dir / "report.md", md)
    write_text_atomic(out_dir / "report.html", markdown_to_html(md, "Pelvic organ segmentation: run report"))
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        changed = config.apply_overrides(argv)
    except config.SettingError as err:
        sys.exit(f"analyze.py: {err}")
    for name, value in changed.items():
        print(f"setting {name} = {value}")
    report = analyze()
    print(f"report: {report}")
    print(f"        {report.with_suffix('.html')}")


if __name__ == "__main__":
    main()

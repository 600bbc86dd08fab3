"""Run the pipeline: preprocess -> train -> evaluate -> analyze, in-process and in that order.

Usage:
    python run_pipeline.py --all                      # everything (synthetic phantom if no data is given)
    python run_pipeline.py --eval --analyze           # any combination of stages
    python run_pipeline.py --all --data-root /data/AbdomenAtlas1.1Mini --EPOCHS=50

Any UPPER_CASE setting of config.py can be overridden as --NAME=value (tuples as 96,96,96; booleans as
true/false); an unknown name or a wrong type stops the run with exit code 2. PELVIS_DATA_ROOT and
PELVIS_OUTPUT_ROOT set the data and output folders from the environment.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import config

STAGES = ("preprocess", "train", "eval", "analyze")


def ensure_data():
    """Point DATA_ROOT at cases: real ones if there are any, else the synthetic phantom (generated once)."""
    root = Path(config.DATA_ROOT)
    if root.resolve() != Path(config.DEFAULT_DATA_ROOT).resolve() and not root.is_dir():
        raise FileNotFoundError(f"{root}: data root does not exist (expected BDMAP_*/ct.nii.gz case folders)")
    if root.is_dir() and any(root.glob("BDMAP_*")):
        if (root / "phantom.json").is_file():  # our own phantom: top up if more cases are asked for
            import phantom
            phantom.generate_dataset(root, config.PHANTOM_CASES, config.PHANTOM_SEED, config.PHANTOM_GRID,
                                     config.NUM_WORKERS)
        return root
    if root.resolve() != Path(config.DEFAULT_DATA_ROOT).resolve():
        raise FileNotFoundError(f"{root}: no BDMAP_* case folders in the data root")
    import phantom
    print(f"no BDMAP_* cases in {root}: generating the synthetic pelvic CT phantom "
          f"({config.PHANTOM_CASES} cases, grid {config.PHANTOM_GRID}, seed {config.PHANTOM_SEED})", flush=True)
    t0 = time.time()
    phantom.generate_dataset(root, config.PHANTOM_CASES, config.PHANTOM_SEED, config.PHANTOM_GRID,
                             config.NUM_WORKERS)
    print(f"phantom written to {root} in {time.time() - t0:.0f} s", flush=True)
    return root


def generalisation_check():
    """Score the model where it was never trained: phantoms of the held-out style and real CTs that hold no
    pelvic organ (config.EMPTY_CTS). Results in EVAL_DIR/heldout/, next to the test split's."""
    if config.HELDOUT_CASES <= 0 and not config.EMPTY_CTS:
        return None
    import evaluate
    import phantom
    root = None
    if config.HELDOUT_CASES > 0:
        root = Path(config.HELDOUT_DATA_ROOT)
        phantom.generate_dataset(root, config.HELDOUT_CASES, config.HELDOUT_SEED, config.PHANTOM_GRID,
                                 config.NUM_WORKERS, style="ood")
    print(f"generalisation check: {config.HELDOUT_CASES} held-out-style phantoms, {len(config.EMPTY_CTS)} real "
          "CTs with no pelvic organ", flush=True)
    return evaluate.evaluate(split=None, plots=False, data_root_dir=root, empty=config.EMPTY_CTS,
                             out_dir=Path(config.EVAL_DIR) / "heldout")


def run(stages, resume=False):
    """Run the named stages in pipeline order; returns {stage: seconds}."""
    timings = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        t0 = time.time()
        print(f"=== {stage} ===", flush=True)
        if stage == "preprocess":
            ensure_data()
            import preprocessing
            preprocessing.preprocess()
        elif stage == "train":
            import train
            train.train(resume=resume)
        elif stage == "eval":
            import evaluate
            evaluate.evaluate()
            generalisation_check()
        elif stage == "analyze":
            import analyze
            analyze.analyze()
        timings[stage] = time.time() - t0
        print(f"=== {stage} done in {timings[stage]:.0f} s ===", flush=True)
    return timings


def summary(timings):
    """The closing lines of --all: where every output is, and the headline numbers."""
    lines = ["", "Summary", f"  data:        {config.DATA_ROOT}", f"  processed:   {config.PROCESSED_DIR}",
             f"  checkpoints: {Path(config.CHECKPOINT_DIR) / 'best_model.pth'}",
             f"  logs:        {Path(config.LOG_DIR) / 'train_log.jsonl'}",
             f"  evaluation:  {Path(config.EVAL_DIR) / 'evaluation_report.md'}",
             f"  report:      {Path(config.ANALYSIS_DIR) / 'report.md'}"]
    for title, stats_path in (
            ("test set", Path(config.EVAL_DIR) / "summary_statistics.json"),
            ("held out (ood-style phantoms + real CTs with no pelvic organ)",
             Path(config.EVAL_DIR) / "heldout" / "summary_statistics.json")):
        if not stats_path.is_file():
            continue
        stats = json.loads(stats_path.read_text())
        lines.append(f"  {title}, organ-present cases only (absent organs are never scored as Dice 1):")
        for organ, s in stats.get("organs", {}).items():
            dice, hd = s.get("dice") or {}, s.get("hd95") or {}
            det = s.get("detection") or {}
            fmt = lambda d: "n/a" if d.get("mean") is None else f"{d['mean']:.3f}"
            lines.append(f"    {organ:9s} Dice {fmt(dice)}  HD95 {fmt(hd)} mm  (present in {s.get('n_present', 0)}, "
                         f"missed {det.get('fn', 0)}, false organ {det.get('fp', 0)})")
    lines.append("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
                 + f" (total {sum(timings.values()):.0f} s)")
    print("\n".join(lines), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="run every stage")
    parser.add_argument("--preprocess", action="store_true",
                        help="check, reorient, resample and crop the cases into processed/ (generates the phantom "
                             "when the data root holds no BDMAP_* case)")
    parser.add_argument("--train", action="store_true", help="train; checkpoints/ and logs/")
    parser.add_argument("--eval", action="store_true", help="evaluate best_model.pth on the test split")
    parser.add_argument("--analyze", action="store_true", help="figures and analysis/report.md")
    parser.add_argument("--resume", action="store_true", help="with --train: continue from checkpoint_last.pth")
    parser.add_argument("--data-root", type=Path, help="AbdomenAtlas folder of BDMAP_* cases (same as --DATA_ROOT=)")
    args, rest = parser.parse_known_args(argv)
    if args.data_root:
        rest.append(f"--DATA_ROOT={args.data_root}")
    try:
        profile, overrides = config.configure(rest)
    except config.SettingError as exc:
        parser.exit(2, f"error: {exc}\n")
    stages = STAGES if args.all else [s for s in STAGES if getattr(args, s)]
    if not stages:
        parser.print_help()
        return 2
    print(f"profile {profile}: spacing {config.TARGET_SPACING} mm, patch {config.PATCH_SIZE}, batch "
          f"{config.BATCH_SIZE}, {config.EPOCHS} epochs x {config.ITERS_PER_EPOCH} steps; "
          f"overrides: {', '.join(f'{k}={v}' for k, v in overrides.items()) or 'none'}", flush=True)
    try:
        timings = run(stages, resume=args.resume)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.all:
        summary(timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ablation of the cross-decoder attention: train + evaluate with it on and off, several seeds, same budget.

Usage:
    python ablation.py [--seeds 0 1 2] [--jobs 2] [--NAME=value ...]   # needs processed/ (run --preprocess)

Each run is a `run_pipeline.py --train --eval` subprocess with its own OUTPUT_ROOT under runs/ablation/ and
the shared processed/ folder; --jobs runs that many at once, one thread each. Prints a markdown table of
mean test Dice (organ-present cases) per organ and writes it to runs/ablation/ablation.md.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import config

OUT = config.REPO / "runs" / "ablation"


def run_one(seed, attention, extra):
    root = OUT / f"seed{seed}_attention_{'on' if attention else 'off'}"
    summary = root / "evaluation_results" / "summary_statistics.json"
    if not summary.is_file():
        threads = "1" if extra["jobs"] > 1 else str(os.cpu_count())
        cmd = [sys.executable, str(config.REPO / "run_pipeline.py"), "--train", "--eval", f"--OUTPUT_ROOT={root}",
               f"--PROCESSED_DIR={config.PROCESSED_DIR}", f"--SEED={seed}", f"--ATTENTION={attention}",
               *extra["overrides"]]
        log = root / "ablation.log"
        root.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS=threads)).returncode
        if code:
            raise RuntimeError(f"{log}: run failed with exit code {code}")
    stats = json.loads(summary.read_text())
    return {organ: s["dice"]["mean"] for organ, s in stats["organs"].items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    args, overrides = parser.parse_known_args(argv)
    try:
        config.configure(overrides)  # validate early; the runs apply them again
    except config.SettingError as exc:
        parser.exit(2, f"error: {exc}\n")
    runs = [(s, a) for s in args.seeds for a in (True, False)]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda r: run_one(*r, {"jobs": args.jobs, "overrides": overrides}), runs))
    organs = list(config.ORGANS)
    lines = [f"Settings: {' '.join(overrides) or 'profile defaults'}; seeds {args.seeds}; test split, mean Dice over "
             "organ-present cases.", "", "| attention | seed | " + " | ".join(organs) + " | mean |",
             "|---|---|" + "---|" * (len(organs) + 1)]
    for (seed, att), res in zip(runs, results):
        vals = [res[o] for o in organs]
        lines.append(f"| {'on' if att else 'off'} | {seed} | " + " | ".join(f"{v:.3f}" for v in vals)
                     + f" | {np.mean(vals):.3f} |")
    for att in (True, False):
        per = [[res[o] for o in organs] for (s, a), res in zip(runs, results) if a == att]
        means = np.mean(per, axis=0)
        spread = np.std([np.mean(p) for p in per])
        lines.append(f"| **{'on' if att else 'off'}** | mean | " + " | ".join(f"{v:.3f}" for v in means)
                     + f" | **{np.mean(means):.3f}** ± {spread:.3f} |")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Ablation of the cross-decoder attention: train + evaluate with it on and off, several seeds, same budget.

Usage:
    python ablation.py [--seeds 0 1 2] [--jobs 2] [--NAME=value ...]   # needs processed/ (run --preprocess)

Each run is a `run_pipeline.py --train --eval` subprocess with its own OUTPUT_ROOT under runs/ablation/ and
the shared processed/ folder; --jobs runs that many at once, one thread each. Every run is scored on the test
split AND on the generalisation check (held-out-style phantoms, written once and shared by all runs, plus the
real CTs with no pelvic organ). Prints a markdown table of mean Dice (organ-present cases) per organ, missed
and false organs, and writes it to runs/ablation/ablation.md.
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
               f"--HELDOUT_DATA_ROOT={OUT / 'data_heldout'}", *extra["overrides"]]
        log = root / "ablation.log"
        root.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, OMP_NUM_THREADS=threads)).returncode
        if code:
            raise RuntimeError(f"{log}: run failed with exit code {code}")
    out = {}
    for name, path in (("test", summary), ("heldout", root / "evaluation_results" / "heldout" / "summary_statistics.json")):
        stats = json.loads(path.read_text()) if path.is_file() else {"organs": {}}
        out[name] = {organ: s["dice"]["mean"] for organ, s in stats["organs"].items()}
        out[name]["missed"] = sum(s["detection"]["fn"] for s in stats["organs"].values())
        out[name]["false"] = sum(s["detection"]["fp"] for s in stats["organs"].values())
    return out


def table(runs, results, key, organs):
    """Markdown rows for one evaluation set: each run, then the mean over seeds per setting."""
    lines = ["| attention | seed | " + " | ".join(organs) + " | mean | missed | false organs |",
             "|---|---|" + "---|" * (len(organs) + 3)]
    cell = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for (seed, att), res in zip(runs, results):
        r = res[key]
        vals = [r.get(o) for o in organs]
        mean = np.mean([v for v in vals if v is not None]) if any(v is not None for v in vals) else None
        lines.append(f"| {'on' if att else 'off'} | {seed} | " + " | ".join(cell(v) for v in vals)
                     + f" | {cell(mean)} | {r['missed']} | {r['false']} |")
    for att in (True, False):
        per = [res[key] for (s, a), res in zip(runs, results) if a == att]
        means = [np.mean([p[o] for p in per if p.get(o) is not None]) if any(p.get(o) is not None for p in per)
                 else None for o in organs]
        run_means = [np.mean([p[o] for o in organs if p.get(o) is not None]) for p in per]
        lines.append(f"| **{'on' if att else 'off'}** | mean ± std | " + " | ".join(cell(v) for v in means)
                     + f" | **{np.mean(run_means):.3f}** ± {np.std(run_means):.3f} | "
                     + f"{np.mean([p['missed'] for p in per]):.1f} | {np.mean([p['false'] for p in per]):.1f} |")
    return lines


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
    if config.HELDOUT_CASES > 0:  # written once here, not by the runs at the same time
        import phantom
        phantom.generate_dataset(OUT / "data_heldout", config.HELDOUT_CASES, config.HELDOUT_SEED,
                                 config.PHANTOM_GRID, config.NUM_WORKERS, style="ood")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda r: run_one(*r, {"jobs": args.jobs, "overrides": overrides}), runs))
    organs = list(config.ORGANS)
    lines = [f"Settings: {' '.join(overrides) or 'profile defaults'}; seeds {args.seeds}; mean Dice over "
             "organ-present cases, missed organs and false organs (counts over all cases).", "",
             "Test split (in distribution):", ""] + table(runs, results, "test", organs)
    lines += ["", f"Generalisation check ({config.HELDOUT_CASES} held-out-style phantoms + "
              f"{len(config.EMPTY_CTS)} real CTs with no pelvic organ):", ""] + table(runs, results, "heldout", organs)
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ablation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

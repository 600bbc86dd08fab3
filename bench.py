"""Benchmarks of the whole pipeline on this machine -> one table, printed and written to BENCHMARKS.md.

Usage:
    python bench.py            # everything, including `run_pipeline.py --all` on the CPU profile (~25+ min, 2 cores)
    python bench.py --quick    # fewer repeats, 64^3 and the CPU demo shape only, no full pipeline run (<= 10 min)
    python bench.py --smoke --out /tmp/b.md   # tiny sizes, seconds: checks the code paths, numbers mean nothing
    python bench.py --gpu      # the device check, <= 8 min on one CUDA GPU: BENCHMARKS.md's GPU section + JSON
    python bench.py --gpu --smoke --out /tmp/g.md --json /tmp/g.json   # its code path, tiny, on the CPU

Every figure is the median of several runs after a warm-up, with min and max. Rows:
- preprocessing.process_case of one CT-sized phantom case (512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm), at 1.5 mm
  (GPU profile) and 3 mm (CPU profile), each run in a fresh process: seconds and peak RSS;
- train step (forward + loss + backward + AdamW) and inference forward of MultiDecoderUNet against
  bench_model.ReferenceNet (runs interleaved so that load noise hits both), achieved GFLOP/s against the measured conv ceilings;
- sliding-window inference, inference.predict_logits against MONAI's sliding_window_inference on the same net
  and volume, each run in a fresh process: seconds and peak RSS;
- predict.py end to end on the CT-sized case: seconds and peak RSS;
- run_pipeline.py --all with the CPU profile (not with --quick), with its test Dice;
- peak RSS of one CPU train step of the base-32 net at 128^3, batch 1, decoder checkpointing off and on (not with
  --quick): the same tensors a GPU would hold in fp32, standing in for the 8 GB goal until a GPU measures it;
- cross-decoder attention on and off (train step) at the CPU demo shape and at 128^3;
- the data path alone (data.batches: patches/s at the gpu profile's 128^3 and the CPU demo's shape, augmentation
  off/on, 0 and 2 workers) next to the train step, and the CPU demo's train loop (data + step), 0 vs 2 workers;
- `--gpu` (CUDA): train step time and peak allocated / reserved memory at 128^3, batch 1, base 8 and 32, bf16 and
  fp16 autocast, activation checkpointing off/on, channels-last vs contiguous; data-path patches/s against the
  step rate (GPU busy share, augmentation on the device vs in the workers); a gpu-profile run end to end (a few
  phantom cases, two short epochs with validation, evaluation) and predict.py on a 512x512x300 CT.
  Without CUDA its rows are written as "not measured on a GPU".

Peak RSS is measured through a small wrapper process (`bench.py --child rss -- CMD`): the kernel copies a
parent's high-water mark into ru_maxrss of a child it spawns, so the parent of a measured command must stay
small. Peak RSS is that of the largest single process (worker pools are not summed).
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import config
from fileio import write_text_atomic

REPO = Path(__file__).resolve().parent
THREADS = 2  # torch threads for the in-process and child benchmarks (the dev box and CI have 2 cores)
# The CPU demo's setting: what `run_pipeline.py --all` trains on a 2-core CPU, read from config.py's cpu profile.
# Used for the demo train step, the sliding-window comparison and the random checkpoint of the predict row.
CPU_DEMO = dict({name: config.PROFILES["cpu"][name] for name in ("TARGET_SPACING", "PATCH_SIZE", "BATCH_SIZE", "DEPTH",
                                                                  "ATTENTION")}, BASE_CHANNELS=config.BASE_CHANNELS)
# The gpu profile's net as a checkpoint for the 1.5 mm predict row (issue 18: <= 60 s, <= 3 GB on 2 CPU cores).
GPU_CKPT = dict({name: config.PROFILES["gpu"][name] for name in ("TARGET_SPACING", "PATCH_SIZE", "DEPTH")},
                BASE_CHANNELS=config.BASE_CHANNELS, ATTENTION=config.PROFILES["gpu"].get("ATTENTION", config.ATTENTION))
TARGETS = dict(speedup=5.0, predict_s=30.0, predict_gb=3.0, mix_pct=60.0, pipeline_s=600.0, train_gb=8.0,
               predict_gpu_ckpt_s=60.0)

# Sizes per mode. model: (base channels, depth or None = config.DEPTH, size, batch), each with a "demo" flag;
# sw_net: (base, depth) of the sliding-window comparison; demo_ckpt: settings of the random predict checkpoint;
# use_trained: predict with CHECKPOINT_DIR/best_model.pth when it exists; peak_conv: size of the single-conv peak.
_DEMO_STEP = (CPU_DEMO["BASE_CHANNELS"], CPU_DEMO["DEPTH"], CPU_DEMO["PATCH_SIZE"][0], CPU_DEMO["BATCH_SIZE"])
_CT = dict(case_shape=(512, 512, 300), case_spacing=(0.8, 0.8, 1.5), prep_spacings=(1.5, 3.0),
           sw_volume=(144, 144, 96), sw_window=CPU_DEMO["PATCH_SIZE"][0],
           sw_net=(CPU_DEMO["BASE_CHANNELS"], CPU_DEMO["DEPTH"]), demo_ckpt=CPU_DEMO, use_trained=True, peak_conv=32,
           gpu_ckpt=GPU_CKPT)
# Data path: {name: (case shape at the profile's spacing (the CT case's model-space shape, see the preprocessing
# rows), patch, batch, batches timed)}; the 2-worker row at data_path_target^3 must outpace the train step.
_DATA_PATH = {"gpu profile": ((273, 206, 300), 128, 1, 12), "CPU demo": ((136, 104, 150), 48, 2, 40)}
_DEMO_ATTN = (CPU_DEMO["BASE_CHANNELS"], CPU_DEMO["DEPTH"], CPU_DEMO["PATCH_SIZE"][0], CPU_DEMO["BATCH_SIZE"],
              " (CPU demo shape)")
_LOOP = dict(data_path_target=128, loop_steps=10, loop_repeats=2)
SIZES = {
    "full": dict(_CT, model=[(8, None, 64, 1), (8, None, 128, 1), (32, None, 64, 1)], demo_step=_DEMO_STEP,
                 repeats=5, prep_repeats=3, predict_repeats=3, pipeline=True, train_memory=(32, 128),
                 data_path=_DATA_PATH, attention=[_DEMO_ATTN, (8, 5, 128, 1, " (gpu profile shape)")], **_LOOP),
    "quick": dict(_CT, model=[(8, None, 64, 1)], demo_step=_DEMO_STEP,
                  repeats=3, prep_repeats=1, predict_repeats=1, pipeline=False, train_memory=None,
                  data_path=_DATA_PATH, attention=[_DEMO_ATTN], **_LOOP),
    "smoke": dict(case_shape=(64, 64, 40), case_spacing=(6.0, 6.0, 9.0), prep_spacings=(9.0, 12.0),
                  sw_volume=(40, 40, 24), sw_window=16, sw_net=(4, 3),
                  demo_ckpt=dict(CPU_DEMO, TARGET_SPACING=(12.0,) * 3, PATCH_SIZE=(16,) * 3, DEPTH=3, BASE_CHANNELS=4),
                  use_trained=False, peak_conv=8,
                  gpu_ckpt=dict(TARGET_SPACING=(12.0,) * 3, PATCH_SIZE=(16,) * 3, DEPTH=3, BASE_CHANNELS=4, ATTENTION=True),
                  model=[(4, 3, 16, 1)], demo_step=(4, 3, 16, 2),
                  repeats=1, prep_repeats=1, predict_repeats=1, pipeline=False, train_memory=(4, 16),
                  data_path={"gpu profile": ((40, 36, 34), 16, 1, 3), "CPU demo": ((30, 28, 26), 12, 2, 3)},
                  data_path_target=16, attention=[(4, 3, 16, 1, "")], loop_steps=2, loop_repeats=1),
}
BUSY_LOAD = 0.5  # 1-min load average before the run above which the report warns that the machine was busy
SW_OVERLAP = 0.25  # sliding-window comparison: MONAI's default overlap
SW_BATCH = 4


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def spread(values):
    """(median, min, max) of a list of numbers."""
    return statistics.median(values), min(values), max(values)


def fmt_spread(values, digits=2):
    med, lo, hi = spread(values)
    return f"{med:.{digits}f}" if len(values) == 1 else f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def proc_status_mb(field):
    """VmRSS / VmHWM of this process in MB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss():
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_cmd(*args):
    """Command line of a child mode of this script (see run_child)."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", *map(str, args)]


def csv(values):
    return ",".join(map(str, values))


def emit(**values):
    """A result line for the parent process to parse."""
    print("BENCH " + json.dumps(values), flush=True)


def machine():
    """CPU model, cores, ISA features that matter for bf16, torch version."""
    import torch

    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return dict(cpu=model, cores=os.cpu_count(), isa=isa, torch=torch.__version__, python=platform.python_version(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


# --------------------------------------------------------------------------------------------
# Measured subprocesses
# --------------------------------------------------------------------------------------------
def measure(cmd, log, env=None, timeout=900):
    """Run `cmd` (list) through the RSS wrapper; returns a dict with wall_s, peak_rss_mb, rc and whatever the
    command itself reported on BENCH lines; "error" holds the last output line when it failed. Output -> log."""
    wrapped = [sys.executable, str(Path(__file__).resolve()), "--child", "rss", "--", *cmd]
    with open(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(wrapped, cwd=REPO, env={**os.environ, **(env or {})}, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and everything it started
            proc.wait()
            return {"rc": None, "error": f"timed out after {timeout} s"}
    lines = Path(log).read_text().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("$ "))
    result = {}
    for line in lines[start:]:
        if line.startswith("BENCH "):
            result.update(json.loads(line[6:]))
    if result.get("rc") != 0:
        tail = [l for l in lines[start + 1:] if l.strip() and not l.startswith("BENCH ")]
        result["error"] = f"exit {result.get('rc', proc.returncode)}: {tail[-1][:160] if tail else 'no output'}"
    return result


def child_rss(cmd):
    """Wrapper: run cmd, then report its wall time and the peak RSS of the largest process it ran."""
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    emit(wall_s=time.perf_counter() - t0, rc=rc,
         peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # Linux: KiB
    return rc


def child_make_case(out_dir, shape, spacing):
    """One CT-sized phantom case written in the AbdomenAtlas layout."""
    import phantom

    t0 = time.perf_counter()
    phantom.write_case(phantom.make_case(0, grid="ct", shape=shape, spacing=spacing), out_dir)
    emit(seconds=time.perf_counter() - t0)


def child_preprocess(case_dir, out_dir, spacing):
    """preprocessing.process_case at TARGET_SPACING = spacing (mm, isotropic)."""
    import torch
    import preprocessing

    torch.set_num_threads(THREADS)
    config.TARGET_SPACING = (spacing,) * 3
    t0 = time.perf_counter()
    meta = preprocessing.process_case(case_dir, out_dir)
    emit(seconds=time.perf_counter() - t0, model_shape=meta["geom"]["model_shape"])


def child_sliding(impl, volume, window, base, depth):
    """One sliding-window pass of MultiDecoderUNet (eval, fp32) over a random volume: ours or MONAI's."""
    import torch
    import inference
    from multi_decoder_model import MultiDecoderUNet

    torch.set_num_threads(THREADS)
    config.AMP = False  # fp32 in both, whatever the CPU (predict_logits would use bf16 where it is fast)
    torch.manual_seed(0)
    model = MultiDecoderUNet(base_channels=base, depth=depth).eval()
    image = torch.randn(1, 1, *volume, generator=torch.Generator().manual_seed(0))  # (1, 1, X, Y, Z)
    if impl == "ours":
        def run():
            return inference.predict_logits(model, image[0, 0].numpy(), window, SW_OVERLAP, SW_BATCH, False, "cpu")
    else:
        from monai.inferers import sliding_window_inference

        def run():
            with torch.inference_mode():
                return sliding_window_inference(image, window, SW_BATCH, model, overlap=SW_OVERLAP, mode="gaussian",
                                                sigma_scale=inference.GAUSSIAN_SIGMA_SCALE)
    with torch.inference_mode():  # warm-up: oneDNN builds its kernels on the first call of each shape
        model(torch.randn(SW_BATCH, 1, *window))
    before = proc_status_mb("VmRSS")
    exact = reset_peak_rss()
    t0 = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - t0
    emit(seconds=seconds, rss_before_mb=before, hwm_mb=proc_status_mb("VmHWM"), hwm_exact=exact,
         out_shape=list(out.shape))


def child_train_memory(base, size, checkpointing):
    """One fp32 channels-last train step (as bench_model.train_step_fn) of MultiDecoderUNet at size^3, batch 1,
    in this fresh process; reports its seconds, the RSS before it and the process's high-water mark after it."""
    import torch
    import bench_model
    from multi_decoder_model import MultiDecoderUNet

    torch.set_num_threads(THREADS)
    model = MultiDecoderUNet(base_channels=base, depth=config.DEPTH, checkpointing=bool(checkpointing))
    step = bench_model.train_step_fn(model, size, 1)
    before = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    step()
    emit(seconds=time.perf_counter() - t0, rss_before_mb=before, hwm_mb=proc_status_mb("VmHWM"))


# --------------------------------------------------------------------------------------------
# Rows: preprocessing, sliding window, predict, pipeline, training memory
# --------------------------------------------------------------------------------------------
def bench_preprocessing(sizes, work, log, rows):
    """Make the CT-sized case (returned for the predict row), then process_case at each target spacing."""
    case_dir = work / "BDMAP_00000001"
    made = measure(child_cmd("make-case", case_dir, csv(sizes["case_shape"]), csv(sizes["case_spacing"])), log)
    shape = "x".join(map(str, sizes["case_shape"]))
    spacing = "x".join(map(str, sizes["case_spacing"]))
    if made.get("error"):
        rows.append(("phantom CT case", f"{shape} @ {spacing} mm", f"failed: {made['error']}", "", "", ""))
        return None
    rows.append(("phantom CT case (setup)", f"make_case + write_case, {shape} @ {spacing} mm",
                 f"{made['seconds']:.1f}", f"{made['peak_rss_mb']:.0f} MB", "one run, not a target", ""))
    for target in sizes["prep_spacings"]:
        runs = [measure(child_cmd("preprocess", case_dir, work / f"prep_{target}_{i}", target), log)
                for i in range(sizes["prep_repeats"])]
        label = "preprocessing.process_case"
        setting = f"-> {target:g} mm ({'GPU' if target == 1.5 else 'CPU' if target == 3.0 else 'test'} profile)"
        bad = [r["error"] for r in runs if r.get("error")]
        if bad:
            rows.append((label, setting, f"failed: {bad[0]}", "", "", ""))
            continue
        rows.append((label, setting, fmt_spread([r["seconds"] for r in runs]),
                     f"{max(r['peak_rss_mb'] for r in runs):.0f} MB",
                     f"model-space shape {'x'.join(map(str, runs[0]['model_shape']))}; "
                     f"process wall {fmt_spread([r['wall_s'] for r in runs], 1)} s with imports", ""))
    return case_dir


def bench_sliding(sizes, log, rows):
    """Ours vs MONAI, alternating fresh processes so that load noise hits both."""
    try:
        import monai  # noqa: F401  (test-only dependency)
        impls = ("ours", "monai")
    except ImportError:
        impls = ("ours",)
    vol, win = sizes["sw_volume"], sizes["sw_window"]
    base, depth = sizes["sw_net"]
    results = {impl: [] for impl in impls}
    for _ in range(sizes["repeats"]):
        for impl in impls:
            results[impl].append(measure(child_cmd("sliding", impl, csv(vol), win, base, depth), log))
    setting = (f"MultiDecoderUNet base {base} depth {depth} eval fp32, 1x1x{'x'.join(map(str, vol))}, {win}^3 windows, "
               f"overlap {SW_OVERLAP}, sw_batch {SW_BATCH}, gaussian")
    times = {}
    for impl in impls:
        runs = results[impl]
        label = "sliding window, ours (inference.predict_logits)" if impl == "ours" else \
            "sliding window, MONAI sliding_window_inference"
        bad = [r["error"] for r in runs if r.get("error")]
        if bad:
            rows.append((label, setting, f"failed: {bad[0]}", "", "", ""))
            continue
        times[impl] = statistics.median(r["seconds"] for r in runs)
        extra = max(r["hwm_mb"] - r["rss_before_mb"] for r in runs)
        derived = "" if impl == "ours" or "ours" not in times else f"MONAI / ours time: {times[impl] / times['ours']:.2f}x"
        rows.append((label, setting if impl == "ours" else "same net, same volume",
                     fmt_spread([r["seconds"] for r in runs]),
                     f"+{extra:.0f} MB over {runs[0]['rss_before_mb']:.0f} MB"
                     + ("" if all(r["hwm_exact"] for r in runs) else " (peak not resettable: upper bound)"),
                     derived, ""))


def random_checkpoint(path, demo, profile="cpu"):
    """A randomly initialised checkpoint in train.py's format with the settings `demo` (CPU_DEMO-like) on top
    of config.py's `profile` profile: what predict.py gets when no trained checkpoint exists."""
    import torch
    import train
    from multi_decoder_model import MultiDecoderUNet

    settings = config.settings()
    settings.update({k: list(v) if isinstance(v, tuple) else v for k, v in {**config.PROFILES[profile], **demo}.items()})
    torch.manual_seed(config.SEED)
    model = MultiDecoderUNet(organs=config.ORGANS, base_channels=demo["BASE_CHANNELS"], depth=demo["DEPTH"],
                             attention=demo["ATTENTION"])
    optimizer = train.make_optimizer(model)
    ckpt = {"model": model.state_dict(), "model_config": model.config, "optimizer": optimizer.state_dict(),
            "scheduler": train.make_scheduler(optimizer).state_dict(),
            "scaler": torch.amp.GradScaler("cpu", enabled=False).state_dict(), "epoch": 0, "rng": None,
            "best": {"score": None, "epoch": None}, "settings": settings, "largest_component": False,
            "run": config.run_record("cpu")}
    train.save_atomic(ckpt, path)
    return path


def bench_predict(sizes, case_dir, work, log, rows):
    """predict.py on the CT-sized case, in a fresh process per run."""
    label = "predict.py end to end"
    if case_dir is None:
        rows.append((label, "", "skipped: no CT case (see the phantom row)", "", "", ""))
        return
    best = Path(config.CHECKPOINT_DIR) / "best_model.pth"
    if best.is_file() and sizes["use_trained"]:
        ckpt, which = best, f"trained {best.relative_to(REPO) if best.is_relative_to(REPO) else best}"
    else:
        demo = sizes["demo_ckpt"]
        ckpt = random_checkpoint(work / "random_model.pth", demo)
        which = (f"random-init checkpoint, CPU demo settings ({demo['TARGET_SPACING'][0]:g} mm, "
                 f"{demo['PATCH_SIZE'][0]}^3, depth {demo['DEPTH']}, base {demo['BASE_CHANNELS']})")
    predict_rows(sizes, case_dir, ckpt, which, work / "pred", log, rows, TARGETS["predict_s"])
    # The gpu profile's checkpoint (1.5 mm, 128^3 windows) predicted on this CPU: what a user who trained on a
    # GPU gets on a laptop; sliding-window settings are what the profile picks without CUDA (the cpu profile's).
    gpu = sizes["gpu_ckpt"]
    ckpt = random_checkpoint(work / "random_gpu_model.pth", gpu, profile="gpu")
    which = (f"random-init gpu-profile checkpoint ({gpu['TARGET_SPACING'][0]:g} mm, {gpu['PATCH_SIZE'][0]}^3 windows, "
             f"depth {gpu['DEPTH']}, base {gpu['BASE_CHANNELS']}, attention {'on' if gpu['ATTENTION'] else 'off'}), "
             f"overlap {config.PROFILES['cpu']['SW_OVERLAP']}, sw_batch {config.PROFILES['cpu']['SW_BATCH']} (cpu profile)")
    predict_rows(sizes, case_dir, ckpt, which, work / "pred_gpu", log, rows, TARGETS["predict_gpu_ckpt_s"])


def predict_rows(sizes, case_dir, ckpt, which, out, log, rows, target_s):
    """predict.py with `ckpt` on the CT case, predict_repeats fresh processes: one row."""
    label = "predict.py end to end"
    runs = [measure([sys.executable, "predict.py", str(case_dir / "ct.nii.gz"), "-o", f"{out}_{i}",
                     "--checkpoint", str(ckpt)], log) for i in range(sizes["predict_repeats"])]
    shape = "x".join(map(str, sizes["case_shape"]))
    bad = [r["error"] for r in runs if r.get("error")]
    if bad:
        rows.append((label, f"{shape} CT, {which}", f"failed: {bad[0]}", "", "", ""))
        return
    secs = [r["wall_s"] for r in runs]
    gb = max(r["peak_rss_mb"] for r in runs) / 1024
    med = statistics.median(secs)
    rows.append((label, f"{shape} CT, {which}", fmt_spread(secs, 1), f"{gb:.2f} GB",
                 "wall time incl. Python/torch start-up, reading, writing",
                 f"<= {target_s:g} s: {met(med <= target_s, med - target_s, 's')}; "
                 f"<= {TARGETS['predict_gb']:g} GB: {met(gb <= TARGETS['predict_gb'], gb - TARGETS['predict_gb'], 'GB')}"))


def bench_pipeline(work, log, rows):
    """run_pipeline.py --all, CPU profile, phantom generated first into a temporary data root."""
    env = {"PELVIS_DATA_ROOT": str(work / "pipeline_data"), "PELVIS_OUTPUT_ROOT": str(work / "pipeline_out"),
           "PYTHONUNBUFFERED": "1"}
    # run_pipeline.ensure_data only generates the phantom into the default data root, so make it here (timed)
    gen = measure([sys.executable, "phantom.py", "--out", env["PELVIS_DATA_ROOT"]], log, env, timeout=1800)
    run = measure([sys.executable, "run_pipeline.py", "--all", "--PROFILE=cpu"], log, env, timeout=3600) \
        if not gen.get("error") else gen
    if run.get("error"):
        rows.append(("run_pipeline.py --all", "CPU profile", f"failed: {run['error']}", "", "", ""))
        return
    total = gen["wall_s"] + run["wall_s"]
    summary = Path(env["PELVIS_OUTPUT_ROOT"]) / "evaluation_results" / "summary_statistics.json"
    train_s = json.loads((Path(env["PELVIS_OUTPUT_ROOT"]) / "logs" / "run.json").read_text()).get("train_seconds")
    dice = {organ: s["dice"]["mean"] for organ, s in json.loads(summary.read_text())["organs"].items()}
    rows.append(("run_pipeline.py --all", "CPU profile, fresh temp PELVIS_DATA_ROOT / PELVIS_OUTPUT_ROOT",
                 f"{run['wall_s']:.0f}", f"{max(gen['peak_rss_mb'], run['peak_rss_mb']) / 1024:.2f} GB",
                 f"one run; + phantom generation {gen['wall_s']:.0f} s = {total:.0f} s; training {train_s:.0f} s "
                 f"(logs/run.json); test Dice (organ-present "
                 f"cases) {', '.join(f'{o} {d:.3f}' for o, d in dice.items())}",
                 f"<= {TARGETS['pipeline_s']:g} s incl. phantom: "
                 f"{met(total <= TARGETS['pipeline_s'], total - TARGETS['pipeline_s'], 's', 0)}"))


def bench_train_memory(sizes, log, rows):
    """Peak RSS of one CPU train step of the base-32 net at the GPU patch size, with and without decoder
    checkpointing: the tensors are the ones a GPU would hold (fp32 here), so this stands in for the 8 GB goal
    until a GPU run measures it."""
    base, size = sizes["train_memory"]
    for ckpt in (0, 1):
        r = measure(child_cmd("train-memory", base, size, ckpt), log, timeout=1800)
        setting = f"base {base}, depth {config.DEPTH}, {size}^3, batch 1, fp32, decoder checkpointing {'on' if ckpt else 'off'}"
        if r.get("error"):
            rows.append(("train step memory, CPU", setting, f"failed: {r['error']}", "", "", ""))
            continue
        gb = r["hwm_mb"] / 1024
        rows.append(("train step memory, CPU (one step in a fresh process)", setting, f"{r['seconds']:.1f}",
                     f"{gb:.2f} GB peak RSS", f"{r['rss_before_mb'] / 1024:.2f} GB before the step (torch, model, data)",
                     f"<= {TARGETS['train_gb']:g} GB: {met(gb <= TARGETS['train_gb'], gb - TARGETS['train_gb'], 'GB', 2)} "
                     "(CPU RSS, not GPU memory)"))


def met(ok, gap, unit, digits=1):
    return "met" if ok else f"NOT met ({gap:+.{digits}f} {unit})"


# --------------------------------------------------------------------------------------------
# Rows: train step (in this process)
# --------------------------------------------------------------------------------------------
def interleaved_times(steps, repeats, warmup=1):
    """Seconds per call of each step function, the functions taking turns (one list per function)."""
    for step in steps:
        for _ in range(warmup):
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, out in zip(steps, times):
            t0 = time.perf_counter()
            step()
            out.append(time.perf_counter() - t0)
    return times


def record_convs(model, x, amp=False):
    """Every convolution one forward of `model` on `x` runs, as the kernel sees it:
    [(x shape, w shape, bias, stride, padding, dilation, groups, x channels-last, w channels-last, dtype)]."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    cl = torch.channels_last_3d

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default and not args[6]:  # args[6]: transposed
                inp, w, b, stride, padding, dilation, _, _, groups = args
                self.calls.append((tuple(inp.shape), tuple(w.shape), b is not None, tuple(stride), tuple(padding),
                                   tuple(dilation), groups, inp.is_contiguous(memory_format=cl),
                                   w.is_contiguous(memory_format=cl), inp.dtype))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), Recorder() as rec:
        model(x)
    return rec.calls


def conv_mix_ceiling(calls, repeats=2):
    """(GFLOP per train step, GFLOP/s) of the recorded convolutions run one by one outside the net, forward +
    backward (input and weight gradients), best of `repeats`: what the step would reach if every conv ran as
    fast as it does alone and nothing else took time. FLOPs counted as 3 x forward, like bench_model."""
    import collections
    import math
    import torch
    import torch.nn.functional as F

    cl = torch.channels_last_3d
    total_flops = total_time = 0.0
    for (xs, ws, bias, stride, padding, dilation, groups, x_cl, w_cl, dtype), n in collections.Counter(calls).items():
        x = torch.randn(xs, dtype=dtype)
        w = torch.randn(ws, dtype=dtype) * 0.1
        x, w = (x.to(memory_format=cl) if x_cl else x), (w.to(memory_format=cl) if w_cl else w)
        b = torch.zeros(ws[0], dtype=dtype, requires_grad=True) if bias else None
        x.requires_grad_(), w.requires_grad_()
        out = F.conv3d(x, w, b, stride, padding, dilation, groups)
        grad = torch.randn_like(out)
        best = math.inf
        for _ in range(repeats + 1):  # the first one is a warm-up
            t0 = time.perf_counter()
            F.conv3d(x, w, b, stride, padding, dilation, groups).backward(grad)
            best = min(best, time.perf_counter() - t0)
        total_flops += n * 3 * 2 * out.numel() * ws[1] * math.prod(ws[2:])  # ws[1] = input channels per group
        total_time += n * best
    return total_flops / 1e9, total_flops / 1e9 / total_time


def bench_train_steps(sizes, rows, step_rates=None):
    """Train step and forward rows, ours against the reference; step_rates gets {(size, batch): (our patches/s,
    what ran)} for the data-path rows."""
    import torch
    import bench_model
    import inference
    from multi_decoder_model import MultiDecoderUNet

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    amp = inference.cpu_bf16_fast()  # bf16 only where the CPU has it natively (emulated bf16 is ~100x slower)
    ours_kind = "bf16 autocast" if amp else "fp32"
    peak = bench_model.conv_ceiling_gflops(size=sizes["peak_conv"], amp=amp)
    cases = [(base, depth or config.DEPTH, size, batch, False) for base, depth, size, batch in sizes["model"]]
    cases.append((*sizes["demo_step"], True))
    for base, depth, size, batch, demo in cases:
        ours = MultiDecoderUNet(base_channels=base, depth=depth, attention=CPU_DEMO["ATTENTION"] if demo else True)
        ref = bench_model.ReferenceNet(base_channels=base, depth=depth)
        gflop = bench_model.count_step_gflops(ours, size, batch), bench_model.count_step_gflops(ref, size, batch)
        reps = sizes["repeats"] if size <= 64 else max(2, sizes["repeats"] // 2)
        t_ours, t_ref, f_ours, f_ref = interleaved_times(
            [bench_model.train_step_fn(ours, size, batch, amp, True), bench_model.train_step_fn(ref, size, batch, False, False),
             bench_model.forward_fn(ours, size, batch, amp, True), bench_model.forward_fn(ref, size, batch, False, False)], reps)
        x = torch.randn(batch, 1, size, size, size).to(memory_format=torch.channels_last_3d)
        conv_gflop, mix = conv_mix_ceiling(record_convs(ours, x, amp))
        med_ours, med_ref = statistics.median(t_ours), statistics.median(t_ref)
        rate = gflop[0] / med_ours
        if step_rates is not None:
            step_rates[(size, batch)] = (batch / med_ours, f"base {base} depth {depth} {ours_kind}")
        mix_pct = 100 * conv_gflop / med_ours / mix
        speedup = med_ref / med_ours
        setting = f"base {base}, depth {depth}, {size}^3, batch {batch}" + (f" (CPU demo, attention {'on' if CPU_DEMO['ATTENTION'] else 'off'})" if demo else "")
        rows.append((f"train step, ours ({ours_kind} channels-last)", setting, fmt_spread(t_ours, 3), "",
                     f"{batch / med_ours:.2f} patches/s; {gflop[0]:.1f} GFLOP/step, {rate:.1f} GFLOP/s = "
                     f"{100 * rate / peak:.0f} % of the single-conv peak, {mix_pct:.0f} % of the layer-mix ceiling "
                     f"({mix:.1f} GFLOP/s); {speedup:.2f}x the reference",
                     f">= {TARGETS['speedup']:g}x ref: {met(speedup >= TARGETS['speedup'], speedup - TARGETS['speedup'], 'x', 2)}; "
                     f">= {TARGETS['mix_pct']:g} % of mix: {met(mix_pct >= TARGETS['mix_pct'], mix_pct - TARGETS['mix_pct'], '%', 0)}"))
        rows.append(("train step, bench_model.ReferenceNet (fp32)", "same", fmt_spread(t_ref, 3), "",
                     f"{batch / med_ref:.2f} patches/s; {gflop[1]:.1f} GFLOP/step, {gflop[1] / med_ref:.1f} GFLOP/s", ""))
        rows.append((f"forward (eval, no grad), ours ({ours_kind} channels-last)", "same", fmt_spread(f_ours, 3), "",
                     f"{statistics.median(f_ref) / statistics.median(f_ours):.2f}x the reference", ""))
        rows.append(("forward (eval, no grad), bench_model.ReferenceNet (fp32)", "same", fmt_spread(f_ref, 3), "", "", ""))
        print(f"  train step {setting}: ours {med_ours:.3f} s, reference {med_ref:.3f} s", flush=True)
    return peak, amp


# --------------------------------------------------------------------------------------------
# Rows: the data path (data.batches) next to the train step
# --------------------------------------------------------------------------------------------
def synthetic_processed(folder, n_cases, shape, seed=0):
    """A processed/-like folder for the data-path rows: int16 CT (fat with noise) and three ellipsoid organs of
    distinct HU per case; returns the case ids. What the loader costs depends on shapes, not on anatomy."""
    import numpy as np

    rng = np.random.default_rng(seed)
    axes = np.ogrid[tuple(slice(0, s) for s in shape)]
    ids = []
    for i in range(n_cases):
        cid = f"BDMAP_{i + 1:08d}"
        case = Path(folder) / "cases" / cid
        case.mkdir(parents=True, exist_ok=True)
        ct = rng.normal(-100, 20, shape).astype(np.int16)
        label = np.zeros(shape, np.uint8)
        for k, (hu, radius) in enumerate(((45, 0.08), (5, 0.15), (-600, 0.1)), start=1):
            centre = [s * f for s, f in zip(shape, (0.5, 0.3 + 0.15 * k, 0.5))]
            inside = sum(((a - c) / (radius * s)) ** 2 for a, c, s in zip(axes, centre, shape)) < 1
            ct[inside], label[inside] = hu, k
        np.save(case / "ct.npy", ct)
        np.save(case / "label.npy", label)
        ids.append(cid)
    return ids


def _with_settings(**values):
    """Set config values; returns the old ones (for _with_settings(**old))."""
    old = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    return old


def data_path_rate(sampler, batch, n, workers, augment, device="cpu", augment_on="worker"):
    """Patches/s that data.batches delivers when consumed as fast as it can make them: n batches timed from
    the arrival of the first (workers started, nothing buffered yet) to the arrival of the last."""
    import data

    old = _with_settings(AUGMENT=augment, AUGMENT_ON=augment_on, BATCH_SIZE=batch, ITERS_PER_EPOCH=n + 1)
    try:
        stream = data.batches(sampler, 0, 1, 0, device, workers)
        next(stream)
        t0 = time.perf_counter()
        for _ in range(n):
            img, _lab = next(stream)
        if device != "cpu":
            import torch
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        stream.close()
    finally:
        _with_settings(**old)
    return n * batch / seconds


def loop_seconds(model, sampler, batch, steps, workers, augment, device="cpu", augment_on="worker", fixed=None):
    """Seconds per step of train.train_one_epoch fed by data.batches (or by one `fixed` batch over and over, the
    step alone): one warm-up epoch, then one timed one."""
    import itertools
    import torch
    import data
    import inference
    import train

    old = _with_settings(AUGMENT=augment, AUGMENT_ON=augment_on, BATCH_SIZE=batch, ITERS_PER_EPOCH=steps)
    try:
        dev = torch.device(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler(dev.type, enabled=inference.amp_dtype(dev) == torch.float16)
        stream = itertools.repeat(fixed) if fixed is not None else data.batches(sampler, 0, 2, 0, dev, workers)
        train.train_one_epoch(model, stream, optimizer, scheduler, scaler, dev, False)  # warm-up, workers start
        t0 = time.perf_counter()
        train.train_one_epoch(model, stream, optimizer, scheduler, scaler, dev, False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = (time.perf_counter() - t0) / steps
        if fixed is None:
            stream.close()
    finally:
        _with_settings(**old)
    return seconds


def bench_data_path(sizes, work, rows, step_rates):
    """Patches/s of the data path alone at the gpu profile's patch (1.5 mm cases) and at the CPU demo's (3 mm
    cases), augmentation off/on, 0 and 2 workers, next to the train step's patches/s; then the CPU demo's real
    loop (data + step) with 0 and 2 workers."""
    import torch
    import data
    from multi_decoder_model import MultiDecoderUNet

    torch.set_num_threads(THREADS)
    for name, (case_shape, patch, batch, n) in sizes["data_path"].items():
        folder = work / f"data_{name}"
        ids = synthetic_processed(folder, 2, case_shape)
        sampler = data.PatchSampler(ids, folder, (patch,) * 3)
        step = step_rates.get((patch, batch))
        for augment in (False, True):
            for workers in (0, 2):
                rate = data_path_rate(sampler, batch, n, workers, augment)
                setting = (f"{name}: {patch}^3 from {'x'.join(map(str, case_shape))} cases, batch {batch}, "
                           f"augmentation {'on' if augment else 'off'}, {workers} workers")
                ratio = (f"{rate / step[0]:.1f}x the train step ({step[0]:.2f} patches/s, {step[1]})" if step
                         else "no train step of this shape in this mode")
                target = ""
                if workers == 2 and step and patch == sizes["data_path_target"]:
                    target = f"> train step: {met(rate > step[0], rate - step[0], 'patches/s', 2)}"
                rows.append(("data path alone (data.batches)", setting, f"{batch * n / rate:.2f} for {batch * n}",
                             "", f"{rate:.2f} patches/s; {ratio}", target))
                print(f"  data path {setting}: {rate:.2f} patches/s", flush=True)
    # The demo's real loop: does moving the patches to workers help or hurt when they share the 2 cores?
    case_shape, patch, batch, _ = sizes["data_path"]["CPU demo"]
    folder = work / "data_CPU demo"
    sampler = data.PatchSampler(sorted(p.name for p in (folder / "cases").iterdir()), folder, (patch,) * 3)
    base, depth = CPU_DEMO["BASE_CHANNELS"], sizes["demo_step"][1]
    times = {0: [], 2: []}
    for _ in range(sizes["loop_repeats"]):
        for workers in times:
            torch.manual_seed(0)
            model = MultiDecoderUNet(base_channels=base, depth=depth, attention=CPU_DEMO["ATTENTION"])
            model = model.to(memory_format=torch.channels_last_3d)
            times[workers].append(loop_seconds(model, sampler, batch, sizes["loop_steps"], workers,
                                               config.PROFILES["cpu"]["AUGMENT"]))
    for workers, secs in times.items():
        rows.append(("train loop, data + step (train.train_one_epoch)",
                     f"CPU demo: base {base}, depth {depth}, {patch}^3, batch {batch}, augmentation "
                     f"{'on' if config.PROFILES['cpu']['AUGMENT'] else 'off'}, {workers} workers",
                     fmt_spread(secs, 3), "", f"{batch / statistics.median(secs):.2f} patches/s"
                     + ("" if workers == 0 else f"; {statistics.median(times[0]) / statistics.median(secs):.2f}x "
                        "the loop without workers"), ""))


def bench_attention(sizes, rows):
    """Train step with the cross-decoder attention on and off (the model's attention argument), interleaved."""
    import torch
    import bench_model
    import inference
    from multi_decoder_model import MultiDecoderUNet

    torch.set_num_threads(THREADS)
    amp = inference.cpu_bf16_fast()
    for base, depth, size, batch, label in sizes["attention"]:
        steps = []
        for attention in (True, False):
            torch.manual_seed(0)
            model = MultiDecoderUNet(base_channels=base, depth=depth, attention=attention)
            steps.append(bench_model.train_step_fn(model, size, batch, amp, True))
        reps = sizes["repeats"] if size <= 64 else max(2, sizes["repeats"] // 2)
        on, off = interleaved_times(steps, reps)
        setting = f"base {base}, depth {depth}, {size}^3, batch {batch}{label}"
        for attention, secs in (("on", on), ("off", off)):
            rows.append((f"train step, cross-decoder attention {attention} ({'bf16' if amp else 'fp32'})", setting,
                         fmt_spread(secs, 3), "", f"{batch / statistics.median(secs):.2f} patches/s"
                         + (f"; attention costs {100 * (statistics.median(on) / statistics.median(off) - 1):+.0f} %"
                            if attention == "off" else ""), ""))
        print(f"  attention {setting}: on {statistics.median(on):.3f} s, off {statistics.median(off):.3f} s", flush=True)


# --------------------------------------------------------------------------------------------
# The device check: python bench.py --gpu
# --------------------------------------------------------------------------------------------
GPU_SIZES = {
    # step: (size, bases); data: (case shape at 1.5 mm, patch, batches timed, loop steps); pipeline: overrides of
    # the gpu-profile smoke run; ct: (shape, spacing) of the CT predicted at the end.
    "gpu": dict(step=(128, (8, 32)), repeats=10, data=((273, 206, 300), 128, 20, 20), net=(8, 5),
                pipeline=["--PHANTOM_CASES=5", "--EPOCHS=2", "--ITERS_PER_EPOCH=5", "--VAL_EVERY=1"],
                ct=((512, 512, 300), (0.8, 0.8, 1.5)), budget_s=450),
    "smoke": dict(step=(16, (4,)), repeats=1, data=((40, 36, 34), 16, 3, 2), net=(4, 3),
                  pipeline=["--PHANTOM_CASES=5", "--EPOCHS=1", "--ITERS_PER_EPOCH=2", "--VAL_EVERY=1",
                            "--TARGET_SPACING=12,12,12", "--PATCH_SIZE=16,16,16", "--BASE_CHANNELS=4", "--DEPTH=3",
                            "--SW_BATCH=4"],
                  ct=((64, 64, 40), (6.0, 6.0, 9.0)), budget_s=None),  # every code path, however slow the machine
}
GPU_TARGETS = dict(step_s=0.060, reserved_gb=8.0, busy_pct=90.0)
NOT_ON_GPU = "not measured on a GPU"
PIPE_LABEL = "gpu profile smoke run, run_pipeline.py --preprocess --train --eval"


def gpu_row(rows, records, label, setting, seconds=None, memory="", derived="", target="", **numbers):
    """A table row and its JSON record (numbers: whatever a later reader may want to compare)."""
    times = seconds if isinstance(seconds, list) else None
    text = fmt_spread(times, 3) if times else (seconds if isinstance(seconds, str) else f"{seconds:.1f}")
    rows.append((label, setting, text, memory, derived, target))
    records.append(dict(benchmark=label, setting=setting, seconds=(statistics.median(times) if times else seconds),
                        seconds_all=times, memory=memory, derived=derived, target=target, **numbers))


def bench_gpu(rows, repeats, device="cuda", size=128, bases=(8, 32), records=None, dtypes=("bf16", "fp16"),
              deadline=None, dry=False):
    """Train step as train.py runs it (autocast, GradScaler for fp16, dice_ce_loss, AdamW) at size^3, batch 1:
    each base x autocast dtype x activation checkpointing off/on x channels-last/contiguous, with seconds and
    peak allocated / reserved memory. On CUDA from `bench.py --gpu`; device="cpu" at a small size checks the code
    path (memory is then n/a). Configurations left when time.time() passes `deadline` are marked skipped;
    dry: only the rows, marked "not measured on a GPU"."""
    import torch
    import train
    from multi_decoder_model import MultiDecoderUNet

    records = [] if records is None else records
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train.py
    for base in bases:
        for name in dtypes:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
            for checkpointing in (False, True):
                for channels_last in (True, False):
                    setting = (f"base {base}, {size}^3, batch 1, {name} autocast, activation checkpointing "
                               f"{'on' if checkpointing else 'off'}, {'channels-last' if channels_last else 'contiguous'}")
                    if dry:
                        gpu_row(rows, records, "GPU train step", setting, NOT_ON_GPU)
                        continue
                    if deadline is not None and time.time() > deadline:
                        gpu_row(rows, records, "GPU train step", setting, "skipped: time budget")
                        continue
                    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
                    torch.manual_seed(0)
                    model = MultiDecoderUNet(base_channels=base, depth=config.DEPTH, checkpointing=checkpointing)
                    model = model.to(dev, memory_format=fmt).train()
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
                    x = torch.randn(1, 1, size, size, size, device=dev).contiguous(memory_format=fmt)
                    target = torch.randint(0, len(model.organs) + 1, (1, size, size, size), device=dev)

                    def step():
                        opt.zero_grad(set_to_none=True)
                        with torch.autocast(dev.type, dtype=dtype):
                            logits = model(x)
                        scaler.scale(train.dice_ce_loss(logits, target)).backward()
                        scaler.step(opt)
                        scaler.update()
                        if cuda:
                            torch.cuda.synchronize(dev)  # kernels run asynchronously: wait before reading the clock

                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(dev)
                    step()  # warm-up (cudnn.benchmark picks its kernels here)
                    times = interleaved_times([step], repeats, warmup=0)[0]
                    med = statistics.median(times)
                    numbers = dict(base=base, size=size, dtype=name, checkpointing=checkpointing,
                                   channels_last=channels_last, patches_per_s=1 / med)
                    if cuda:
                        alloc = torch.cuda.max_memory_allocated(dev) / 2 ** 30
                        reserved = torch.cuda.max_memory_reserved(dev) / 2 ** 30
                        memory = f"{alloc:.2f} GB allocated, {reserved:.2f} GB reserved (peak)"
                        numbers.update(peak_allocated_gb=alloc, peak_reserved_gb=reserved)
                    else:
                        memory, reserved = "n/a (CPU)", None
                    target_text = ""
                    if base == 8:
                        target_text = (f"<= {GPU_TARGETS['step_s'] * 1000:g} ms: "
                                       f"{met(med <= GPU_TARGETS['step_s'], 1000 * (med - GPU_TARGETS['step_s']), 'ms', 0)}")
                    elif reserved is not None:
                        target_text = (f"< {GPU_TARGETS['reserved_gb']:g} GB reserved: "
                                       f"{met(reserved < GPU_TARGETS['reserved_gb'], reserved - GPU_TARGETS['reserved_gb'], 'GB', 2)}")
                    gpu_row(rows, records, "GPU train step", setting, times, memory, f"{1 / med:.2f} patches/s",
                            target_text if cuda else "", **numbers)
                    del model, opt, x, target
    return records


def bench_gpu_data(rows, records, work, device, gsizes, dry=False):
    """Data path against the step rate on the device: patches/s of data.batches alone (augmentation on the device
    or in the workers) and the train loop fed by it against the same loop on one fixed batch (the step alone).
    GPU busy share = loop time on a fixed batch / loop time on data.batches."""
    import torch
    import data
    from multi_decoder_model import MultiDecoderUNet

    case_shape, patch, n, steps = gsizes["data"]
    base, depth = gsizes["net"]
    workers = config.LOADER_WORKERS
    net = f"base {base}, depth {depth}, {patch}^3, batch 1"
    alone_setting = f"{net}, one fixed batch on the device"
    where = {"device": "on the device", "worker": "in the workers"}
    fed_setting = f"{net}, augmentation {{}}, {workers} workers"
    data_setting = f"{patch}^3 from {'x'.join(map(str, case_shape))} cases, batch 1, augmentation {{}}, {workers} workers"
    if dry:
        for place in ("device", "worker"):
            gpu_row(rows, records, "GPU data path alone (data.batches)", data_setting.format(where[place]), NOT_ON_GPU)
        gpu_row(rows, records, "GPU train loop, step alone", alone_setting, NOT_ON_GPU)
        for place in ("device", "worker"):
            gpu_row(rows, records, "GPU train loop, fed by data.batches", fed_setting.format(where[place]), NOT_ON_GPU)
        return
    folder = work / "gpu_data"
    ids = synthetic_processed(folder, 2, case_shape)
    sampler = data.PatchSampler(ids, folder, (patch,) * 3)
    dev = torch.device(device)
    for place in ("device", "worker"):
        rate = data_path_rate(sampler, 1, n, workers, True, device=str(dev), augment_on=place)
        gpu_row(rows, records, "GPU data path alone (data.batches)", data_setting.format(where[place]), n / rate, "",
                f"{rate:.1f} patches/s", "", patches_per_s=rate, augment_on=place)
    torch.manual_seed(0)
    model = MultiDecoderUNet(base_channels=base, depth=depth).to(dev, memory_format=torch.channels_last_3d)
    first = next(data.batches(sampler, 0, 1, 0, dev, 0))
    alone = loop_seconds(model, None, 1, steps, 0, False, str(dev), fixed=first)
    gpu_row(rows, records, "GPU train loop, step alone", alone_setting, [alone], "", f"{1 / alone:.1f} steps/s", "",
            step_s=alone)
    for place in ("device", "worker"):
        fed = loop_seconds(model, sampler, 1, steps, workers, True, str(dev), augment_on=place)
        busy = 100 * alone / fed
        gpu_row(rows, records, "GPU train loop, fed by data.batches", fed_setting.format(where[place]), [fed], "",
                f"{1 / fed:.1f} steps/s; GPU busy {busy:.0f} % of the time",
                f">= {GPU_TARGETS['busy_pct']:g} % busy: {met(busy >= GPU_TARGETS['busy_pct'], busy - GPU_TARGETS['busy_pct'], '%', 0)}"
                if dev.type == "cuda" else "", step_s=fed, busy_pct=busy, augment_on=place)
    del model


def bench_gpu_pipeline(rows, records, work, log, gsizes, dry=False):
    """The gpu profile end to end on a few phantom cases (preprocess, train a few short epochs with validation,
    evaluate), then predict.py with its checkpoint on a CT-sized case: every GPU-only line runs once."""
    env = {"PELVIS_DATA_ROOT": str(work / "gpu_pipeline_data"), "PELVIS_OUTPUT_ROOT": str(work / "gpu_pipeline_out"),
           "PYTHONUNBUFFERED": "1"}
    cases = next(a.split("=")[1] for a in gsizes["pipeline"] if a.startswith("--PHANTOM_CASES="))
    setting = f"--PROFILE=gpu {' '.join(gsizes['pipeline'])}"
    shape, spacing = gsizes["ct"]
    label, where = "gpu profile smoke run, predict.py", f"{'x'.join(map(str, shape))} CT, the smoke run's best_model.pth"
    if dry:
        gpu_row(rows, records, PIPE_LABEL, setting, NOT_ON_GPU)
        gpu_row(rows, records, label, where, NOT_ON_GPU)
        return
    gen = measure([sys.executable, "phantom.py", "--out", env["PELVIS_DATA_ROOT"], "--cases", cases], log, env)
    # analysis draws figures on the CPU: no GPU line in it, so the check leaves it out
    run = measure([sys.executable, "run_pipeline.py", "--preprocess", "--train", "--eval", "--PROFILE=gpu",
                   *gsizes["pipeline"]], log, env) if not gen.get("error") else gen
    if run.get("error"):
        gpu_row(rows, records, PIPE_LABEL, setting, f"failed: {run['error']}")
        return
    gpu_row(rows, records, PIPE_LABEL, setting, run["wall_s"],
            f"{run['peak_rss_mb'] / 1024:.2f} GB peak RSS", f"+ phantom {gen['wall_s']:.0f} s", "",
            peak_rss_mb=run["peak_rss_mb"])
    case_dir = work / "gpu_ct" / "BDMAP_00000001"
    made = measure(child_cmd("make-case", case_dir, csv(shape), csv(spacing)), log)
    ckpt = Path(env["PELVIS_OUTPUT_ROOT"]) / "checkpoints" / "best_model.pth"
    pred = measure([sys.executable, "predict.py", str(case_dir / "ct.nii.gz"), "-o", str(work / "gpu_pred"),
                    "--checkpoint", str(ckpt)], log) if not made.get("error") else made
    if pred.get("error"):
        gpu_row(rows, records, label, where, f"failed: {pred['error']}")
        return
    gpu_row(rows, records, label, where, pred["wall_s"], f"{pred['peak_rss_mb'] / 1024:.2f} GB peak RSS",
            "wall time incl. start-up, reading, writing", "", peak_rss_mb=pred["peak_rss_mb"])


def run_gpu_check(args):
    """python bench.py --gpu [--smoke]: the rows a GPU run must fill, into BENCHMARKS.md's GPU section and a JSON."""
    import torch

    cuda = torch.cuda.is_available()
    dry = not cuda and not args.smoke  # no GPU: write the rows, each marked "not measured on a GPU"
    if dry:
        print("bench.py --gpu: no CUDA GPU here; the GPU rows are written as not measured "
              "(bench.py --gpu --smoke runs their code on the CPU at tiny sizes)")
    gsizes = GPU_SIZES["smoke" if args.smoke else "gpu"]
    device = "cuda" if cuda else "cpu"
    t0 = time.time()
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        work = Path(tmp)
        log = work / "children.log"
        print("bench --gpu: gpu profile smoke run", flush=True)
        bench_gpu_pipeline(rows, records, work, log, gsizes, dry)
        print("bench --gpu: data path against the step", flush=True)
        bench_gpu_data(rows, records, work, device, gsizes, dry)
        print("bench --gpu: train steps", flush=True)
        size, bases = gsizes["step"]
        deadline = t0 + gsizes["budget_s"] if gsizes["budget_s"] else None
        bench_gpu(rows, gsizes["repeats"], device, size, bases, records, deadline=deadline, dry=dry)
        if any(str(r[2]).startswith("failed") for r in rows):
            print(f"bench --gpu: some runs failed; their output:\n{log.read_text()[-4000:]}", file=sys.stderr)
    info = machine()
    elapsed = time.time() - t0
    section = render_gpu(rows, info, shlex.join(["python", "bench.py", *sys.argv[1:]]), elapsed, cuda, args.smoke)
    print(section)
    out = args.out or (None if args.smoke else REPO / "BENCHMARKS.md")
    if out is not None:
        previous = Path(out).read_text() if Path(out).is_file() else "# Benchmarks\n"
        write_text_atomic(out, with_gpu_section(previous, section))
        print(f"bench --gpu: written to {out}")
    js = args.json or (None if args.smoke else REPO / "BENCHMARKS_gpu.json")
    if js is not None:
        write_text_atomic(js, json.dumps(dict(machine=info, smoke=args.smoke, cuda=cuda, elapsed_s=elapsed,
                                              rows=records), indent=2) + "\n")
        print(f"bench --gpu: JSON written to {js}")
    return 0


GPU_BEGIN, GPU_END = "<!-- bench.py --gpu: begin -->", "<!-- bench.py --gpu: end -->"


def render_gpu(rows, info, command, elapsed, cuda, smoke):
    """The GPU section of BENCHMARKS.md, between markers so that either kind of run can replace its own part."""
    header = ("| benchmark | setting | seconds, median (min-max) | peak memory | derived | target |\n"
              "|---|---|---|---|---|---|")
    table = "\n".join([header] + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows])
    where = (f"GPU {info['cuda']}" if cuda else f"**{NOT_ON_GPU}**: no CUDA GPU was at hand ({info['cpu']}); "
             + ("the check ran on the CPU at tiny sizes" if smoke else "`python bench.py --gpu` on a CUDA machine fills these rows"))
    title = "## GPU check (`python bench.py --gpu`)" + (" (SMOKE: tiny sizes on the CPU, numbers mean nothing)"
                                                        if smoke else "")
    return (f"{GPU_BEGIN}\n{title}\n\n{table}\n\n- {where}; torch {info['torch']}; command `{command}`, "
            f"{elapsed / 60:.1f} min, {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.\n{GPU_END}\n")


def with_gpu_section(text, section):
    """`text` with its GPU section replaced by `section` (appended when it has none)."""
    if GPU_BEGIN in text and GPU_END in text:
        before, rest = text.split(GPU_BEGIN, 1)
        return before + section.rstrip("\n") + rest.split(GPU_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def render(rows, info, command, peak, peak_size, amp, mode, elapsed, loads):
    header = ("| benchmark | setting | seconds, median (min-max) | peak memory | derived | target |\n"
              "|---|---|---|---|---|---|")
    table = "\n".join([header] + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows])
    bf16 = ("native bf16 kernels (cpu_bf16_fast() is True): our net runs bf16 autocast" if amp else
            "NO native bf16 (no AVX512-BF16 / AMX): bf16 autocast is emulated and ~100x slower, so our net runs "
            "fp32 channels-last on this CPU (inference.amp_dtype / cpu_bf16_fast decide)")
    notes = [
        f"- Machine: {info['cpu']}, {info['cores']} cores, ISA {', '.join(info['isa']) or 'unknown'}; {bf16}. "
        f"torch {info['torch']}, Python {info['python']}, torch threads {THREADS}"
        + (f"; GPU {info['cuda']}" if info["cuda"] else "; no GPU") + ".",
        f"- Date {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; command `{command}`"
        f" ({mode} mode, {elapsed / 60:.1f} min in all). 1-min load average at start {loads[0]:.2f}, at the end "
        f"{loads[1]:.2f} (other work on the machine inflates every time here).",
        "- Median (min-max) of the runs after one warm-up; train-step runs of ours and the reference take turns, "
        "sliding-window runs alternate fresh processes.",
        f"- Single-conv peak: one 3x3x3 32->32 Conv3d forward at {peak_size}^3, batch 1, channels-last "
        f"({'bf16' if amp else 'fp32'}): {peak:.1f} GFLOP/s (bench_model.conv_ceiling_gflops). Layer-mix ceiling: "
        "the convolutions one step of our net runs (recorded at the kernel, same shapes, groups and memory formats), "
        "each timed alone forward + backward; the % is conv FLOPs / step time / that rate, i.e. the share of the step "
        "spent doing conv work at stand-alone speed (the rest: norms, activations, attention, copies, optimiser). "
        "FLOPs = 3 x forward (torch.utils.flop_counter), as in bench_model.py.",
        "- Peak memory: peak RSS of the largest process of a fresh run (through a small wrapper, as ru_maxrss "
        "inherits the parent's peak otherwise); for the sliding window, the growth of the RSS high-water mark during "
        "the call over the process after model set-up and warm-up.",
    ]
    if loads[0] > BUSY_LOAD:
        notes.insert(0, f"- **WARNING: the machine was busy** (1-min load average {loads[0]:.1f} on {info['cores']} cores "
                     "before this benchmark started). On oversubscribed cores oneDNN's OpenMP barriers make a "
                     f"{THREADS}-thread Conv3d backward up to ~10x slower than alone, so these times (and the layer-mix "
                     "ceiling, which times single convs) are unreliable: rerun on an idle machine. Peak memory is "
                     "not affected.")
    unmet = [f"{row[0]} [{row[1]}]: {row[5]}" for row in rows if "NOT met" in row[5]]
    failed = [f"{row[0]} [{row[1]}]" for row in rows if str(row[2]).startswith("failed")]
    notes.append("- Targets NOT met: " + "; ".join(unmet) if unmet else "- Every measured target is met.")
    if failed:
        notes.append("- Failed runs: " + "; ".join(failed) + " (their output went to stderr).")
    title = "# Benchmarks" + (" (SMOKE: tiny sizes, numbers mean nothing)" if mode == "smoke" else "")
    return f"{title}\n\n{table}\n\n" + "\n".join(notes) + "\n"


def run_child(args):
    kind, rest = args[0], args[1:]
    if kind == "rss":
        return child_rss(rest[1:] if rest[:1] == ["--"] else rest)
    if kind == "make-case":
        child_make_case(rest[0], tuple(int(v) for v in rest[1].split(",")), tuple(float(v) for v in rest[2].split(",")))
    elif kind == "preprocess":
        child_preprocess(rest[0], rest[1], float(rest[2]))
    elif kind == "train-memory":
        child_train_memory(int(rest[0]), int(rest[1]), int(rest[2]))
    elif kind == "sliding":
        child_sliding(rest[0], tuple(int(v) for v in rest[1].split(",")), (int(rest[2]),) * 3, int(rest[3]),
                      int(rest[4]))
    else:
        raise SystemExit(f"bench.py: unknown child {kind!r}")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # a measured child process (see measure); keeps this process small
        return run_child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 64^3 + CPU demo only, no pipeline run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds); checks the code paths")
    parser.add_argument("--out", type=Path, default=None, help="report file (default BENCHMARKS.md; none with --smoke)")
    parser.add_argument("--gpu", action="store_true", help="only the device check (<= 8 min on one GPU): its section "
                        "of BENCHMARKS.md and BENCHMARKS_gpu.json; with --smoke, tiny on the CPU")
    parser.add_argument("--json", type=Path, default=None, help="with --gpu: JSON file (default BENCHMARKS_gpu.json)")
    args = parser.parse_args(argv)
    if args.gpu:
        return run_gpu_check(args)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    sizes = SIZES[mode]
    out = args.out or (None if args.smoke else REPO / "BENCHMARKS.md")
    command = shlex.join(["python", "bench.py", *argv])
    t0, load_start = time.time(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        work = Path(tmp)
        log = work / "children.log"
        # processes first, while this one is small; then the in-process train steps
        print("bench: preprocessing", flush=True)
        case_dir = bench_preprocessing(sizes, work, log, rows)
        print("bench: sliding window", flush=True)
        bench_sliding(sizes, log, rows)
        print("bench: predict.py", flush=True)
        bench_predict(sizes, case_dir, work, log, rows)
        if sizes["pipeline"]:
            print("bench: run_pipeline.py --all", flush=True)
            bench_pipeline(work, log, rows)
        else:
            rows.append(("run_pipeline.py --all", "CPU profile", f"not run ({mode} mode)", "", "",
                         f"<= {TARGETS['pipeline_s']:g} s incl. phantom: not measured"))
        if sizes["train_memory"]:
            print("bench: train step memory", flush=True)
            bench_train_memory(sizes, log, rows)
        print("bench: train steps", flush=True)
        step_rates = {}
        peak, amp = bench_train_steps(sizes, rows, step_rates)
        print("bench: cross-decoder attention on/off", flush=True)
        bench_attention(sizes, rows)
        print("bench: data path", flush=True)
        bench_data_path(sizes, work, rows, step_rates)
        import torch
        if torch.cuda.is_available() and not args.smoke:
            print("bench: GPU train steps", flush=True)
            bench_gpu(rows, sizes["repeats"])
        elif args.smoke:  # the GPU rows' code path, on the CPU at a tiny size
            bench_gpu(rows, 1, device="cpu", size=16, bases=(4,))
        if any("failed" in str(row[2]) for row in rows):
            print(f"bench: some runs failed; their output:\n{log.read_text()[-4000:]}", file=sys.stderr)
    text = render(rows, machine(), command, peak, sizes["peak_conv"], amp, mode, time.time() - t0,
                  (load_start, os.getloadavg()[0]))
    print(text)
    if out is not None:
        old = Path(out).read_text() if Path(out).is_file() else ""
        if GPU_BEGIN in old and GPU_END in old:  # keep the last device check
            text = with_gpu_section(text, GPU_BEGIN + old.split(GPU_BEGIN, 1)[1].split(GPU_END, 1)[0] + GPU_END + "\n")
        write_text_atomic(out, text)
        print(f"bench: written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

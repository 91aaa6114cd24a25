#!/usr/bin/env python
# Copyright 2026 The DTI diffusers authors. Licensed under the Apache License, Version 2.0.
"""Time a whole training run, from launch to exit: the training script itself in a subprocess, as a user runs it,
on a pipeline read from local disk. The phases (load, compile, the steps and s/step, validation, saving, upload)
come from the run's last line; the rest of the wall time is the interpreter and the imports.

    python benchmarks/bench_run.py --family sdxl --config tiny                   # CPU: the test models, 20 steps
    python benchmarks/bench_run.py --family sdxl --config full --settings default cache cache+compile   # GPU only

--config tiny writes the tiny test pipeline (tests/tiny_<family>.py) and runs 20 steps at 64 px. --config full (or a
folder of benchmarks/configs/) is for one GPU: it builds the full-size architecture from benchmarks/configs/ with
random weights, saves it in the published layout as fp16 variant files (what `--variant fp16` downloads), and runs
the family's defaults (SDXL: 768 px, batch 4, 400 steps; SANA: 1024 px, 2 x 2, 500 steps; 4 validation images every
50 steps) in bf16. Flags after `--` go to the training script. Writes a JSON file and prints a table.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SCRIPTS = {"sdxl": "train_dti_sdxl.py", "sana": "train_dti_sana.py", "wan": "train_dti_wan.py",
           "flux2-klein": "train_dti_flux2_klein.py"}  # fmt: skip
# Setting -> the training script's flags.
SETTINGS = {
    "default": [],
    "cache": ["--cache_latents", "--center_crop"],
    "cache+compile": ["--cache_latents", "--center_crop", "--compile"],
}
TINY_FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--gradient_accumulation_steps", "1"]
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sana": "SanaPipeline", "wan": "WanPipeline",
             "flux2-klein": "Flux2KleinPipeline"}  # fmt: skip
PHASES = ("load", "compile", "training", "validation", "saving", "upload")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Time a whole training run (launch to exit) and its phases.", allow_abbrev=False
    )
    parser.add_argument("--family", choices=list(SCRIPTS), default="sdxl", help="Which training script.")
    parser.add_argument(
        "--config",
        default="tiny",
        help="tiny (the test models, CPU or GPU), full (the family's first folder of benchmarks/configs, one GPU) or a "
        "folder name under benchmarks/configs.",
    )
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["default"], help="Runs, in order.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Default: 20 (tiny), the family's (full).")
    parser.add_argument("--validation_steps", type=int, default=None, help="Default: 10 (tiny), the script's (full).")
    parser.add_argument(
        "--model_dir", default=None, help="Where the pipeline is written (kept). Default: a temp folder."
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="Default: cuda if available.")
    parser.add_argument("--output", default="bench_run.json", help="JSON file with every number of the table.")
    args, script_flags = parser.parse_known_args(input_args)
    if script_flags[:1] == ["--"]:
        script_flags = script_flags[1:]
    if script_flags and not script_flags[0].startswith("--"):
        parser.error(f"unrecognized arguments: {' '.join(script_flags)}")
    args.script_flags = script_flags
    if args.config == "full":
        import bench_step

        args.config = bench_step.REAL_CONFIGS[args.family][0]
    if args.config != "tiny" and not (REPO / "benchmarks" / "configs" / args.config).is_dir():
        parser.error(f"--config {args.config}: no folder benchmarks/configs/{args.config} (or use tiny or full)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The pipeline on disk
# ----------------------------------------------------------------------------------------------------------------


def write_tiny_pipeline(family, folder):
    """The tiny test pipeline (tests/tiny_<family>.py), fp32."""
    import importlib

    name = family.replace("-", "_")
    return getattr(importlib.import_module(f"tests.tiny_{name}"), f"save_tiny_{name}")(folder)


def write_full_pipeline(family, config, folder):
    """GPU only. The full-size architecture of benchmarks/configs/<config> with random weights (built on the GPU:
    seconds), saved in the published layout as fp16 variant files."""
    import bench_step
    import diffusers
    import torch

    family_seam = bench_step.SCRIPTS[family].FAMILY
    models = bench_step.build_models(family, config, "cuda")
    if family == "flux2-klein":  # bench_step cuts the Qwen3 encoder as the script does; the published one is whole
        import transformers

        qwen3 = bench_step.read_config(config, "text_encoder")
        qwen3.pop("model_type", None)
        with torch.device("cuda"):
            models["text_encoders"] = [transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3))]
    scheduler_config = json.loads((REPO / "benchmarks" / "configs" / config / "scheduler.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    components = {"vae": models["vae"], family_seam.denoiser: models["denoiser"], "scheduler": scheduler}
    components |= dict(zip(family_seam.text_encoders, models["text_encoders"], strict=True))
    components |= dict(zip(family_seam.tokenizers, models["tokenizers"], strict=True))
    extra = {"sdxl": {"add_watermarker": False}, "flux2-klein": {"is_distilled": False}}.get(family, {})
    pipeline = getattr(diffusers, PIPELINES[family])(**components, **extra)
    pipeline.to(torch.float16).save_pretrained(folder, variant="fp16")
    del pipeline, components, models
    torch.cuda.empty_cache()
    return Path(folder)


# ----------------------------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------------------------


def seconds(text):
    """The run's durations back in seconds: '12.3s', '1m05s', '2h03m'."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?", text)
    hours, minutes, secs = (float(group or 0) for group in match.groups())
    return 3600 * hours + 60 * minutes + secs


def parse_done_line(line):
    """{phase_s, steps, s_per_step, validations, total_s} of the run's last line ('Done in 1m05s: wrote ... in DIR.
    Load 12.0s, compile 31.2s (the first step), 399 steps 52.0s (0.13 s/step), 8 validations 20.1s, ...')."""
    total = re.search(r"Done in (\d+)m(\d\d)s: ", line)
    phases = re.search(r"\. (Load .*)\.$", line)
    if not total or not phases:
        raise ValueError(f"not a run's last line: {line!r}")
    found = {"total_s": 60 * int(total.group(1)) + int(total.group(2))}
    for part in phases.group(1).split(", "):
        if m := re.fullmatch(r"(\d+) steps? (\S+) \(([\d.e+-]+) s/step\)", part):
            found |= {"steps": int(m.group(1)), "training_s": seconds(m.group(2)), "s_per_step": float(m.group(3))}
        elif m := re.fullmatch(r"(\d+) validations? (\S+)", part):
            found |= {"validations": int(m.group(1)), "validation_s": seconds(m.group(2))}
        elif m := re.fullmatch(r"(\w+) (\S+)(?: \(the first step\))?", part):
            found[f"{m.group(1).lower()}_s"] = seconds(m.group(2))
    return found


def run_command(opts, model, setting, output_dir):
    """The training script's command line of one setting."""
    full = opts.config != "tiny"
    steps = opts.max_train_steps or (None if full else 20)
    validation_steps = opts.validation_steps or (None if full else 10)
    command = [sys.executable, str(REPO / SCRIPTS[opts.family]), "--pretrained_model_name_or_path", str(model),
               "--train_data_dir", str(REPO / "assets" / "toy_robot"), "--placeholder_token", "<toy-robot>",
               "--initializer_token", "robot", "--output_dir", str(output_dir), "--seed", "0",
               "--mixed_precision", "bf16" if opts.device == "cuda" else "no"]  # fmt: skip
    command += ["--variant", "fp16"] if full else TINY_FLAGS
    command += ["--max_train_steps", str(steps)] if steps else []
    command += ["--validation_steps", str(validation_steps)] if validation_steps else []
    return command + SETTINGS[setting] + opts.script_flags


def time_run(opts, model, setting, folder):
    """Launch one run, wait for its exit; its wall time and phases."""
    command = run_command(opts, model, setting, folder / f"out-{setting}")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"error: the {setting} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "Done in " in line]
    done = lines[-1][lines[-1].index("Done in ") :]
    phases = parse_done_line(done)
    startup = wall - sum(phases.get(f"{p}_s", 0.0) for p in PHASES)
    return {"setting": setting, "flags": command[command.index("--mixed_precision") :], "wall_s": wall,
            **{f"{p}_s": phases.get(f"{p}_s") for p in PHASES}, "steps": phases.get("steps"),
            "s_per_step": phases.get("s_per_step"), "validations": phases.get("validations", 0),
            "startup_s": startup, "done_line": done}  # fmt: skip


def device_name(device):
    import platform

    import torch

    return torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"


def versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def table(report):
    def cell(value, width, fmt=".1f"):
        return "-".rjust(width) if value is None else format(value, f"{width}{fmt}")

    header = (f"{'setting':<14} {'wall s':>7} {'startup':>7} {'load':>6} {'compile':>7} {'steps':>5} {'train s':>7} "
              f"{'s/step':>7} {'valid s':>7} {'save s':>6} {'upload':>6}")  # fmt: skip
    lines = [f"{report['family']} {report['config']} | {report['device']} | pipeline written in "
             f"{report['write_s']:.1f} s", header, "-" * len(header)]  # fmt: skip
    for r in report["runs"]:
        lines.append(
            f"{r['setting']:<14} {cell(r['wall_s'], 7)} {cell(r['startup_s'], 7)} {cell(r['load_s'], 6)} "
            f"{cell(r['compile_s'], 7)} {cell(r['steps'], 5, 'd')} {cell(r['training_s'], 7)} "
            f"{cell(r['s_per_step'], 7, '.3g')} {cell(r['validation_s'], 7)} {cell(r['saving_s'], 6)} "
            f"{cell(r['upload_s'], 6)}"
        )
    return "\n".join(lines)


def main(opts):
    import torch

    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.config != "tiny" and opts.device != "cuda":
        raise SystemExit("error: --config full runs the full-size models: it needs a CUDA GPU (use --config tiny)")
    folder = Path(tempfile.mkdtemp(prefix="bench-run-"))
    model = Path(opts.model_dir) if opts.model_dir else folder / "pipeline"
    started = time.perf_counter()
    if not (model / "model_index.json").is_file():
        tiny = opts.config == "tiny"
        write_tiny_pipeline(opts.family, model) if tiny else write_full_pipeline(opts.family, opts.config, model)
    write_s = time.perf_counter() - started
    try:
        runs = [time_run(opts, model, setting, folder) for setting in opts.settings]
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the pipeline too, unless --model_dir keeps it
    report = {"family": opts.family, "config": opts.config, "device": device_name(opts.device),
              "device_type": opts.device, "versions": versions(), "write_s": write_s, "runs": runs}  # fmt: skip
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


if __name__ == "__main__":
    main(parse_args())

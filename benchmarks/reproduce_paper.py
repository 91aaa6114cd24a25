#!/usr/bin/env python
# Copyright 2026 The DTI diffusers authors. Licensed under the Apache License, Version 2.0.
"""Every row of the paper's DreamBooth tables as one command, with the DTI authors' recipe for that row.

    python benchmarks/reproduce_paper.py --list
    python benchmarks/reproduce_paper.py sdxl-dti --dreambooth_dir dreambooth --runs_root runs           # print
    python benchmarks/reproduce_paper.py sdxl-dti --dreambooth_dir dreambooth --runs_root runs --run     # run

For a row, the script writes RUNS_ROOT/<row>.concepts.json (the 30 subjects as one --concepts_list, each with the
word the authors' launcher of that row takes: the subject's `class` for every SDXL row and for SANA's TI and
CrossInit, its `initializer` (their `initialization`) for SANA's and Wan's DTI), then prints, or with --run runs,
the training launch (into RUNS_ROOT/<row>/<row>/<subject>/; a row with a LoRA: one launch per subject, since a LoRA
belongs to one concept) and the evaluate.py command that scores it (into EVAL_DIR/<row>/). A --concepts_list run
trains each subject as its own
run with the same flags would: only the wall time changes. The flags of each row are the authors' launchers'
(exps/*.py of their public code), translated to this repository's names; where our defaults already equal theirs
the flag is still written out, so a row reads as the whole recipe.
"""

import argparse
import json
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = REPO / "assets" / "evaluation" / "dreambooth_subjects.json"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SANA = {"1.6b": "Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers",
        "4.8b": "Efficient-Large-Model/SANA1.5_4.8B_1024px_diffusers"}  # fmt: skip
WAN = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"

# What every row of a family shares: the authors' launchers' resolution, batch, steps, seed, precision, validation.
# --pooled_output argmax: their SDXL runs pool CLIP-G as the checkpoint's config says (our default pools at <eos>);
# --image_resampling bicubic: their data loader resizes bicubically (our default: bilinear).
SDXL_COMMON = ["--resolution", "768", "--train_batch_size", "4", "--gradient_accumulation_steps", "1",
               "--max_train_steps", "400", "--scale_lr", "--seed", "42", "--mixed_precision", "bf16",
               "--pooled_output", "argmax", "--image_resampling", "bicubic", "--validation_steps", "50",
               "--save_steps", "50",
               "--validation_prompt", "a {} with Japanese modern city street in the background"]  # fmt: skip
# --initializer_form bare: their SANA code takes the class word's bare Gemma piece ("robot", not "▁robot").
SANA_COMMON = ["--resolution", "1024", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
               "--max_train_steps", "500", "--scale_lr", "--seed", "42", "--mixed_precision", "bf16",
               "--initializer_form", "bare", "--image_resampling", "bicubic", "--validation_steps", "100",
               "--save_steps", "100",
               "--validation_prompt", "a {} on a beach"]  # fmt: skip
WAN_COMMON = ["--resolution", "512", "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--max_train_steps", "500", "--scale_lr", "--seed", "42", "--mixed_precision", "bf16",
              "--image_resampling", "bicubic", "--validation_steps", "100", "--save_steps", "100",
              "--validation_prompt", "a {} on a beach"]  # fmt: skip
# Their SANA AdamW passes the RSGD weight decay (0) and their TI / CrossInit launchers add no zero pad.
SANA_ADAMW = ["--adam_weight_decay", "0", "--no-zero_pad"]


@dataclass(frozen=True)
class Recipe:
    """One row: the script, the base model, the subject field the initializer comes from, the training flags, the
    extra evaluate.py flags, and the paper's numbers (image sim, text sim; None where the paper has none)."""

    script: str
    model: str
    word: str  # "class" or "initializer" (the authors' "initialization") of dreambooth_subjects.json
    flags: list
    paper: tuple | None
    evaluate_flags: tuple = ()
    trains_as: str | None = None  # a row scored from another row's runs (TI rescaled at inference)


RECIPES = {
    "sdxl-dti": Recipe("train_dti_sdxl.py", SDXL, "class",
                       ["--method", "dti", "--learning_rate", "0.01", "--kappa", "1e-4", "--token_scale", "mean"],
                       (0.450, 0.522)),
    "sdxl-ti": Recipe("train_dti_sdxl.py", SDXL, "class", ["--method", "ti", "--learning_rate", "5e-3"],
                      (0.561, 0.292)),
    "sdxl-ti-rescaled": Recipe("train_dti_sdxl.py", SDXL, "class", ["--method", "ti", "--learning_rate", "5e-3"],
                               (0.243, 0.466), evaluate_flags=("--rescale", "mean"), trains_as="sdxl-ti"),
    "sdxl-crossinit": Recipe("train_dti_sdxl.py", SDXL, "class",
                             ["--method", "crossinit", "--learning_rate", "5e-3", "--crossinit_lambda", "1e-5"],
                             (0.545, 0.464)),
    "sdxl-dti-adamw": Recipe("train_dti_sdxl.py", SDXL, "class",
                             ["--method", "dti", "--optimizer", "adamw", "--learning_rate", "0.01"], (0.335, 0.463)),
    "sdxl-dti-min-norm": Recipe("train_dti_sdxl.py", SDXL, "class",
                                ["--method", "dti", "--learning_rate", "0.01", "--token_scale", "min"],
                                (0.030, 0.074)),
    "sdxl-dti-norm-5": Recipe("train_dti_sdxl.py", SDXL, "class",
                              ["--method", "dti", "--learning_rate", "0.01", "--token_scale", "5.0"], (0.383, 0.373)),
    "sdxl-dti-kappa-0": Recipe("train_dti_sdxl.py", SDXL, "class",
                               ["--method", "dti", "--learning_rate", "0.01", "--kappa", "0"], (0.507, 0.436)),
    "sdxl-dti-kappa-5e-4": Recipe("train_dti_sdxl.py", SDXL, "class",
                                  ["--method", "dti", "--learning_rate", "0.01", "--kappa", "5e-4"], (0.278, 0.688)),
    "sdxl-dti-dco": Recipe("train_dti_sdxl.py", SDXL, "class",
                           ["--method", "dti", "--learning_rate", "0.01", "--max_train_steps", "250",
                            "--lora_rank", "4", "--lora_target_modules", "to_q,to_k,to_v", "--lora_start_step", "1",
                            "--lora_learning_rate", "1.25e-5", "--dco_beta", "1000"], None),
    **{
        f"sana-{size}-{row}": recipe
        for size, numbers in (("1.6b", ((0.479, 0.744), (0.480, 0.621))), ("4.8b", ((0.452, 0.757), (0.446, 0.646))))
        for row, recipe in (
            ("dti", Recipe("train_dti_sana.py", SANA[size], "initializer",
                           ["--method", "dti", "--learning_rate", "0.01", "--kappa", "5e-5", "--zero_pad"],
                           numbers[0])),
            ("ti", Recipe("train_dti_sana.py", SANA[size], "class",
                          ["--method", "ti", "--learning_rate", "5e-3", *SANA_ADAMW], numbers[1])),
            ("crossinit", Recipe("train_dti_sana.py", SANA[size], "class",
                                 ["--method", "crossinit", "--learning_rate", "5e-3", "--crossinit_lambda", "1e-5",
                                  *SANA_ADAMW], None)),
        )
    },
    "wan-dti": Recipe("train_dti_wan.py", WAN, "initializer",
                      ["--method", "dti", "--learning_rate", "0.01", "--kappa", "5e-5"], None),
}  # fmt: skip
COMMON = {"train_dti_sdxl.py": SDXL_COMMON, "train_dti_sana.py": SANA_COMMON, "train_dti_wan.py": WAN_COMMON}


def concepts(recipe, dreambooth_dir):
    """The --concepts_list entries of a row: every subject, with the word that row's launcher takes."""
    subjects = json.loads(SUBJECTS.read_text())["subjects"]
    data = Path(dreambooth_dir)
    data = data / "dataset" if (data / "dataset").is_dir() else data
    return [
        {
            "placeholder_token": f"<{name}>",
            "initializer_token": subject[recipe.word],
            "train_data_dir": str(data / name),
        }
        for name, subject in subjects.items()
    ]


def merged(common, flags):
    """The family's common flags with the row's own in place of any it overrides (each flag written once)."""
    out, i = [], 0
    while i < len(common):
        takes_value = i + 1 < len(common) and not common[i + 1].startswith("--")
        if common[i] not in flags:
            out += common[i : i + 1 + takes_value]
        i += 1 + takes_value
    return out + flags


def training_command(row, recipe, concepts_file, runs_root, concepts_per_step=None):
    """The row's launch: RUNS_ROOT/<row>/<row>/<subject>/, so RUNS_ROOT/<row> is a --runs_root of that row only."""
    command = ["accelerate", "launch", recipe.script, "--pretrained_model_name_or_path", recipe.model,
               "--concepts_list", str(concepts_file), *merged(COMMON[recipe.script], recipe.flags),
               "--output_dir", str(Path(runs_root) / row / row)]  # fmt: skip
    return command + (["--concepts_per_step", str(concepts_per_step)] if concepts_per_step else [])


def subject_commands(row, recipe, dreambooth_dir, runs_root):
    """A LoRA row's launches, one per subject (a LoRA belongs to one concept, so no --concepts_list)."""
    commands = []
    for entry in concepts(recipe, dreambooth_dir):
        name = entry["placeholder_token"].strip("<>")
        commands.append(["accelerate", "launch", recipe.script, "--pretrained_model_name_or_path", recipe.model,
                         "--train_data_dir", entry["train_data_dir"], "--placeholder_token", entry["placeholder_token"],
                         "--initializer_token", entry["initializer_token"],
                         *merged(COMMON[recipe.script], recipe.flags),
                         "--output_dir", str(Path(runs_root) / row / row / name)])  # fmt: skip
    return commands


def evaluate_command(row, recipe, dreambooth_dir, runs_root, eval_dir):
    """evaluate.py --benchmark dreambooth on the row's runs (a TI-rescaled row: TI's runs, rescaled at inference)."""
    return ["python", "evaluate.py", "--pretrained_model_name_or_path", recipe.model, "--benchmark", "dreambooth",
            "--dreambooth_dir", str(dreambooth_dir), "--runs_root", str(Path(runs_root) / (recipe.trains_as or row)),
            *recipe.evaluate_flags, "--output_dir", str(Path(eval_dir) / row)]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("row", nargs="?", choices=sorted(RECIPES), help="The table row to reproduce.")
    parser.add_argument("--list", action="store_true", help="List the rows with the paper's numbers.")
    parser.add_argument("--dreambooth_dir", default="dreambooth", help="A clone of google/dreambooth (or dataset/).")
    parser.add_argument("--runs_root", default="runs", help="Where the training runs go: RUNS_ROOT/<row>/<subject>/.")
    parser.add_argument("--eval_dir", default="eval-paper", help="Where evaluate.py writes: EVAL_DIR/<row>/.")
    parser.add_argument("--concepts_per_step", type=int, default=None, help="Concepts per forward (memory).")
    parser.add_argument("--run", action="store_true", help="Run the commands instead of printing them.")
    args = parser.parse_args()
    if args.list or args.row is None:
        for row, recipe in RECIPES.items():
            paper = f"image sim {recipe.paper[0]:.3f}, text sim {recipe.paper[1]:.3f}" if recipe.paper else "–"
            print(f"{row:<22} {recipe.script:<18} initializer: subject's {recipe.word:<12} {paper}")
        return
    recipe, runs_root, trained = RECIPES[args.row], Path(args.runs_root), RECIPES[args.row].trains_as or args.row
    commands = [evaluate_command(args.row, recipe, args.dreambooth_dir, runs_root, args.eval_dir)]
    if recipe.trains_as:
        print(f"# {args.row} scores the runs of {trained} (train that row first), rescaled at inference.")
    elif "--lora_rank" in recipe.flags:
        commands[:0] = subject_commands(args.row, recipe, args.dreambooth_dir, runs_root)
    else:
        concepts_file = runs_root / f"{args.row}.concepts.json"
        runs_root.mkdir(parents=True, exist_ok=True)
        concepts_file.write_text(json.dumps(concepts(recipe, args.dreambooth_dir), indent=1) + "\n")
        commands.insert(0, training_command(args.row, recipe, concepts_file, runs_root, args.concepts_per_step))
    for command in commands:
        print(shlex.join(command))
        if args.run:
            subprocess.run(command, check=True, cwd=REPO)


if __name__ == "__main__":
    main()

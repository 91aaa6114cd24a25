"""benchmarks/reproduce_paper.py: each row's flags are the DTI authors' launcher's (held against the table below, not
against their code), the initializer word is the field their launcher takes, and every command parses with the real
scripts."""

import json
import shlex
import subprocess
import sys

import pytest

import evaluate
import train_dti_sana
import train_dti_sdxl
import train_dti_wan
from benchmarks import reproduce_paper
from tests.conftest import REPO

SCRIPTS = {"train_dti_sdxl.py": train_dti_sdxl, "train_dti_sana.py": train_dti_sana, "train_dti_wan.py": train_dti_wan}
SDXL = {"--resolution": "768", "--train_batch_size": "4", "--gradient_accumulation_steps": "1",
        "--max_train_steps": "400", "--seed": "42", "--mixed_precision": "bf16", "--pooled_output": "argmax",
        "--image_resampling": "bicubic",
        "--validation_steps": "50", "--save_steps": "50", "--scale_lr": True,
        "--validation_prompt": "a {} with Japanese modern city street in the background"}  # fmt: skip
SANA = {"--resolution": "1024", "--train_batch_size": "2", "--gradient_accumulation_steps": "2",
        "--max_train_steps": "500", "--seed": "42", "--mixed_precision": "bf16", "--initializer_form": "bare",
        "--image_resampling": "bicubic",
        "--validation_steps": "100", "--save_steps": "100", "--scale_lr": True,
        "--validation_prompt": "a {} on a beach"}  # fmt: skip
SANA_ADAMW = {"--adam_weight_decay": "0", "--no-zero_pad": True}
WAN = {k: v for k, v in SANA.items() if k != "--initializer_form"} | {"--resolution": "512"}
# row: (initializer field, flags beyond the family's common ones, paper numbers)
EXPECTED = {
    "sdxl-dti": ("class", {"--method": "dti", "--learning_rate": "0.01", "--kappa": "1e-4", "--token_scale": "mean"},
                 (0.450, 0.522)),
    "sdxl-ti": ("class", {"--method": "ti", "--learning_rate": "5e-3"}, (0.561, 0.292)),
    "sdxl-ti-rescaled": ("class", {"--method": "ti", "--learning_rate": "5e-3"}, (0.243, 0.466)),
    "sdxl-crossinit": ("class", {"--method": "crossinit", "--learning_rate": "5e-3", "--crossinit_lambda": "1e-5"},
                       (0.545, 0.464)),
    "sdxl-dti-adamw": ("class", {"--method": "dti", "--optimizer": "adamw", "--learning_rate": "0.01"},
                       (0.335, 0.463)),
    "sdxl-dti-min-norm": ("class", {"--method": "dti", "--learning_rate": "0.01", "--token_scale": "min"},
                          (0.030, 0.074)),
    "sdxl-dti-norm-5": ("class", {"--method": "dti", "--learning_rate": "0.01", "--token_scale": "5.0"},
                        (0.383, 0.373)),
    "sdxl-dti-kappa-0": ("class", {"--method": "dti", "--learning_rate": "0.01", "--kappa": "0"}, (0.507, 0.436)),
    "sdxl-dti-kappa-5e-4": ("class", {"--method": "dti", "--learning_rate": "0.01", "--kappa": "5e-4"},
                            (0.278, 0.688)),
    "sdxl-dti-dco": ("class", {"--method": "dti", "--learning_rate": "0.01", "--max_train_steps": "250",
                               "--lora_rank": "4", "--lora_target_modules": "to_q,to_k,to_v", "--lora_start_step": "1",
                               "--lora_learning_rate": "1.25e-5", "--dco_beta": "1000"}, None),
    "sana-1.6b-dti": ("initializer", {"--method": "dti", "--learning_rate": "0.01", "--kappa": "5e-5",
                                      "--zero_pad": True}, (0.479, 0.744)),
    "sana-1.6b-ti": ("class", {"--method": "ti", "--learning_rate": "5e-3", **SANA_ADAMW}, (0.480, 0.621)),
    "sana-1.6b-crossinit": ("class", {"--method": "crossinit", "--learning_rate": "5e-3", "--crossinit_lambda": "1e-5",
                                      **SANA_ADAMW}, None),
    "sana-4.8b-dti": ("initializer", {"--method": "dti", "--learning_rate": "0.01", "--kappa": "5e-5",
                                      "--zero_pad": True}, (0.452, 0.757)),
    "sana-4.8b-ti": ("class", {"--method": "ti", "--learning_rate": "5e-3", **SANA_ADAMW}, (0.446, 0.646)),
    "sana-4.8b-crossinit": ("class", {"--method": "crossinit", "--learning_rate": "5e-3", "--crossinit_lambda": "1e-5",
                                      **SANA_ADAMW}, None),
    "wan-dti": ("initializer", {"--method": "dti", "--learning_rate": "0.01", "--kappa": "5e-5"}, None),
}  # fmt: skip
COMMON = {"sdxl": SDXL, "sana": SANA, "wan": WAN}


def as_flags(argv):
    """{flag: value, or True for a switch} of a command line's flags."""
    flags, i = {}, 0
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[argv[i]], i = argv[i + 1], i + 2
        else:
            flags[argv[i]], i = True, i + 1
    return flags


def test_every_row_is_in_the_table_and_nothing_else():
    assert sorted(reproduce_paper.RECIPES) == sorted(EXPECTED)


@pytest.mark.parametrize("row", sorted(EXPECTED))
def test_a_rows_flags_words_and_numbers_are_the_authors(row, tmp_path):
    word, flags, paper = EXPECTED[row]
    recipe = reproduce_paper.RECIPES[row]
    assert (recipe.word, recipe.paper) == (word, paper)
    if "--lora_rank" in flags:  # a LoRA belongs to one concept: one launch per subject
        command = reproduce_paper.subject_commands(row, recipe, tmp_path / "db", tmp_path / "runs")[0]
        source = {
            "--train_data_dir": str(tmp_path / "db" / "backpack"),
            "--placeholder_token": "<backpack>",
            "--initializer_token": "backpack",
            "--output_dir": str(tmp_path / "runs" / row / row / "backpack"),
        }
    else:
        command = reproduce_paper.training_command(row, recipe, tmp_path / "c.json", tmp_path / "runs")
        source = {"--concepts_list": str(tmp_path / "c.json"), "--output_dir": str(tmp_path / "runs" / row / row)}
    assert command[:3] == ["accelerate", "launch", recipe.script]
    given = as_flags(command[3:])
    assert len(given) == len(command[3:]) - sum(v is not True for v in given.values())  # each flag written once
    assert given == COMMON[row.split("-")[0]] | flags | {"--pretrained_model_name_or_path": recipe.model} | source
    script = SCRIPTS[recipe.script]
    args = script.parse_args(command[3:])  # every flag exists in the script
    assert args.seed == 42
    evaluate.parse_args(reproduce_paper.evaluate_command(row, recipe, "dreambooth", tmp_path, "eval")[2:])


def test_the_concepts_list_takes_the_word_of_the_rows_launcher(tmp_path):
    subjects = json.loads(reproduce_paper.SUBJECTS.read_text())["subjects"]
    for row, field in (("sdxl-dti", "class"), ("sana-1.6b-ti", "class"), ("sana-1.6b-dti", "initializer")):
        entries = reproduce_paper.concepts(reproduce_paper.RECIPES[row], tmp_path)
        assert [e["initializer_token"] for e in entries] == [s[field] for s in subjects.values()]
        assert [e["placeholder_token"] for e in entries] == [f"<{name}>" for name in subjects]
    differ = [n for n, s in subjects.items() if s["class"] != s["initializer"]]
    assert len(differ) == 11  # the subjects whose SDXL word is not the SANA DTI word


def printed(row, runs_root):
    script = str(REPO / "benchmarks" / "reproduce_paper.py")
    proc = subprocess.run([sys.executable, script, row, "--runs_root", str(runs_root)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()


def test_the_printed_commands_write_the_concepts_file_and_score_the_rows_runs(tmp_path):
    lines = printed("sdxl-ti-rescaled", tmp_path / "runs")
    assert lines[0].startswith("# sdxl-ti-rescaled scores the runs of sdxl-ti")
    score = as_flags(shlex.split(lines[1])[2:])
    assert score["--runs_root"] == str(tmp_path / "runs" / "sdxl-ti") and score["--rescale"] == "mean"
    train, score = (shlex.split(line) for line in printed("sdxl-dti", tmp_path / "runs"))
    assert len(json.loads((tmp_path / "runs" / "sdxl-dti.concepts.json").read_text())) == 30
    assert as_flags(score[2:])["--runs_root"] == str(tmp_path / "runs" / "sdxl-dti")

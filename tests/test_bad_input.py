"""Bad input and faults, table-driven, for the four scripts: each case is a command line, its exit status, the one
line it must end with, and the check that its output folder is left as it was. The cases run through
tests/cli_driver.py (one import, one fork per case). Faults that need a patched function run in-process below."""

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train_dti_sana
import train_dti_sdxl
from tests.conftest import ASSETS, REPO, assert_one_line_error, run_script_cases, training_args

SCRIPTS = {"sdxl": train_dti_sdxl, "sana": train_dti_sana}
TOKEN = "<toy-robot>"
FAKE_HUB_ID = "someone/no-such-model"
OFFLINE_HUB_ID_ERROR = (
    f"--pretrained_model_name_or_path '{FAKE_HUB_ID}' is not a local folder and the Hugging Face Hub could not be "
    "reached (HF_HUB_OFFLINE=1 is set), nor is it in the local cache: download it once online and run with "
    "HF_HUB_OFFLINE=1, or give a local folder (gated models need `hf auth login` first)."
)


def snapshot(folder):
    """{relative path: sha256} of every file under folder (None if the folder does not exist)."""
    if not folder.exists():
        return None
    if folder.is_file():
        return hashlib.sha256(folder.read_bytes()).hexdigest()
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def unchanged(before, after):
    """The folder is as it was; a folder that did not exist may now exist, empty (made by the writability check)."""
    return after == before or (before is None and after == {})


def busy_lock(folder):
    """A lock file of a live process (this test process) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"pid": os.getpid(), "start": train_dti_sdxl.process_start_time(os.getpid()), "host": socket.gethostname()}
    (folder / train_dti_sdxl.OUTPUT_LOCK).write_text(json.dumps(owner))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def damaged_checkpoint(folder, step, how):
    """A checkpoint-<step> whose manifest names a file that is missing or was cut short."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    data = b"0123456789"
    state = {"step": step, "seed": 0, "files": {"random_states_0.pkl": {"size": 10, "sha256": "0" * 64}}}
    if how == "cut":
        (checkpoint / "random_states_0.pkl").write_bytes(data[:5])
    if how == "changed":
        (checkpoint / "random_states_0.pkl").write_bytes(data[::-1])
    if how != "no state":
        (checkpoint / train_dti_sdxl.CHECKPOINT_STATE).write_text(json.dumps(state))
    return checkpoint


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Image folders and data sets no image of which can be used, and broken embedding files."""
    root = tmp_path_factory.mktemp("bad-files")
    folders = {name: root / name for name in ("bomb", "lab", "corrupt")}
    for folder in folders.values():
        folder.mkdir()
    Image.new("1", (13400, 13400)).save(folders["bomb"] / "bomb.png")  # 179.6 M pixels, 22 kB
    Image.new("LAB", (64, 64)).save(folders["lab"] / "lab.tif")
    (folders["corrupt"] / "cut.png").write_bytes((ASSETS / sorted(os.listdir(ASSETS))[0]).read_bytes()[:200])
    files = dict(folders)
    files["three_images"] = root / "three-images"  # a readable folder, other than the runs' own
    files["three_images"].mkdir()
    for image in sorted(ASSETS.iterdir())[:3]:
        shutil.copy(image, files["three_images"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {
        "strings": pa.array(["not an image", "neither"]),
        "numbers": pa.array([1, 2]),
        "corrupt": pa.array([{"bytes": b"\x89PNG garbage", "path": None}] * 2),
        "empty": pa.array([{"bytes": None, "path": None}] * 2, image_struct),
    }
    for name, column in columns.items():
        files[f"data-{name}"] = root / f"{name}.parquet"
        pq.write_table(pa.table({"image": column}), files[f"data-{name}"])
    good = torch.randn(1, 32)
    files["empty.safetensors"] = root / "empty.safetensors"
    files["empty.safetensors"].write_bytes(b"")
    files["text.safetensors"] = root / "text.safetensors"
    files["text.safetensors"].write_text("not a safetensors file\n")
    save_file({TOKEN: good}, root / "good.safetensors")
    files["good.safetensors"] = root / "good.safetensors"
    files["cut.safetensors"] = root / "cut.safetensors"
    files["cut.safetensors"].write_bytes((root / "good.safetensors").read_bytes()[:-40])
    for name, state in {
        "3d.safetensors": {TOKEN: torch.randn(2, 2, 32)},
        "int.safetensors": {TOKEN: torch.ones(1, 32, dtype=torch.int64)},
        "nan.safetensors": {TOKEN: torch.full((1, 32), float("nan"))},
        "keys.safetensors": {"clip_l": good, "clip_g": torch.randn(1, 64), "extra": good.clone()},
        "two.safetensors": {"<a>": good, "<b>": good.clone()},
        "scalar.safetensors": {TOKEN: torch.ones(())},
    }.items():
        save_file(state, root / name)
        files[name] = root / name
    combined = {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}
    save_file(combined, root / "combined.safetensors", metadata={"placeholder_token": TOKEN})
    files["combined.safetensors"] = root / "combined.safetensors"
    files["garbage.pt"] = root / "garbage.pt"
    files["garbage.pt"].write_bytes(b"\x80\x04 this is no pickle")
    files["list.pt"] = root / "list.pt"
    torch.save([good], files["list.pt"])
    files["nostar.pt"] = root / "nostar.pt"
    torch.save({"string_to_param": {"x": good}, "name": "nostar"}, files["nostar.pt"])
    files["a_file"] = root / "a-file.txt"
    files["a_file"].write_text("a file, not a folder\n")
    pq.write_table(pa.table({"image": columns["strings"], "text": pa.array(["a photo", "a {}"])}),
                   root / "captioned.parquet")  # fmt: skip
    files["data-captioned"] = root / "captioned.parquet"
    return files | concepts_lists(root) | caption_files(root)


def caption_files(root):
    """--captions files: not JSON, a list, a caption without its slot, one for the first four toy robot images only,
    one for all, one far longer than any text encoder's context."""
    names = sorted(p.name for p in ASSETS.iterdir())
    tables = {
        "list": [f"a {{}} in {name}" for name in names],
        "no_slot": dict.fromkeys(names, "a robot on a table"),
        "four": dict.fromkeys(names[:4], "a {} on a table"),
        "all": dict.fromkeys(names, "a {} on a table"),
        "long": dict.fromkeys(names, "a {} " + "red " * 600),
    }
    files = {}
    for name, table in tables.items():
        files[f"captions-{name}"] = root / f"captions-{name}.json"
        files[f"captions-{name}"].write_text(json.dumps(table))
    files["captions-not_json"] = root / "captions-not-json.json"
    files["captions-not_json"].write_text("{01_wood_table.jpg: a {} on a table}\n")
    return files


def concepts_lists(root):
    """--concepts_list files: an entry without its initializer, two entries with one placeholder or one output folder,
    an entry whose image folder is empty, a file that is not JSON."""
    (root / "no-images").mkdir()
    good = [
        {"placeholder_token": f"<toy-{c}>", "initializer_token": "robot", "train_data_dir": str(ASSETS)} for c in "ab"
    ]
    lists = {
        "no_initializer": [good[0], {k: v for k, v in good[1].items() if k != "initializer_token"}],
        "same_placeholder": [good[0], {**good[1], "placeholder_token": "<toy-a>"}],
        "same_output": [{**good[0], "output_dir": str(root / "one")}, {**good[1], "output_dir": str(root / "one")}],
        "empty_folder": [good[0], {**good[1], "train_data_dir": str(root / "no-images")}],
        "dots": [{**good[0], "placeholder_token": "<..>"}, good[1]],
        "captions_missing": [good[0], {**good[1], "captions": str(root / "no-such-captions.json")}],
    }
    files = {}
    for name, entries in lists.items():
        files[f"list-{name}"] = root / f"{name}.json"
        files[f"list-{name}"].write_text(json.dumps(entries))
    files["list-not_json"] = root / "not-json.json"
    files["list-not_json"].write_text("[{placeholder_token: <toy-a>}]\n")
    return files


# ----------------------------------------------------------------------------------------------------------------
# The training scripts
# ----------------------------------------------------------------------------------------------------------------


def training_cases(family, bad):
    """{name: (extra flags, prepare(output_dir) or None, exit status, expected text of the last line)}."""
    data = ["--train_data_dir"]
    cases = {
        "adam_beta1_one": (["--adam_beta1", "1.0"], None, 1, "--adam_beta1 must be in [0, 1)"),
        "adam_beta2_negative": (["--adam_beta2", "-0.1"], None, 1, "--adam_beta2 must be in [0, 1)"),
        "adam_beta2_nan": (["--adam_beta2", "nan"], None, 1, "--adam_beta2 must be in [0, 1)"),
        "weight_decay_nan": (["--adam_weight_decay", "nan"], None, 1, "--adam_weight_decay must be zero or positive"),
        "weight_decay_negative": (["--adam_weight_decay", "-1"], None, 1, "--adam_weight_decay must be zero or"),
        "epsilon_inf": (["--adam_epsilon", "inf"], None, 1, "--adam_epsilon must be zero or positive"),
        "epsilon_negative": (["--adam_epsilon=-1e-8"], None, 1, "--adam_epsilon must be zero or positive"),
        "warmup_negative": (["--lr_warmup_steps", "-1"], None, 1, "--lr_warmup_steps must be zero or positive"),
        "seed_negative": (["--seed", "-1"], None, 1, "--seed must be in [0, 2**32 - 1]"),
        "seed_too_large": (["--seed", str(2**32)], None, 1, "--seed must be in [0, 2**32 - 1]"),
        "output_dir_is_a_file": ([], "file", 1, "is a file; give a folder"),
        "resume_missing": (["--resume_from_checkpoint", "checkpoint-7"], None, 1, "no checkpoint there"),
        "resume_missing_file": (
            ["--resume_from_checkpoint", "checkpoint-5"], "missing", 1,
            "checkpoint-5 is damaged (random_states_0.pkl is missing)",
        ),
        "resume_cut_file": (
            ["--resume_from_checkpoint", "checkpoint-5"], "cut", 1,
            "checkpoint-5 is damaged (random_states_0.pkl is 5 bytes, 10 were written)",
        ),
        "resume_changed_file": (
            ["--resume_from_checkpoint", "checkpoint-5"], "changed", 1, "random_states_0.pkl has changed",
        ),
        "resume_without_state": (
            ["--resume_from_checkpoint", "checkpoint-5"], "no state", 1, "dti_state.json is missing or unreadable",
        ),
        "busy_output_dir": ([], "busy", 1, "is in use by training process"),
        "bomb_only": ([*data, str(bad["bomb"])], None, 1, "holds no readable image"),
        "lab_only": ([*data, str(bad["lab"])], None, 1, "holds no readable image"),
        "corrupt_only": ([*data, str(bad["corrupt"])], None, 1, "holds no readable image"),
    }  # fmt: skip
    cases |= {
        "abbreviated_flag": (["--max_train", "2"], None, 2, "unknown flag --max_train; did you mean --max_train_steps"),
        "misspelled_flag": (["--lerning_rate=1"], None, 2, "unknown flag --lerning_rate; did you mean --learning_rate"),
        "no_initializer": ([], "no initializer", 1, "--initializer_token is missing: give --initializer_token dog"),
        "no_placeholder": ([], "no placeholder", 1, "--placeholder_token is missing: give --placeholder_token"),
        "hub_id_offline": (["--pretrained_model_name_or_path", FAKE_HUB_ID], None, 1, OFFLINE_HUB_ID_ERROR),
        "lora_rank_negative": (["--lora_rank", "-1"], None, 1, "--lora_rank must be zero (no LoRA) or positive."),
        "lora_flag_without_rank": (["--lora_alpha", "8"], None, 1, "--lora_alpha applies to a LoRA only: add"),
        "dco_without_lora": (["--dco_beta", "1000"], None, 1, "--dco_beta applies to a LoRA only: add --lora_rank"),
        "dco_beta_negative": (["--lora_rank", "4", "--dco_beta", "-1"], None, 1, "--dco_beta must be zero (no DCO) or"),
        "lora_start_too_late": (
            ["--lora_rank", "4", "--lora_start_step", "3"], None, 1,
            "--lora_start_step must be in [0, --max_train_steps 3) for the LoRA to train.",
        ),
        "lora_with_concepts_list": (
            ["--concepts_list", "concepts.json", "--lora_rank", "4"], None, 1,
            "--lora_rank with --concepts_list: a LoRA belongs to one concept",
        ),
        "lora_unknown_target": (
            ["--lora_rank", "4", "--lora_target_modules", "to_q,qkv"], None, 1,
            "--lora_target_modules: no linear layer of the",  # found once the models load; some names are listed
        ),
    }  # fmt: skip
    for kind in ("strings", "numbers", "corrupt", "empty"):
        flags = ["--dataset_name", str(bad[f"data-{kind}"])]
        cases[f"dataset_{kind}"] = (flags, None, 1, "no row of --image_column 'image' holds a readable image")
    concepts = {
        "missing": (root_of(bad) / "no-such-list.json", "cannot be read (No such file or directory)"),
        "not_json": (bad["list-not_json"], "is not JSON (Expecting property name enclosed in double quotes"),
        "no_initializer": (bad["list-no_initializer"], "--concepts_list entry 1 has no initializer_token;"),
        "same_placeholder": (bad["list-same_placeholder"], "entries 0 and 1 have the same placeholder_token '<toy-a>'"),
        "same_output": (bad["list-same_output"], "--concepts_list entries 0 and 1 have the same output folder"),
        "empty_folder": (bad["list-empty_folder"], "--concepts_list entry 1 (<toy-b>): --train_data_dir"),
    }
    for name, (path, expected) in concepts.items():
        cases[f"concepts_list_{name}"] = (["--concepts_list", str(path)], None, 1, expected)
    captions = {
        "missing": (root_of(bad) / "no-such-captions.json", " cannot be read (No such file or directory)"),
        "not_json": (bad["captions-not_json"], " is not JSON (Expecting property name enclosed in double quotes"),
        "list": (bad["captions-list"], " must hold a JSON object {image file name: caption}"),
        "no_slot": (bad["captions-no_slot"], ": the caption of '01_wood_table.jpg' has no '{}' where the token goes"),
        "uncovered": (bad["captions-four"], " has no caption for '05_tiled_floor.jpg' of --train_data_dir"),
        "too_long": (bad["captions-long"], ": the caption of 01_wood_table.jpg is cut off by the text encoder's"),
    }
    for name, (path, expected) in captions.items():
        cases[f"captions_{name}"] = (["--captions", str(path)], None, 1, f"--captions {path}{expected}")
    cases |= {
        "concepts_list_captions_missing": (
            ["--concepts_list", str(bad["list-captions_missing"])], None, 1,
            "--concepts_list entry 1 (<toy-b>): --captions",
        ),
        "captions_with_dataset": (
            ["--dataset_name", str(bad["data-strings"]), "--captions", str(bad["captions-four"])], None, 1,
            "--captions goes with --train_data_dir; with --dataset_name give --caption_column.",
        ),
        "caption_column_with_folder": (["--caption_column", "text"], None, 1, "--caption_column goes with --dataset"),
        "caption_column_unknown": (
            ["--dataset_name", str(bad["data-strings"]), "--caption_column", "text"], None, 1,
            "--caption_column 'text' is not a column of",
        ),
        "caption_column_no_slot": (
            ["--dataset_name", str(bad["data-captioned"]), "--caption_column", "text"], None, 1,
            "--caption_column 'text': row 0 has no '{}' where the token goes",
        ),
    }  # fmt: skip
    cases |= {
        "concepts_per_step_alone": (["--concepts_per_step", "1"], None, 1, "--concepts_per_step applies to --concepts"),
        "output_dir_empty": (["--output_dir", ""], None, 1, "--output_dir must not be empty; give a folder."),
        "learning_rate_huge": (["--learning_rate", "1e39"], None, 1, "--learning_rate must be a positive number (in"),
        "token_scale_huge": (["--token_scale", "1e39"], None, 2, "argument --token_scale: expected mean, min, max or"),
        "repeats_huge": (["--repeats", "100000000"], None, 1, "--repeats must be in [1, 100000]"),
        "placeholder_dots": (["--placeholder_token", "<..>"], None, 1, "would name its files '..'; use letters"),
        "placeholder_too_long": (
            ["--placeholder_token", f"<{'a' * 250}>"], None, 1, "--placeholder_token is too long to name files (250",
        ),
        "revision_on_a_folder": (["--revision", "main"], None, 1, "--revision applies to Hub ids;"),
        "concepts_list_dots": (["--concepts_list", str(bad["list-dots"])], None, 1, "entry 0: --placeholder_token"),
        "resume_changed_learning_rate": (
            ["--resume_from_checkpoint", "latest", "--learning_rate", "0.1"], "trained", 1,
            "was made with learning_rate 0.01, this run has learning_rate 0.1; resume with the flags",
        ),
        "resume_changed_batch_size": (
            ["--resume_from_checkpoint", "latest", "--train_batch_size", "1"], "trained", 1,
            "was made with train_batch_size 2, this run has train_batch_size 1",
        ),
        "resume_changed_resolution": (
            ["--resume_from_checkpoint", "latest", "--resolution", "128"], "trained", 1,
            "was made with resolution 64, this run has resolution 128",
        ),
        "resume_changed_data": (
            ["--resume_from_checkpoint", "latest", "--train_data_dir", str(bad["three_images"])], "trained", 1,
            "was made with train_data_dir",
        ),
        "resume_with_captions": (
            ["--resume_from_checkpoint", "latest", "--captions", str(bad["captions-all"])], "trained", 1,
            "was made with captions None, this run has captions",
        ),
        "resume_below_its_step": (
            ["--resume_from_checkpoint", "latest", "--max_train_steps", "1"], "trained", 1,
            "--max_train_steps 1 is below the step of",
        ),
    }  # fmt: skip
    if family != "sdxl":  # the flow-matching families' timestep densities
        cases |= {
            "logit_std_zero": (["--logit_std", "0"], None, 1, "--logit_std must be a positive number."),
            "logit_mean_nan": (["--logit_mean", "nan"], None, 1, "--logit_mean must be a finite number."),
            "mode_scale_out_of_range": (["--mode_scale", "9"], None, 1, "--mode_scale must be in [-1, 7.2]."),
        }
    if family == "sdxl":
        too_many = ["--initializer_token", "robot", "--num_vectors", "80"]
        cases["num_vectors_beyond_context"] = (too_many, None, 1, "--num_vectors 80: the prompt")
        for token in ("<learned_embeds>", "<Learned_Embeds_2>", "<learned_embeds-steps-5>"):
            cases[f"placeholder_{token}"] = (["--placeholder_token", token], None, 1, "clashes with the learned_embeds")
        lora = ["--lora_rank", "4", "--lora_target_modules"]  # layers outside the UNet's blocks: no kohya name
        cases["lora_time_embedding_target"] = (
            [*lora, "to_q,linear_1"], None, 1,
            "--lora_target_modules 'linear_1' matches the UNet's time_embedding.linear_1, outside its blocks",
        )  # fmt: skip
        cases["lora_add_embedding_target"] = (
            [*lora, "add_embedding.linear_2"], None, 1, "'add_embedding.linear_2' matches the UNet's add_embedding",
        )  # fmt: skip
        cases["lora_placeholder_with_a_dot"] = (
            ["--lora_rank", "4", "--placeholder_token", "<toy.robot>"], None, 1, "embedding name A1111 cuts at a dot",
        )  # fmt: skip
    else:
        length = 24 if family == "flux2_klein" else 12  # klein: the chat template's own tokens come first
        short = ["--max_sequence_length", str(length), "--num_vectors", str(length - 2)]
        cases["num_vectors_beyond_context"] = (short, None, 1, f"--num_vectors {length - 2}: the prompt")
    return cases


def root_of(bad):
    return bad["a_file"].parent


def prepare(how, out):
    if how == "file":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("a file\n")
    elif how == "busy":
        busy_lock(out)
    elif how in ("missing", "cut", "changed", "no state"):
        damaged_checkpoint(out, 5, how)


def trained_folder(family, model, tmp_path, common):
    """A finished 2-step run with checkpoint-2, for the resume cases (its lock, left by this process, removed)."""
    out = tmp_path / "trained"
    script = __import__(f"train_dti_{family}")
    script.main(script.parse_args(training_args(model, out, *common, "--max_train_steps", "2",
                                                "--checkpointing_steps", "2")))  # fmt: skip
    (out / script.OUTPUT_LOCK).unlink(missing_ok=True)
    return out


@pytest.mark.parametrize("family", ["sdxl", "sana", "wan", "flux2_klein"])
def test_bad_training_input_ends_in_one_line_and_leaves_the_output_folder(family, bad_files, request, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    common = ["--max_sequence_length", "64"] if family == "flux2_klein" else []  # the tiny Qwen3 is slow at 512
    cases = training_cases(family, bad_files)
    incomplete = tmp_path / "incomplete-model"  # the checkpoint without its text_encoder/ folder
    incomplete.mkdir()
    for entry in model.iterdir():
        if entry.name != "text_encoder":
            (incomplete / entry.name).symlink_to(entry)
    cases["model_folder_incomplete"] = (["--pretrained_model_name_or_path", str(incomplete)], None, 1,
                                        "lacks the folder(s) text_encoder/ its model_index.json names")  # fmt: skip
    factor = {"sdxl": ("VAE", 8), "sana": ("DC-AE", 32)}.get(family, ("VAE", 16))
    cases["resolution_not_a_multiple"] = (["--resolution", str(factor[1] * 3 // 2)], None, 1,
                                          f"--resolution must be a positive multiple of the {factor[0]} factor "
                                          f"{factor[1]}.")  # fmt: skip
    trained = trained_folder(family, model, tmp_path, common)
    argvs, before = {}, {}
    for name, (extra, how, _, _) in cases.items():
        out = tmp_path / name
        if how == "trained":
            shutil.copytree(trained, out)
        prepare(how, out)
        before[name] = snapshot(out)
        argv = training_args(model, out, *common, *extra)
        if "--dataset_name" in extra:  # one data source only
            at = argv.index("--train_data_dir")
            argv = argv[:at] + argv[at + 2 :]
        dropped = {"no initializer": ("--initializer_token",), "no placeholder": ("--placeholder_token",)}.get(how, ())
        if "--concepts_list" in extra:  # the list replaces the one concept's flags
            dropped = ("--train_data_dir", "--placeholder_token", "--initializer_token")
        for flag in dropped:
            at = argv.index(flag)
            argv = argv[:at] + argv[at + 2 :]
        argvs[name] = argv
    procs = run_script_cases(REPO / f"train_dti_{family}.py", argvs)
    for name, (_, _, status, expected) in cases.items():
        assert procs[name].returncode == status, (name, procs[name].stderr[-2000:])
        assert_one_line_error(procs[name], expected)
        assert "*****" not in procs[name].stderr, name  # refused before the models load (the banner follows them)
        assert unchanged(before[name], snapshot(tmp_path / name)), name
    for name in ("bomb_only", "lab_only", "corrupt_only"):
        assert "Skipping" in procs[name].stderr, name
    assert "image mode LAB cannot be converted" in procs["lab_only"].stderr
    assert "too many pixels" in procs["bomb_only"].stderr
    assert "Skipping row 1 of --image_column 'image'" in procs["dataset_strings"].stderr
    assert "named 'qkv'; some that exist: " in procs["lora_unknown_target"].stderr
    assert "to_k" in procs["lora_unknown_target"].stderr.strip().splitlines()[-1]  # a layer every family has


def test_wandb_without_a_login_is_refused_before_the_models_load(tiny_sdxl, tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc there
    procs = run_script_cases(REPO / "train_dti_sdxl.py", {"wandb": training_args(tiny_sdxl, tmp_path / "out",
                             "--report_to", "wandb")})  # fmt: skip
    assert_one_line_error(procs["wandb"], "wandb is not logged in; run `wandb login`, set WANDB_API_KEY")
    assert not (tmp_path / "out").exists()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert train_dti_sdxl.wandb_can_log()
    monkeypatch.delenv("NETRC")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert train_dti_sdxl.wandb_can_log()


# ----------------------------------------------------------------------------------------------------------------
# infer.py and evaluate.py
# ----------------------------------------------------------------------------------------------------------------


def embedding_cases(bad):
    """{name: (--embeddings values, expected text)}, shared by infer.py and evaluate.py."""
    return {
        "empty_file": ([bad["empty.safetensors"]], "not a readable safetensors embedding file (the file is empty)"),
        "not_safetensors": ([bad["text.safetensors"]], "not a readable safetensors embedding file"),
        "cut_safetensors": ([bad["cut.safetensors"]], "not a readable safetensors embedding file"),
        "three_dimensions": ([bad["3d.safetensors"]], "has shape [2, 2, 32]; expected [vectors, width]"),
        "scalar": ([bad["scalar.safetensors"]], "has shape []; expected [vectors, width]"),
        "integer_vectors": ([bad["int.safetensors"]], "is not a float tensor of embeddings"),
        "nan_vectors": ([bad["nan.safetensors"]], "holds values that are not finite"),
        "unexpected_keys": ([bad["keys.safetensors"]], "unexpected keys ['extra'] next to ['clip_g', 'clip_l']"),
        "garbage_pt": ([bad["garbage.pt"]], "not a readable torch (.pt / .bin) embedding file"),
        "list_pt": ([bad["list.pt"]], "holds a list, not a dict of embeddings"),
        "a1111_without_star": ([bad["nostar.pt"]], "an A1111 file without the '*' vectors"),
    }


def sampling_cases():
    """Sampling numbers infer.py and evaluate.py refuse before any model loads (SDXL: sizes in multiples of 8)."""
    size = "must be a positive multiple of 8 up to 8192 for SDXL, got"
    return {
        "height_zero": (["--height", "0"], f"--height {size} 0."),
        "height_not_a_multiple": (["--height", "63"], f"--height {size} 63."),
        "width_negative": (["--width=-64"], f"--width {size} -64."),
        "width_huge": (["--width", "100000"], f"--width {size} 100000."),
        "steps_zero": (["--num_inference_steps", "0"], "--num_inference_steps must be at least 1, got 0."),
        "steps_negative": (["--num_inference_steps=-2"], "--num_inference_steps must be at least 1, got -2."),
        "guidance_nan": (["--guidance_scale", "nan"], "--guidance_scale must be a finite number, got nan."),
        "rescale_inf": (["--rescale", "inf"], "--rescale must be mean, min, max or a positive number, got 'inf'."),
    }


def test_bad_infer_input_ends_in_one_line(bad_files, tiny_sdxl, tmp_path):
    good = str(bad_files["good.safetensors"])
    copy = tmp_path / "copy.safetensors"
    shutil.copy(good, copy)
    common = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--prompt", f"a {TOKEN}", "--device", "cpu"]
    cases = {name: ([*map(str, specs)], expected) for name, (specs, expected) in embedding_cases(bad_files).items()}
    cases |= {
        "same_token_twice": ([good, str(copy)], f"{TOKEN} comes from both {good} and {copy}"),
        "per_encoder_and_combined": ([good, str(bad_files["combined.safetensors"])], f"{TOKEN} comes from both"),
    }
    argvs = {name: [*common, "--output_dir", str(tmp_path / name), "--embeddings", *specs] for name, (specs, _) in
             cases.items()}  # fmt: skip
    flag_cases = {
        "device_unknown": (["--device", "gpu0"], "--device 'gpu0' is not a device"),
        "seed_negative": (["--seed", "-1"], "--seed must be in [0, 2**32 - 1]"),
        "seed_beyond_range": (["--seed", str(2**32 - 1), "--num_images_per_prompt", "2"], "--seed must be in"),
        "output_dir_is_a_file": (["--output_dir", str(bad_files["a_file"])], "is a file; give a folder"),
        "lora_missing": (["--lora", str(tmp_path / "no-lora")], f"--lora {tmp_path / 'no-lora'}: no such file or"),
        "lora_not_a_lora": (["--lora", good], f"--lora {good}: not a LoRA this pipeline can load"),
        "lora_scale_nan": (["--lora_scale", "nan"], "--lora_scale must be a number, got nan."),
        "hub_id_offline": (["--pretrained_model_name_or_path", FAKE_HUB_ID], OFFLINE_HUB_ID_ERROR),
        "interpolate_unknown_token": (["--interpolate", TOKEN, "<nope>"], "--interpolate <nope>: not a loaded token"),
        "output_dir_under_a_file": (["--output_dir", str(bad_files["a_file"] / "sub")], "is a file, not a folder;"),
    } | sampling_cases()
    if not torch.cuda.is_available():
        flag_cases["device_cuda_without_cuda"] = (["--device", "cuda"], "--device cuda: this machine has no CUDA")
    usage = {"abbreviated_flag": (["--num_images", "2"], "unknown flag --num_images; did you mean --num_images_per_"),
             "misspelled_flag": (["--promt", "a"], "unknown flag --promt; did you mean --prompt?")}  # fmt: skip
    for name, (flags, expected) in (flag_cases | usage).items():
        argvs[name] = [*common, "--output_dir", str(tmp_path / name), "--embeddings", good, *flags]
        cases[name] = (None, expected)
    procs = run_script_cases(REPO / "infer.py", argvs)
    for name, (_, expected) in cases.items():
        assert procs[name].returncode == (2 if name in usage else 1), (name, procs[name].stderr[-2000:])
        assert_one_line_error(procs[name], expected)
        assert not (tmp_path / name).exists(), name  # nothing written
    assert bad_files["a_file"].read_text() == "a file, not a folder\n"


def test_bad_evaluate_input_ends_in_one_line(bad_files, tiny_sdxl, tmp_path):
    good = str(bad_files["good.safetensors"])
    common = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--image_encoder", "none", "--text_encoder", "none",
              "--device", "cpu", "--instance_data_dir", str(ASSETS)]  # fmt: skip
    argvs, expected = {}, {}
    for name, (specs, text) in embedding_cases(bad_files).items():
        if name in ("empty_file", "three_dimensions", "garbage_pt", "nan_vectors"):
            argvs[name] = [*common, "--output_dir", str(tmp_path / name), "--embeddings", *map(str, specs)]
            expected[name] = text
    flag_cases = {
        "seeds_negative": (["--seeds", "-1", "0"], "--seeds must be in [0, 2**32 - 1]"),
        "output_dir_is_a_file": (["--output_dir", str(bad_files["a_file"])], "is a file; give a folder"),
        "bomb_references": (["--instance_data_dir", str(bad_files["bomb"])], "in this folder (1 could not be read)"),
        "corrupt_references": (
            ["--instance_data_dir", str(bad_files["corrupt"])],
            "in this folder (1 could not be read)",
        ),
        "device_unknown": (["--device", "gpu0"], "--device 'gpu0' is not a device"),
        "hub_id_offline": (
            ["--pretrained_model_name_or_path", FAKE_HUB_ID, "--class_word", "toy"],
            OFFLINE_HUB_ID_ERROR,
        ),
        "evaluator_hub_id_offline": (
            ["--image_encoder", FAKE_HUB_ID, "--class_word", "toy"],
            f"--image_encoder '{FAKE_HUB_ID}' is not a local folder and the Hugging Face Hub could not be reached",
        ),
    } | {name: ([*flags, "--class_word", "toy"], text) for name, (flags, text) in sampling_cases().items()}
    if not torch.cuda.is_available():
        flag_cases["device_cuda_without_cuda"] = (["--device", "cuda"], "--device cuda: this machine has no CUDA")
    usage = {"abbreviated_flag": (["--seed", "1"], "unknown flag --seed; did you mean --seeds?")}
    for name, (flags, text) in (flag_cases | usage).items():
        argvs[name] = [*common, "--output_dir", str(tmp_path / name), "--embeddings", good, *flags]
        expected[name] = text
    procs = run_script_cases(REPO / "evaluate.py", argvs)
    for name, text in expected.items():
        assert procs[name].returncode == (2 if name in usage else 1), (name, procs[name].stderr[-2000:])
        assert_one_line_error(procs[name], text)
        assert not (tmp_path / name).exists(), name
    assert "warning: skipping" in procs["bomb_references"].stderr


def test_a_hub_id_with_the_hub_out_of_reach_fails_in_one_line_within_seconds(tiny_sdxl, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset and the Hub's endpoint refusing connections (no retries for half a minute): one line
    naming the id, the Hub and the ways out; the training script as run, infer.py's check (evaluate.py's too)
    in-process with the endpoint set the same way."""
    import time
    from datetime import datetime

    from huggingface_hub import constants

    import infer

    unreachable = "http://127.0.0.1:9"  # nothing listens there: every request is refused at once
    expected = f"'{FAKE_HUB_ID}' is not a local folder and the Hugging Face Hub could not be reached ({unreachable} did"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    argv = [*training_args(tiny_sdxl, tmp_path / "out"), "--pretrained_model_name_or_path", FAKE_HUB_ID]
    proc = subprocess.run([sys.executable, str(REPO / "train_dti_sdxl.py"), *argv], capture_output=True, text=True,
                          env=env | {"HF_ENDPOINT": unreachable}, timeout=300)  # fmt: skip
    ended = time.time()
    assert_one_line_error(proc, expected)
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "hf auth login" in proc.stderr and "Retry" not in proc.stderr
    logged = re.search(r"^(\S+ \S+) INFO ", proc.stderr, re.M).group(1)  # the first log line: the imports are done
    started = datetime.strptime(logged, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    assert ended - started < 5 and not (tmp_path / "out").exists()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", unreachable)
    started = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(expected)) as error:
        infer.check_hub_model("--pretrained_model_name_or_path", FAKE_HUB_ID)
    assert "\n" not in str(error.value) and time.monotonic() - started < 5


def test_a_cached_hub_id_passes_the_check_offline(tmp_path, monkeypatch):
    """A model in the local HF cache (the cache's own layout) is not refused under HF_HUB_OFFLINE=1; another is."""
    from huggingface_hub import constants

    import infer

    snapshot = tmp_path / "hub" / "models--someone--cached-model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for check in (train_dti_sdxl.check_hub_model, infer.check_hub_model):
        check("--pretrained_model_name_or_path", "someone/cached-model")
        with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 is set"):
            check("--pretrained_model_name_or_path", FAKE_HUB_ID)


def test_an_old_a1111_file_with_a_parameter_dict_loads(tmp_path):
    import infer

    vectors = torch.randn(2, 32)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors.clone())})
    torch.save({"string_to_param": params, "name": "old-style", "string_to_token": {"*": 265}}, tmp_path / "old.pt")
    token, loaded, _ = infer.read_embedding_file(tmp_path / "old.pt")
    assert token == "old-style" and torch.equal(loaded["width:32"], vectors)


# ----------------------------------------------------------------------------------------------------------------
# Faults: failed writes, damaged checkpoints, a busy output folder, image modes
# ----------------------------------------------------------------------------------------------------------------


def complete(folder):
    return train_dti_sdxl.checkpoint_damage(folder) is None


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_a_failed_checkpoint_write_keeps_the_last_complete_checkpoint(
    family, tiny_sdxl, tiny_sana, tmp_path, monkeypatch
):
    """--checkpoints_total_limit 1: the write of checkpoint-2 fails (a full disk); checkpoint-1 stays, complete."""
    script, model = SCRIPTS[family], tiny_sdxl if family == "sdxl" else tiny_sana
    out, calls = tmp_path / "out", []
    original = script.Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        result = original(self, output_dir, **kwargs)
        if len(calls) == 2:  # the second checkpoint's files are written, then the disk is full
            raise OSError(28, "No space left on device")
        return result

    monkeypatch.setattr(script.Accelerator, "save_state", save_state)
    flags = ["--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--gradient_accumulation_steps", "1",
             "--save_steps", "1"]  # fmt: skip
    with pytest.raises(script.TrainingStopped, match="The disk is full: .*checkpoint-2 could not be written"):
        script.main(script.parse_args(training_args(model, out, *flags)))
    assert [p.name for p in out.iterdir() if p.name.startswith((".checkpoint", "checkpoint"))] == ["checkpoint-1"]
    assert complete(out / "checkpoint-1")
    assert load_file(out / "learned_embeds-steps-1.safetensors")[TOKEN].shape[0] == 1  # so are the embeddings


def test_rotation_removes_old_checkpoints_only_after_the_new_one_is_complete(train, monkeypatch):
    seen = []
    original = train_dti_sdxl.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if os.path.basename(path).startswith("checkpoint-"):
            seen.append(sorted(p for p in os.listdir(os.path.dirname(path)) if p.startswith("checkpoint-")))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(train_dti_sdxl.shutil, "rmtree", rmtree)
    _, out = train("--checkpointing_steps", "1", "--checkpoints_total_limit", "1")
    assert seen == [["checkpoint-1", "checkpoint-2"], ["checkpoint-2", "checkpoint-3"]]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"] and complete(out / "checkpoint-3")


def test_a_full_disk_is_found_before_the_models_load(train, monkeypatch):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(train_dti_sdxl.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    loaded = []
    monkeypatch.setattr(train_dti_sdxl, "load_models", lambda args: loaded.append(1))
    with pytest.raises(ValueError, match=r"only 10 MiB free on its disk, 64 MiB are needed"):
        train()
    assert not loaded


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_a_damaged_newest_checkpoint_is_passed_over_and_the_resume_is_exact(
    family, tiny_sdxl, tiny_sana, tmp_path, caplog
):
    """Checkpoints at steps 2 and 4 of 6; checkpoint-4's RNG state is cut short. 'latest' resumes from checkpoint-2
    with a warning and ends bit-identical to an uninterrupted run; naming checkpoint-4 is refused."""
    script, model = SCRIPTS[family], tiny_sdxl if family == "sdxl" else tiny_sana
    flags = ["--max_train_steps", "6", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "1"]
    straight = script.main(script.parse_args(training_args(model, tmp_path / "straight", *flags)))
    out = tmp_path / "out"
    script.main(script.parse_args(training_args(model, out, *flags[:1], "4", *flags[2:])))
    rng = out / "checkpoint-4" / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"checkpoint-4 is damaged \(random_states_0.pkl is \d+ bytes, \d+ were"):
        script.main(script.parse_args(training_args(model, out, *flags, "--resume_from_checkpoint", "checkpoint-4")))
    with caplog.at_level("WARNING"):
        script.main(script.parse_args(training_args(model, out, *flags, "--resume_from_checkpoint", "latest")))
    assert "Passing over the damaged" in caplog.text and "checkpoint-4" in caplog.text
    expected = straight.learned["text_encoder"].embeddings().detach()
    assert torch.equal(load_file(out / "learned_embeds.safetensors")[TOKEN], expected)


def test_the_same_model_written_another_way_resumes(train, tiny_sdxl):
    _, out = train("--checkpointing_steps", "1", "--max_train_steps", "1")
    args = training_args(tiny_sdxl, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "2")
    args[args.index(str(tiny_sdxl))] = str(tiny_sdxl) + "/"
    train_dti_sdxl.main(train_dti_sdxl.parse_args(args))
    assert (out / "learned_embeds.safetensors").is_file()


def test_a_stale_lock_is_taken_over_and_released(train, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = {"pid": dead_pid(), "start": "1", "host": socket.gethostname()}
    (out / train_dti_sdxl.OUTPUT_LOCK).write_text(json.dumps(stale))
    train(output_dir=out)
    assert (out / "learned_embeds.safetensors").is_file()
    assert json.loads((out / train_dti_sdxl.OUTPUT_LOCK).read_text())["pid"] == os.getpid()  # held until exit
    assert not train_dti_sdxl.lock_owner_alive(stale)


def test_a_running_training_process_refuses_a_second_one(tiny_sdxl, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "train_dti_sdxl.py"), *training_args(tiny_sdxl, out, "--max_train_steps", "400",
            "--save_steps", "1", "--repeats", "1")]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        from tests.test_reliability import wait_for

        wait_for(out / "learned_embeds-steps-1.safetensors", first)
        second = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert_one_line_error(second, f"is in use by training process {first.pid}")
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert not (out / train_dti_sdxl.OUTPUT_LOCK).exists()  # released at exit


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16", np.full((4, 4), 65535, np.uint16), 255),
        ("I", np.full((4, 4), 40000, np.int32), 156),
        ("I", np.full((4, 4), 2**31 - 1, np.int32), 128),
        ("I", np.full((4, 4), 200, np.int32), 200),
        ("F", np.full((4, 4), 0.5, np.float32), 128),
        ("F", np.full((4, 4), 100.0, np.float32), 100),
    ],
)
def test_deep_grayscale_images_convert_by_their_range(mode, values, expected):
    image = Image.fromarray(values) if mode != "I;16" else Image.fromarray(values).convert("I;16")
    assert train_dti_sdxl.to_rgb(image).getpixel((0, 0)) == (expected,) * 3


def test_a_full_disk_while_saving_embeddings_leaves_the_previous_set_whole(tmp_path):
    files = {tmp_path / name: name.encode() for name in ("learned_embeds.safetensors", "toy-robot.safetensors")}
    for path, data in files.items():
        path.write_bytes(data)

    def full(tmp):
        raise OSError(28, "No space left on device")

    writes = dict(zip(files, [lambda tmp: tmp.write_bytes(b"new"), full], strict=True))
    with pytest.raises(train_dti_sdxl.TrainingStopped, match="The disk is full: .* are kept"):
        train_dti_sdxl.write_all_atomically(writes)
    assert {path: path.read_bytes() for path in files} == files and sorted(tmp_path.iterdir()) == sorted(files)

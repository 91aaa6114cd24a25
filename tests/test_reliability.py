"""Interruption without loss, no half-written files, and the non-finite guard, for both scripts."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_dti_flux2_klein
import train_dti_sana
import train_dti_sdxl
import train_dti_wan
from tests.conftest import REPO, assert_stopped_by, training_args

SCRIPTS = {"sdxl": train_dti_sdxl, "sana": train_dti_sana, "wan": train_dti_wan, "flux2_klein": train_dti_flux2_klein}
TOKEN = "<toy-robot>"


def model_of(family, tiny_sdxl, tiny_sana):
    return tiny_sdxl if family == "sdxl" else tiny_sana


def start(family, model, out, *extra):
    argv = [sys.executable, str(REPO / f"train_dti_{family}.py"), *training_args(model, out, *extra)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("family", ["sdxl", "sana", "wan", "flux2_klein"])
def test_interruptions_then_resume_end_bit_identical(family, request, tmp_path):
    """SDXL: a SIGTERM, then a Ctrl-C in the resumed run, then the resume. The stop itself is the core's, so the other
    families check one SIGTERM and the resume (what their own state and data stream must survive)."""
    model = request.getfixturevalue(f"tiny_{family}")
    steps = 20 if family == "sdxl" else 8
    flags = ["--max_train_steps", str(steps), "--save_steps", "1", "--checkpointing_steps", "100", "--repeats", "1"]
    flags += ["--gradient_accumulation_steps", "1"] + (
        ["--max_sequence_length", "64"] if family == "flux2_klein" else []
    )
    script = SCRIPTS[family]
    straight = script.main(script.parse_args(training_args(model, tmp_path / "straight", *flags)))
    out, stopped_at = tmp_path / "interrupted", []
    for wait_step, sig in [(3, signal.SIGTERM), (9, signal.SIGINT)][: 2 if family == "sdxl" else 1]:
        extra = ["--resume_from_checkpoint", "latest"] if stopped_at else []
        proc = start(family, model, out, *flags, *extra)
        wait_for(out / f"learned_embeds-steps-{wait_step}.safetensors", proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        step = assert_stopped_by(SimpleProc(proc.returncode, stderr), sig)
        assert step < steps
        assert (out / f"checkpoint-{step}").is_dir()
        saved = load_file(out / "learned_embeds.safetensors")[TOKEN]
        assert torch.equal(saved, load_file(out / f"learned_embeds-steps-{step}.safetensors")[TOKEN])
        stopped_at.append(step)
    assert stopped_at == sorted(set(stopped_at))
    proc = start(family, model, out, *flags, "--resume_from_checkpoint", "latest")
    _, stderr = proc.communicate(timeout=300)  # drain the pipes while it runs
    assert proc.returncode == 0, stderr[-2000:]
    expected = straight.learned["text_encoder"].embeddings().detach()
    assert torch.equal(load_file(out / "learned_embeds.safetensors")[TOKEN], expected)


class SimpleProc:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def checkpoint_steps(out):
    return [int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")]


def test_a_process_killed_while_writing_leaves_only_complete_files(tiny_sdxl, tmp_path):
    """SIGKILL at moments when embeddings and checkpoints are being written, three times, then resume."""
    flags = ["--max_train_steps", "16", "--save_steps", "1", "--checkpointing_steps", "1", "--repeats", "1"]
    out = tmp_path / "killed"
    for kill_after in (0.05, 0.13, 0.21):
        done = max(checkpoint_steps(out), default=0)
        proc = start("sdxl", tiny_sdxl, out, *flags, *(["--resume_from_checkpoint", "latest"] if done else []))
        wait_for(out / f"checkpoint-{done + 1}", proc)  # the run is now writing files at every step
        time.sleep(kill_after)
        proc.kill()
        proc.wait()
        for file in out.glob("*.safetensors"):  # every visible file is complete and readable
            assert set(load_file(file)) in ({TOKEN}, {"clip_l", "clip_g"})
        for folder in out.glob("checkpoint-*"):
            assert (folder / "dti_state.json").is_file() and (folder / "custom_checkpoint_0.pkl").is_file()
    proc = start("sdxl", tiny_sdxl, out, *flags, "--resume_from_checkpoint", "latest")
    _, stderr = proc.communicate(timeout=300)  # read the pipes while it runs: a full pipe would block the run
    assert proc.returncode == 0, stderr[-2000:]
    straight = train_dti_sdxl.main(train_dti_sdxl.parse_args(training_args(tiny_sdxl, tmp_path / "straight", *flags)))
    expected = straight.learned["text_encoder"].embeddings().detach()
    assert torch.equal(load_file(out / "learned_embeds.safetensors")[TOKEN], expected)


def nan_at(monkeypatch, script, bad_steps, accumulation=1):
    """Make training_loss non-finite (NaN times the real loss, so gradients are NaN too) on the given steps."""
    calls, original = [0], script.training_loss

    def loss(*args, **kwargs):
        calls[0] += 1
        value = original(*args, **kwargs)
        return value * float("nan") if (calls[0] - 1) // accumulation + 1 in bad_steps else value

    monkeypatch.setattr(script, "training_loss", loss)


def record_updates(monkeypatch, script):
    """The directions after every RSGD step, skipped or not (a skipped step is masked on the device)."""
    history, original = [], script.DirectionalTokens.step

    def step(self, lr, only_if=None):
        original(self, lr, only_if)
        history.append(self.direction.detach().clone())

    monkeypatch.setattr(script.DirectionalTokens, "step", step)
    return history


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_a_non_finite_step_is_skipped_and_counted(family, tiny_sdxl, tiny_sana, tmp_path, monkeypatch, caplog):
    script, model = SCRIPTS[family], model_of(family, tiny_sdxl, tiny_sana)
    nan_at(monkeypatch, script, {2})
    history = record_updates(monkeypatch, script)
    with caplog.at_level("WARNING"):
        result = script.main(
            script.parse_args(training_args(model, tmp_path / "out", "--gradient_accumulation_steps", "1"))
        )
    assert "Step 2: non-finite loss or gradient, update skipped (1 in a row)." in caplog.text
    assert caplog.text.count("update skipped") == 1
    per_step = len(result.learned)
    after = [history[i * per_step] for i in range(3)]  # text_encoder's direction after steps 1, 2, 3
    assert torch.equal(after[1], after[0]) and not torch.equal(after[2], after[1])  # step 2 changed nothing
    final = result.learned["text_encoder"].direction.detach()
    assert torch.isfinite(final).all() and torch.equal(final, after[2])


@pytest.mark.parametrize(("family", "logging_steps", "in_a_row", "last"), [("sdxl", 1, 3, 4), ("sana", 5, 4, 5)])
def test_too_many_non_finite_steps_stop_with_the_last_good_embeddings(
    family, logging_steps, in_a_row, last, tiny_sdxl, tiny_sana, tmp_path, monkeypatch
):
    """The flags are read every --logging_steps: the run stops at the first read that sees the limit reached."""
    script, model = SCRIPTS[family], model_of(family, tiny_sdxl, tiny_sana)
    nan_at(monkeypatch, script, set(range(2, 100)))
    history = record_updates(monkeypatch, script)
    argv = training_args(model, tmp_path / "out", "--max_train_steps", "10", "--max_nonfinite_steps", "3",
                         "--gradient_accumulation_steps", "1", "--logging_steps", str(logging_steps))  # fmt: skip
    match = rf"{in_a_row} steps in a row had a non-finite loss .* step {last}\)"
    with pytest.raises(script.TrainingStopped, match=match):
        script.main(script.parse_args(argv))
    saved = load_file(tmp_path / "out" / "learned_embeds.safetensors")[TOKEN]
    norm_scale = saved.norm().item()
    per_step = len(SCRIPTS[family].FAMILY.text_encoders)
    assert len(history) == last * per_step and all(torch.equal(h, history[0]) for h in history[::per_step])
    assert torch.allclose(saved, history[0] * norm_scale, atol=1e-6)  # only step 1 updated


def step_files(folder):
    """{file name: the step its metadata records} of the final embedding files in folder."""
    from safetensors import safe_open

    steps = {}
    for path in sorted(folder.glob("*.safetensors")):
        if "-steps-" not in path.name:
            with safe_open(path, framework="pt") as f:
                steps[path.name] = f.metadata()["steps"]
    return steps


def test_vectors_that_stop_being_finite_are_never_written(tiny_sdxl, tmp_path, monkeypatch):
    """An update that overflows (here: from step 3 on the direction is NaN) stops the run at the next save (the
    final one, step 4) before anything of it is written; the files on disk are the last save's, finite."""
    script, out = train_dti_sdxl, tmp_path / "out"
    original, steps = script.DirectionalTokens.step, []

    def step(self, lr, only_if=None):
        original(self, lr, only_if)
        steps.append(None)
        if len(steps) > 2 * 2:  # both text encoders' tokens step once per step: from step 3 on
            self.direction.data.fill_(float("nan"))

    monkeypatch.setattr(script.DirectionalTokens, "step", step)
    argv = training_args(tiny_sdxl, out, "--max_train_steps", "4", "--save_steps", "2", "--checkpointing_steps", "2")
    with pytest.raises(script.TrainingStopped, match=r"<toy-robot> \(text_encoder\) are not finite at step 4"):
        script.main(script.parse_args(argv))
    saved = {p.name: load_file(p) for p in out.glob("*.safetensors")}
    assert sorted(saved) == ["learned_embeds-steps-2.safetensors", "learned_embeds_2-steps-2.safetensors",
                             "toy-robot-steps-2.safetensors"]  # fmt: skip
    assert all(torch.isfinite(t).all() for tensors in saved.values() for t in tensors.values())
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_a_signal_in_the_last_validation_keeps_a_checkpoint_and_the_resume_finishes(tiny_sdxl, tmp_path, monkeypatch):
    """SIGTERM during the end-of-run validation: the validation ends, the final embeddings and a checkpoint of the
    last step are kept and the run stops in one line; `latest` then does only what was left (the model card)."""
    script, out = train_dti_sdxl, tmp_path / "out"
    flags = ["--num_validation_images", "1", "--validation_steps", "100", "--checkpointing_steps", "100"]
    original = script.log_validation

    def validation_then_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(script, "log_validation", validation_then_signal)
    with pytest.raises(script.StoppedBySignal, match="Stopped by SIGTERM at step 3: saved checkpoint-3 and the final"):
        script.main(script.parse_args(training_args(tiny_sdxl, out, *flags)))
    assert (out / "checkpoint-3").is_dir() and not (out / "README.md").exists()
    assert (out / "validation" / "step-3.png").is_file()  # the validation that was under way ended
    final = load_file(out / "learned_embeds.safetensors")[TOKEN]
    monkeypatch.setattr(script, "log_validation", original)
    script.main(script.parse_args(training_args(tiny_sdxl, out, *flags, "--resume_from_checkpoint", "latest")))
    assert torch.equal(load_file(out / "learned_embeds.safetensors")[TOKEN], final)
    assert (out / "README.md").is_file()


@pytest.mark.parametrize("failing_rename", [1, 2, 3])
def test_a_rename_failing_part_way_leaves_the_previous_files_whole(failing_rename, tiny_sdxl, tmp_path, monkeypatch):
    """The n-th rename of a save fails (any OSError, not only a full disk): the run stops in one line and the three
    embedding files on disk are all from the previous save, byte for byte."""
    script, out = train_dti_sdxl, tmp_path / "out"
    flags = ["--checkpointing_steps", "3"]
    script.main(script.parse_args(training_args(tiny_sdxl, out, *flags)))
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert set(step_files(out).values()) == {"3"} and len(before) == 3
    original, renames = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(".safetensors"):
            renames.append(dst)
            if len(renames) == failing_rename:
                raise OSError(5, "Input/output error")
        return original(src, dst)

    monkeypatch.setattr(script.os, "replace", replace)
    resume = training_args(tiny_sdxl, out, *flags, "--max_train_steps", "5", "--resume_from_checkpoint", "latest")
    with pytest.raises(script.TrainingStopped, match=r"could not be written \(Input/output error\): the last comp"):
        script.main(script.parse_args(resume))
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".old"))]


def file_metadata(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata()


def tokenizer_beyond_table(model, folder):
    """A copy of the tiny pipeline whose `tokenizer` has one id more than its text encoder's table (tokens added to
    the tokenizer file only, as a tokenizer that gained special tokens has)."""
    import json

    from transformers import AutoTokenizer

    folder.mkdir()
    for entry in model.iterdir():
        if entry.name != "tokenizer":
            (folder / entry.name).symlink_to(entry)
    tokenizer = AutoTokenizer.from_pretrained(model / "tokenizer")
    config = json.loads((model / "text_encoder" / "config.json").read_text())
    rows = config.get("vocab_size") or config["text_config"]["vocab_size"]
    extra = rows + 1 - len(tokenizer)
    tokenizer.add_tokens([f"<extra-{i}>" for i in range(max(extra, 1))], special_tokens=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    assert len(tokenizer) > rows
    return folder


@pytest.mark.parametrize("family", ["sdxl", "sana", "wan", "flux2_klein"])
def test_a_tokenizer_larger_than_its_table_gives_the_same_files_twice(family, request, tmp_path, caplog):
    """The ids without a pretrained row stay out of m* and get zero rows, so two runs that differ only in the
    global random state (what a resized table's new rows would be drawn from) write the same tensors and metadata."""
    model = tokenizer_beyond_table(request.getfixturevalue(f"tiny_{family}"), tmp_path / "model")
    script = SCRIPTS[family]
    extra = ["--max_sequence_length", "64"] if family == "flux2_klein" else []
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        out = tmp_path / f"run-{seed}"
        with caplog.at_level("WARNING"):
            script.main(script.parse_args(training_args(model, out, *extra, "--max_train_steps", "2")))
        files.append({p.name: (load_file(p), file_metadata(p)) for p in sorted(out.glob("*.safetensors"))})
    assert files[0].keys() == files[1].keys() and files[0]
    for name, (tensors, metadata) in files[0].items():  # safetensors orders the metadata differently each write
        assert tensors.keys() == files[1][name][0].keys() and metadata == files[1][name][1], name
        assert all(torch.equal(t, files[1][name][0][k]) for k, t in tensors.items()), name
    assert "id(s) without a row in the text encoder's table" in caplog.text


def test_going_back_to_an_older_checkpoint_sets_the_newer_ones_aside(train, caplog):
    """After a resume from checkpoint-2 of a run that reached checkpoint-4, 'latest' continues the new branch."""
    _, out = train("--max_train_steps", "4", "--checkpointing_steps", "1")
    with caplog.at_level("WARNING"):
        train("--max_train_steps", "3", "--checkpointing_steps", "1", "--resume_from_checkpoint", "checkpoint-2")
    assert "checkpoint-4 is newer than the resumed step 2: renamed abandoned-checkpoint-4." in caplog.text
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [
        "abandoned-checkpoint-3", "abandoned-checkpoint-4", "checkpoint-1", "checkpoint-2", "checkpoint-3",
    ]  # fmt: skip
    caplog.clear()
    with caplog.at_level("INFO"):
        train("--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert f"Resumed from {out / 'checkpoint-3'} at step 3." in caplog.text

"""SIGTERM to `accelerate launch` (one process and two): the training processes save and stop with their launcher,
and the resumed run ends bit-identical to an uninterrupted one (in its own file, so pytest-xdist can run it beside
tests/test_reliability.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_dti_sdxl
from tests.conftest import REPO, training_args
from tests.test_reliability import TOKEN, wait_for


def launch(nproc, model, out, *extra):
    """`accelerate launch` of train_dti_sdxl.py on CPU: one process, or two (gloo) with batch 1 each."""
    launcher = ["--num_processes", "1", "--cpu"] if nproc == 1 else ["--multi_gpu", "--num_processes", "2"]
    batch = ["--train_batch_size", str(2 // nproc)]
    argv = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--main_process_port", str(29540 + nproc),
            str(REPO / "train_dti_sdxl.py"), *training_args(model, out, *batch, *extra)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def training_pids(out):
    """Processes whose command line names this output folder (the launcher and the training processes)."""
    pids = []
    for proc in os.listdir("/proc"):
        try:
            command = Path(f"/proc/{proc}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.isdigit() and str(out).encode() in command:
            pids.append(int(proc))
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher watch uses Linux's PR_SET_PDEATHSIG")
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_to_accelerate_launch_saves_and_the_resume_is_bit_identical(nproc, tiny_sdxl, tmp_path):
    flags = ["--max_train_steps", "12", "--save_steps", "1", "--checkpointing_steps", "100", "--repeats", "1",
             "--logging_steps", "4"]  # fmt: skip
    flags += ["--lora_rank", "2", "--lora_start_step", "1"] if nproc == 1 else []  # DTI + LoRA: the LoRA is saved too
    straight = launch(nproc, tiny_sdxl, tmp_path / "straight", *flags)
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-2000:]
    out = tmp_path / "interrupted"
    proc = launch(nproc, tiny_sdxl, out, *flags)
    wait_for(out / "learned_embeds-steps-2.safetensors", proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler does
    proc.communicate(timeout=120)
    deadline = time.time() + 120
    while training_pids(out) and time.time() < deadline:
        time.sleep(0.1)
    assert not training_pids(out), "a training process outlived its launcher"
    (checkpoint,) = out.glob("checkpoint-*")
    assert int(checkpoint.name.split("-")[1]) < 12 and not (out / train_dti_sdxl.OUTPUT_LOCK).exists()
    resumed = launch(nproc, tiny_sdxl, out, *flags, "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.communicate()[1][-2000:]
    expected = load_file(tmp_path / "straight" / "learned_embeds.safetensors")[TOKEN]
    assert torch.equal(load_file(out / "learned_embeds.safetensors")[TOKEN], expected)
    lora_files = ("pytorch_lora_weights.safetensors", "toy-robot_lora.safetensors", "toy-robot_pivotal.safetensors")
    for file in lora_files if nproc == 1 else ():
        straight_lora, resumed_lora = load_file(tmp_path / "straight" / file), load_file(out / file)
        assert straight_lora.keys() == resumed_lora.keys()
        assert all(torch.equal(straight_lora[k], resumed_lora[k]) for k in straight_lora), file

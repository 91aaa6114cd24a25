"""The README's quick try as a new user runs it: with the network unreachable, it asks nothing of the network and
prints no line that a user cannot act on."""

import contextlib
import io
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests.conftest import REPO

# What a user cannot act on: library warnings and deprecations, network retries, tracebacks.
NOISE = re.compile(r"warn|deprecat|retry|retrying|huggingface\.co|traceback|error|torchvision|kept in float32", re.I)


def readme_quick_try():
    """The command of the README's "Try it in a minute" section, less its `pip install ... &&` part."""
    section = (REPO / "README.md").read_text().split("## Try it in a minute on CPU, no download", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)
    assert command.startswith("pip install -r requirements.txt && ")
    return command.split(" && ", 1)[1].replace("python ", f"{sys.executable} ")


def readme_generate_and_score():
    """The commands of the README's "Generate and score with the quick try's token" section, one per line."""
    section = (REPO / "README.md").read_text().split("### Generate and score with the quick try's token", 1)[1]
    block = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1).replace("\\\n", " ")
    return [line.replace("python ", f"{sys.executable} ", 1) for line in block.splitlines() if line.strip()]


def test_the_quick_try_is_offline_and_quiet(tmp_path):
    for name in ("tests", "assets", "train_dti_sdxl.py", "infer.py", "evaluate.py"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    unreachable = "http://127.0.0.1:9"  # every request is refused at once: a network that cannot be reached
    env |= {"HTTP_PROXY": unreachable, "HTTPS_PROXY": unreachable, "http_proxy": unreachable,
            "https_proxy": unreachable, "NO_PROXY": "", "no_proxy": "", "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    proc = subprocess.run(
        ["bash", "-c", readme_quick_try()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines() if line.strip()]
    assert [line for line in lines if NOISE.search(line)] == []
    done = [line for line in lines if "Done in " in line]
    assert len(done) == 1 and "learned_embeds.safetensors" in done[0] and "out-tiny" in done[0], lines[-5:]
    assert {p.name for p in (tmp_path / "out-tiny").iterdir()} >= {"learned_embeds.safetensors", "README.md"}
    commands = readme_generate_and_score()
    assert [c.split()[1] for c in commands] == ["infer.py", "-m", "evaluate.py"]
    for command in commands:  # infer.py and evaluate.py on the quick try's output, as offline and as quiet
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines() if line.strip()]
        assert [line for line in lines if NOISE.search(line)] == [], command
        output_dir = command.split("--output_dir ")[1].split()[0] if "--output_dir" in command else None
        if output_dir:  # the last line names what was written where
            last = proc.stdout.strip().splitlines()[-1]
            assert last.startswith("Done in ") and last.endswith(f" in {output_dir}."), proc.stdout[-500:]
    assert (tmp_path / "gen-tiny" / "generations.json").is_file() and (
        tmp_path / "eval-tiny" / "metrics.json"
    ).is_file()


class RecordingAccelerator:
    is_main_process = True

    def __init__(self):
        self.trackers, self.calls = [], []

    def init_trackers(self, project, config=None, init_kwargs=None):
        self.calls.append((project, config, init_kwargs))


def test_wandb_gets_its_config_at_init_and_honours_wandb_dir(tmp_path, monkeypatch):
    import train_dti_sdxl

    args = train_dti_sdxl.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                                      "--placeholder_token", "<t>", "--initializer_token", "dog",
                                      "--output_dir", str(tmp_path / "out"), "--report_to", "wandb"])  # fmt: skip
    monkeypatch.delenv("WANDB_DIR", raising=False)
    accelerator = RecordingAccelerator()
    train_dti_sdxl.start_trackers(accelerator, args, "dti-sdxl")
    ((project, config, init_kwargs),) = accelerator.calls
    assert project == "dti-sdxl" and config is None  # no store_init_configuration: accelerate 1.10 would restart
    assert init_kwargs["wandb"]["config"]["placeholder_token"] == "<t>"
    assert init_kwargs["wandb"]["dir"] == str(tmp_path / "out" / "logs")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    accelerator = RecordingAccelerator()
    train_dti_sdxl.start_trackers(accelerator, args, "dti-sdxl")
    assert "dir" not in accelerator.calls[0][2]["wandb"]


def test_the_base_model_license_is_read_from_disk_and_the_hub_is_not_asked_offline(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    import train_dti_sdxl

    model = tmp_path / "model"
    model.mkdir()
    args = SimpleNamespace(pretrained_model_name_or_path=str(model))
    assert train_dti_sdxl.base_model_license(args) is None  # a local folder without a card
    (model / "README.md").write_text("---\nlicense: openrail++\n---\n# a model\n")
    assert train_dti_sdxl.base_model_license(args) == "openrail++"

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub.ModelCard, "load", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_id = SimpleNamespace(pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0")
    assert train_dti_sdxl.base_model_license(hub_id) is None


def help_text(module):
    """`--help` of a script, in-process (the text `python SCRIPT --help` prints), whitespace collapsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.parse_args(["--help"])
    return " ".join(out.getvalue().split())


def test_help_writes_defaults_one_way():
    import evaluate
    import infer
    import train_dti_sana
    import train_dti_sdxl

    for module in (train_dti_sdxl, train_dti_sana, infer, evaluate):
        flat = help_text(module)
        assert "(default" not in flat, module.__name__
        assert "Default: False" not in flat and "Default: None" not in flat, module.__name__
    sdxl = help_text(train_dti_sdxl)
    assert "Default: 768." in sdxl and "--pooled_output {eos,argmax}" in sdxl
    center_crop = sdxl.split("--center_crop", 2)[2].split("--")[0]  # the switch's own help text
    assert "Default" not in center_crop

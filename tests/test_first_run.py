"""The README's quick try as a new user runs it: with the network unreachable, it asks nothing of the network and
prints no line that a user cannot act on."""

import os
import re
import subprocess
import sys

from tests.conftest import REPO

# What a user cannot act on: library warnings and deprecations, network retries, tracebacks.
NOISE = re.compile(r"warn|deprecat|retry|retrying|huggingface\.co|traceback|error|torchvision|kept in float32", re.I)


def readme_quick_try():
    """The command of the README's "Try it in a minute" section, less its `pip install ... &&` part."""
    section = (REPO / "README.md").read_text().split("## Try it in a minute on CPU, no download", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)
    assert command.startswith("pip install -r requirements.txt && ")
    return command.split(" && ", 1)[1].replace("python ", f"{sys.executable} ")


def test_the_quick_try_is_offline_and_quiet(tmp_path):
    for name in ("tests", "assets", "train_dti_sdxl.py"):
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

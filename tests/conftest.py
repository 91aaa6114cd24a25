"""Shared fixtures: a tiny random SDXL pipeline built once per session, offline, and a helper to train on it."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker (and its subprocesses), not N each
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "assets" / "toy_robot"
sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """Folder of a tiny random-weight StableDiffusionXLPipeline (see tests/tiny_sdxl.py)."""
    from tests.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sana(tmp_path_factory):
    """Folder of a tiny random-weight SanaPipeline (see tests/tiny_sana.py)."""
    from tests.tiny_sana import save_tiny_sana

    return save_tiny_sana(tmp_path_factory.mktemp("tiny-sana") / "pipeline")


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """Folder of a tiny random-weight WanPipeline (see tests/tiny_wan.py)."""
    from tests.tiny_wan import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan") / "pipeline")


@pytest.fixture(scope="session")
def tiny_flux2_klein(tmp_path_factory):
    """Folder of a tiny random-weight Flux2KleinPipeline, base (see tests/tiny_flux2_klein.py)."""
    from tests.tiny_flux2_klein import save_tiny_flux2_klein

    return save_tiny_flux2_klein(tmp_path_factory.mktemp("tiny-klein") / "pipeline")


@pytest.fixture(scope="session")
def tiny_sdxl_fp16_variant(tmp_path_factory):
    """The same tiny pipeline stored as an fp16 variant (*.fp16.safetensors), like `--variant fp16` checkpoints."""
    import torch

    from tests.tiny_sdxl import build_tiny_sdxl

    folder = tmp_path_factory.mktemp("tiny-sdxl-fp16") / "pipeline"
    build_tiny_sdxl().to(torch.float16).save_pretrained(folder, variant="fp16")
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process training run starts from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def training_args(model, output_dir, *extra, data_dir=ASSETS):
    """Fast defaults for the tiny pipeline: 64 px, batch 2, 3 steps, no validation, fixed seed."""
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data_dir),
        "--placeholder_token", "<toy-robot>",
        "--initializer_token", "robot",
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--train_batch_size", "2",
        "--max_train_steps", "3",
        "--num_validation_images", "0",
        "--seed", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def train_sana(tiny_sana, tmp_path):
    """Run train_dti_sana.main in-process on the tiny SANA pipeline (64 px, batch 2, 3 steps); (result, output_dir)."""
    import train_dti_sana

    def run(*extra, output_dir=None, **kwargs):
        output_dir = Path(output_dir or tmp_path / "out")
        argv = training_args(tiny_sana, output_dir, "--gradient_accumulation_steps", "1", *extra, **kwargs)
        return train_dti_sana.main(train_dti_sana.parse_args(argv)), output_dir

    return run


@pytest.fixture
def train_wan(tiny_wan, tmp_path):
    """Run train_dti_wan.main in-process on the tiny Wan pipeline (64 px, batch 2, 3 steps); (result, output_dir)."""
    import train_dti_wan

    def run(*extra, output_dir=None, **kwargs):
        output_dir = Path(output_dir or tmp_path / "out")
        argv = training_args(tiny_wan, output_dir, "--gradient_accumulation_steps", "1", *extra, **kwargs)
        return train_dti_wan.main(train_dti_wan.parse_args(argv)), output_dir

    return run


@pytest.fixture
def train_klein(tiny_flux2_klein, tmp_path):
    """Run train_dti_flux2_klein.main in-process on the tiny klein pipeline (64 px, batch 2, 3 steps, 64 text tokens);
    (result, output_dir)."""
    import train_dti_flux2_klein

    def run(*extra, output_dir=None, **kwargs):
        output_dir = Path(output_dir or tmp_path / "out")
        flags = ["--gradient_accumulation_steps", "1", "--max_sequence_length", "64"]
        argv = training_args(tiny_flux2_klein, output_dir, *flags, *extra, **kwargs)
        return train_dti_flux2_klein.main(train_dti_flux2_klein.parse_args(argv)), output_dir

    return run


@pytest.fixture
def train(tiny_sdxl, tmp_path):
    """Run train_dti_sdxl.main in-process on the tiny pipeline; returns (result, output_dir)."""
    import train_dti_sdxl

    def run(*extra, output_dir=None, **kwargs):
        output_dir = Path(output_dir or tmp_path / "out")
        args = train_dti_sdxl.parse_args(training_args(tiny_sdxl, output_dir, *extra, **kwargs))
        return train_dti_sdxl.main(args), output_dir

    return run


def run_commands(commands, workers=3):
    """Run {name: argv} as a user would (subprocesses, offline), a few at a time; returns {name: CompletedProcess}."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def run(item):
        name, argv = item
        return name, subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(pool.map(run, commands.items()))


def run_script_cases(script, cases, workers=2):
    """Run {name: args} as `python script *args` would (offline); returns {name: CompletedProcess}.

    The first case runs as its own subprocess; on Linux the others go through tests/cli_driver.py, which imports once
    and forks a fresh process per case, with the same exit status, stdout and stderr."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    from tests.cli_driver import run_cases

    if not sys.platform.startswith("linux"):
        return run_commands({name: [str(script), *args] for name, args in cases.items()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    (first, first_args), *rest = cases.items()
    with ThreadPoolExecutor(max_workers=2) as pool:
        command = [sys.executable, str(script), *first_args]
        plain = pool.submit(subprocess.run, command, capture_output=True, text=True, env=env, timeout=300)
        forked = pool.submit(run_cases, script, dict(rest), workers=workers, env=env) if rest else None
        results = {first: plain.result(), **(forked.result() if forked else {})}
    return {name: results[name] for name in cases}


def assert_one_line_error(proc, expected):
    """A failed run: non-zero exit, no traceback, and a last line 'error: ...' that holds `expected`."""
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and expected in last_line, proc.stderr[-2000:]
    assert sum(line.startswith("error:") for line in proc.stderr.splitlines()) == 1


def assert_stopped_by(proc, sig):
    """A run stopped by a signal: exit 128 + its number, no traceback, no error line, and a last line that says the
    step, what was saved and how to resume; returns the step."""
    assert proc.returncode == 128 + sig.value and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"Stopped by {sig.name} at step ") and "error" not in proc.stderr.lower(), last_line
    assert last_line.endswith("resume with --resume_from_checkpoint latest."), last_line
    return int(last_line.split(" at step ")[1].split(":")[0])


def torchrun_ranks(script, argv, dump, port):
    """Train with `torchrun --nproc_per_node 2` on CPU (gloo); return what each rank held (see dist_worker.py)."""
    import subprocess

    import torch

    dump.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(REPO / "tests" / "dist_worker.py"), script, str(dump), *argv]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(dump / f"rank{rank}.pt") for rank in (0, 1)]

"""Reference tensors: a few fixed tiny runs must keep giving the same learned vectors (and LoRA) on each CI stack.
The references were written by the scripts as they were before they became generated files (one thread, as the test
workers run). Another CPU or thread count sums floats in another order, so the comparison allows that rounding: the
vectors to 1e-6 of their norm (measured: 1.4e-7 between 1 and 2 threads), the LoRA, whose AdamW steps from zero
amplify it, to 1e-3 (measured: 1.3e-4). A change that alters a result on purpose rewrites them with

    OMP_NUM_THREADS=1 python -m tests.test_reference_runs --write
"""

import sys

import pytest
import transformers
from safetensors.torch import load_file, save_file

from tests.conftest import REPO

REFERENCE = REPO / "tests" / "fixtures" / "reference_runs.safetensors"
# run -> (family, extra flags); the base flags are conftest.training_args' (64 px, batch 2, 3 steps, seed 0).
RUNS = {
    "sdxl-dti": ("sdxl", []),
    "sdxl-lora": ("sdxl", ["--lora_rank", "4", "--lora_alpha", "2", "--lora_start_step", "1"]),
    "sana-dti": ("sana", []),
}
STACK = f"transformers{transformers.__version__.split('.')[0]}"  # the tiny models' random draws differ by major


def run_tensors(name, train, train_sana, output_dir):
    """{file::key: tensor} of every safetensors file run `name` writes."""
    family, extra = RUNS[name]
    _, out = (train if family == "sdxl" else train_sana)(*extra, output_dir=output_dir)
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors |= {f"{file.name}::{key}": value for key, value in load_file(file).items()}
    return tensors


@pytest.mark.parametrize("name", list(RUNS))
def test_a_fixed_run_gives_its_reference_tensors(name, train, train_sana, tmp_path):
    references = load_file(REFERENCE)
    prefix = f"{STACK}/{name}/"
    expected = {key.removeprefix(prefix): value for key, value in references.items() if key.startswith(prefix)}
    assert expected, f"no references for {prefix}: python -m tests.test_reference_runs --write on this stack"
    actual = run_tensors(name, train, train_sana, tmp_path / name)
    assert actual.keys() == expected.keys()
    errors = {key: ((actual[key] - value).norm() / value.norm()).item() for key, value in expected.items()}
    tolerance = {key: 1e-3 if "lora" in key else 1e-6 for key in expected}
    differ = {key: error for key, error in errors.items() if not error <= tolerance[key]}
    assert not differ, f"{name}: these differ from the reference (relative error): {differ}"


if __name__ == "__main__":  # write this stack's references (the other stack's are kept)
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_reference_runs --write")
    import tempfile
    from pathlib import Path

    from accelerate.state import AcceleratorState, GradientState

    from tests.conftest import training_args
    from tests.tiny_sana import save_tiny_sana
    from tests.tiny_sdxl import save_tiny_sdxl

    tmp = Path(tempfile.mkdtemp())
    models = {"sdxl": save_tiny_sdxl(tmp / "sdxl"), "sana": save_tiny_sana(tmp / "sana")}

    def runner(family):
        import importlib

        script = importlib.import_module(f"train_dti_{family}")

        def run(*extra, output_dir):
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            accumulation = ["--gradient_accumulation_steps", "1"] if family == "sana" else []
            script.main(script.parse_args(training_args(models[family], output_dir, *accumulation, *extra)))
            return None, Path(output_dir)

        return run

    kept = load_file(REFERENCE) if REFERENCE.is_file() else {}
    kept = {key: value for key, value in kept.items() if not key.startswith(f"{STACK}/")}
    for name in RUNS:
        tensors = run_tensors(name, runner("sdxl"), runner("sana"), tmp / "out" / name)
        kept |= {f"{STACK}/{name}/{key}": value for key, value in tensors.items()}
    save_file(kept, REFERENCE)
    print(f"wrote {len(kept)} tensors to {REFERENCE}")

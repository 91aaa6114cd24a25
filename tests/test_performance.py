"""Speed and memory options change nothing but speed and memory; the benchmark runs on CPU with the tiny models."""

import json
import subprocess
import sys
import traceback
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import train_dti_flux2_klein
import train_dti_sana
import train_dti_sdxl
import train_dti_wan
from tests.conftest import REPO, training_args

SCRIPTS = {"sdxl": train_dti_sdxl, "sana": train_dti_sana, "wan": train_dti_wan, "flux2_klein": train_dti_flux2_klein}


def train_run(family, model, output_dir, *extra):
    script = SCRIPTS[family]
    argv = training_args(model, output_dir, "--gradient_accumulation_steps", "1", "--center_crop", *extra)
    return script.main(script.parse_args(argv))


def final_rows(result):
    return {name: tokens.embeddings().detach().clone() for name, tokens in result.learned.items()}


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_each_speed_option_leaves_the_learned_embeddings_unchanged(family, tiny_sdxl, tiny_sana, tmp_path):
    model = tiny_sdxl if family == "sdxl" else tiny_sana
    reference = final_rows(train_run(family, model, tmp_path / "reference"))
    options = {
        "logging": (["--logging_steps", "2"], 0.0),
        "workers": (["--dataloader_num_workers", "2"], 0.0),
        "checkpointing": (["--gradient_checkpointing"], 1e-6),  # recomputation may reorder float sums
        "cache": (["--cache_latents"], 1e-5),
        "compile": (["--compile", "--compile_backend", "aot_eager"], 1e-5),
    }
    for name, (flags, tolerance) in options.items():
        reset_accelerate()
        rows = final_rows(train_run(family, model, tmp_path / name, *flags))
        for encoder, expected in reference.items():
            error = ((rows[encoder] - expected).norm() / expected.norm()).item()
            assert error <= tolerance, (name, encoder, error)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_compile_compiles_the_clip_encoders_with_the_unet_and_validation_keeps_the_plain_modules(
    family, tiny_sdxl, tiny_sana, tmp_path
):
    model = tiny_sdxl if family == "sdxl" else tiny_sana
    run, _, _ = setup_run(family, model, tmp_path / "out", "--compile", "--compile_backend", "aot_eager")
    trained = run.loss_fn.keywords["models"]
    compiled = [
        isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in (trained.denoiser, *trained.text_encoders)
    ]
    assert compiled == [True, *[family == "sdxl"] * len(trained.text_encoders)]  # SANA's text length varies by batch
    plain = [run.components[name] for name in (run.family.denoiser, *run.family.text_encoders)]
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in plain)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_quantize_frozen_8bit_keeps_the_gradient_path_and_changes_the_loss_little(
    family, tiny_sdxl, tiny_sana, tmp_path, monkeypatch
):
    import bitsandbytes as bnb
    from accelerate import Accelerator

    model = tiny_sdxl if family == "sdxl" else tiny_sana
    logged = {}

    def log(self, values, step=None, **kwargs):
        if "loss" in values:  # the step logs, not the run's phases at the end
            logged.setdefault(run_name, []).append(values["loss"])

    monkeypatch.setattr(Accelerator, "log", log)
    run_name = "full"
    full = train_run(family, model, tmp_path / "full")
    reset_accelerate()
    run_name = "8bit"
    quantized = train_run(family, model, tmp_path / "8bit", "--quantize_frozen", "8bit")

    denoiser = quantized.components["unet" if family == "sdxl" else "transformer"]
    for frozen in (denoiser, quantized.components["text_encoder"]):
        layers = list(frozen.modules())
        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in layers)
        assert not any(type(m) is torch.nn.Linear for m in layers)  # every linear layer is int8
    for name, tokens in quantized.learned.items():
        reference = full.learned[name]
        norms = tokens.embeddings().norm(dim=-1)
        torch.testing.assert_close(norms, torch.full_like(norms, reference.norm_scale), rtol=1e-6, atol=0)
        moved, moved_full = (t.direction - t.initial_direction for t in (tokens, reference))
        cosine = torch.nn.functional.cosine_similarity(moved.flatten(), moved_full.flatten(), dim=0).item()
        assert cosine > 0.9, (name, cosine)  # the gradient reaches the learned rows through the int8 layers
    first_loss_change = abs(logged["8bit"][0] - logged["full"][0]) / logged["full"][0]
    assert 0 < first_loss_change < 0.02, first_loss_change


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def setup_run(family, model, output_dir, *extra):
    """The script's run as `train` sets it up (1 micro-batch per step), and its first concept's first batch and
    latents."""
    script = SCRIPTS[family]
    flags = [
        "--gradient_accumulation_steps",
        "1",
        *(["--max_sequence_length", "64"] if family == "flux2_klein" else []),
    ]
    run = script.setup(script.parse_args(training_args(model, output_dir, *flags, *extra)), script.FAMILY)
    batch = next(run.concepts[0].batches)
    return run, batch, run.concepts[0].latents(batch)


def loss_and_gradient(run, batch, latents):
    """The loss of each sample and the gradient of the first concept's learned tokens, flat."""
    learned = run.concepts[0].learned
    learned.zero_grad(set_to_none=True)
    loss = run.loss_fn(batch, *latents)
    loss.sum().backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in learned.parameters()])


def text_conditioning(family, text_encoder, text, args, attended_only):
    """What the denoiser reads of the text conditioning: SANA's attended positions (it masks the rest), all of Wan's."""
    if family == "sana":
        embeds, mask = train_dti_sana.encode_prompt(text_encoder, text, args.max_sequence_length, attended_only)
        return embeds[mask.bool()]
    return train_dti_wan.encode_prompt(text_encoder, text, attended_only)


@pytest.mark.parametrize(
    ("family", "flags"), [("sana", []), ("sana", ["--complex_human_instruction"]), ("wan", [])],
    ids=["sana", "sana-instruction", "wan"],
)  # fmt: skip
def test_encoding_only_the_attended_positions_keeps_the_conditioning_loss_and_gradient(
    family, flags, request, tmp_path, monkeypatch
):
    script = SCRIPTS[family]
    run, batch, latents = setup_run(family, request.getfixturevalue(f"tiny_{family}"), tmp_path / "out", *flags)
    lengths = batch["text"]["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 2 and max(lengths) < batch["text"]["attention_mask"].shape[1]  # padded, unevenly
    with torch.no_grad():
        attended, full = (text_conditioning(family, run.models.text_encoders[0], batch["text"], run.args, attended)
                          for attended in (True, False))  # fmt: skip
    assert relative(attended, full) <= 1e-6
    results = {}
    for attended_only in (True, False):
        monkeypatch.setattr(script.FAMILY, "encode_attended_only", attended_only)
        results[attended_only] = loss_and_gradient(run, batch, latents)
    (loss, gradient), (full_loss, full_gradient) = results[True], results[False]
    assert relative(loss, full_loss) <= 1e-6 and relative(gradient, full_gradient) <= 1e-6


@pytest.mark.parametrize("family", ["sana", "wan"])
def test_a_run_encoding_the_attended_positions_ends_where_the_full_length_run_ends(
    family, request, tmp_path, monkeypatch
):
    model = request.getfixturevalue(f"tiny_{family}")
    attended = final_rows(train_run(family, model, tmp_path / "attended"))
    reset_accelerate()
    monkeypatch.setattr(SCRIPTS[family].FAMILY, "encode_attended_only", False)
    full = final_rows(train_run(family, model, tmp_path / "full"))
    assert {name: relative(rows, full[name]) <= 1e-6 for name, rows in attended.items()} == {"text_encoder": True}


def test_the_klein_encoder_cut_after_its_last_read_layer_keeps_the_loss_and_gradient(
    tiny_flux2_klein, tmp_path, monkeypatch
):
    cut = setup_run("flux2_klein", tiny_flux2_klein, tmp_path / "cut")
    reset_accelerate()
    monkeypatch.setattr(train_dti_flux2_klein.FAMILY, "prepare_text_encoders", lambda args, models, *_: models.extras)
    full = setup_run("flux2_klein", tiny_flux2_klein, tmp_path / "full")
    assert [len(run.models.text_encoders[0].model.layers) for run, _, _ in (cut, full)] == [28, 36]
    (loss, gradient), (full_loss, full_gradient) = (loss_and_gradient(*run) for run in (cut, full))
    assert relative(loss, full_loss) <= 1e-6 and relative(gradient, full_gradient) <= 1e-6


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_validation_images_made_in_one_call_are_the_images_made_one_by_one(family, tiny_sdxl, tiny_sana, tmp_path):
    model = tiny_sdxl if family == "sdxl" else tiny_sana
    grids = {}
    for name, flags in {"one call": [], "one by one": ["--validation_batch_size", "1"]}.items():
        reset_accelerate()
        train_run(family, model, tmp_path / name, "--max_train_steps", "1", "--num_validation_images", "3", *flags)
        grids[name] = np.asarray(Image.open(tmp_path / name / "validation" / "step-1.png"), dtype=int)
    difference = np.abs(grids["one call"] - grids["one by one"])
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3  # fp32 rounding, seen through 8 bits


class RecordingPipeline:
    """A family whose pipeline records the seeds of each call and runs out of memory above max_batch images."""

    def __init__(self, max_batch):
        self.max_batch, self.calls = max_batch, []

    def validation_images(self, components, models, args, prompt, generators):
        self.calls.append([g.initial_seed() for g in generators])
        if len(generators) > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return [f"image {g.initial_seed()}" for g in generators]


@pytest.mark.parametrize(
    ("batch_size", "max_batch", "calls", "kept"),
    [
        (None, 5, [[10, 11, 12, 13, 14]], None),
        (2, 5, [[10, 11], [12, 13], [14]], 2),
        (None, 2, [[10, 11, 12, 13, 14], [10, 11], [12, 13], [14]], 2),  # halved after running out of memory
    ],
    ids=["all-at-once", "batches-of-2", "out-of-memory"],
)
def test_validation_calls_the_pipeline_per_batch_each_image_seeded_by_its_index(
    batch_size, max_batch, calls, kept, caplog
):
    from accelerate import PartialState

    PartialState(cpu=True)  # the scripts' logger needs it
    family = RecordingPipeline(max_batch)
    args = SimpleNamespace(num_validation_images=5, validation_batch_size=batch_size)
    images = train_dti_sdxl.generate_validation_images({}, None, args, "cpu", 10, "a prompt", family)
    assert family.calls == calls and images == [f"image {seed}" for seed in range(10, 15)]
    assert args.validation_batch_size == kept
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == (["Validation of 5 images in one call ran out of memory: 2 per call from now on "
                         "(--validation_batch_size sets it)."] if len(calls) == 4 else [])  # fmt: skip


def test_run_phases_give_each_second_to_one_phase(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(train_dti_sdxl.time, "monotonic", lambda: now[0])

    def spend(seconds):
        now[0] += seconds

    phases = train_dti_sdxl.RunPhases()
    spend(12)  # loading
    phases.start_steps(torch.device("cpu"), compiles=True)
    spend(30)
    phases.step_done()  # the first step, compiling
    for _ in range(4):
        spend(0.5)
        phases.step_done()
    with phases("validation"):
        spend(3)
    with phases("saving"):
        spend(1)
    spend(0.5)
    phases.step_done()
    phases.end_steps()
    with phases("saving"):
        spend(1)
    with phases("upload"):
        spend(2)
    assert phases.summary() == ("Load 12.0s, compile 30.0s (the first step), 5 steps 2.5s (0.5 s/step), 1 validation "
                                "3.0s, saving 2.0s, upload 2.0s.")  # fmt: skip
    assert phases.tracker_values() == {"time/load_s": 12, "time/compile_s": 30, "time/training_s": 2.5,
                                       "time/validation_s": 3, "time/saving_s": 2, "time/upload_s": 2,
                                       "time/total_s": 51.5, "time/s_per_step": 0.5}  # fmt: skip
    assert [train_dti_sdxl.duration(s) for s in (59.94, 65, 3725)] == ["59.9s", "1m05s", "1h02m"]


class CountDeviceReads(TorchDispatchMode):
    """Counts tensor-to-Python reads (.item(), bool(), float()): each one is a host-device sync on a GPU. Reads made
    by transformers' attention-mask helpers (transformers 4's Gemma-2 makes two per forward) are counted apart:
    they are the library's, not the scripts'."""

    def __init__(self):
        super().__init__()
        self.reads, self.library_reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default):
            in_mask_helper = any(
                "transformers" in frame.filename and "masking_utils" in frame.filename
                for frame in traceback.extract_stack()
            )
            self.library_reads += in_mask_helper
            self.reads += not in_mask_helper
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_the_training_loop_reads_the_device_only_at_logging_steps(family, tiny_sdxl, tiny_sana, tmp_path, monkeypatch):
    script, model = SCRIPTS[family], tiny_sdxl if family == "sdxl" else tiny_sana
    counter, reads_at_step, log_reads = CountDeviceReads(), [], []
    original_gradient, original_read = script.data_gradient, script.StepLogs.read

    def data_gradient(*args, **kwargs):
        reads_at_step.append(counter.reads)
        return original_gradient(*args, **kwargs)

    def read(self):
        records = original_read(self)
        log_reads.append([step for step, _, _ in records])
        return records

    monkeypatch.setattr(script, "data_gradient", data_gradient)
    monkeypatch.setattr(script.StepLogs, "read", read)
    with counter:
        train_run(family, model, tmp_path / "out", "--max_train_steps", "7", "--logging_steps", "3")
    assert len(reads_at_step) == 7 and reads_at_step[-1] == reads_at_step[0]  # no .item() between steps 1 and 7
    if family == "sdxl" or int(transformers.__version__.split(".")[0]) >= 5:
        assert counter.library_reads == 0  # CLIP, and Gemma-2 from transformers 5 on, read nothing either
    assert log_reads == [[1], [2, 3], [4, 5, 6], [7]]  # at the first step (the bar shows its loss), every 3, the end


def test_benchmark_runs_on_cpu_with_the_tiny_models_and_reports_every_field(tmp_path):
    output = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_step.py"), "--family", "sdxl", "--config", "tiny",
               "--device", "cpu", "--steps", "2", "--warmup", "1", "--compile_backend", "aot_eager",
               "--output", str(output)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["family"] == "sdxl" and report["config"] == "tiny" and report["device_type"] == "cpu"
    assert report["batch_size"] == 4 and report["resolution"] == 64 and report["steps"] == 2
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers"}
    rows = {row["variant"]: row for row in report["results"]}
    assert list(rows) == ["floor", "dti", "dti+cache", "ti+cache", "dti+cache+compile", "dti+lora+cache", "dti+gc",
                          "dti+gc+cache", "dti+gc+cache+8bit"]  # fmt: skip
    for row in rows.values():
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["images_per_s"] == pytest.approx(4 / row["median_s"])
        assert row["ratio_to_floor"] == pytest.approx(row["median_s"] / rows["floor"]["median_s"])
        assert row["peak_memory_gib"] is None and row["fraction_of_peak"] is None  # CPU: no device counters
    # FLOPs: the step adds the text encoders (and the VAE without the cache) to the floor; checkpointing recomputes.
    flops = {name: row["tflop_per_step"] for name, row in rows.items()}
    assert 0 < flops["floor"] < flops["dti+cache"] < flops["dti"] < flops["dti+gc"]
    assert flops["dti+cache+compile"] == flops["dti+cache"] and flops["dti+gc+cache+8bit"] == flops["dti+gc+cache"]
    # Every DTI variant follows the same stream from the same seed: the same loss after the timed steps.
    for name in ("dti+cache", "dti+gc", "dti+gc+cache", "dti+cache+compile"):
        assert rows[name]["loss_rel_diff_vs_dti"] < 1e-5, name
    assert rows["dti+gc+cache+8bit"]["loss_rel_diff_vs_dti"] < 0.02
    # DTI + LoRA adds the LoRA's work, trains another model (no loss comparison), and leaves none behind (dti+gc).
    assert flops["dti+lora+cache"] > flops["dti+cache"] and rows["dti+lora+cache"]["loss_rel_diff_vs_dti"] is None
    table = proc.stdout.splitlines()
    assert table[0].startswith("sdxl tiny | 64 px | batch 4") and table[1].split()[:3] == ["variant", "median", "s"]
    assert [line.split()[0] for line in table[3:]] == list(rows)


def test_the_run_benchmark_times_a_whole_tiny_run_and_reports_its_phases(tiny_sdxl, tmp_path):
    output = tmp_path / "run.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_run.py"), "--family", "sdxl", "--config", "tiny",
               "--model_dir", str(tiny_sdxl), "--device", "cpu", "--max_train_steps", "4", "--validation_steps", "2",
               "--output", str(output), "--", "--num_validation_images", "1"]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["family"] == "sdxl" and report["config"] == "tiny" and report["device_type"] == "cpu"
    assert set(report["versions"]) >= {"torch", "diffusers", "transformers", "accelerate"}
    (run,) = report["runs"]
    assert run["setting"] == "default" and run["done_line"].startswith("Done in ")
    assert run["flags"][-2:] == ["--num_validation_images", "1"]  # what follows -- goes to the script
    assert run["steps"] == 4 and run["validations"] == 2 and run["compile_s"] is None and run["upload_s"] is None
    assert run["s_per_step"] == pytest.approx(run["training_s"] / 4, rel=0.05, abs=0.05)  # the line's rounding
    phases = [run[f"{phase}_s"] for phase in ("load", "training", "validation", "saving")]
    assert all(seconds >= 0 for seconds in phases) and run["startup_s"] > 0
    assert sum(phases) + run["startup_s"] == pytest.approx(run["wall_s"])
    table = proc.stdout.splitlines()
    assert table[0].startswith("sdxl tiny | ") and table[1].split()[:3] == ["setting", "wall", "s"]
    assert table[3].split()[0] == "default" and tiny_sdxl.is_dir()  # a given --model_dir is kept


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "nope"], "--config nope: no folder benchmarks/configs/nope"),
        (["--steps", "0"], "--steps"),
        (["--variants", "dti+cache+full_text"], "sdxl's text encoder always runs over the whole length"),
    ],
)
def test_benchmark_bad_input_is_one_line(argv, expected, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_step

    with pytest.raises(SystemExit) as stopped:
        bench_step.parse_args(["--device", "cpu", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0]

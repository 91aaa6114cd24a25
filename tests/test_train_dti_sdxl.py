"""Tests of train_dti_sdxl.py on a tiny random SDXL pipeline (CPU, offline)."""

import json
import math
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train_dti_sdxl as dti
from tests.conftest import ASSETS, REPO, assert_one_line_error, run_script_cases, torchrun_ranks, training_args

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PLACEHOLDER = "<toy-robot>"


def reference_rsgd(v, mu, grads, lr, kappa, beta, eps):
    """The spec's five steps, float64 numpy, written independently of the script. Returns the trajectory."""
    v, mu, s, trajectory = np.array(v, dtype=np.float64), np.array(mu, dtype=np.float64), np.zeros(len(v)), []
    for t, grad in enumerate(grads, start=1):
        g = np.array(grad) - kappa * mu
        g = g - np.sum(v * g, axis=1, keepdims=True) * v
        s = beta * s + (1 - beta) * np.sum(g * g, axis=1)
        g = g / (np.sqrt(s / (1 - beta**t)) + eps)[:, None]
        v = v - lr * g
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        trajectory.append(v)
    return trajectory


def run_rsgd(v0, mu, grads, lr, kappa, beta, eps=1e-8):
    tokens = dti.DirectionalTokens(
        torch.tensor(np.asarray(mu), dtype=torch.float64),
        torch.tensor(np.asarray(v0), dtype=torch.float64),
        norm_scale=1.0,
        kappa=kappa,
        beta=beta,
        eps=eps,
        dtype=torch.float64,
    )
    trajectory = []
    for grad in grads:
        tokens.direction.grad = torch.tensor(grad, dtype=torch.float64)
        tokens.step(lr)
        trajectory.append(tokens.direction.detach().numpy().copy())
    return trajectory


def unit_angle(a, b):
    """Angle between unit vectors, float64 and accurate for small angles."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    return 2 * np.arcsin(np.linalg.norm(a - b, axis=-1) / 2)


def pretrained_table(model, subfolder):
    """The pretrained input-embedding table of text_encoder or text_encoder_2, read from disk."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModel if subfolder == "text_encoder" else CLIPTextModelWithProjection
    return model_class.from_pretrained(model, subfolder=subfolder).get_input_embeddings().weight.detach()


# ------------------------------------------------------------------------------------------------ the update math


GOLDEN = json.loads((FIXTURES / "rsgd_golden.json").read_text())["cases"]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: c["name"])
def test_update_reproduces_the_authors_trajectories(case):
    ours = run_rsgd(
        case["initial_direction"], case["prior_direction"], case["euclidean_grads"], case["lr"], case["kappa"],
        case["beta"], case["eps"],
    )  # fmt: skip
    expected = np.array(case["directions_after_each_step"])
    assert np.abs(np.array(ours) - expected).max() < 1e-10


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_update_matches_an_independent_implementation(beta):
    rng = np.random.default_rng(0)
    k, d = 3, 24
    mu = rng.normal(size=(k, d))
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    v0 = rng.normal(size=(k, d))
    grads = rng.normal(size=(10, k, d)) * np.array([1e-3, 1.0, 30.0])[None, :, None]
    ours = run_rsgd(v0 / np.linalg.norm(v0, axis=1, keepdims=True), mu, grads, 0.05, 0.02, beta)
    reference = reference_rsgd(v0 / np.linalg.norm(v0, axis=1, keepdims=True), mu, grads, 0.05, 0.02, beta, 1e-8)
    assert np.abs(np.array(ours) - np.array(reference)).max() < 1e-12
    assert np.allclose(np.linalg.norm(ours[-1], axis=1), 1.0, atol=1e-14)


def test_one_step_turns_each_direction_by_atan_lr_whatever_the_gradient_scale():
    rng = np.random.default_rng(1)
    v0 = rng.normal(size=(4, 16))
    v0 /= np.linalg.norm(v0, axis=1, keepdims=True)
    grads = [rng.normal(size=(4, 16)) * np.array([1e-2, 1.0, 1e3, 1e6])[:, None]]
    (v1,) = run_rsgd(v0, v0, grads, lr=0.04, kappa=1e-4, beta=0.0)
    assert np.allclose(unit_angle(v0, v1), math.atan(0.04), rtol=1e-6)


def test_prior_pulls_toward_the_class_direction_when_the_data_gradient_is_zero():
    mu = np.eye(8)[:1]
    v0 = np.array([[0.6, 0.8, 0, 0, 0, 0, 0, 0]])
    (v1,) = run_rsgd(v0, mu, [np.zeros((1, 8))], lr=0.1, kappa=1.0, beta=0.0)
    assert (v1 @ mu.T)[0, 0] > (v0 @ mu.T)[0, 0]
    assert unit_angle(v0, v1)[0] == pytest.approx(math.atan(0.1), rel=1e-7)  # |g| = 0.8: eps/|g| ~ 1e-8


# ------------------------------------------------------------------------------------------------ training runs


def test_training_keeps_the_norm_at_the_vocabulary_mean_and_turns_by_atan_lr(train, tiny_sdxl):
    result, out = train("--max_train_steps", "1", "--learning_rate", "0.02")
    robot_id = 8797  # "robot</w>" in the CLIP vocabulary, the same in both tokenizers
    for name, file, width in [("text_encoder", "learned_embeds", 32), ("text_encoder_2", "learned_embeds_2", 48)]:
        table = pretrained_table(tiny_sdxl, name).double()
        vector = load_file(out / f"{file}.safetensors")[PLACEHOLDER]
        assert vector.shape == (1, width) and vector.dtype == torch.float32
        mean_norm = table.norm(dim=1).mean().item()
        assert vector.double().norm(dim=1).item() == pytest.approx(mean_norm, rel=1e-6)
        prior = result.learned[name].prior_direction.double()
        assert torch.allclose(prior, (table[robot_id] / table[robot_id].norm())[None], atol=1e-7)
        assert unit_angle(table[robot_id], vector[0])[()] == pytest.approx(math.atan(0.02), rel=1e-4)


def test_everything_but_the_new_rows_stays_bit_identical(train, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    result, _ = train("--max_train_steps", "2")
    pretrained = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        trained, original = result.components[name].state_dict(), getattr(pretrained, name).state_dict()
        assert trained.keys() == original.keys()
        for key, tensor in original.items():
            if key.endswith("token_embedding.weight"):
                assert trained[key].shape[0] == tensor.shape[0] + 1
                assert torch.equal(trained[key][: tensor.shape[0]], tensor), f"{name}.{key}"
            else:
                assert torch.equal(trained[key], tensor), f"{name}.{key}"
        assert not any(p.requires_grad for p in result.components[name].parameters())
    assert {n for n, p in result.learned.named_parameters()} == {"text_encoder.direction", "text_encoder_2.direction"}


def test_output_files_load_with_diffusers_and_match_training_text_features(train, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    result, out = train("--max_train_steps", "2")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    before = pipe("a photo of a robot", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    pipe.load_textual_inversion(out / "learned_embeds.safetensors", token=PLACEHOLDER,
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(out / "learned_embeds_2.safetensors", token=PLACEHOLDER,
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)  # fmt: skip
    for encoder, tokenizer, file in [(pipe.text_encoder, pipe.tokenizer, "learned_embeds"),
                                     (pipe.text_encoder_2, pipe.tokenizer_2, "learned_embeds_2")]:  # fmt: skip
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(PLACEHOLDER)]
        assert torch.equal(row, load_file(out / f"{file}.safetensors")[PLACEHOLDER][0])
    prompt = f"a photo of a {PLACEHOLDER} on a table"
    exec(dti.POOL_AT_END_OF_TEXT)  # the README's line: the pipeline pools at end-of-text, as training did
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    tokenizers = [result.components["tokenizer"], result.components["tokenizer_2"]]
    text = {key: torch.tensor([ids]) for key, ids in dti.tokenize_prompt(tokenizers, prompt).items()}
    with torch.no_grad():
        trained_embeds, trained_pooled = dti.encode_prompt(
            [result.components["text_encoder"], result.components["text_encoder_2"]], text
        )
    assert torch.allclose(embeds, trained_embeds, atol=1e-6) and torch.allclose(pooled, trained_pooled, atol=1e-6)
    after = pipe(f"a photo of a {PLACEHOLDER}", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert np.abs(after - before).max() > 1e-4


def test_combined_file_and_metadata(train):
    _, out = train("--max_train_steps", "2", "--kappa", "0.0003")
    combined = load_file(out / "toy-robot.safetensors")
    assert {k: tuple(v.shape) for k, v in combined.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    assert torch.equal(combined["clip_l"], load_file(out / "learned_embeds.safetensors")[PLACEHOLDER])
    assert torch.equal(combined["clip_g"], load_file(out / "learned_embeds_2.safetensors")[PLACEHOLDER])
    with safe_open(out / "learned_embeds_2.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "dti" and meta["placeholder_token"] == PLACEHOLDER
    assert meta["initializer_token"] == "robot" and meta["kappa"] == "0.0003" and meta["steps"] == "2"
    assert float(meta["norm_scale_text_encoder_2"]) == pytest.approx(combined["clip_g"].norm().item(), rel=1e-6)
    assert meta["script_version"] == dti.__version__ and meta["base_model"].endswith("pipeline")
    assert meta["seed"] == "0"
    assert not list(out.glob(".*tmp"))


def test_multi_vector_tokens_use_diffusers_names_and_prompt_expansion(train, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    result, out = train("--initializer_token", "red robot", "--max_train_steps", "1")
    tokenizer = result.components["tokenizer"]
    assert tokenizer.convert_tokens_to_ids([PLACEHOLDER, f"{PLACEHOLDER}_1"]) == result.placeholder_ids[0]
    assert load_file(out / "learned_embeds.safetensors")[PLACEHOLDER].shape == (2, 32)
    assert load_file(out / "toy-robot.safetensors")["clip_g"].shape == (2, 48)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_textual_inversion(out / "learned_embeds.safetensors", token=PLACEHOLDER,
                                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)  # fmt: skip
    expanded = pipe.maybe_convert_prompt(f"a photo of a {PLACEHOLDER}", pipe.tokenizer)
    assert expanded == f"a photo of a {dti.placeholder_prompt_token(PLACEHOLDER, 2)}"
    assert expanded == f"a photo of a {PLACEHOLDER} {PLACEHOLDER}_1"
    red, robot = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("red", "robot"))
    prior = result.learned["text_encoder"].prior_direction
    table = pretrained_table(tiny_sdxl, "text_encoder")
    assert torch.allclose(prior, torch.nn.functional.normalize(table[[red, robot]], dim=-1), atol=1e-7)


def test_num_vectors_repeats_a_one_token_initializer(train):
    result, out = train("--num_vectors", "3", "--max_train_steps", "1")
    prior = result.learned["text_encoder_2"].prior_direction
    assert prior.shape == (3, 48) and torch.equal(prior[0], prior[2])
    assert load_file(out / "learned_embeds_2.safetensors")[PLACEHOLDER].shape == (3, 48)


def test_checkpoints_total_limit_keeps_the_newest(train):
    _, out = train("--checkpointing_steps", "1", "--checkpoints_total_limit", "2")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    size = sum(f.stat().st_size for f in (out / "checkpoint-3").iterdir())
    assert size < 100_000, f"a checkpoint holds only the learned state, not {size} bytes"


@pytest.mark.parametrize("extra", [[], ["--random_flip", "--gradient_accumulation_steps", "2", "--beta", "0.5"]])
def test_resume_is_bit_identical_to_an_uninterrupted_run(train, tmp_path, extra):
    common = ["--checkpointing_steps", "2", "--repeats", "1", *extra]
    train("--max_train_steps", "4", *common, output_dir=tmp_path / "straight")
    train("--max_train_steps", "2", *common, output_dir=tmp_path / "resumed")
    half_way = load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[PLACEHOLDER]
    train("--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common, output_dir=tmp_path / "resumed")
    for file in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        straight = load_file(tmp_path / "straight" / file)[PLACEHOLDER]
        assert torch.equal(straight, load_file(tmp_path / "resumed" / file)[PLACEHOLDER])
    assert not torch.equal(half_way, load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[PLACEHOLDER])


def test_resume_refuses_a_checkpoint_of_another_placeholder(train, tmp_path, tiny_sdxl):
    train("--checkpointing_steps", "1", "--max_train_steps", "1", output_dir=tmp_path / "run")
    other = dti.parse_args([*training_args(tiny_sdxl, tmp_path / "run"), "--placeholder_token", "<other>"])
    with pytest.raises(ValueError, match="placeholder_token '<toy-robot>'.*'<other>'"):
        dti.read_checkpoint_state(tmp_path / "run" / "checkpoint-1", dti.checkpoint_identity(other, 1))


def test_method_ti_lets_the_norm_move_and_adamw_on_the_sphere_keeps_it(train, tmp_path, tiny_sdxl):
    table = pretrained_table(tiny_sdxl, "text_encoder").double()
    _, ti_out = train("--method", "ti", "--learning_rate", "0.05", output_dir=tmp_path / "ti")
    _, adamw_out = train("--optimizer", "adamw", "--learning_rate", "0.05", output_dir=tmp_path / "adamw")
    mean_norm = table.norm(dim=1).mean().item()
    ti_vector = load_file(ti_out / "learned_embeds.safetensors")[PLACEHOLDER].double()
    adamw_vector = load_file(adamw_out / "learned_embeds.safetensors")[PLACEHOLDER].double()
    tokenizer = dti.load_tokenizers(dti.parse_args(training_args(tiny_sdxl, tmp_path)))[0]
    robot_norm = table[tokenizer("robot", add_special_tokens=False).input_ids[0]].norm().item()
    assert abs(ti_vector.norm().item() - robot_norm) > 1e-3 * robot_norm
    assert abs(ti_vector.norm().item() - mean_norm) > 1e-3 * mean_norm
    assert adamw_vector.norm().item() == pytest.approx(mean_norm, rel=1e-6)
    with safe_open(ti_out / "learned_embeds.safetensors", "pt") as f:
        assert f.metadata()["method"] == "ti" and f.metadata()["norm_scale_text_encoder"] == "free"


def test_bf16_keeps_fp32_directions_and_the_exact_norm(train, tiny_sdxl):
    result, out = train("--mixed_precision", "bf16", "--max_train_steps", "2")
    assert result.components["unet"].dtype == torch.bfloat16
    assert result.components["text_encoder"].dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in result.learned.parameters())
    mean_norm = pretrained_table(tiny_sdxl, "text_encoder").double().norm(dim=1).mean().item()
    vector = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER].double()
    assert vector.norm().item() == pytest.approx(mean_norm, rel=1e-6)


def test_validation_writes_a_grid_every_validation_steps_and_at_the_end(train):
    _, out = train("--num_validation_images", "2", "--validation_steps", "2", "--validation_prompt", "a {} in snow")
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2.png", "step-3.png"]
    assert Image.open(out / "validation" / "step-3.png").size == (128, 64)


def test_fp16_validation_decodes_with_the_fp32_vae(train, caplog):
    """Under fp16 the VAE stays fp32 and the UNet's latents are fp16: the validation images still come (no dtype
    error), and the CPU run is warned about."""
    with caplog.at_level("WARNING"):
        result, out = train("--mixed_precision", "fp16", "--max_train_steps", "1", "--num_validation_images", "1",
                            "--validation_steps", "1")  # fmt: skip
    assert result.components["unet"].dtype == torch.float16 and result.components["vae"].dtype == torch.float32
    image = np.asarray(Image.open(out / "validation" / "step-1.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert "--mixed_precision fp16 on a machine without CUDA" in caplog.text


def test_a_validation_that_fails_is_reported_and_training_goes_on(train, monkeypatch, caplog):
    def broken(self, *args, **kwargs):
        raise RuntimeError("the pipeline broke\nsecond line")

    monkeypatch.setattr(dti.SDXL, "validation_images", broken)
    with caplog.at_level("WARNING"):
        _, out = train("--num_validation_images", "1", "--validation_steps", "2", "--checkpointing_steps", "2")
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.getMessage() for r in failed] == [
        f"Validation at step {step} failed (RuntimeError: the pipeline broke); training goes on without its images."
        for step in (2, 3)
    ]  # one line each, and no [RANK 0] prefix in a run of one process
    assert all(r.exc_info for r in failed)  # the traceback is in the log
    assert {"learned_embeds.safetensors", "learned_embeds_2.safetensors", "README.md", "checkpoint-2"} <= {
        p.name for p in out.iterdir()
    }


def test_variant_fp16_checkpoints_load_and_the_norm_comes_from_their_table(tiny_sdxl_fp16_variant, tmp_path):
    from transformers import CLIPTextModel

    args = dti.parse_args([*training_args(tiny_sdxl_fp16_variant, tmp_path / "out"), "--variant", "fp16"])
    assert list(Path(tiny_sdxl_fp16_variant, "unet").glob("*.fp16.safetensors"))
    dti.main(args)
    table = CLIPTextModel.from_pretrained(tiny_sdxl_fp16_variant, subfolder="text_encoder", variant="fp16")
    table = table.get_input_embeddings().weight.detach().double()
    vector = load_file(tmp_path / "out" / "learned_embeds.safetensors")[PLACEHOLDER].double()
    assert vector.norm().item() == pytest.approx(table.norm(dim=1).mean().item(), rel=1e-6)


def test_an_unset_seed_is_drawn_logged_and_recorded(train, tiny_sdxl, tmp_path, caplog):
    argv = training_args(tiny_sdxl, tmp_path / "out")
    del argv[argv.index("--seed") : argv.index("--seed") + 2]
    args = dti.parse_args(argv)
    assert args.seed is None
    with caplog.at_level("INFO"):
        dti.main(args)
    with safe_open(tmp_path / "out" / "learned_embeds.safetensors", "pt") as f:
        seed = f.metadata()["seed"]
    assert f"--seed not given: drew seed {seed} (pass --seed {seed} to repeat this run)." in caplog.text
    _, again = train("--seed", seed, output_dir=tmp_path / "again")
    assert torch.equal(load_file(again / "learned_embeds.safetensors")[PLACEHOLDER],
                       load_file(tmp_path / "out" / "learned_embeds.safetensors")[PLACEHOLDER])  # fmt: skip


def test_one_process_logs_without_a_rank_prefix_and_the_bar_shows_the_step(train, capfd, caplog):
    with caplog.at_level("INFO"):
        train("--max_train_steps", "2", "--logging_steps", "1")
    assert caplog.records and not [r for r in caplog.records if "[RANK" in r.getMessage()]
    bar = capfd.readouterr().err.replace("\r", "\n").splitlines()
    assert [line for line in bar if line.startswith("Steps: 100%")][-1].endswith("step=2]")


def test_several_processes_log_with_their_rank(monkeypatch):
    import accelerate.logging

    state = SimpleNamespace(num_processes=2, process_index=1, is_main_process=False)
    for module in (dti, accelerate.logging):
        monkeypatch.setattr(module, "PartialState", lambda: state)
    accelerates = accelerate.logging.MultiProcessAdapter.process(dti.logger, "saved", {})[0]
    assert dti.logger.process("saved", {})[0] == accelerates  # "[RANK 1] saved" from accelerate 1.11 on
    state.num_processes, state.process_index = 1, 0
    assert dti.logger.process("saved", {})[0] == "saved"


def test_trackers_get_loss_lr_norm_cosine_and_angle_every_step(train, monkeypatch):
    from accelerate import Accelerator

    logged = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    train("--max_train_steps", "3", "--num_validation_images", "1", "--validation_steps", "2")
    assert [step for step, _ in logged] == [1, 2, 3, 3]  # every step, then the run's phases
    phases = logged.pop()[1]
    assert set(phases) == {f"time/{p}_s" for p in ("load", "training", "validation", "saving", "total")} | {
        "time/s_per_step"
    }
    assert phases["time/s_per_step"] == pytest.approx(phases["time/training_s"] / 3)
    assert sum(v for k, v in phases.items() if k.endswith("_s") and k != "time/total_s") <= phases["time/total_s"]
    keys = {"loss", "lr"} | {
        f"{e}/{q}" for e in ("text_encoder", "text_encoder_2") for q in ("norm", "cos_prior", "angle_deg")
    }
    assert set(logged[-1][1]) == keys
    assert logged[0][1]["lr"] == pytest.approx(0.01)
    assert 0 < logged[0][1]["text_encoder/angle_deg"] < logged[-1][1]["text_encoder/angle_deg"] + 1e-6
    assert logged[-1][1]["text_encoder/cos_prior"] == pytest.approx(
        math.cos(math.radians(logged[-1][1]["text_encoder/angle_deg"])), abs=1e-5
    )


def test_style_templates_and_a_validation_prompt_without_the_token_warns(train, caplog):
    with caplog.at_level("WARNING"):
        train("--learnable_property", "style", "--max_train_steps", "1", "--num_validation_images", "1",
              "--validation_prompt", "a city street")  # fmt: skip
    assert "--validation_prompt 'a city street' has neither" in caplog.text
    dataset = dti.DTIDataset([(Path("a.png"), Image.new("RGB", (64, 64)))], "<s>", no_text, 64, True, False,
                             dti.STYLE_TEMPLATES, 1, seed=0)  # fmt: skip
    assert "in the style of <s>" in dataset[0]["prompt"]


def test_save_steps_writes_intermediate_embeddings(train):
    _, out = train("--save_steps", "2", "--max_train_steps", "3")
    assert (out / "learned_embeds-steps-2.safetensors").is_file()
    assert (out / "learned_embeds_2-steps-2.safetensors").is_file() and (
        out / "toy-robot-steps-2.safetensors"
    ).is_file()
    assert not torch.equal(
        load_file(out / "learned_embeds-steps-2.safetensors")[PLACEHOLDER],
        load_file(out / "learned_embeds.safetensors")[PLACEHOLDER],
    )


# ------------------------------------------------------------------------------------------------ data


def no_text(prompt):
    return {}


def load_components(model):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encoders = [CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")]  # fmt: skip
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    return tokenizers, encoders, vae, unet, DDPMScheduler.from_pretrained(model, subfolder="scheduler")


def test_cached_latents_give_the_same_loss_as_encoding_each_step(tiny_sdxl):
    tokenizers, encoders, vae, unet, scheduler = load_components(tiny_sdxl)
    images = dti.load_training_images(ASSETS, 64)
    tokenize = partial(dti.tokenize_prompt, tokenizers)
    dataset = dti.DTIDataset(images, "robot", tokenize, 64, True, True, dti.OBJECT_TEMPLATES, 2, seed=0)
    assert dataset.crops_are_fixed
    samples = [dataset[p] for p in range(10)]
    batch = dti.collate([next(s for s in samples if s["flip"]), next(s for s in samples if not s["flip"])])
    cache = dti.LatentCache(dataset, partial(dti.FAMILY.latent_posterior, vae))
    fresh, cached = dti.vae_posterior(vae, batch["pixel_values"]), cache(batch)
    assert torch.allclose(fresh[0], cached[0], atol=1e-5) and torch.allclose(fresh[1], cached[1], atol=1e-5)
    dataset.with_pixels = False  # what the script sets once the latents are cached: no image work per sample
    lean = dti.collate([dataset[int(p)] for p in batch["position"]])
    assert lean["pixel_values"] is None and torch.equal(cache(lean)[0], cached[0])
    with torch.no_grad():
        losses = [dti.training_loss(batch, *latents, unet, encoders, scheduler, 0.13025, 0, 64).mean() for latents in
                  (fresh, cached)]  # fmt: skip
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)


def test_random_crops_of_non_square_images_cannot_be_cached():
    images = dti.load_training_images(ASSETS, 64)
    dataset = dti.DTIDataset(images, "x", no_text, 64, False, False, dti.OBJECT_TEMPLATES, 1, seed=0)
    assert not dataset.crops_are_fixed


def test_time_ids_come_from_each_sample(tiny_sdxl):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer")
    images = dti.load_training_images(ASSETS, 64)
    tokenize = partial(dti.tokenize_prompt, [tokenizer, tokenizer])
    dataset = dti.DTIDataset(images, "robot", tokenize, 64, False, True, dti.OBJECT_TEMPLATES, 4, seed=3)
    batch = dti.collate([dataset[p] for p in range(len(dataset))])
    wide = [i for i, (path, _) in enumerate(images) if path.name == "02_studio.jpg"][0]
    for index, size, crop in zip(batch["image_index"], batch["original_size"], batch["crop_top_left"], strict=True):
        assert tuple(size.tolist()) == images[index][1].info["original_size"]
        if index == wide:
            assert size.tolist() == [768, 1024] and crop[0] == 0 and 0 <= crop[1] <= 85 - 64
    wide_crops = {
        tuple(c.tolist()) for i, c in zip(batch["image_index"], batch["crop_top_left"], strict=True) if i == wide
    }
    assert len(wide_crops) > 1, "random crops of the wide image differ between samples"
    assert set(batch["flip"].tolist()) == {0, 1}


def test_each_epoch_visits_every_image_repeats_times_and_processes_split_global_batches():
    images = [(Path(f"{i}.png"), Image.new("RGB", (64, 64))) for i in range(5)]
    dataset = dti.DTIDataset(images, "x", no_text, 64, True, False, dti.OBJECT_TEMPLATES, 2, seed=0)
    for epoch in range(3):
        visits = [dataset._image_index(p) for p in range(epoch * 10, (epoch + 1) * 10)]
        assert sorted(visits) == sorted(list(range(5)) * 2)
    take = lambda sampler, n: [next(it) for it in [iter(sampler)] for _ in range(n)]  # noqa: E731
    single = take(dti.StreamSampler(6, 2, 0, 1), 6)
    rank0, rank1 = take(dti.StreamSampler(6, 1, 0, 2), 3), take(dti.StreamSampler(6, 1, 1, 2), 3)
    assert single == [6, 7, 8, 9, 10, 11] and rank0 == [6, 8, 10] and rank1 == [7, 9, 11]


def test_images_are_converted_and_exif_rotation_is_honoured(tmp_path):
    Image.new("RGBA", (40, 30), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    Image.new("L", (40, 30), 128).save(tmp_path / "gray.png")
    Image.new("CMYK", (40, 30), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (40, 30)).save(tmp_path / "palette.gif")
    Image.new("RGB", (40, 30), (0, 0, 255)).save(tmp_path / "blue.webp")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.new("RGB", (40, 30)).save(tmp_path / "rotated.jpg", exif=exif)
    (tmp_path / "notes.txt").write_text("not an image")
    loaded = {path.name: image for path, image in dti.load_training_images(tmp_path, 16)}
    assert sorted(loaded) == ["blue.webp", "cmyk.jpg", "gray.png", "palette.gif", "rgba.png", "rotated.jpg"]
    assert all(image.mode == "RGB" for image in loaded.values())
    assert loaded["rotated.jpg"].size == (30, 40)
    assert loaded["rgba.png"].getpixel((0, 0)) == (255, 255, 255)  # transparent pixels become white


def test_an_unreadable_image_is_skipped_with_a_warning_naming_it_and_too_few_images_are_warned_of(
    train, tmp_path, caplog
):
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted(ASSETS.iterdir())[:2]:
        (data / path.name).write_bytes(path.read_bytes())
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level("WARNING"):
        _, out = train("--max_train_steps", "1", data_dir=data)
    assert "broken.jpg" in caplog.text
    assert "Only 2 training image(s): 3 to 6 images of the concept" in caplog.text  # trained all the same
    assert (out / "learned_embeds.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ errors


def error_cases(tmp_path, model):
    """{name: (extra flags, what the error line must say)}; later flags override training_args' own."""
    other_run, a_file = tmp_path / "other-run", tmp_path / "a-file"
    other_run.mkdir()
    save_file(
        {"<other>": torch.ones(1, 32)},
        other_run / "learned_embeds.safetensors",
        metadata={"placeholder_token": "<other>"},
    )
    a_file.write_text("not a folder")
    with_token = tmp_path / "model-with-token"
    shutil.copytree(model, with_token)
    from transformers import CLIPTokenizer

    for sub in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder=sub)
        tokenizer.add_tokens([PLACEHOLDER])
        shutil.rmtree(with_token / sub)
        tokenizer.save_pretrained(with_token / sub)
    empty, unreadable = tmp_path / "empty", tmp_path / "unreadable"
    empty.mkdir()
    unreadable.mkdir()
    (unreadable / "a.jpg").write_bytes(b"garbage")
    (unreadable / "b.png").write_bytes(b"")
    return {
        "missing data folder": (["--train_data_dir", str(tmp_path / "nope")], "--train_data_dir"),
        "empty data folder": (["--train_data_dir", str(empty)], "--train_data_dir"),
        "only unreadable images": (["--train_data_dir", str(unreadable)], "--train_data_dir"),
        "placeholder in vocabulary": (["--placeholder_token", "robot"], "--placeholder_token"),
        "placeholder with a space": (["--placeholder_token", "<my robot>"], "--placeholder_token"),
        "initializer vs num_vectors": (["--initializer_token", "red robot", "--num_vectors", "3"], "--num_vectors"),
        "empty initializer": (["--initializer_token", " "], "--initializer_token"),
        "unknown model folder": (["--pretrained_model_name_or_path", str(tmp_path / "nomodel")], "--pretrained_model"),
        "unknown hub model": (["--pretrained_model_name_or_path", "nobody/no-such-model"], "--pretrained_model"),
        "token_scale word": (["--token_scale", "median"], "--token_scale"),
        "token_scale negative": (["--token_scale", "-1"], "--token_scale"),
        "negative kappa": (["--kappa", "-0.1"], "--kappa"),
        "negative learning rate": (["--learning_rate", "-0.01"], "--learning_rate"),
        "resolution not multiple of 8": (["--resolution", "60"], "--resolution"),
        "zero batch": (["--train_batch_size", "0"], "--train_batch_size"),
        "zero steps": (["--max_train_steps", "0"], "--max_train_steps"),
        "resume from nothing": (["--resume_from_checkpoint", "checkpoint-7"], "--resume_from_checkpoint"),
        "output_dir of another concept": (["--output_dir", str(other_run)], "holds the run of '<other>'"),
        "output_dir not writable": (["--output_dir", str(a_file / "out")], "--output_dir"),
        "placeholder already added": (["--pretrained_model_name_or_path", str(with_token)], "--placeholder_token"),
        "zero accumulation": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        "beta out of range": (["--beta", "1.0"], "--beta"),
        "8-bit adam with rsgd": (["--use_8bit_adam"], "--use_8bit_adam"),
    }


ERROR_CASE_NAMES = [
    "missing data folder", "empty data folder", "only unreadable images", "placeholder in vocabulary",
    "placeholder with a space", "initializer vs num_vectors", "empty initializer", "unknown model folder",
    "unknown hub model", "token_scale word", "token_scale negative", "negative kappa", "negative learning rate",
    "resolution not multiple of 8", "zero batch", "zero steps", "resume from nothing", "output_dir of another concept",
    "output_dir not writable", "placeholder already added", "zero accumulation", "beta out of range",
    "8-bit adam with rsgd",
]  # fmt: skip


@pytest.fixture(scope="module")
def error_runs(tiny_sdxl, tmp_path_factory):
    """Run every error case as a user would (`python train_dti_sdxl.py ...`), once."""
    tmp_path = tmp_path_factory.mktemp("errors")
    cases = error_cases(tmp_path, tiny_sdxl)
    assert list(cases) == ERROR_CASE_NAMES
    outputs = {name: tmp_path / f"out-{i}" for i, name in enumerate(cases)}
    argvs = {name: training_args(tiny_sdxl, outputs[name], *extra) for name, (extra, _) in cases.items()}
    runs = run_script_cases(REPO / "train_dti_sdxl.py", argvs)
    return {name: (proc, cases[name][1], outputs[name]) for name, proc in runs.items()}


@pytest.mark.parametrize("name", ERROR_CASE_NAMES)
def test_bad_input_gives_one_line_error_and_writes_nothing(error_runs, name):
    proc, flag, out = error_runs[name]
    assert_one_line_error(proc, flag)
    assert not out.exists() or not list(out.glob("**/*.safetensors"))


# ------------------------------------------------------------------------------------------------ multi-process


def test_two_processes_end_identical_and_equal_a_single_process_run(train, tiny_sdxl, tmp_path):
    argv = training_args(tiny_sdxl, tmp_path / "ddp", "--train_batch_size", "1", "--max_train_steps", "3")
    ranks = torchrun_ranks("train_dti_sdxl", argv, tmp_path / "dump", port=29533)
    assert len(ranks[0]["history"]) == 3 * 2  # 3 steps x 2 encoders
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert torch.equal(a, b)
    for name in ("text_encoder", "text_encoder_2"):
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name])
    result, _ = train("--train_batch_size", "2", "--max_train_steps", "3", output_dir=tmp_path / "single")
    for name in ("text_encoder", "text_encoder_2"):
        single = result.learned[name].embeddings().detach()
        assert torch.allclose(single, ranks[0]["final"][name], atol=1e-5 * single.norm().item())
    assert not list((tmp_path / "ddp").glob(".*tmp"))


# ------------------------------------------------------------------------------------------------ CLI


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, str(REPO / "train_dti_sdxl.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    documented = {line.split()[0].rstrip(",") for line in proc.stdout.splitlines() if line.startswith("  --")}
    issue_flags = [
        "--pretrained_model_name_or_path",
        "--revision",
        "--variant",
        "--train_data_dir",
        "--placeholder_token",
        "--initializer_token",
        "--num_vectors",
        "--learnable_property",
        "--repeats",
        "--resolution",
        "--center_crop",
        "--random_flip",
        "--train_batch_size",
        "--max_train_steps",
        "--gradient_accumulation_steps",
        "--gradient_checkpointing",
        "--learning_rate",
        "--scale_lr",
        "--lr_scheduler",
        "--lr_warmup_steps",
        "--mixed_precision",
        "--allow_tf32",
        "--seed",
        "--output_dir",
        "--logging_dir",
        "--report_to",
        "--validation_prompt",
        "--num_validation_images",
        "--validation_steps",
        "--save_steps",
        "--checkpointing_steps",
        "--checkpoints_total_limit",
        "--resume_from_checkpoint",
        "--dataloader_num_workers",
        "--method",
        "--optimizer",
        "--token_scale",
        "--kappa",
        "--beta",
        "--init_method",
        "--use_8bit_adam",
        "--adam_beta1",
        "--adam_beta2",
        "--adam_weight_decay",
        "--adam_epsilon",
        "--cache_latents",
    ]
    assert set(issue_flags) <= documented, set(issue_flags) - documented


def test_overwrite_replaces_another_concepts_run_and_leaves_only_the_new_one(train, tmp_path):
    """The replaced run's files go (its combined file, -steps-N copies, checkpoints, card); the new run's
    `latest` then resumes its own checkpoint. Files the runs do not write stay."""
    out = tmp_path / "out"
    train("--max_train_steps", "2", "--save_steps", "1", "--checkpointing_steps", "1", "--placeholder_token",
          "<other>", output_dir=out)  # fmt: skip
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(ValueError, match="holds the run of '<other>'"):
        train("--max_train_steps", "1", output_dir=out)
    train("--max_train_steps", "2", "--checkpointing_steps", "2", "--overwrite", output_dir=out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "README.md", "checkpoint-2", "learned_embeds.safetensors", "learned_embeds_2.safetensors", "notes.txt",
        "toy-robot.safetensors",
    ]  # fmt: skip
    assert PLACEHOLDER in load_file(out / "learned_embeds.safetensors")
    train("--max_train_steps", "3", "--resume_from_checkpoint", "latest", output_dir=out)  # its own checkpoint
    train("--max_train_steps", "1", output_dir=out)  # the same concept may always be trained again


def test_an_initializer_the_tokenizer_does_not_know_is_refused():
    class UnknownWords:
        unk_token_id, eos_token_id = 3, 1

        def __call__(self, text, add_special_tokens=False):
            return SimpleNamespace(input_ids=[3])

        def decode(self, ids):
            return "<unk>"

    with pytest.raises(ValueError, match="--initializer_token 'zzqx' is unknown to the tokenizer"):
        dti.initializer_token_ids(UnknownWords(), "zzqx", None)


def test_awkward_images_load_as_rgb_at_a_sensible_size(tmp_path, caplog):
    from accelerate import PartialState

    PartialState()  # the scripts log through accelerate
    gradient = np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (32, 1))
    Image.fromarray(gradient).save(tmp_path / "sixteen-bit.png")  # mode I;16
    frames = [Image.new("RGB", (48, 48), color) for color in ("red", "blue")]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("P", (48, 48), 5).save(tmp_path / "palette.png")
    Image.new("RGB", (6400, 4800), (10, 200, 30)).save(tmp_path / "huge.jpg", quality=50)
    Image.new("RGB", (3200, 2400), (200, 10, 30)).save(tmp_path / "huge.png")
    with caplog.at_level("WARNING"):
        loaded = {path.name: image for path, image in dti.load_training_images(tmp_path, 64)}
    assert "sixteen-bit.png is 256x32, smaller than --resolution; upscaled." in caplog.text
    assert all(image.mode == "RGB" for image in loaded.values())
    assert np.asarray(loaded["sixteen-bit.png"])[0, :, 0].tolist() == list(range(256))  # 16 bits mapped to 8
    assert loaded["animated.gif"].getpixel((0, 0)) == (255, 0, 0)  # the first frame
    for name, original in (("huge.jpg", (4800, 6400)), ("huge.png", (2400, 3200))):
        image = loaded[name]
        assert 64 <= min(image.size) < 4 * 64 and image.info["original_size"] == original
    dataset = dti.DTIDataset(list(loaded.items()), "x", no_text, 64, True, False, dti.OBJECT_TEMPLATES, 1, seed=0)
    huge = list(loaded).index("huge.jpg")
    assert dataset.original_sizes[huge] == (4800, 6400)


def test_image_resampling_bicubic_resizes_as_pil_bicubic():
    """--image_resampling bicubic (the DTI authors' resize); the default stays bilinear."""
    image = Image.open(next(ASSETS.glob("*.jpg"))).convert("RGB")
    resized = {name: dti.DTIDataset._resize(image, 64, name) for name in ("bilinear", "bicubic")}
    for name, result in resized.items():
        target = image.resize(result.size, getattr(Image.Resampling, name.upper()), reducing_gap=3.0)
        assert min(result.size) == 64 and np.array_equal(np.asarray(result), np.asarray(target)), name
    assert not np.array_equal(np.asarray(resized["bilinear"]), np.asarray(resized["bicubic"]))
    assert np.array_equal(np.asarray(dti.DTIDataset._resize(image, 64)), np.asarray(resized["bilinear"]))
    args = dti.parse_args(["--pretrained_model_name_or_path", "m", "--image_resampling", "bicubic"])
    assert args.image_resampling == "bicubic"

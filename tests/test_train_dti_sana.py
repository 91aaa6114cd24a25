"""Tests of train_dti_sana.py on a tiny random SANA pipeline (CPU, offline)."""

import json
import math
from functools import partial

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_dti_sana as dti
from tests.conftest import REPO, assert_one_line_error, run_script_cases, torchrun_ranks, training_args

PLACEHOLDER = "<toy-robot>"


def gemma_table(model):
    from transformers import AutoModel

    return AutoModel.from_pretrained(model, subfolder="text_encoder").get_input_embeddings().weight.detach().double()


def mean_norm(table):
    """m* of the spec: the mean norm of the rows with a non-zero norm (Gemma's padding row is zero)."""
    norms = table.norm(dim=1)
    assert (norms == 0).sum() == 1
    return norms[norms > 0].mean().item()


def robot_id(model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    (robot,) = dti.initializer_token_ids(tokenizer, "robot", None)
    assert tokenizer.convert_ids_to_tokens(robot) == "▁robot"  # the word as it stands inside a prompt
    return robot


def unit_angle(a, b):
    a, b = torch.nn.functional.normalize(a.double(), dim=-1), torch.nn.functional.normalize(b.double(), dim=-1)
    return (2 * torch.asin((a - b).norm(dim=-1) / 2)).item()


def load_pipeline_with_token(model, embeddings_file, placeholder=PLACEHOLDER):
    """SanaPipeline with the learned rows added by hand (the loader of the spec, before infer.py provides one)."""
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(model)
    vectors = load_file(embeddings_file)[placeholder]
    names = dti.placeholder_names(placeholder, len(vectors))
    pipe.tokenizer.add_tokens(names)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(names)] = vectors
    return pipe


def test_norm_is_the_raw_gemma_mean_norm_and_a_step_turns_by_atan_lr(train_sana, tiny_sana):
    _, out = train_sana("--max_train_steps", "1", "--learning_rate", "0.02")
    table = gemma_table(tiny_sana)
    vector = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    assert vector.shape == (1, 64) and vector.dtype == torch.float32
    assert vector.double().norm().item() == pytest.approx(mean_norm(table), rel=1e-6)
    assert unit_angle(table[robot_id(tiny_sana)], vector[0]) == pytest.approx(math.atan(0.02), rel=1e-4)


def test_everything_but_the_new_rows_stays_bit_identical(train_sana, tiny_sana):
    from diffusers import SanaPipeline

    result, _ = train_sana("--max_train_steps", "2")
    pretrained = SanaPipeline.from_pretrained(tiny_sana)
    for name in ("transformer", "vae", "text_encoder"):
        trained, original = result.components[name].state_dict(), getattr(pretrained, name).state_dict()
        assert trained.keys() == original.keys()
        for key, tensor in original.items():
            if key.endswith("embed_tokens.weight"):  # one row for the token, one zero row for --zero_pad
                assert trained[key].shape[0] == tensor.shape[0] + 2
                assert torch.equal(trained[key][: tensor.shape[0]], tensor), f"{name}.{key}"
                assert torch.count_nonzero(trained[key][-1]) == 0
            else:
                assert torch.equal(trained[key], tensor), f"{name}.{key}"
    assert [n for n, _ in result.learned.named_parameters()] == ["text_encoder.direction"]


@pytest.mark.parametrize("instruction", [False, True], ids=["plain", "complex_human_instruction"])
def test_text_features_equal_the_pipelines_and_the_token_changes_them(train_sana, tiny_sana, instruction):
    flags = ["--complex_human_instruction"] if instruction else []
    result, out = train_sana("--max_train_steps", "2", *flags)
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        recorded = json.loads(f.metadata()["complex_human_instruction"])
    assert bool(recorded) == instruction
    prompt = f"A photo of a {PLACEHOLDER} on the beach"  # the pipeline lowercases; so does training
    pipe = load_pipeline_with_token(tiny_sana, out / "learned_embeds.safetensors")
    kwargs = {"do_classifier_free_guidance": False, "max_sequence_length": 300, "complex_human_instruction": recorded}
    embeds, mask, _, _ = pipe.encode_prompt(prompt, **kwargs)
    text = dti.tokenize_prompt(result.components["tokenizer"], 300, recorded, prompt)
    text = {key: torch.tensor([ids]) for key, ids in text.items()}
    with torch.no_grad():
        trained_embeds, trained_mask = dti.encode_prompt(result.components["text_encoder"], text, 300)
    assert torch.equal(mask, trained_mask)
    assert torch.equal(embeds, trained_embeds)

    from diffusers import SanaPipeline

    plain = SanaPipeline.from_pretrained(tiny_sana)
    plain.tokenizer.add_tokens([PLACEHOLDER])
    plain.text_encoder.resize_token_embeddings(len(plain.tokenizer), mean_resizing=False)
    before, _, _, _ = plain.encode_prompt(prompt, **kwargs)
    assert (before - embeds).abs().max() > 1e-3


def test_metadata_and_multi_vector_tokens(train_sana):
    result, out = train_sana("--num_vectors", "2", "--max_train_steps", "1", "--max_sequence_length", "120")
    vectors = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    assert vectors.shape == (2, 64)
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["script"] == "train_dti_sana.py" and meta["method"] == "dti" and meta["kappa"] == "5e-05"
    assert meta["max_sequence_length"] == "120" and meta["complex_human_instruction"] == "null"
    assert float(meta["norm_scale_text_encoder"]) == pytest.approx(vectors[0].norm().item(), rel=1e-6)
    tokenizer = result.components["tokenizer"]
    ids = tokenizer(f"a photo of {dti.placeholder_prompt_token(PLACEHOLDER, 2)}").input_ids
    assert ids[0] == tokenizer.bos_token_id and [i for i in ids if i in result.placeholder_ids[0]] == [
        *result.placeholder_ids[0]
    ]
    padded = dti.tokenize_prompt(tokenizer, 120, None, f"a {PLACEHOLDER}")
    assert padded["input_ids"][-1] == tokenizer.pad_token_id and len(padded["input_ids"]) == 120


def test_resume_with_gradient_accumulation_is_bit_identical(train_sana, tmp_path):
    common = ["--checkpointing_steps", "2", "--gradient_accumulation_steps", "2", "--random_flip"]
    train_sana("--max_train_steps", "4", *common, output_dir=tmp_path / "straight")
    train_sana("--max_train_steps", "2", *common, output_dir=tmp_path / "resumed")
    train_sana("--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common, output_dir=tmp_path / "resumed")
    straight = load_file(tmp_path / "straight" / "learned_embeds.safetensors")[PLACEHOLDER]
    assert torch.equal(straight, load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[PLACEHOLDER])
    size = sum(f.stat().st_size for f in (tmp_path / "resumed" / "checkpoint-4").iterdir())
    assert size < 100_000, f"a SANA checkpoint holds only the learned state, not {size} bytes"


def test_cached_latents_give_the_same_loss(tiny_sana):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import AutoModel, AutoTokenizer

    from tests.conftest import ASSETS

    tokenizer = AutoTokenizer.from_pretrained(tiny_sana, subfolder="tokenizer")
    encoder = AutoModel.from_pretrained(tiny_sana, subfolder="text_encoder")
    vae = AutoencoderDC.from_pretrained(tiny_sana, subfolder="vae")
    transformer = SanaTransformer2DModel.from_pretrained(tiny_sana, subfolder="transformer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sana, subfolder="scheduler")
    args = dti.parse_args(training_args(tiny_sana, "unused", "--weighting_scheme", "logit_normal"))
    images = dti.load_training_images(ASSETS, 64)
    tokenize = lambda prompt: dti.tokenize_prompt(tokenizer, 300, None, prompt)  # noqa: E731
    dataset = dti.DTIDataset(images, "robot", tokenize, 64, True, True, dti.OBJECT_TEMPLATES, 2, seed=0)
    batch = dti.collate([dataset[p] for p in range(3)])
    cache = dti.LatentCache(dataset, partial(dti.FAMILY.latent_posterior, vae))
    fresh, cached = dti.vae_posterior(vae, batch["pixel_values"]), cache(batch)
    assert torch.allclose(fresh[0], cached[0], atol=1e-5) and not cached[1].any()
    with torch.no_grad():
        losses = [dti.training_loss(batch, *latents, transformer, [encoder], scheduler, 0.41407, 0, args).mean().item()
                  for latents in (fresh, cached)]  # fmt: skip
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and math.isfinite(losses[0])


def test_method_ti_moves_the_norm_and_adamw_on_the_sphere_keeps_it(train_sana, tiny_sana, tmp_path):
    table = gemma_table(tiny_sana)
    _, ti = train_sana("--method", "ti", "--learning_rate", "0.05", output_dir=tmp_path / "ti")
    _, adamw = train_sana("--optimizer", "adamw", "--learning_rate", "0.05", output_dir=tmp_path / "adamw")
    ti_norm = load_file(ti / "learned_embeds.safetensors")[PLACEHOLDER].double().norm().item()
    adamw_norm = load_file(adamw / "learned_embeds.safetensors")[PLACEHOLDER].double().norm().item()
    robot_norm = table[robot_id(tiny_sana)].norm().item()
    assert abs(ti_norm - robot_norm) > 1e-3 * robot_norm
    assert adamw_norm == pytest.approx(mean_norm(table), rel=1e-6)


def test_validation_images_use_the_pipeline(train_sana):
    from PIL import Image

    _, out = train_sana("--num_validation_images", "2", "--validation_steps", "2", "--num_vectors", "2")
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2.png", "step-3.png"]
    grid = np.asarray(Image.open(out / "validation" / "step-3.png"))
    assert grid.shape == (64, 128, 3) and grid.std() > 0


def test_fp16_validation_images_come_with_the_fp32_dc_ae(train_sana):
    from PIL import Image

    result, out = train_sana("--mixed_precision", "fp16", "--max_train_steps", "1", "--num_validation_images", "1",
                             "--validation_steps", "1")  # fmt: skip
    assert result.components["transformer"].dtype == torch.float16 and result.components["vae"].dtype == torch.float32
    image = np.asarray(Image.open(out / "validation" / "step-1.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0


def test_two_processes_end_identical_and_equal_a_single_process_run(train_sana, tiny_sana, tmp_path):
    argv = training_args(tiny_sana, tmp_path / "ddp", "--train_batch_size", "1", "--gradient_accumulation_steps", "1")
    ranks = torchrun_ranks("train_dti_sana", argv, tmp_path / "dump", port=29534)
    assert len(ranks[0]["history"]) == 3
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert torch.equal(a, b)
    result, _ = train_sana("--train_batch_size", "2", output_dir=tmp_path / "single")
    single = result.learned["text_encoder"].embeddings().detach()
    assert torch.allclose(single, ranks[0]["final"]["text_encoder"], atol=1e-5 * single.norm().item())


ERROR_CASES = {
    "uppercase placeholder": (["--placeholder_token", "<Toy-Robot>"], "--placeholder_token"),
    "placeholder in vocabulary": (["--placeholder_token", "dog"], "--placeholder_token"),
    "initializer vs num_vectors": (["--initializer_token", "red robot", "--num_vectors", "3"], "--num_vectors"),
    "missing data folder": (["--train_data_dir", "/nonexistent/images"], "--train_data_dir"),
    "unknown model": (["--pretrained_model_name_or_path", "nobody/no-such-sana"], "--pretrained_model"),
    "resolution not a multiple of 32": (["--resolution", "48"], "--resolution"),
    "negative kappa": (["--kappa", "-1e-5"], "--kappa"),
    "bad weighting scheme": (["--weighting_scheme", "uniform"], "--weighting_scheme"),
    "short max_sequence_length": (["--max_sequence_length", "1"], "--max_sequence_length"),
}


@pytest.fixture(scope="module")
def sana_error_runs(tiny_sana, tiny_sdxl, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sana-errors")
    cases = {**ERROR_CASES, "an SDXL model": (["--pretrained_model_name_or_path", str(tiny_sdxl)], "SanaPipeline")}
    outputs = {name: tmp_path / f"out-{i}" for i, name in enumerate(cases)}
    argvs = {name: training_args(tiny_sana, outputs[name], *extra) for name, (extra, _) in cases.items()}
    runs = run_script_cases(REPO / "train_dti_sana.py", argvs)
    return {name: (proc, cases[name][1], outputs[name]) for name, proc in runs.items()}


@pytest.mark.parametrize("name", [*ERROR_CASES, "an SDXL model"])
def test_bad_input_gives_one_line_error_and_writes_nothing(sana_error_runs, name):
    proc, expected, out = sana_error_runs[name]
    assert_one_line_error(proc, expected)
    assert not out.exists() or not list(out.glob("**/*.safetensors"))


def test_a_table_padded_beyond_the_tokenizer_keeps_its_size_and_statistics(tmp_path):
    """Published Gemma tables can have more rows than the tokenizer: the new tokens take the first spare rows."""
    from transformers import Gemma2Model

    from tests.tiny_sana import build_tiny_sana

    pipe = build_tiny_sana()
    config = pipe.text_encoder.config
    config.vocab_size = len(pipe.tokenizer) + 8
    pipe.register_modules(text_encoder=Gemma2Model(config))
    pipe.save_pretrained(tmp_path / "padded")
    result = dti.main(dti.parse_args(training_args(tmp_path / "padded", tmp_path / "out", "--max_train_steps", "1")))
    table = result.components["text_encoder"].get_input_embeddings().weight
    assert table.shape[0] == len(pipe.tokenizer) + 8 and result.placeholder_ids[0] == [len(pipe.tokenizer)]
    original = gemma_table(tmp_path / "padded")
    assert torch.equal(table[: len(pipe.tokenizer)].double(), original[: len(pipe.tokenizer)])
    vector = load_file(tmp_path / "out" / "learned_embeds.safetensors")[PLACEHOLDER]
    assert vector.double().norm().item() == pytest.approx(mean_norm(original[: len(pipe.tokenizer)]), rel=1e-6)

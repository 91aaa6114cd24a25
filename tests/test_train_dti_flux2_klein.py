"""Tests of train_dti_flux2_klein.py on a tiny random FLUX.2 [klein] pipeline (CPU, offline)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import train_dti_flux2_klein as dti
from tests.conftest import ASSETS, torchrun_ranks, training_args

PLACEHOLDER = "<toy-robot>"


def unit_angle(a, b):
    a, b = torch.nn.functional.normalize(a.double(), dim=-1), torch.nn.functional.normalize(b.double(), dim=-1)
    return (2 * torch.asin((a - b).norm(dim=-1) / 2)).item()


def pipeline(model):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(model)


def test_norm_over_the_tokenizers_rows_atan_lr_steps_and_the_comfyui_file(train_klein, tiny_flux2_klein):
    _, out = train_klein("--save_steps", "1", "--learning_rate", "0.02")
    pipe = pipeline(tiny_flux2_klein)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().double()
    assert len(table) > len(pipe.tokenizer)  # the published table is padded past the tokenizer
    expected = table[: len(pipe.tokenizer)].norm(dim=1).mean().item()
    assert abs(expected - table.norm(dim=1).mean().item()) > 1e-6 * expected  # the padding would change m*
    (robot,) = dti.initializer_token_ids(pipe.tokenizer, "robot", None)
    vectors = [table[robot]] + [
        load_file(out / f"learned_embeds-steps-{s}.safetensors")[PLACEHOLDER][0].double() for s in (1, 2)
    ]
    vectors.append(load_file(out / "learned_embeds.safetensors")[PLACEHOLDER][0].double())
    for vector in vectors[1:]:
        assert vector.norm().item() == pytest.approx(expected, rel=1e-5)
    for before, after in zip(vectors, vectors[1:], strict=False):
        assert abs(unit_angle(before, after) - math.atan(0.02)) < 1e-5
    (key,) = load_file(out / "toy-robot.safetensors")  # ComfyUI's key for a klein Qwen3 embedding
    assert key == "qwen3_4b"
    comfy = load_file(out / "toy-robot.safetensors")[key]
    assert torch.equal(comfy, load_file(out / "learned_embeds.safetensors")[PLACEHOLDER])
    assert comfy.shape == (1, table.shape[1])


def test_the_conditioning_equals_the_pipelines_and_the_truncated_encoder_the_full_one(train_klein, tiny_flux2_klein):
    """Training encodes as Flux2KleinPipeline.encode_prompt does (chat template, layers 9/18/27), with and without
    the token, on an encoder cut after the last layer it reads; the full pipeline keeps all its layers."""
    result, out = train_klein("--max_train_steps", "1")
    pipe = pipeline(tiny_flux2_klein)
    full_layers = len(pipe.text_encoder.model.layers)
    assert len(result.components["text_encoder"].model.layers) == 28 < full_layers
    vectors = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    dti.FAMILY.add_tokens(pipe.tokenizer, [PLACEHOLDER])
    if pipe.text_encoder.get_input_embeddings().weight.shape[0] < len(pipe.tokenizer):
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer), mean_resizing=False)
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[pipe.tokenizer.convert_tokens_to_ids([PLACEHOLDER])] = vectors
    tokenizer, text_encoder = result.components["tokenizer"], result.components["text_encoder"]
    for prompt in ("a photo of a <toy-robot> on a beach", "a photo of a robot"):
        text = dti.tokenize_prompt(tokenizer, 64, prompt)
        with torch.no_grad():
            ours = dti.encode_prompt(text_encoder, {k: torch.tensor([v]) for k, v in text.items()})
            theirs = pipe.encode_prompt(prompt, max_sequence_length=64)[0]
        assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)


def test_resume_is_bit_identical(train_klein, tmp_path):
    common = ["--checkpointing_steps", "2", "--random_flip"]
    train_klein("--max_train_steps", "4", *common, output_dir=tmp_path / "straight")
    train_klein("--max_train_steps", "2", *common, output_dir=tmp_path / "resumed")
    train_klein(
        "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common, output_dir=tmp_path / "resumed"
    )
    straight = load_file(tmp_path / "straight" / "learned_embeds.safetensors")[PLACEHOLDER]
    assert torch.equal(straight, load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[PLACEHOLDER])


def test_concepts_list_equals_single_runs(train_klein, tiny_flux2_klein, tmp_path):
    entries = [
        {"placeholder_token": "<a>", "initializer_token": "robot", "train_data_dir": str(ASSETS)},
        {"placeholder_token": "<b>", "initializer_token": "dog", "train_data_dir": str(ASSETS)},
    ]
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps(entries))
    flags = ["--gradient_accumulation_steps", "1", "--max_sequence_length", "64", "--max_train_steps", "2"]
    argv = training_args(tiny_flux2_klein, tmp_path / "list", *flags)
    for flag in ("--placeholder_token", "--initializer_token", "--train_data_dir"):
        del argv[argv.index(flag) : argv.index(flag) + 2]
    listed = dti.main(dti.parse_args([*argv, "--concepts_list", str(concepts)]))
    for entry, concept in zip(entries, listed.concepts, strict=True):
        own = ["--placeholder_token", entry["placeholder_token"], "--initializer_token", entry["initializer_token"]]
        single, _ = train_klein(*own, "--max_train_steps", "2", output_dir=tmp_path / entry["placeholder_token"][1])
        a, b = concept.learned["text_encoder"].embeddings(), single.learned["text_encoder"].embeddings()
        assert torch.allclose(a, b, atol=1e-5 * b.norm().item())


def test_two_processes_end_identical_and_equal_a_single_process_run(train_klein, tiny_flux2_klein, tmp_path):
    flags = ["--train_batch_size", "1", "--gradient_accumulation_steps", "1", "--max_sequence_length", "64"]
    ranks = torchrun_ranks("train_dti_flux2_klein", training_args(tiny_flux2_klein, tmp_path / "ddp", *flags),
                           tmp_path / "dump", port=29547)  # fmt: skip
    assert len(ranks[0]["history"]) == 3
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert torch.equal(a, b)
    result, _ = train_klein("--train_batch_size", "2", output_dir=tmp_path / "single")
    single = result.learned["text_encoder"].embeddings().detach()
    assert torch.allclose(single, ranks[0]["final"]["text_encoder"], atol=1e-5 * single.norm().item())


def test_a_short_max_sequence_length_is_refused_before_anything_is_written(tiny_flux2_klein, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--max_sequence_length must be at least 16"):
        dti.main(dti.parse_args(training_args(tiny_flux2_klein, out, "--max_sequence_length", "8")))
    assert not out.exists()

"""Tests of train_dti_wan.py on a tiny random Wan 2.1 pipeline (CPU, offline)."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_dti_wan as dti
from tests.conftest import torchrun_ranks, training_args

PLACEHOLDER = "<toy-robot>"


def umt5(model):
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder")


def tokenizer_of(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, subfolder="tokenizer")


def unit_angle(a, b):
    a, b = torch.nn.functional.normalize(a.double(), dim=-1), torch.nn.functional.normalize(b.double(), dim=-1)
    return (2 * torch.asin((a - b).norm(dim=-1) / 2)).item()


def test_norm_is_the_mean_over_the_tokenizers_rows_and_each_step_turns_by_atan_lr(train_wan, tiny_wan):
    _, out = train_wan("--save_steps", "1", "--learning_rate", "0.02")
    table, tokenizer = umt5(tiny_wan).get_input_embeddings().weight.detach().double(), tokenizer_of(tiny_wan)
    assert len(table) > len(tokenizer)  # the published table is padded past the tokenizer
    expected = table[: len(tokenizer)].norm(dim=1).mean().item()
    assert abs(expected - table.norm(dim=1).mean().item()) > 1e-3  # the padding rows would change m*
    (robot,) = dti.initializer_token_ids(tokenizer, "robot", None)
    vectors = [table[robot]] + [
        load_file(out / f"learned_embeds-steps-{s}.safetensors")[PLACEHOLDER][0].double() for s in (1, 2)
    ]
    vectors.append(load_file(out / "learned_embeds.safetensors")[PLACEHOLDER][0].double())
    for vector in vectors[1:]:
        assert vector.norm().item() == pytest.approx(expected, rel=1e-5)
    for before, after in zip(vectors, vectors[1:], strict=False):
        assert abs(unit_angle(before, after) - math.atan(0.02)) < 1e-5
    with safe_open(out / "learned_embeds.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["training_shift"] == "1.0" and metadata["max_sequence_length"] == "512"
    assert float(metadata["norm_scale_text_encoder"]) == pytest.approx(expected, rel=1e-6)


def test_the_loss_is_the_rectified_flow_loss_on_normalised_1_frame_latents(tiny_wan):
    """The script's loss on one fixed batch equals the rectified-flow loss written out here: the VAE mode of the
    image as a 1-frame video, normalised per channel, x_t = (1 - sigma) x + sigma eps, target eps - x."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan)
    args = dti.parse_args(training_args(tiny_wan, "unused"))
    models = dti.load_models(args, json.loads((tiny_wan / "model_index.json").read_text()))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    text = dti.tokenize_prompt(pipe.tokenizer, 512, "a photo of a robot")
    batch = {"position": torch.tensor([3, 7]), "text": {k: torch.tensor([v, v]) for k, v in text.items()}}
    mean, std = dti.vae_posterior(models.vae, pixels)
    loss = dti.FAMILY.training_loss(batch, mean, std, models, seed=0, args=args)

    with torch.no_grad():
        z = models.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
    config = models.vae.config
    z = (z - torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(config.latents_std).view(
        1, -1, 1, 1, 1
    )
    expected = []
    for b, position in enumerate([3, 7]):
        generator = torch.Generator().manual_seed(dti.stable_seed(0, "noise", position))
        noise = torch.randn(z.shape[1:], generator=generator)
        u = torch.rand(1, generator=generator)  # weighting "none": u ~ U(0, 1)
        index = int(u * 1000)
        sigma = models.noise_scheduler.sigmas[index]
        assert models.noise_scheduler.config.shift == 1.0  # sigma = 1 - t / 1000
        x_t = (1 - sigma) * z[b] + sigma * noise
        embeds = pipe.encode_prompt("a photo of a robot", do_classifier_free_guidance=False, max_sequence_length=512)[0]
        pred = models.denoiser(x_t[None], models.noise_scheduler.timesteps[index][None], embeds, return_dict=False)[0]
        expected.append(((pred[0] - (noise - z[b])) ** 2).mean())
    assert torch.allclose(loss, torch.stack(expected), rtol=1e-5, atol=1e-7)


def test_training_conditioning_equals_the_pipelines_with_and_without_the_token(train_wan, tiny_wan):
    from diffusers import WanPipeline

    result, out = train_wan("--max_train_steps", "1")
    pipe = WanPipeline.from_pretrained(tiny_wan)
    vectors = load_file(out / "learned_embeds.safetensors")[PLACEHOLDER]
    dti.FAMILY.add_tokens(pipe.tokenizer, [PLACEHOLDER])
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[pipe.tokenizer.convert_tokens_to_ids([PLACEHOLDER])] = vectors
    text_encoder = result.components["text_encoder"]
    for prompt in ("a photo of a <toy-robot> on a beach", "a photo of a robot"):
        text = dti.tokenize_prompt(result.components["tokenizer"], 512, prompt)
        ours = dti.encode_prompt(text_encoder, {k: torch.tensor([v]) for k, v in text.items()})
        theirs = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)[0]
        assert torch.allclose(ours, theirs, atol=1e-6)


def test_a_prompt_tokenizes_to_the_same_ids_on_every_stack(tiny_wan):
    """The new tokens are added with lstrip (the family's add_tokens): transformers 4.56 and 5.x then agree."""
    tokenizer = tokenizer_of(tiny_wan)
    dti.FAMILY.add_tokens(tokenizer, ["<cpt>", "<cpt>_1"])
    ids = dti.tokenize_prompt(tokenizer, 12, "a photo of a <cpt> <cpt>_1")["input_ids"]
    assert ids == [5, 8, 9, 5, 486, 487, 1, 0, 0, 0, 0, 0]


def test_resume_is_bit_identical_and_the_checkpoint_holds_only_the_learned_state(train_wan, tmp_path):
    common = ["--checkpointing_steps", "2", "--random_flip"]
    train_wan("--max_train_steps", "4", *common, output_dir=tmp_path / "straight")
    train_wan("--max_train_steps", "2", *common, output_dir=tmp_path / "resumed")
    train_wan("--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common, output_dir=tmp_path / "resumed")
    straight = load_file(tmp_path / "straight" / "learned_embeds.safetensors")[PLACEHOLDER]
    assert torch.equal(straight, load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[PLACEHOLDER])
    size = sum(f.stat().st_size for f in (tmp_path / "resumed" / "checkpoint-4").iterdir())
    assert size < 100_000


def test_concepts_list_equals_single_runs(train_wan, tiny_wan, tmp_path):
    from tests.conftest import ASSETS

    entries = [
        {"placeholder_token": "<a>", "initializer_token": "robot", "train_data_dir": str(ASSETS)},
        {"placeholder_token": "<b>", "initializer_token": "red backpack", "train_data_dir": str(ASSETS)},
    ]
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps(entries))
    argv = training_args(tiny_wan, tmp_path / "list", "--gradient_accumulation_steps", "1")
    for flag in ("--placeholder_token", "--initializer_token", "--train_data_dir"):
        del argv[argv.index(flag) : argv.index(flag) + 2]
    listed = dti.main(dti.parse_args([*argv, "--concepts_list", str(concepts)]))
    for entry, concept in zip(entries, listed.concepts, strict=True):
        own = ["--placeholder_token", entry["placeholder_token"], "--initializer_token", entry["initializer_token"]]
        single, _ = train_wan(*own, output_dir=tmp_path / entry["placeholder_token"].strip("<>"))
        a, b = concept.learned["text_encoder"].embeddings(), single.learned["text_encoder"].embeddings()
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5 * b.norm().item())
    assert listed.concepts[1].num_vectors == 2  # "red backpack": two pieces, two vectors


def test_two_processes_end_identical_and_equal_a_single_process_run(train_wan, tiny_wan, tmp_path):
    argv = training_args(tiny_wan, tmp_path / "ddp", "--train_batch_size", "1", "--gradient_accumulation_steps", "1")
    ranks = torchrun_ranks("train_dti_wan", argv, tmp_path / "dump", port=29541)
    assert len(ranks[0]["history"]) == 3
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert torch.equal(a, b)
    result, _ = train_wan("--train_batch_size", "2", output_dir=tmp_path / "single")
    single = result.learned["text_encoder"].embeddings().detach()
    assert torch.allclose(single, ranks[0]["final"]["text_encoder"], atol=1e-5 * single.norm().item())


def test_the_benchmark_times_the_wan_step_against_its_floor(tmp_path):
    """bench_step.py --family wan: the floor and the DTI variants run; the DTI variants end at the same loss, with the
    text encoder over the attended positions (the script) or all of them; a validation times both ways."""
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_step

    argv = ["--family", "wan", "--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--variants",
            "floor", "dti", "dti+cache", "dti+cache+full_text", "--validation_images", "2",
            "--output", str(tmp_path / "bench.json")]  # fmt: skip
    report = bench_step.main(bench_step.parse_args(argv))
    rows = {row["variant"]: row for row in report["results"]}
    assert list(rows) == ["floor", "dti", "dti+cache", "dti+cache+full_text"] and rows["floor"]["loss"] is None
    assert rows["dti+cache"]["loss"] == pytest.approx(rows["dti"]["loss"], rel=1e-5)
    assert rows["dti+cache+full_text"]["loss"] == pytest.approx(rows["dti+cache"]["loss"], rel=1e-6)
    assert rows["dti+cache+full_text"]["tflop_per_step"] > rows["dti+cache"]["tflop_per_step"]  # 512 positions, not 7
    validation = report["validation"]
    assert validation["images"] == 2 and validation["one_call_s"] > 0 and validation["one_call_per_image_s"] > 0


def test_model_card_parses_and_its_snippet_loads_the_token(train_wan, monkeypatch):
    import re

    import huggingface_hub

    _, out = train_wan("--max_train_steps", "1", "--num_validation_images", "1")
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert {"dti", "wan", "textual-inversion"} <= set(card.data.to_dict()["tags"])
    code = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    code = code.replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32")
    code = code.replace("num_frames=33)", 'num_frames=1, num_inference_steps=2, height=64, width=64, output_type="np")')
    code = code.replace('export_to_video(video, "video.mp4", fps=16)', "")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(out / name))
    namespace = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)
    assert namespace["video"].shape == (1, 64, 64, 3)
    pipe = namespace["pipe"]
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(PLACEHOLDER)]
    assert torch.equal(row, load_file(out / "learned_embeds.safetensors")[PLACEHOLDER][0])


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(["--training_shift", "0"], "--training_shift"), (["--max_sequence_length", "1"], "--max_sequence_length")],
)
def test_bad_wan_flags_are_refused_before_anything_is_written(tiny_wan, tmp_path, flags, expected):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=expected):
        dti.main(dti.parse_args(training_args(tiny_wan, out, *flags)))
    assert not out.exists()

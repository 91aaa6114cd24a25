"""DTI + LoRA (--lora_rank): the token stays on the sphere while a LoRA of the denoiser trains; the LoRA files load
with diffusers' load_lora_weights (and, for SDXL, in kohya's layout that ComfyUI, A1111 and kohya's scripts read, and
bundled with the token for A1111); resume, SIGTERM and two processes stay exact (SIGTERM with a LoRA:
tests/test_reliability.py)."""

import hashlib
import itertools
import json
import math
import re
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import train_dti_sana
import train_dti_sdxl as dti
from tests.conftest import ASSETS, torchrun_ranks, training_args
from tests.test_ecosystem import python_block
from tests.test_evaluate import evaluate_args, run_evaluate

TOKEN = "<toy-robot>"
LORA = ["--lora_rank", "4", "--lora_alpha", "2", "--lora_start_step", "2"]
STRAIGHT = ["--max_train_steps", "4", "--checkpointing_steps", "1", "--learning_rate", "0.02", "--repeats", "1"]


def file_sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_lora_weights_of_folder(pipe, folder):
    """pipe.load_lora_weights(folder): it finds pytorch_lora_weights.safetensors (not the -steps- copies). diffusers
    before 0.40 wants the file named when offline, as the tests run."""
    try:
        pipe.load_lora_weights(folder)
    except ValueError as error:
        assert "offline mode" in str(error)
        pipe.load_lora_weights(folder, weight_name=dti.LORA_WEIGHT_NAME)


def lora_state(checkpoint):
    """The LoRA weights a checkpoint holds (accelerate's third registered object: tokens, scheduler, LoRA)."""
    return torch.load(checkpoint / "custom_checkpoint_2.pkl", weights_only=True)


def unet_output(unet, seed=0):
    """The UNet's prediction for fixed random inputs, as the training loss calls it (fp32)."""
    g = torch.Generator().manual_seed(seed)
    latents, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 80, generator=g)
    pooled, time_ids = torch.randn(2, 32, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    with torch.no_grad():
        return unet(
            latents, torch.tensor([10, 500]), text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample


@pytest.fixture(scope="module")
def straight(tiny_sdxl, tmp_path_factory):
    """One SDXL run with a LoRA (rank 4, alpha 2, from step 2), 4 steps, a checkpoint every step, recording each
    RSGD step's directions."""
    from accelerate.state import AcceleratorState, GradientState

    out, history = tmp_path_factory.mktemp("lora") / "straight", []
    original = dti.DirectionalTokens.step

    def recording_step(self, lr, only_if=None):
        before = self.direction.detach().clone()
        original(self, lr, only_if)
        history.append((before, self.direction.detach().clone(), lr))

    dti.DirectionalTokens.step = recording_step
    try:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        result = dti.main(dti.parse_args(training_args(tiny_sdxl, out, *STRAIGHT, *LORA)))
    finally:
        dti.DirectionalTokens.step = original
    return result, out, history


def test_the_token_keeps_its_norm_and_turns_atan_lr_per_step_while_the_lora_trains(straight, tiny_sdxl):
    result, out, history = straight
    assert len(history) == 4 * 2  # 4 steps x 2 encoders
    for before, after, lr in history:
        cos = torch.nn.functional.cosine_similarity(before.double(), after.double(), dim=-1).clamp(-1, 1)
        assert torch.acos(cos).item() == pytest.approx(math.atan(lr), rel=1e-4)
    for name, file in (("text_encoder", "learned_embeds"), ("text_encoder_2", "learned_embeds_2")):
        vector = load_file(out / f"{file}.safetensors")[TOKEN].double()
        assert vector.norm(dim=1).item() == pytest.approx(result.learned[name].norm_scale, rel=1e-6)


def test_the_lora_is_unchanged_before_lora_start_step_and_trains_after(straight):
    _, out, _ = straight
    states = {step: lora_state(out / f"checkpoint-{step}") for step in (1, 2, 3, 4)}
    names = sorted(states[1])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert all(v.dtype == torch.float32 for v in states[1].values())
    for name in names:  # steps 1 and 2 are token-only: B is still zero, A as drawn
        assert torch.equal(states[1][name], states[2][name])
        if ".lora_B." in name:
            assert not states[2][name].any()
    assert any(states[3][n].any() for n in names if ".lora_B." in n)
    assert all(not torch.equal(states[3][n], states[4][n]) for n in names)


def test_load_lora_weights_reproduces_the_training_time_denoiser(straight, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    result, out, _ = straight
    trained = unet_output(result.components["unet"])
    fresh = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert not torch.allclose(unet_output(fresh.unet), trained, atol=1e-4)  # the LoRA changes the denoiser
    load_lora_weights_of_folder(fresh, out)
    torch.testing.assert_close(unet_output(fresh.unet), trained, atol=1e-6, rtol=1e-5)
    kohya = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    kohya.load_lora_weights(out, weight_name="toy-robot_lora.safetensors")  # diffusers converts the kohya layout
    torch.testing.assert_close(unet_output(kohya.unet), trained, atol=1e-6, rtol=1e-5)


def kohya_names(config, targets):
    """{kohya module name: diffusers layer} of each attention layer a LoRA on `targets` has, built from the UNet config
    alone (not with the script's map): the SGM UNet numbers input_blocks 1 + i (layers_per_block + 1) + j (conv_in is
    0; each down block but the last ends in a downsampler), output_blocks i (layers_per_block + 1) + j, holds a
    layer's attention at .1 and the mid block's at middle_block.1; each attention has transformer_layers_per_block
    transformer blocks (reversed for the up blocks)."""
    per_block, n = config.layers_per_block, len(config.down_block_types)
    depth = config.transformer_layers_per_block
    depth = [depth] * n if isinstance(depth, int) else list(depth)
    attentions = {"mid_block.attentions.0": ("middle_block.1", depth[-1])}
    for i, kind in enumerate(config.down_block_types):
        for j in range(per_block) if kind.startswith("CrossAttn") else ():
            attentions[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{1 + i * (per_block + 1) + j}.1", depth[i])
    for i, kind in enumerate(config.up_block_types):
        for j in range(per_block + 1) if kind.startswith("CrossAttn") else ():
            attentions[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{i * (per_block + 1) + j}.1", depth[-1 - i])
    names = {}
    for layer, (sgm, blocks) in attentions.items():
        for block, attention, target in itertools.product(range(blocks), ("attn1", "attn2"), targets):
            inner = f"transformer_blocks.{block}.{attention}.{target}"
            names["lora_unet_" + f"{sgm}.{inner}".replace(".", "_")] = f"{layer}.{inner}"
    return names


def test_the_kohya_file_names_the_trained_layers_as_kohyas_sdxl_loras_do(straight):
    result, out, _ = straight
    tensors = load_file(out / "toy-robot_lora.safetensors")
    sgm = re.compile(r"lora_unet_(input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+)_\w+")
    assert all(sgm.fullmatch(key.split(".")[0]) for key in tensors)
    unet = result.components["unet"]
    names = kohya_names(unet.config, dti.DEFAULT_LORA_TARGETS.split(","))
    assert {key.split(".")[0] for key in tensors} == set(names)
    assert set(names.values()) == {name for name, module in unet.named_modules() if hasattr(module, "lora_A")}
    for base, layer in names.items():
        assert tensors[f"{base}.lora_down.weight"].shape == (4, unet.get_submodule(layer).in_features)
        assert tensors[f"{base}.lora_up.weight"].shape == (unet.get_submodule(layer).out_features, 4)


def test_the_kohya_file_holds_the_lora_as_trained_with_its_alpha(straight):
    result, out, _ = straight
    with safe_open(out / "toy-robot_lora.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"].startswith("sdxl_") and metadata["ss_network_module"] == "networks.lora"
    assert int(metadata["ss_network_dim"]) == 4 and float(metadata["ss_network_alpha"]) == 2.0
    kohya, diffusers_file = load_file(out / "toy-robot_lora.safetensors"), load_file(out / dti.LORA_WEIGHT_NAME)
    trained = result.lora.state_dict()  # peft's A and B
    for base, layer in kohya_names(result.components["unet"].config, dti.DEFAULT_LORA_TARGETS.split(",")).items():
        down, up, alpha = (kohya[f"{base}.{kind}"] for kind in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.item() == 2.0 and up.any()
        assert torch.equal(down, trained[f"{layer}.lora_A.default.weight"])
        assert torch.equal(up, trained[f"{layer}.lora_B.default.weight"])
        delta = alpha / down.shape[0] * up @ down  # as kohya's scripts, A1111 and ComfyUI apply it
        b, a = (diffusers_file[f"unet.{layer}.lora_{kind}.weight"] for kind in "BA")
        torch.testing.assert_close(delta, b @ a, rtol=1e-6, atol=1e-9)


def test_only_the_time_embeddings_have_no_kohya_name(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert dti.unnamed_linear_layers(unet) == [layer for layer in dti.EMBEDDING_LAYERS if "cond_proj" not in layer]


def test_the_pivotal_file_bundles_the_token_with_the_kohya_lora(straight, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    _, out, _ = straight
    pivotal, kohya = load_file(out / "toy-robot_pivotal.safetensors"), load_file(out / "toy-robot_lora.safetensors")
    for key, file in (("clip_l", "learned_embeds"), ("clip_g", "learned_embeds_2")):
        assert torch.equal(pivotal.pop(f"bundle_emb.toy-robot.{key}"), load_file(out / f"{file}.safetensors")[TOKEN])
    assert pivotal.keys() == kohya.keys() and all(torch.equal(pivotal[k], kohya[k]) for k in kohya)
    with safe_open(out / "toy-robot_pivotal.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):  # diffusers refuses the bundle_emb keys
        pipe.load_lora_weights(out, weight_name="toy-robot_pivotal.safetensors")


def test_metadata_card_and_resume_of_a_lora_run(straight, tiny_sdxl, tmp_path, monkeypatch):
    result, out, _ = straight
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["lora_rank"] == "4" and metadata["lora_alpha"] == "2.0" and metadata["lora_start_step"] == "2"
    assert metadata["lora_target_modules"] == "to_q,to_k,to_v,to_out.0"
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert "lora" in card.data.tags and "| LoRA | rank 4, alpha 2" in card.text
    assert "toy-robot_lora.safetensors" in card.text and "toy-robot_pivotal.safetensors" in card.text

    # The card's snippet loads the embeddings and the LoRA.
    code = python_block(card.text).replace(f'"{out.name}"', f'"{out}"').replace('"cuda"', '"cpu"')
    code = code.replace("torch.float16", "torch.float32")
    code = code.replace(").images[0]", ", num_inference_steps=1, height=64, width=64).images[0]")
    namespace = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)
    torch.testing.assert_close(unet_output(namespace["pipe"].unet), unet_output(result.components["unet"]))

    # Resuming from checkpoint-2 ends bit-identical to the straight run, LoRA included.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    dti.main(dti.parse_args(training_args(tiny_sdxl, resumed, *STRAIGHT, *LORA, "--resume_from_checkpoint", "latest")))
    for file in ("learned_embeds.safetensors", "learned_embeds_2.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(out / file), load_file(resumed / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file


def test_a_checkpoint_resumes_only_with_the_same_lora(straight, tiny_sdxl, tmp_path, monkeypatch):
    _, out, _ = straight
    monkeypatch.setattr(dti, "load_models", lambda *a: pytest.fail("the models were loaded"))
    with_lora, without_lora = tmp_path / "with", tmp_path / "without"
    shutil.copytree(out / "checkpoint-4", with_lora / "checkpoint-4")
    plain = dti.parse_args(training_args(tiny_sdxl, with_lora, *STRAIGHT, "--resume_from_checkpoint", "latest"))
    made = r"made with lora 'rank 4, alpha 2, .*', this run has no LoRA; resume with the flags"
    with pytest.raises(ValueError, match=made):
        dti.main(plain)
    (without_lora / "checkpoint-4").mkdir(parents=True)
    state = json.loads((out / "checkpoint-4" / dti.CHECKPOINT_STATE).read_text()) | {"lora": None, "files": {}}
    (without_lora / "checkpoint-4" / dti.CHECKPOINT_STATE).write_text(json.dumps(state))
    lora = dti.parse_args(
        training_args(tiny_sdxl, without_lora, *STRAIGHT, *LORA, "--resume_from_checkpoint", "latest")
    )
    with pytest.raises(ValueError, match=r"made with no LoRA, this run has lora 'rank 4, alpha 2"):
        dti.main(lora)


def test_peft_missing_is_one_line_naming_the_install(tiny_sdxl, tmp_path, monkeypatch):
    real = dti.importlib.util.find_spec
    monkeypatch.setattr(dti.importlib.util, "find_spec", lambda name: None if name == "peft" else real(name))
    with pytest.raises(ValueError, match=r"^--lora_rank needs peft: pip install peft\.$"):
        dti.validate_args(dti.parse_args(training_args(tiny_sdxl, tmp_path, "--lora_rank", "4")), dti.FAMILY)


def test_two_processes_equal_one_with_a_lora(straight, tiny_sdxl, tmp_path):
    flags = [*STRAIGHT, *LORA, "--train_batch_size", "1"]
    ranks = torchrun_ranks("train_dti_sdxl", training_args(tiny_sdxl, tmp_path / "ddp", *flags), tmp_path / "d", 29541)
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert torch.equal(a, b)
    assert ranks[0]["lora"].keys() == ranks[1]["lora"].keys()
    assert all(torch.equal(ranks[0]["lora"][k], ranks[1]["lora"][k]) for k in ranks[0]["lora"])
    result, _, _ = straight  # batch 2 in one process = batch 1 in each of two
    single = result.lora.state_dict()
    for key, value in single.items():
        torch.testing.assert_close(ranks[0]["lora"][key], value, atol=1e-5, rtol=1e-4)
    for name in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(
            ranks[0]["final"][name], result.learned[name].embeddings().detach(), atol=1e-5, rtol=0
        )


def test_sana_lora_loads_with_load_lora_weights_and_reproduces_the_transformer(train_sana, tiny_sana):
    from diffusers import SanaPipeline

    result, out = train_sana("--lora_rank", "4", "--lora_alpha", "8", "--lora_start_step", "1")
    transformer = result.components["transformer"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, transformer.config.in_channels, 4, 4, generator=g)
    text = torch.randn(2, 6, transformer.config.caption_channels, generator=g)

    def output(model):
        with torch.no_grad():
            return model(latents, encoder_hidden_states=text, timestep=torch.tensor([10, 500])).sample

    fresh = SanaPipeline.from_pretrained(tiny_sana)
    assert not torch.allclose(output(fresh.transformer), output(transformer), atol=1e-4)
    load_lora_weights_of_folder(fresh, out)
    torch.testing.assert_close(output(fresh.transformer), output(transformer), atol=1e-6, rtol=1e-5)
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        assert f.metadata()["lora_alpha"] == "8.0"
    vector = load_file(out / "learned_embeds.safetensors")[TOKEN].double()
    assert vector.norm(dim=1).item() == pytest.approx(result.learned["text_encoder"].norm_scale, rel=1e-6)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "learned_embeds.safetensors",
        train_dti_sana.LORA_WEIGHT_NAME,
    ]


def test_infer_applies_a_training_folders_lora_and_records_it(straight, tiny_sdxl, tmp_path, capsys):
    import infer

    _, out, _ = straight

    def image(name, *extra):
        argv = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--output_dir", str(tmp_path / name), "--height",
                "64", "--width", "64", "--num_inference_steps", "2", "--device", "cpu", "--prompt",
                f"a photo of {TOKEN}", *extra]  # fmt: skip
        summary = infer.main(infer.parse_args(argv))
        return np.asarray(Image.open(tmp_path / name / summary["images"][0]["file"])), summary

    files = [str(out / "learned_embeds.safetensors"), str(out / "learned_embeds_2.safetensors")]
    auto, summary = image("auto", "--embeddings", str(out))
    assert summary["loras"] == [
        {"source": str(out / dti.LORA_WEIGHT_NAME), "sha256": file_sha256(out / dti.LORA_WEIGHT_NAME), "scale": 1.0}
    ]
    explicit, _ = image("explicit", "--embeddings", *files, "--lora", str(out / dti.LORA_WEIGHT_NAME))
    assert np.array_equal(auto, explicit)
    capsys.readouterr()
    plain, summary = image("plain", "--embeddings", *files)
    assert summary["loras"] == [] and "was trained with a LoRA (rank 4)" in capsys.readouterr().err
    assert not np.array_equal(auto, plain)
    off, _ = image("off", "--embeddings", str(out), "--lora_scale", "0")
    assert np.array_equal(off, plain)  # scale 0: the base denoiser


def test_evaluate_switches_each_runs_lora(straight, tiny_sdxl, tmp_path):
    from tests.tiny_evaluators import save_tiny_evaluators

    _, out, _ = straight
    evaluators = save_tiny_evaluators(tmp_path / "evaluators")
    without = tmp_path / "without-lora"
    shutil.copytree(out, without, ignore=shutil.ignore_patterns("checkpoint-*", "*lora*", ".*"))
    argv = evaluate_args(tiny_sdxl, evaluators, tmp_path / "eval", "--embeddings", str(out), str(without),
                         "--instance_data_dir", str(ASSETS), "--max_prompts", "1", "--seeds", "0")  # fmt: skip
    summary, calls, _ = run_evaluate(argv)
    assert len(calls) == 2 and summary["runs"]["straight"]["lora"] == str(out / dti.LORA_WEIGHT_NAME)
    assert summary["runs"]["without-lora"]["lora"] is None
    settings = {run: json.loads((tmp_path / "eval" / run / "generation.json").read_text()) for run in summary["runs"]}
    assert settings["straight"]["loras"][0]["sha256"] == file_sha256(out / dti.LORA_WEIGHT_NAME)
    assert settings["without-lora"]["loras"] == []
    images = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "eval").glob("*/images/*.png"))]
    assert len(images) == 2 and not np.array_equal(*images)  # same vectors; only the LoRA differs

"""Behaviour that depends on fields of the published checkpoints: SDXL's legacy CLIP special ids (pooling) and
SANA as its authors trained it (DC-AE precision, the zero-embedding pad prefix, the class word's piece)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import infer
import train_dti_sana
import train_dti_sdxl
from tests.test_infer import run_infer, train_in_process

ROBOT = "<toy-robot>"


@pytest.fixture(scope="module")
def tiny_sdxl_fixed_ids(tmp_path_factory):
    """The tiny SDXL pipeline with the same weights but the tokenizer's own special ids (49406/49407) in the text
    encoder configs, with which transformers pools CLIP at the first end-of-text token by itself."""
    from tests.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-fixed-ids") / "pipeline", special_ids="fixed")


def test_fixture_carries_the_published_special_ids(tiny_sdxl):
    for name in ("text_encoder", "text_encoder_2"):
        config = json.loads((tiny_sdxl / name / "config.json").read_text())
        assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 2, 1)
    assert json.loads((tiny_sdxl / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"


def pooled_by_hand(encoder, ids, position):
    """CLIP-G's projected final hidden state (after the final layer norm) at one position per sample."""
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).last_hidden_state
        return encoder.text_projection(hidden[torch.arange(len(ids)), position])


@pytest.mark.parametrize("pooled_output", ["eos", "argmax"])
def test_pooled_text_embedding_is_taken_where_the_flag_says(tiny_sdxl, tmp_path, pooled_output):
    result = train_in_process(
        train_dti_sdxl, tiny_sdxl, tmp_path / "out", "--max_train_steps", "1", "--pooled_output", pooled_output
    )
    tokenizers = [result.components["tokenizer"], result.components["tokenizer_2"]]
    encoders = [result.components["text_encoder"], result.components["text_encoder_2"]]
    text = train_dti_sdxl.tokenize_prompt(tokenizers, f"a photo of a {ROBOT} on a table")
    text = {key: torch.tensor([ids]) for key, ids in text.items()}
    with torch.no_grad():
        _, pooled = train_dti_sdxl.encode_prompt(encoders, text)
    ids = text["input_ids_2"]
    end_of_text = ids[0].tolist().index(tokenizers[1].eos_token_id)
    new_token = ids[0].tolist().index(result.placeholder_ids[1][0])
    at_eos, at_new = (pooled_by_hand(encoders[1], ids, torch.tensor([p])) for p in (end_of_text, new_token))
    expected, other = (at_eos, at_new) if pooled_output == "eos" else (at_new, at_eos)
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert (pooled - other).abs().max() > 1e-3
    with safe_open(tmp_path / "out" / "learned_embeds.safetensors", framework="pt") as f:
        assert f.metadata()["pooled_output"] == pooled_output
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| pooled text embedding | {pooled_output} |" in card
    assert (train_dti_sdxl.POOL_AT_END_OF_TEXT in card) == (pooled_output == "eos")


def test_eos_pooling_is_the_same_on_both_id_conventions_and_argmax_is_not(tiny_sdxl, tiny_sdxl_fixed_ids, tmp_path):
    """Same weights, other special ids: with --pooled_output eos training and infer.py cannot tell them apart."""
    learned = {}
    for pooling in ("eos", "argmax"):
        for name, model in (("published", tiny_sdxl), ("fixed", tiny_sdxl_fixed_ids)):
            out = tmp_path / f"{name}-{pooling}"
            train_in_process(train_dti_sdxl, model, out, "--max_train_steps", "3", "--pooled_output", pooling)
            learned[name, pooling] = load_file(out / "learned_embeds_2.safetensors")[ROBOT]
    assert torch.equal(learned["published", "eos"], learned["fixed", "eos"])
    assert not torch.allclose(learned["published", "argmax"], learned["fixed", "argmax"], atol=1e-6)

    images = {}
    for pooling in ("eos", "argmax"):
        for name, model in (("published", tiny_sdxl), ("fixed", tiny_sdxl_fixed_ids)):
            out = tmp_path / f"gen-{name}-{pooling}"
            summary = run_infer(model, out, "--embeddings", str(tmp_path / "published-eos"),
                                "--prompt", f"a photo of a {ROBOT}", "--pooled_output", pooling)  # fmt: skip
            assert summary["pooled_output"] == pooling
            images[name, pooling] = np.asarray(load_png(out / summary["images"][0]["file"]), dtype=np.int16)
    assert np.array_equal(images["published", "eos"], images["fixed", "eos"])
    assert np.abs(images["published", "argmax"] - images["fixed", "argmax"]).max() > 0


def load_png(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def test_infer_pools_as_the_metadata_says(tiny_sdxl, tmp_path):
    for pooling in ("eos", "argmax"):
        train_in_process(train_dti_sdxl, tiny_sdxl, tmp_path / pooling, "--max_train_steps", "1",
                         "--pooled_output", pooling)  # fmt: skip
    concepts = infer.load_embeddings([str(tmp_path / "eos")])
    args = infer.parse_args(["--pretrained_model_name_or_path", "m", "--prompt", "p"])
    assert infer.pooled_output(args, concepts) == "eos"
    assert infer.pooled_output(args, infer.load_embeddings([str(tmp_path / "argmax")])) == "argmax"
    bare = infer.Concept("<x>", metadata={})  # an A1111 / ComfyUI file: no metadata
    assert infer.pooled_output(args, [bare]) == "eos"
    older = infer.Concept("<y>", metadata={"script_version": "0.1.0"})  # trained before the flag: config pooling
    assert infer.pooled_output(args, [older]) == "argmax"
    mixed = concepts + infer.load_embeddings([str(tmp_path / "argmax")], token="<other>")
    with pytest.raises(ValueError, match="different pooled outputs"):
        infer.pooled_output(args, mixed)


def test_resume_refuses_another_pooled_output(tiny_sdxl, tmp_path):
    out = tmp_path / "out"
    train_in_process(train_dti_sdxl, tiny_sdxl, out, "--max_train_steps", "2", "--checkpointing_steps", "1")
    with pytest.raises(ValueError, match="pooled_output"):
        train_in_process(train_dti_sdxl, tiny_sdxl, out, "--max_train_steps", "3", "--pooled_output", "argmax",
                         "--resume_from_checkpoint", "latest")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# SANA
# ---------------------------------------------------------------------------------------------------------------


def test_dc_ae_stays_fp32_under_bf16(train_sana):
    result, _ = train_sana("--max_train_steps", "1", "--mixed_precision", "bf16")
    assert result.components["vae"].dtype == torch.float32
    assert result.components["transformer"].dtype == torch.bfloat16
    assert result.components["text_encoder"].dtype == torch.bfloat16


def test_zero_pad_counts_follow_the_documented_distribution_and_are_keyed():
    counts = train_dti_sana.zero_pad_counts(0, range(20000))
    assert counts == train_dti_sana.zero_pad_counts(0, range(20000))  # keyed: the same draw for the same position
    assert counts[5:9] == train_dti_sana.zero_pad_counts(0, [5, 6, 7, 8])  # whatever batch the position is in
    assert min(counts) == 0 and max(counts) == 15
    # floor of an Exponential(scale 2): P(n = 0) = 1 - exp(-1/2), P(n >= 15) = exp(-15/2)
    assert abs(np.mean(np.array(counts) == 0) - (1 - np.exp(-0.5))) < 0.015
    assert abs(np.mean(np.array(counts) == 15) - np.exp(-7.5)) < 0.002


def test_zero_pad_inserts_attended_pad_ids_after_bos():
    text = {"input_ids": torch.tensor([[2, 10, 11, 1, 0, 0], [2, 12, 0, 0, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])}  # fmt: skip
    padded = train_dti_sana.zero_pad(text, [2, 0], pad_id=99)
    assert padded["input_ids"].tolist() == [[2, 99, 99, 10, 11, 1], [2, 12, 0, 0, 0, 0]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]


def test_zero_pad_row_stays_zero_is_recorded_and_changes_the_loss(train_sana, tmp_path):
    """--zero_pad is the default, so the resume and two-process tests of test_train_dti_sana.py run with it."""
    result, out = train_sana("--max_train_steps", "2", output_dir=tmp_path / "padded")
    encoder, tokenizer = result.components["text_encoder"], result.components["tokenizer"]
    pad_id = result.placeholder_ids[0][-1] + 1
    assert pad_id == len(tokenizer)  # the row after the new tokens, which no tokenizer id reaches
    assert torch.count_nonzero(encoder.get_input_embeddings().weight[pad_id]) == 0
    with safe_open(out / "learned_embeds.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["zero_pad"]) is True and f.metadata()["initializer_form"] == "in_prompt"
    _, plain = train_sana("--max_train_steps", "2", "--no-zero_pad", output_dir=tmp_path / "plain")
    with safe_open(plain / "learned_embeds.safetensors", framework="pt") as f:
        assert json.loads(f.metadata()["zero_pad"]) is False
    padded_rows, plain_rows = (load_file(o / "learned_embeds.safetensors")["<toy-robot>"] for o in (out, plain))
    assert not torch.allclose(padded_rows, plain_rows)


def test_initializer_form_picks_the_documented_piece(tiny_sana):
    from tests.tiny_sana import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    in_prompt = train_dti_sana.initializer_token_ids(tokenizer, "robot", None, in_prompt=True)
    bare = train_dti_sana.initializer_token_ids(tokenizer, "robot", None, in_prompt=False)
    assert tokenizer.convert_ids_to_tokens(in_prompt) == ["▁robot"]
    assert tokenizer.convert_ids_to_tokens(bare) == ["robot"]
    # the piece a prompt holds is the in-prompt one
    assert in_prompt[0] in tokenizer("a photo of a robot").input_ids and bare[0] not in tokenizer("a robot").input_ids

"""The tiny FLUX.2 [klein] pipeline (tests/tiny_flux2_klein.py): it loads offline, generates, keeps the published
fields, encodes prompts as the pipeline's Qwen3 contract says, and its Qwen2-style tokenizer splits prompts with new
tokens the same way on transformers 4 and 5."""

import json

import numpy as np
import pytest
import torch
from transformers import AddedToken

from tests.tiny_flux2_klein import (
    HIDDEN_STATES_LAYERS,
    PUBLISHED,
    TABLE_PADDING,
    TEXT_ENCODER_WIDTH,
    build_tiny_tokenizer,
    save_tiny_flux2_klein,
)

NEW_TOKENS = ["<cpt>", "<cpt>_1"]
# Config keys that are sizes (and the special ids, which follow the small vocabulary).
SIZES = {
    "text_encoder": {"vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "bos_token_id", "eos_token_id"},
    "transformer": {"num_attention_heads", "attention_head_dim", "axes_dims_rope", "joint_attention_dim", "num_layers",
                    "num_single_layers"},
    "vae": {"block_out_channels", "layers_per_block", "norm_num_groups"},
    "scheduler": set(),
}  # fmt: skip
# The chat template of one user turn, generation prompt, thinking off (Flux2KleinPipeline._get_qwen3_prompt_embeds).
LAYOUT = ["<|im_start|>", "user", "Ċ", "a", "Ġphoto", "Ġof", "Ġa", "Ġrobot", "<|im_end|>", "Ċ",
          "<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]  # fmt: skip


def templated(tokenizer, prompt):
    message = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True, enable_thinking=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """512 tokens through 36 layers 32 wide are thousands of tiny ops: a second thread only adds its wake-ups (5-20x
    slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_flux2_klein(tmp_path_factory):
    """Folder of a tiny random-weight Flux2KleinPipeline, the base model (see tests/tiny_flux2_klein.py)."""
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("tiny-flux2-klein") / "pipeline")


@pytest.fixture(scope="module")
def pipe(tiny_flux2_klein):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(tiny_flux2_klein, local_files_only=True)


@pytest.mark.parametrize("distilled", [False, True], ids=["base", "distilled"])
def test_saved_pipeline_loads_offline_and_generates_an_image(tiny_flux2_klein, tmp_path, distilled):
    from diffusers import Flux2KleinPipeline

    folder = save_tiny_flux2_klein(tmp_path / "pipeline", distilled=True) if distilled else tiny_flux2_klein
    pipe = Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    assert json.loads((folder / "model_index.json").read_text())["is_distilled"] is distilled
    image = pipe(
        prompt="a photo of a robot toy on the beach",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=4.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert pipe.do_classifier_free_guidance is not distilled  # the base model runs the empty negative prompt too


@pytest.mark.parametrize("component", sorted(SIZES))
def test_fixture_keeps_every_published_field_but_the_sizes(tiny_flux2_klein, component):
    saved = json.loads((tiny_flux2_klein / component / ("scheduler_config.json" if component == "scheduler" else
                                                        "config.json")).read_text())  # fmt: skip
    if "rope_parameters" in saved:  # transformers 5 writes rope_theta and rope_scaling as one field
        rope = saved.pop("rope_parameters")
        saved |= {"rope_theta": rope["rope_theta"], "rope_scaling": None if rope["rope_type"] == "default" else rope}
    published = json.loads((PUBLISHED / f"{component}.json").read_text())
    bookkeeping = {"_class_name", "_diffusers_version", "_name_or_path", "torch_dtype", "transformers_version"}
    kept = {k: v for k, v in published.items() if k not in SIZES[component] | bookkeeping}
    assert {k: saved.get(k) for k in kept} == kept


def test_vae_normalizes_latents_with_its_batch_norm_statistics(pipe):
    """Not the identity (mean 0, variance 1), so a trainer that skips the normalization trains on other latents."""
    assert pipe.vae.bn.num_features == 4 * pipe.vae.config.latent_channels == pipe.transformer.config.in_channels
    assert pipe.vae.bn.running_mean.abs().min() > 0 and not torch.allclose(pipe.vae.bn.running_var, torch.ones(128))


def test_embedding_table_is_larger_than_the_tokenizer_and_tied_to_the_head(pipe):
    table = pipe.text_encoder.get_input_embeddings().weight
    assert table.shape == (len(pipe.tokenizer) + TABLE_PADDING, TEXT_ENCODER_WIDTH)  # like 151,936 for 151,669 tokens
    assert pipe.text_encoder.get_output_embeddings().weight.data_ptr() == table.data_ptr()


def test_chat_template_gives_the_published_layout():
    tokenizer = build_tiny_tokenizer()
    text = templated(tokenizer, "a photo of a robot")
    assert text == "<|im_start|>user\na photo of a robot<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids) == LAYOUT
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token, tokenizer.padding_side) == (
        "<|endoftext|>", "<|im_end|>", None, "right"
    )  # fmt: skip
    # Qwen's byte-level ids where the small vocabulary has them: bytes first ("a" 64, "Ċ" 198, "Ġ" 220).
    assert tokenizer.convert_tokens_to_ids(["a", "Ċ", "Ġ"]) == [64, 198, 220]


def test_encode_prompt_stacks_layers_9_18_27_of_the_padded_chat_template(pipe):
    prompts = ["a photo of a robot", "a dog"]
    embeds, text_ids = pipe.encode_prompt(prompts, device="cpu")
    assert embeds.shape == (2, 512, len(HIDDEN_STATES_LAYERS) * TEXT_ENCODER_WIDTH)
    assert text_ids.shape == (2, 512, 4) and text_ids[0, :, 3].tolist() == list(range(512))
    assert not text_ids[..., :3].any()  # (t, h, w, l) = (0, 0, 0, position)
    batch = pipe.tokenizer([templated(pipe.tokenizer, p) for p in prompts], padding="max_length", max_length=512,
                           return_tensors="pt")  # fmt: skip
    assert batch.input_ids[0, len(LAYOUT) :].eq(pipe.tokenizer.pad_token_id).all()
    with torch.no_grad():
        hidden = pipe.text_encoder(**batch, output_hidden_states=True).hidden_states
    assert len(hidden) == pipe.text_encoder.config.num_hidden_layers + 1 == 37  # layer 27 is an inner one
    assert torch.equal(embeds, torch.cat([hidden[k] for k in HIDDEN_STATES_LAYERS], dim=-1))


def test_plain_added_tokens_keep_a_lone_space_token_before_them():
    """add_tokens(str): the space before a new token is byte-level "Ġ" (id 220), on transformers 4 and 5 alike."""
    tokenizer = build_tiny_tokenizer()
    first_new = len(tokenizer)
    tokenizer.add_tokens(NEW_TOKENS)
    ids = tokenizer(templated(tokenizer, "a photo of a <cpt> <cpt>_1")).input_ids
    assert ids[3:-9] == [64, 307, 268, 266, 220, first_new, 220, first_new + 1] and first_new == 499


@pytest.mark.parametrize("prompt", ["a photo of a <cpt> <cpt>_1", "a photo of a <cpt><cpt>_1"])
def test_lstrip_added_tokens_take_the_space_before_them(prompt):
    tokenizer = build_tiny_tokenizer()
    first_new = len(tokenizer)
    tokenizer.add_tokens([AddedToken(token, lstrip=True) for token in NEW_TOKENS])
    ids = tokenizer(templated(tokenizer, prompt)).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[3:-9]) == ["a", "Ġphoto", "Ġof", "Ġa", "<cpt>", "<cpt>_1"]
    assert ids[3:-9] == [64, 307, 268, 266, first_new, first_new + 1]

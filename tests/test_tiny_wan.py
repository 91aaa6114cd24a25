"""The tiny Wan 2.1 T2V pipeline (tests/tiny_wan.py): it loads offline, generates, keeps the published fields, and
its UMT5-style tokenizer splits prompts with new tokens the same way on transformers 4 and 5."""

import json

import numpy as np
import pytest
import transformers
from transformers import AddedToken

from tests.tiny_wan import PUBLISHED, TABLE_PADDING, build_tiny_tokenizer, save_tiny_wan

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
NEW_TOKENS = ["<cpt>", "<cpt>_1"]
# Config keys that are sizes (or, for tie_word_embeddings, forced to true by transformers 5 for every UMT5 model).
SIZES = {
    "text_encoder": {"vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
                     "tie_word_embeddings"},
    "transformer": {"num_attention_heads", "attention_head_dim", "ffn_dim", "freq_dim", "num_layers", "text_dim"},
    "vae": {"base_dim", "num_res_blocks"},
    "scheduler": set(),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    """Folder of a tiny random-weight WanPipeline (see tests/tiny_wan.py)."""
    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan") / "pipeline")


def test_saved_pipeline_loads_offline_and_generates_one_frame(tiny_wan):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan)
    frames = pipe(
        "a photo of a robot toy on the beach",
        height=64,
        width=64,
        num_frames=1,
        num_inference_steps=2,
        output_type="np",
    ).frames
    assert frames.shape == (1, 1, 64, 64, 3) and np.isfinite(frames).all()


@pytest.mark.parametrize("component", sorted(SIZES))
def test_fixture_keeps_every_published_field_but_the_sizes(tiny_wan, component):
    saved = json.loads((tiny_wan / component / ("scheduler_config.json" if component == "scheduler" else "config.json"))
                       .read_text())  # fmt: skip
    published = json.loads((PUBLISHED / f"{component}.json").read_text())
    bookkeeping = {"_diffusers_version", "_name_or_path", "torch_dtype", "transformers_version"}
    kept = {k: v for k, v in published.items() if k not in SIZES[component] | bookkeeping}
    assert {k: saved.get(k) for k in kept} == kept


def test_embedding_table_is_larger_than_the_tokenizer(tiny_wan):
    from transformers import T5TokenizerFast, UMT5EncoderModel

    tokenizer = T5TokenizerFast.from_pretrained(tiny_wan / "tokenizer")
    rows = UMT5EncoderModel.from_pretrained(tiny_wan / "text_encoder").get_input_embeddings().weight.shape[0]
    assert rows == len(tokenizer) + TABLE_PADDING  # like the published 256,384 rows for 256,300 tokens


def test_caption_words_are_whole_pieces_and_end_with_eos():
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("a photo of a robot").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "▁robot", "</s>"]
    assert (ids[-1], tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.padding_side) == (1, 1, 0, "right")


def test_plain_added_tokens_get_a_lone_word_boundary_on_transformers_4_only():
    """add_tokens(str) makes normalized tokens: transformers 4 runs the tokenizer.json pre-tokenizer on the text
    before each one and leaves a lone "▁" piece; transformers 5 splits on whitespace first and leaves none."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_tokens(NEW_TOKENS)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a photo of a <cpt> <cpt>_1").input_ids)
    boundary = [] if TRANSFORMERS_5 else ["▁"]
    assert pieces == ["▁a", "▁photo", "▁of", "▁a", *boundary, "<cpt>", *boundary, "<cpt>_1", "</s>"]


@pytest.mark.parametrize("flags", [{"lstrip": True}, {"normalized": False}], ids=["lstrip", "not-normalized"])
@pytest.mark.parametrize("prompt", ["a photo of a <cpt> <cpt>_1", "a photo of a <cpt><cpt>_1"])
def test_added_tokens_split_the_same_on_transformers_4_and_5(flags, prompt):
    tokenizer = build_tiny_tokenizer()
    first_new = len(tokenizer)
    tokenizer.add_tokens([AddedToken(token, **flags) for token in NEW_TOKENS])
    ids = tokenizer(prompt).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["▁a", "▁photo", "▁of", "▁a", "<cpt>", "<cpt>_1", "</s>"]
    assert ids == [5, 8, 9, 5, first_new, first_new + 1, 1] and first_new == 486

"""Build a tiny random-weight Wan 2.1 T2V pipeline on disk, offline, from the real diffusers/transformers classes.

    python -m tests.tiny_wan /tmp/tiny-wan

The layout follows Wan-AI/Wan2.1-T2V-1.3B-Diffusers: a UMT5EncoderModel (the encoder of google/umt5-xxl) with a
T5TokenizerFast, a WanTransformer3DModel, the Wan 2.1 VAE (AutoencoderKLWan: 16 latent channels, 8x spatial and 4x
temporal downsampling) and the flow UniPC scheduler. The models are built from the published configs committed under
benchmarks/configs/wan2.1-t2v-1.3b with only their sizes changed (tests/fixtures/README.md lists what is kept), so a
64 px image is one latent frame of 8x8, 16 tokens for the transformer.

The tokenizer has UMT5's layout (<pad>=0, </s>=1, <s>=2, <unk>=3, EOS appended and no BOS, a SentencePiece Unigram
model that writes spaces as "▁", then the 300 sentinels <extra_id_299> ... <extra_id_0>) with a small listed
vocabulary in which every word of WORDS is one piece, after a space ("▁robot") and bare ("robot"). Its files are
written as transformers' T5 converter wrote the published ones, so each transformers version reads them as it reads
the published tokenizer. The embedding table has 84 rows more than the tokenizer, like the published one (256,384
rows for 256,300 tokens). The text encoder is 32 wide and the transformer 24, so that a mix-up of text_dim and the
transformer's width fails loudly.
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

PUBLISHED = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "wan2.1-t2v-1.3b"
TEXT_ENCODER_WIDTH = 32
TRANSFORMER_HEADS, TRANSFORMER_HEAD_DIM = 2, 12  # width 24; the rotary embedding splits 12 into 4 + 4 + 4
VAE_BASE_DIM = 8  # published 96; dim_mult (1, 2, 4, 4) and the downsampling are kept
EXTRA_IDS = 300  # UMT5's sentinels, as published
TABLE_PADDING = 84  # embedding rows past the tokenizer, as published: 256,384 - 256,300
SPECIAL_TOKENS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0-3, as in UMT5
VERY_LARGE_INTEGER = int(1e30)  # model_max_length of the google/umt5 tokenizers: transformers' "no limit"

# Every word that must be one piece; the rest of the text falls back to single characters.
# fmt: off
WORDS = [
    "a", "an", "the", "photo", "of", "on", "in", "with", "and", "at", "my", "one", "style", "painting", "picture",
    "rendering", "rendition", "cropped", "close-up", "bright", "dark", "clean", "dirty", "cool", "nice", "good",
    "small", "large", "weird", "robot", "toy", "dog", "cat", "red", "backpack", "beach", "snow", "jungle", "city",
    "street", "japanese", "modern", "background", "table",
]
# fmt: on


def _pieces():
    """(piece, log-probability) in SentencePiece order: a whole word scores above any split of it."""
    pieces = dict.fromkeys(SPECIAL_TOKENS, 0.0)
    pieces["▁"] = -2.0
    pieces.update({"▁" + word: -6.0 for word in WORDS})
    pieces.update(dict.fromkeys(WORDS, -8.0))
    for code in range(33, 127):  # printable ASCII, one piece each, as a fallback
        pieces.setdefault(chr(code), -12.0)
    return list(pieces.items()) + [(f"<extra_id_{i}>", 0.0) for i in reversed(range(EXTRA_IDS))]


def _backend():
    """The tokenizers.Tokenizer that transformers' T5Converter makes of a SentencePiece model (legacy, as published):
    strip and squeeze spaces, "▁" before every word, EOS appended. The published file also has the SentencePiece
    NFKC charsmap first, which leaves ASCII text unchanged."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    backend = Tokenizer(models.Unigram(_pieces(), unk_id=SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return backend


def write_tokenizer(folder):
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json with the fields of the published ones."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    backend = _backend()
    backend.save(str(folder / "tokenizer.json"))
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    first_sentinel = backend.get_vocab_size() - EXTRA_IDS
    added = {str(i): {"content": token, **flags, "special": True} for i, token in enumerate(SPECIAL_TOKENS)}
    added.update(
        {str(first_sentinel + i): {"content": f"<extra_id_{EXTRA_IDS - 1 - i}>", **flags, "special": True}
         for i in range(EXTRA_IDS)}
    )  # fmt: skip
    sentinels = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    named = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": sentinels,
        **named,
        "clean_up_tokenization_spaces": True,
        "extra_ids": EXTRA_IDS,
        "legacy": True,
        "model_max_length": VERY_LARGE_INTEGER,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "T5Tokenizer",
    }
    special = {"additional_special_tokens": sentinels, **{k: {"content": v, **flags} for k, v in named.items()}}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return folder


def build_tiny_tokenizer():
    """The T5TokenizerFast this transformers version makes of the tokenizer files (see write_tokenizer)."""
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = T5TokenizerFast.from_pretrained(write_tokenizer(Path(folder) / "tokenizer"))
    for word in WORDS:
        if tokenizer.tokenize(f"a {word}") != ["▁a", f"▁{word}"]:
            raise RuntimeError(f"{word!r} is not one piece: {tokenizer.tokenize(f'a {word}')}")
    return tokenizer


def published(name):
    """A published config of benchmarks/configs/wan2.1-t2v-1.3b without the bookkeeping keys."""
    config = json.loads((PUBLISHED / f"{name}.json").read_text())
    bookkeeping = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "torch_dtype")
    return {k: v for k, v in config.items() if k not in (*bookkeeping, "transformers_version")}


def build_tiny_wan(seed=0):
    """Return a WanPipeline with random weights (about 0.7M parameters, most in the VAE) and the listed tokenizer."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel.from_config(
        {
            **published("transformer"),
            "num_attention_heads": TRANSFORMER_HEADS,
            "attention_head_dim": TRANSFORMER_HEAD_DIM,
            "ffn_dim": 2 * TRANSFORMER_HEADS * TRANSFORMER_HEAD_DIM,
            "freq_dim": 16,
            "num_layers": 2,
            "text_dim": TEXT_ENCODER_WIDTH,
        }
    )
    vae = AutoencoderKLWan.from_config({**published("vae"), "base_dim": VAE_BASE_DIM, "num_res_blocks": 1})
    scheduler = UniPCMultistepScheduler.from_config(published("scheduler"))
    text_config = {
        **published("text_encoder"),
        "vocab_size": len(tokenizer) + TABLE_PADDING,
        "d_model": TEXT_ENCODER_WIDTH,
        "d_kv": 8,
        "d_ff": 2 * TEXT_ENCODER_WIDTH,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
    }
    text_encoder = UMT5EncoderModel(UMT5Config(**text_config))
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def save_tiny_wan(output_dir, seed=0):
    """Build the tiny pipeline and save it like the published Wan checkpoints are stored; return the folder."""
    output_dir = Path(output_dir)
    build_tiny_wan(seed).save_pretrained(output_dir)
    # The tokenizer files as published, whichever transformers saved them; model_index names the class they name.
    write_tokenizer(output_dir / "tokenizer")
    model_index = json.loads((output_dir / "model_index.json").read_text())
    model_index["tokenizer"] = ["transformers", "T5TokenizerFast"]
    (output_dir / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return output_dir


def main():
    parser = argparse.ArgumentParser(description="Write a tiny random-weight Wan 2.1 T2V pipeline to a folder.")
    parser.add_argument("output_dir", help="Folder to write the pipeline to (model_index.json and components).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args()
    print(save_tiny_wan(args.output_dir, args.seed))


if __name__ == "__main__":
    main()

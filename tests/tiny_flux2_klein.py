"""Build a tiny random-weight FLUX.2 [klein] pipeline on disk, offline, from the real diffusers/transformers classes.

    python -m tests.tiny_flux2_klein /tmp/tiny-flux2-klein [--distilled]

The layout follows black-forest-labs/FLUX.2-klein-base-4B (and, with --distilled, FLUX.2-klein-4B): a Qwen3ForCausalLM
text encoder (Qwen3-4B) with a Qwen2TokenizerFast, a Flux2Transformer2DModel, the FLUX.2 VAE (AutoencoderKLFlux2: 32
latent channels, 8x downsampling, 2x2 patches normalized by a batch norm) and FlowMatchEulerDiscreteScheduler. The
models are built from the configs committed under benchmarks/configs/flux2-klein-base-4b with only their sizes changed
(tests/fixtures/README.md lists what is kept), so a 64 px image is 4x4 patches, 16 tokens for the transformer.

Flux2KleinPipeline encodes a prompt as the Qwen3 chat template of one user turn (generation prompt, thinking off),
padded to 512 tokens, and stacks the hidden states after layers 9, 18 and 27 on the feature axis; the text encoder
keeps the published 36 layers so that these are inner layers, as in Qwen3-4B. It is 32 wide (joint_attention_dim 96)
and the transformer 48, so that a mix-up of the two fails loudly.

The tokenizer has Qwen2's layout (byte-level BPE after Qwen's split regex, NFC, no BOS or EOS added, right padding,
the 256 bytes first, then the merged pieces, then the 26 added tokens of Qwen3 from <|endoftext|>) with a small
vocabulary learned at build time, deterministically and without the tokenizers trainer, from the built-in corpus, so
that every word of WORDS is one token after a space ("Ġrobot") and bare ("robot"). The embedding table has 267 rows
more than the tokenizer, like the published one (151,936 rows for 151,669 tokens), and is tied to the LM head.
"""

import argparse
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch

PUBLISHED = Path(__file__).resolve().parent.parent / "benchmarks" / "configs" / "flux2-klein-base-4b"
TEXT_ENCODER_WIDTH = 32
TEXT_ENCODER_HEADS, TEXT_ENCODER_KV_HEADS, TEXT_ENCODER_HEAD_DIM = 4, 1, 16  # grouped 4:1 like 32:8 published
TRANSFORMER_HEADS, TRANSFORMER_HEAD_DIM = 3, 16  # width 48; the rotary embedding splits 16 into 4 + 4 + 4 + 4
HIDDEN_STATES_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
VAE_BLOCK_OUT_CHANNELS = (8, 16, 16, 16)  # published (128, 256, 512, 512): four stages, 8x downsampling
TABLE_PADDING = 267  # embedding rows past the tokenizer, as published: 151,936 - 151,669
# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer and the published tokenizer.json).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

# Every word that must be one token; the rest of the text falls back to shorter pieces and single bytes.
# fmt: off
WORDS = [
    "a", "an", "the", "photo", "of", "on", "in", "with", "and", "at", "my", "one", "style", "painting", "picture",
    "rendering", "rendition", "cropped", "close", "bright", "dark", "clean", "dirty", "cool", "nice", "good",
    "small", "large", "weird", "robot", "toy", "dog", "cat", "red", "backpack", "beach", "snow", "jungle", "city",
    "street", "japanese", "modern", "background", "table", "user", "assistant", "system",
]
# fmt: on
CORPUS = [
    "a photo of a dog",
    "a rendering of a robot toy",
    "a painting of a red dog in the snow",
    "a cropped photo of the cat on the beach",
    "a close-up photo of a cat in the jungle",
    "a modern city street in the background",
    "a dog in the style of a japanese painting",
    "one small dog and one large cat on the table",
    "a good, clean and cool picture of a nice cat",
    "a dark and weird rendition of a dirty robot",
    "high quality, detailed, bright colors and soft light.",
]
# Qwen3's added tokens in their published order (ids 151,643 to 151,668); the first 14 are special.
# fmt: off
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
OTHER_ADDED_TOKENS = [
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]
# fmt: on
PUBLISHED_FIRST_ADDED_ID = 151643


def published(name):
    """A published config of benchmarks/configs/flux2-klein-base-4b without the bookkeeping keys."""
    config = json.loads((PUBLISHED / f"{name}.json").read_text())
    bookkeeping = ("_class_name", "_diffusers_version", "_name_or_path", "architectures", "torch_dtype")
    return {k: v for k, v in config.items() if k not in (*bookkeeping, "transformers_version")}


def chat_template():
    """Qwen3's chat template, from the published tokenizer_config.json."""
    return json.loads((PUBLISHED / "tokenizer_config.json").read_text())["chat_template"]


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def _corpus_pieces():
    """Pre-tokens of the corpus (the words bare and after a space, and each prompt in the chat template)."""
    from jinja2 import Template

    template = Template(chat_template())
    texts = [*WORDS, *(f"a {word}" for word in WORDS), *CORPUS]
    texts += [
        template.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True, enable_thinking=False)
        for text in CORPUS
    ]
    pre_tokenizer = _pre_tokenizer()
    pieces = Counter()
    for text in texts:
        for token in SPECIAL_TOKENS + OTHER_ADDED_TOKENS:
            text = text.replace(token, "\x00")  # added tokens are matched before the BPE model sees the text
        for part in filter(None, text.split("\x00")):
            pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(part))
    return pieces


def _learn_merges(pieces):
    """Byte-level BPE merges that make every corpus piece one token: repeatedly merge the most frequent pair (ties:
    the smaller pair), as BPE training does. Plain Python, so every tokenizers version gets the same vocabulary."""
    words = {tuple(piece): count for piece, count in sorted(pieces.items())}
    merges = []
    while True:
        pairs = Counter()
        for symbols, count in words.items():
            pairs.update(dict.fromkeys(zip(symbols[:-1], symbols[1:], strict=True), count))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged = {}
        for symbols, count in words.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = count
        words = merged


def _byte_alphabet():
    """The 256 byte symbols in GPT-2/Qwen order (ids 0-255 of the published vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    codes = dict(zip(printable, printable, strict=True)) | {b: 256 + i for i, b in enumerate(shifted)}
    return [chr(codes[b]) for b in [*printable, *shifted]]


def _vocab_and_merges():
    merges = _learn_merges(_corpus_pieces())
    vocab = {symbol: i for i, symbol in enumerate(_byte_alphabet())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def _backend(vocab, merges):
    """The tokenizers.Tokenizer of the published tokenizer.json: NFC, Qwen's split then byte level, BPE, the added
    tokens after the vocabulary (all unnormalized, the first 14 special)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _pre_tokenizer()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.add_tokens(
        [AddedToken(token, normalized=False, special=token in SPECIAL_TOKENS) for token in SPECIAL_TOKENS]
        + [AddedToken(token, normalized=False, special=False) for token in OTHER_ADDED_TOKENS]
    )
    return backend


def write_tokenizer(folder):
    """tokenizer.json, tokenizer_config.json, vocab.json and merges.txt as Qwen3-4B publishes them, the added ids
    moved down to follow the small vocabulary."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    vocab, merges = _vocab_and_merges()
    _backend(vocab, merges).save(str(folder / "tokenizer.json"))
    config = json.loads((PUBLISHED / "tokenizer_config.json").read_text())
    added = config["added_tokens_decoder"].items()
    config["added_tokens_decoder"] = {str(int(i) - PUBLISHED_FIRST_ADDED_ID + len(vocab)): t for i, t in added}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges))
    return folder


def build_tiny_tokenizer():
    """The Qwen2TokenizerFast (Qwen2Tokenizer on transformers 5) this transformers version makes of the files."""
    from transformers import Qwen2TokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        tokenizer = Qwen2TokenizerFast.from_pretrained(write_tokenizer(Path(folder) / "tokenizer"))
    for word in WORDS:
        for text in (word, f"a {word}"):
            if len(tokenizer.tokenize(text)) != len(text.split()):
                raise RuntimeError(f"{text!r} is not tokenized word by word: {tokenizer.tokenize(text)}")
    return tokenizer


def build_tiny_flux2_klein(seed=0, distilled=False):
    """Return a Flux2KleinPipeline with random weights (about 0.7M parameters, 0.43M of them in the text encoder) and
    the listed tokenizer; distilled sets the pipeline's is_distilled (FLUX.2-klein-4B: true, no classifier-free
    guidance; the base models: false)."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel.from_config(
        {
            **published("transformer"),
            "num_attention_heads": TRANSFORMER_HEADS,
            "attention_head_dim": TRANSFORMER_HEAD_DIM,
            "axes_dims_rope": [TRANSFORMER_HEAD_DIM // 4] * 4,
            "joint_attention_dim": len(HIDDEN_STATES_LAYERS) * TEXT_ENCODER_WIDTH,
            "num_layers": 1,
            "num_single_layers": 2,
        }
    )
    vae = AutoencoderKLFlux2.from_config(
        {**published("vae"), "block_out_channels": VAE_BLOCK_OUT_CHANNELS, "layers_per_block": 1, "norm_num_groups": 8}
    )
    # The published VAE carries the latents' statistics in its batch norm; random ones make a missing
    # normalization visible (mean 0 and variance 1 would hide it).
    generator = torch.Generator().manual_seed(seed)
    vae.bn.running_mean.copy_(0.5 * torch.randn(vae.bn.num_features, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.num_features, generator=generator))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(published("scheduler"))
    text_config = {
        **published("text_encoder"),
        "vocab_size": len(tokenizer) + TABLE_PADDING,
        "hidden_size": TEXT_ENCODER_WIDTH,
        "intermediate_size": 2 * TEXT_ENCODER_WIDTH,
        "num_attention_heads": TEXT_ENCODER_HEADS,
        "num_key_value_heads": TEXT_ENCODER_KV_HEADS,
        "head_dim": TEXT_ENCODER_HEAD_DIM,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**text_config))
    return Flux2KleinPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=distilled,
    )


def save_tiny_flux2_klein(output_dir, seed=0, distilled=False):
    """Build the tiny pipeline and save it like the published FLUX.2 [klein] checkpoints are stored; return the
    folder."""
    output_dir = Path(output_dir)
    build_tiny_flux2_klein(seed, distilled).save_pretrained(output_dir)
    # The tokenizer files as published, whichever transformers saved them; model_index names the class they name.
    write_tokenizer(output_dir / "tokenizer")
    model_index = json.loads((output_dir / "model_index.json").read_text())
    model_index["tokenizer"] = ["transformers", "Qwen2TokenizerFast"]
    (output_dir / "model_index.json").write_text(json.dumps(model_index, indent=2, sort_keys=True) + "\n")
    return output_dir


def main():
    parser = argparse.ArgumentParser(description="Write a tiny random-weight FLUX.2 [klein] pipeline to a folder.")
    parser.add_argument("output_dir", help="Folder to write the pipeline to (model_index.json and components).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument(
        "--distilled", action="store_true", help="is_distilled true, as FLUX.2-klein-4B (default: the base model)."
    )
    args = parser.parse_args()
    print(save_tiny_flux2_klein(args.output_dir, args.seed, args.distilled))


if __name__ == "__main__":
    main()

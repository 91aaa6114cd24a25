"""Build a tiny random-weight SANA pipeline on disk, offline, from the real diffusers/transformers classes.

    python -m tests.tiny_sana /tmp/tiny-sana

The layout follows Efficient-Large-Model/Sana_1600M_1024px_diffusers: a Gemma2Model text encoder (the decoder of
gemma-2-2b-it) with a Gemma tokenizer, a SanaTransformer2DModel, a DC-AE (AutoencoderDC) that downsamples by 32
like dc-ae-f32c32-sana-1.0, and the flow DPM-Solver scheduler the published checkpoints ship. The transformer's
sample_size is 2, so its default resolution is 64 px; SanaPipeline's resolution binning only knows sample sizes
16/32/64/128, so call the pipeline with use_resolution_binning=False.

The tokenizer has Gemma's layout (<pad>=0, <eos>=1, <bos>=2, <unk>=3, BOS prepended, BPE with byte fallback, spaces
written as "▁" and no dummy prefix) but its small vocabulary is trained at build time, deterministically, on the
built-in corpus below, so that caption words such as "dog" or "robot" are single tokens. The text encoder is 64 wide
and the transformer 32 wide, so that a mix-up of caption_channels and cross_attention_dim fails loudly.
"""

import argparse
import json
from pathlib import Path

import torch

TEXT_ENCODER_WIDTH = 64
TRANSFORMER_WIDTH = 32
LATENT_CHANNELS = 4
VAE_BLOCK_OUT_CHANNELS = (8, 8, 16, 16, 32, 32)  # six stages: five downsamplings, a factor of 32
IMAGE_SIZE = 64
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4, as in Gemma
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]  # byte fallback, as in Gemma

# Every word that must be a single token, both at the start of a text ("dog") and after a space ("▁dog").
# fmt: off
WORDS = [
    "a", "an", "the", "photo", "of", "dog", "cat", "robot", "toy", "red", "in", "on", "with", "style", "painting",
    "rendering", "cropped", "close-up", "bright", "dark", "clean", "dirty", "cool", "nice", "small", "large", "weird",
    "good", "my", "one", "rendition", "picture", "japanese", "modern", "city", "street", "background", "snow",
    "beach", "jungle",
]
# fmt: on
CORPUS = [
    "a photo of a dog",
    "a photo of the cat",
    "a rendering of a robot toy",
    "a painting of a red dog in the snow",
    "a cropped photo of the dog on the beach",
    "a close-up photo of a cat in the jungle",
    "a bright photo of the robot",
    "a dark photo of a toy",
    "a clean photo of my dog",
    "a dirty photo of the cat",
    "a cool photo of a robot",
    "a nice picture of one dog",
    "a small toy on a large beach",
    "a weird rendition of a cat",
    "a good photo of my toy",
    "a japanese painting of a dog",
    "a modern city street in the background",
    "an oil painting of a cat with a red toy",
    "a dog in the style of a japanese painting",
    "a robot on a city street at night",
    "a cat and a dog in the snow",
    "one small dog and one large cat on the beach",
    "an old robot with a dog in the jungle",
    "a picture of a cat in the style of modern art",
    "a close-up rendering of a small red robot",
    "the cat is sleeping on a warm sunny windowsill",
    "a busy city street with people and a bus",
    "a detailed image of a white cat with blue eyes",
    "high quality, detailed, bright colors and soft light",
    "a photo of an old dog in the background",
    "a dark and weird rendition of a dirty robot",
    "a good, clean and cool picture of a nice cat",
    "a cropped painting of an orange cat",
]


def _train_vocab():
    """Train the BPE vocabulary and merges on CORPUS (deterministic: the same corpus gives the same ids)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    # Training splits words before "▁" so that no merge crosses a word boundary; at run time Gemma's tokenizer does
    # not split at all, which then gives the same tokens.
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    alphabet = [chr(c) for c in range(33, 127)] + ["▁", "\n"]
    trainer = trainers.BpeTrainer(
        vocab_size=2000,  # an upper bound: training stops when every corpus word is one token (601 tokens)
        special_tokens=SPECIAL_TOKENS + BYTE_TOKENS,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS + WORDS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(merge) for merge in model["merges"]]


def build_tiny_tokenizer():
    """A GemmaTokenizer (tokenizers-backed) with Gemma's special ids, BOS prepended and right padding."""
    import transformers

    vocab, merges = _train_vocab()
    options = {"add_bos_token": True, "add_eos_token": False, "padding_side": "right", "model_max_length": 1_000_000}
    if int(transformers.__version__.split(".")[0]) >= 5:
        tokenizer = transformers.GemmaTokenizer(vocab=vocab, merges=merges, **options)
    else:  # transformers 4: the tokenizers-backed class is GemmaTokenizerFast, given the same backend
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

        backend = Tokenizer(
            models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
        )
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        special = dict(
            zip(("pad_token", "eos_token", "bos_token", "unk_token", "mask_token"), SPECIAL_TOKENS, strict=True)
        )
        tokenizer = transformers.GemmaTokenizerFast(tokenizer_object=backend, **special, **options)
    for word in WORDS:
        for text in (word, "a " + word):
            if len(tokenizer.tokenize(text)) != len(text.split()):
                raise RuntimeError(f"{text!r} is not tokenized word by word: {tokenizer.tokenize(text)}")
    return tokenizer


def build_tiny_sana(seed=0):
    """Return a SanaPipeline with random weights (about 0.3M parameters, 1.3 MB on disk) and the trained tokenizer."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_tiny_tokenizer()
    vae_scale_factor = 2 ** (len(VAE_BLOCK_OUT_CHANNELS) - 1)

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=TRANSFORMER_WIDTH // 2,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=TRANSFORMER_WIDTH // 2,
        cross_attention_dim=TRANSFORMER_WIDTH,
        caption_channels=TEXT_ENCODER_WIDTH,
        mlp_ratio=2.5,
        attention_bias=False,
        sample_size=IMAGE_SIZE // vae_scale_factor,
        patch_size=1,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        qk_norm="rms_norm_across_heads",  # SANA 1.5 (SANA1.5_1.6B_1024px_diffusers); SANA 1.0 has none
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=LATENT_CHANNELS,
        attention_head_dim=8,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        decoder_block_out_channels=VAE_BLOCK_OUT_CHANNELS,
        encoder_layers_per_block=(1,) * 6,
        decoder_layers_per_block=(1,) * 6,
        encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        decoder_qkv_multiscales=((),) * 3 + ((5,),) * 3,
        downsample_block_type="Conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    # What scripts/convert_sana_to_diffusers.py saves for the 512 to 2048 px checkpoints (flow-dpm_solver).
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_ENCODER_WIDTH,
            intermediate_size=2 * TEXT_ENCODER_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
        )
    )
    return SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def save_tiny_sana(output_dir, seed=0):
    """Build the tiny pipeline and save it like the published SANA checkpoints are stored; return the folder."""
    output_dir = Path(output_dir)
    build_tiny_sana(seed).save_pretrained(output_dir)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description="Write a tiny random-weight SANA pipeline to a folder.")
    parser.add_argument("output_dir", help="Folder to write the pipeline to (model_index.json and components).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args()
    print(save_tiny_sana(args.output_dir, args.seed))


if __name__ == "__main__":
    main()

"""Build a tiny random-weight SDXL pipeline on disk, offline, from the real diffusers/transformers classes.

    python -m tests.tiny_sdxl /tmp/tiny-sdxl

The tokenizers use the real CLIP BPE vocabulary (49,408 tokens, committed under tests/fixtures/clip_tokenizer),
so words tokenize exactly as in stabilityai/stable-diffusion-xl-base-1.0; every config and tokenizer field that
changes behaviour takes the published value (tests/fixtures/README.md lists them). The two text encoders have different
widths (32 and 48) so that a mix-up of encoder 1 and encoder 2 fails loudly. The VAE downsamples by 8, like SDXL's.
"""

import argparse
import json
import logging
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CLIP_VOCAB = 49408
TEXT_ENCODER_WIDTH = 32
TEXT_ENCODER_2_WIDTH = 48
TEXT_ENCODER_2_PROJECTION = 32


# The special ids of the text encoder configs published with stabilityai/stable-diffusion-xl-base-1.0 (both encoders):
# the legacy CLIP ids, with which transformers pools at argmax(input_ids). "fixed" are the tokenizer's own ids (49406,
# 49407), which make transformers pool at the first end-of-text token; tests build both from the same weights.
SPECIAL_IDS = {
    "published": {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "fixed": {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
}


def _clip_config(width, hidden_act, projection_dim=None, special_ids="published"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim or width,
        hidden_act=hidden_act,  # published: quick_gelu (CLIP ViT-L), gelu (OpenCLIP bigG)
        layer_norm_eps=1e-5,
        **SPECIAL_IDS[special_ids],
    )


def _tokenizer(pad_token):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(FIXTURES / "clip_tokenizer" / "vocab.json"),
        str(FIXTURES / "clip_tokenizer" / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


def build_tiny_sdxl(seed=0, special_ids="published"):
    """Return a StableDiffusionXLPipeline with random weights (about 6M parameters, 2 MB of UNet); special_ids
    picks the text encoders' bos/eos/pad ids (see SPECIAL_IDS), which leaves the weights unchanged."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_ENCODER_2_PROJECTION,
        cross_attention_dim=TEXT_ENCODER_WIDTH + TEXT_ENCODER_2_WIDTH,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    scheduler_config = json.loads((FIXTURES / "sdxl_scheduler_config.json").read_text())
    scheduler = EulerDiscreteScheduler.from_config(scheduler_config)
    text_encoder = CLIPTextModel(_clip_config(TEXT_ENCODER_WIDTH, "quick_gelu", special_ids=special_ids))
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_config(TEXT_ENCODER_2_WIDTH, "gelu", TEXT_ENCODER_2_PROJECTION, special_ids=special_ids)
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer("<|endoftext|>"),
        tokenizer_2=_tokenizer("!"),
        unet=unet,
        scheduler=scheduler,
    )


def _write_clip_tokenizer(folder, pad_token):
    """The tokenizer files in the layout of the published SDXL checkpoints (vocab.json + merges.txt)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(FIXTURES / "clip_tokenizer" / name, folder / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    special["pad_token"] = pad_token
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_tiny_sdxl(output_dir, seed=0, special_ids="published"):
    """Build the tiny pipeline and save it like the published SDXL checkpoints are stored; return the folder."""
    output_dir = Path(output_dir)
    build_tiny_sdxl(seed, special_ids).save_pretrained(output_dir)
    _write_clip_tokenizer(output_dir / "tokenizer", "<|endoftext|>")
    _write_clip_tokenizer(output_dir / "tokenizer_2", "!")
    return output_dir


def main():
    parser = argparse.ArgumentParser(description="Write a tiny random-weight SDXL pipeline to a folder.")
    parser.add_argument("output_dir", help="Folder to write the pipeline to (model_index.json and components).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    parser.add_argument(
        "--special_ids",
        choices=sorted(SPECIAL_IDS),
        default="published",
        help="The text encoders' bos/eos/pad ids: as published (0, 2, 1) or the tokenizer's own (49406, 49407, 1).",
    )
    args = parser.parse_args()
    # transformers' notice that image processors fall back to PIL without torchvision: nothing to act on here
    noise = logging.getLogger("transformers.utils.import_utils")
    noise.addFilter(lambda record: "requires torchvision" not in record.getMessage())
    print(save_tiny_sdxl(args.output_dir, args.seed, args.special_ids))


if __name__ == "__main__":
    main()

"""Build tiny random-weight evaluation models on disk, offline: DINOv2, SigLIP and CLIP, each with its processor.

    python -m tests.tiny_evaluators /tmp/tiny-evaluators

The image processors are configured like those of facebook/dinov2-base (BitImageProcessor: resize the short side,
center crop, ImageNet mean and std), google/siglip-base-patch16-512 (SiglipImageProcessor: resize to a square,
scale to [-1, 1]) and openai/clip-vit-large-patch14 (CLIPImageProcessor), at 28-32 px. CLIP uses the real CLIP BPE
vocabulary of tests/fixtures/clip_tokenizer.

SigLIP's own tokenizer class (SiglipTokenizer) reads a SentencePiece model file and needs the sentencepiece package,
which the project does not install. The tiny SigLIP ships a T5Tokenizer instead: the tokenizers-backed class of the
same kind of tokenizer (a SentencePiece-style Unigram vocabulary, "▁" for spaces, </s> appended, </s> as padding, 64
positions), with a vocabulary of whole words and single characters built from WORDS below. AutoTokenizer loads it
from tokenizer.json, so evaluate.py reads it through its normal path.
"""

import argparse
import string
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SIGLIP_TEXT_LENGTH = 64  # google/siglip-base-patch16-512 pads every text to 64 tokens
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# fmt: off
WORDS = [
    "a", "an", "the", "of", "in", "on", "with", "photo", "dog", "cat", "robot", "toy", "jungle", "snow", "beach",
    "red", "purple", "shiny", "wet", "street", "city", "background", "top", "wooden", "floor", "style", "painting",
]
# fmt: on


def build_tiny_dinov2(seed=0):
    """(Dinov2Model, BitImageProcessor): 16 wide, one layer, 14 px patches on 28 px crops."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                     image_size=28, patch_size=14))  # fmt: skip
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 28, "width": 28},
        do_center_crop=True,
        resample=3,  # bicubic
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return model.eval(), processor


def build_tiny_siglip_tokenizer():
    """A T5Tokenizer with SigLIP's layout: <pad>=0, </s>=1 (also the padding), <unk>=2, then words and characters."""
    import transformers

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{word}", -2.0) for word in WORDS] + [("▁", -3.0)] + [(c, -5.0) for c in characters]
    options = {"extra_ids": 0, "pad_token": "</s>", "model_max_length": SIGLIP_TEXT_LENGTH}
    if int(transformers.__version__.split(".")[0]) >= 5:
        return transformers.T5Tokenizer(vocab=vocab, **options)
    # transformers 4: the tokenizers-backed class is T5TokenizerFast, given the backend transformers 5 builds
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    metaspace = {"replacement": "▁", "prepend_scheme": "always", "split": True}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)]
    )
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", **options)


def build_tiny_siglip(seed=0):
    """(SiglipModel, SiglipImageProcessor, tokenizer): 16 wide towers, 32 px images, a logit scale of log(10) and
    a bias of -2 so that scores are not all 0.5."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tokenizer = build_tiny_siglip_tokenizer()
    torch.manual_seed(seed)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": SIGLIP_TEXT_LENGTH,
                     "pad_token_id": 1, "eos_token_id": 1, "bos_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 16},
    )  # fmt: skip
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(10.0)).item())
        model.logit_bias.fill_(-2.0)
    processor = SiglipImageProcessor(size={"height": 32, "width": 32}, resample=3, image_mean=[0.5] * 3,
                                     image_std=[0.5] * 3)  # fmt: skip
    return model, processor, tokenizer


def build_tiny_clip(seed=0):
    """(CLIPModel, CLIPImageProcessor, CLIPTokenizer): 16 wide towers projected to 8, 32 px images."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(str(FIXTURES / "clip_tokenizer" / "vocab.json"),
                              str(FIXTURES / "clip_tokenizer" / "merges.txt"), model_max_length=77)  # fmt: skip
    torch.manual_seed(seed)
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={**tower, "image_size": 32, "patch_size": 16},
        projection_dim=8,
    )  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPModel(config).eval(), processor, tokenizer


def save_tiny_evaluators(output_dir, seed=0):
    """Write dinov2/, siglip/ and clip/ under output_dir (model, processor, tokenizer); return {name: folder}."""
    output_dir = Path(output_dir)
    builders = {"dinov2": build_tiny_dinov2, "siglip": build_tiny_siglip, "clip": build_tiny_clip}
    folders = {}
    for name, build in builders.items():
        folders[name] = output_dir / name
        for part in build(seed):
            part.save_pretrained(folders[name])
    return folders


def main():
    parser = argparse.ArgumentParser(description="Write tiny random-weight DINOv2, SigLIP and CLIP models.")
    parser.add_argument("output_dir", help="Folder to write dinov2/, siglip/ and clip/ to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights.")
    args = parser.parse_args()
    import logging

    notices = logging.getLogger("transformers.utils.import_utils")  # the PIL image processors are what is wanted
    notices.addFilter(lambda record: "requires torchvision" not in record.getMessage())
    for name, folder in save_tiny_evaluators(args.output_dir, args.seed).items():
        print(name, folder)


if __name__ == "__main__":
    main()

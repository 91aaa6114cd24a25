#!/usr/bin/env python
# Copyright 2026 The DTI diffusers authors. Licensed under the Apache License, Version 2.0.
"""Directional Textual Inversion (DTI) for Stable Diffusion XL.

Learns a personal concept token on both SDXL text encoders (CLIP ViT-L and OpenCLIP bigG). The embedding norm is
fixed to an in-distribution value m* (the mean norm of the vocabulary rows); only the direction is learned, on the
unit hypersphere, by Riemannian SGD with a von Mises-Fisher prior toward the class word (arXiv 2512.13672).

    accelerate launch train_dti_sdxl.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --train_data_dir assets/toy_robot --placeholder_token "<my-robot>" --initializer_token robot --output_dir out

The outputs load with `pipe.load_textual_inversion(...)` in diffusers and in ComfyUI / A1111 (see README.md).
"""

import argparse
import atexit
import contextlib
import errno
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from diffusers.optimization import get_scheduler
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

__version__ = "0.1.0"

logger = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Templates and constants
# ----------------------------------------------------------------------------------------------------------------

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CONVERTIBLE_MODES = {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "PA"}
DEFAULT_LEARNING_RATE = {"dti": 1e-2, "ti": 5e-3, "crossinit": 5e-3}
DEFAULT_KAPPA = 1e-4
DEFAULT_CROSSINIT_LAMBDA = 1e-5
DEFAULT_LORA_LEARNING_RATE = 1e-4
DEFAULT_LORA_TARGETS = "to_q,to_k,to_v,to_out.0"  # the attention projections, as diffusers' LoRA scripts
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for
DEFAULT_VALIDATION_PROMPT = "a {} with Japanese modern city street in the background"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
EMBEDDING_FILES = {"text_encoder": "learned_embeds", "text_encoder_2": "learned_embeds_2"}
COMBINED_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
CHECKPOINT_STATE = "dti_state.json"
# The line that makes a StableDiffusionXLPipeline pool CLIP-G at end-of-text (--pooled_output eos), as training did.
POOL_AT_END_OF_TEXT = "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id  # end-of-text"
OUTPUT_LOCK = ".dti-train.lock"
# The keys of a --concepts_list entry: the first two are required, then one of the two data sources.
CONCEPT_KEYS = ("placeholder_token", "initializer_token", "train_data_dir", "dataset_name", "num_vectors",
                "learnable_property", "validation_prompt", "output_dir")  # fmt: skip
MIN_FREE_BYTES = 64 * 2**20  # embeddings and checkpoints take kilobytes; validation images and logs a few MB


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_token_scale(value):
    """`--token_scale`: mean, min, max or a positive float."""
    if value in ("mean", "min", "max"):
        return value
    try:
        scale = float(value)
    except ValueError:
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        raise argparse.ArgumentTypeError(f"expected mean, min, max or a positive number, got {value!r}")
    return scale


class HelpFormatter(argparse.HelpFormatter):
    """Every fixed default written one way, 'Default: X.' after the text; switches (off unless given) and None
    defaults (explained in the text) get none."""

    def _get_help_string(self, action):
        text = (action.help or "").replace(" (default: %(default)s)", "")  # BooleanOptionalAction's, Python < 3.13
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "Default:" in text:
            return text
        return f"{text} Default: {'on' if default is True else '%(default)s'}."


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with usage errors printed as one line (the flag and what is wrong) instead of the full usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(input_args=None):
    parser = OneLineErrorParser(
        description="Directional Textual Inversion (DTI) for Stable Diffusion XL.",
        formatter_class=HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help="Hub id or local folder of an SDXL-architecture diffusers checkpoint.",
    )
    model.add_argument("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the model.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")
    model.add_argument(
        "--pooled_output",
        choices=["eos", "argmax"],
        default="eos",
        help="Where CLIP-G's pooled text embedding is taken. eos: at the end-of-text token, as SDXL was trained and "
        "as ComfyUI, A1111 and kohya pool. argmax: as the checkpoint's config says (the published eos_token_id 2 "
        "pools at argmax(input_ids), the new token): the legacy behaviour of plain diffusers and the authors' runs.",
    )

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="Folder with 3-6 images of the concept.")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Instead of --train_data_dir: a datasets Hub id or local path (image folder, parquet or arrow files).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    data.add_argument("--image_column", type=str, default="image", help="Image column of --dataset_name.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets caches --dataset_name.")
    data.add_argument(
        "--learnable_property",
        choices=["object", "style"],
        default="object",
        help="Prompt templates: 'a photo of a {}' for objects, 'a painting in the style of {}' for styles.",
    )
    data.add_argument("--repeats", type=int, default=100, help="How many times the images repeat in one epoch.")
    data.add_argument(
        "--resolution", type=int, default=768, help="Training resolution (square); a multiple of the VAE factor 8."
    )
    data.add_argument(
        "--center_crop", action="store_true", help="Crop the center of each image instead of a random crop."
    )
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    data.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Worker processes for data loading (0: main process)."
    )

    token = parser.add_argument_group("concept token")
    token.add_argument(
        "--placeholder_token", type=str, default=None, help="The new token, e.g. '<my-dog>'. No spaces. Required."
    )
    token.add_argument(
        "--initializer_token",
        type=str,
        default=None,
        help="The class word (e.g. 'dog'): the prior direction, and the initial direction with --init_method token. "
        "Required.",
    )
    token.add_argument(
        "--num_vectors",
        type=int,
        default=None,
        help="Vectors of the concept, named <tok>, <tok>_1, ... Default: one per token of the initializer.",
    )
    token.add_argument(
        "--concepts_list",
        type=str,
        default=None,
        help="Instead of --placeholder_token, --initializer_token and the data flags: a JSON file with a list of "
        "concepts, each {placeholder_token, initializer_token, train_data_dir or dataset_name} and optionally "
        "num_vectors, learnable_property, validation_prompt, output_dir, trained together in one run (each as its "
        "own run would train it). Outputs go to --output_dir/<placeholder>/ unless an entry names its output_dir; "
        "the other flags apply to every concept.",
    )
    token.add_argument(
        "--concepts_per_step",
        type=int,
        default=None,
        help="With --concepts_list: forward and backward this many concepts at a time within each step, to save "
        "memory (same result). Default: all.",
    )

    dti = parser.add_argument_group("DTI")
    dti.add_argument(
        "--method",
        choices=["dti", "ti", "crossinit"],
        default="dti",
        help="dti: fixed norm, direction on the sphere. ti: plain Textual Inversion (AdamW on the raw rows). "
        "crossinit: the CrossInit baseline (AdamW on raw rows that start at the text encoder's output for the "
        "initializer, pulled back to it by --crossinit_lambda).",
    )
    dti.add_argument(
        "--optimizer",
        choices=["rsgd", "adamw"],
        default="rsgd",
        help="dti only. rsgd: Riemannian SGD (the paper). adamw: AdamW on the direction, projected back to the sphere.",
    )
    dti.add_argument(
        "--token_scale",
        type=parse_token_scale,
        default="mean",
        help="dti only. The fixed norm m*: mean, min or max of the vocabulary norms, or a positive number.",
    )
    dti.add_argument(
        "--kappa",
        type=float,
        default=None,
        help=f"dti only. Concentration of the vMF prior toward the class word. Default: {DEFAULT_KAPPA}.",
    )
    dti.add_argument(
        "--beta",
        type=float,
        default=0.0,
        help="dti rsgd only. Running average of squared gradient norms; 0 is plain per-token normalisation.",
    )
    dti.add_argument(
        "--init_method",
        choices=["token", "random", "mean"],
        default="token",
        help="dti only. Initial direction: the class word, a seeded random direction, or the mean vocabulary row.",
    )
    dti.add_argument(
        "--crossinit_lambda",
        type=float,
        default=None,
        help="crossinit only. Weight of the pull toward the start: lambda * mean over the k x d elements of "
        f"(rows - initial rows)^2 is added to the loss (per text encoder). Default: {DEFAULT_CROSSINIT_LAMBDA}.",
    )

    lora = parser.add_argument_group("DTI + LoRA (pivotal tuning)")
    lora.add_argument(
        "--lora_rank",
        type=int,
        default=0,
        help="Rank of a LoRA on the denoiser trained next to the token (higher subject fidelity); 0: no LoRA.",
    )
    lora.add_argument("--lora_alpha", type=float, default=None, help="LoRA scale numerator (scale alpha/rank). "
                      "Default: --lora_rank.")  # fmt: skip
    lora.add_argument(
        "--lora_learning_rate",
        type=float,
        default=DEFAULT_LORA_LEARNING_RATE,
        help="AdamW learning rate of the LoRA (the token keeps --learning_rate and its optimizer).",
    )
    lora.add_argument(
        "--lora_start_step",
        type=int,
        default=0,
        help="Token-only steps before the LoRA starts training (the token finds its place first).",
    )
    lora.add_argument(
        "--lora_target_modules",
        type=str,
        default=DEFAULT_LORA_TARGETS,
        help="Comma-separated names of the denoiser's linear layers that get a LoRA (a layer matches when its "
        "name ends with one).",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="dti-model", help="Where embeddings and checkpoints go.")
    train.add_argument(
        "--overwrite", action="store_true", help="Allow --output_dir to hold another concept's run (it is replaced)."
    )
    train.add_argument("--seed", type=int, default=None, help="Seed of every random draw. Default: a random seed.")
    train.add_argument("--train_batch_size", type=int, default=4, help="Batch size per process.")
    train.add_argument("--max_train_steps", type=int, default=400, help="Number of update steps.")
    train.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per update step."
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations of the UNet and text encoders in the backward pass to save memory.",
    )
    train.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet for training (the first steps are slow while it compiles; validation is not).",
    )
    train.add_argument(
        "--compile_backend",
        type=str,
        default="inductor",
        help="torch.compile backend of --compile: inductor generates fused kernels; aot_eager only traces the graph.",
    )
    train.add_argument(
        "--quantize_frozen",
        choices=["none", "8bit"],
        default="none",
        help="8bit: the linear layers of the frozen UNet and text encoders in int8 (bitsandbytes LLM.int8) to save "
        "memory; gradients still reach the learned rows, the loss changes slightly.",
    )
    train.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help="Step size; with rsgd one step turns each direction by atan(lr). Default: 1e-2 for dti, 5e-3 for ti "
        "and crossinit.",
    )
    train.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by batch size, accumulation steps and processes (the authors' runs do).",
    )
    train.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule.",
    )
    train.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the schedule.")
    train.add_argument(
        "--use_8bit_adam", action="store_true", help="Use bitsandbytes' 8-bit AdamW (adamw modes and the LoRA)."
    )
    train.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (adamw modes).")
    train.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (adamw modes).")
    train.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay (adamw modes).")
    train.add_argument("--adam_epsilon", type=float, default=1e-08, help="AdamW epsilon (adamw modes).")
    train.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode each image once with the VAE; used when exact (--center_crop, or square images), else ignored.",
    )
    train.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Precision of the frozen models; the learned directions stay fp32. Default: accelerate's config.",
    )
    train.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    train.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=10,
        help="Steps with a non-finite loss or gradient are skipped; this many in a row stop the run.",
    )

    logs = parser.add_argument_group("logging, validation, saving")
    logs.add_argument(
        "--report_to",
        type=str,
        default="none",
        help="Tracker: tensorboard, wandb, all or none (tensorboard and wandb need their packages).",
    )
    logs.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    logs.add_argument(
        "--logging_steps",
        type=int,
        default=10,
        help="Read the per-step logs from the device every N steps (one host sync), then log every step's values.",
    )
    logs.add_argument(
        "--validation_prompt",
        type=str,
        default=DEFAULT_VALIDATION_PROMPT,
        help="Prompt of the validation images; '{}' stands for the placeholder token.",
    )
    logs.add_argument(
        "--num_validation_images", type=int, default=4, help="Images per validation; 0 turns validation off."
    )
    logs.add_argument(
        "--validation_steps", type=int, default=50, help="Validate every N steps (and always at the end)."
    )
    logs.add_argument(
        "--save_steps",
        type=int,
        default=500,
        help="Also save the embeddings every N steps (the final ones always are).",
    )
    logs.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save a resumable checkpoint (kilobytes: learned state, scheduler, RNG) every N steps.",
    )
    logs.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    logs.add_argument("--run_name", type=str, default=None, help="Run name shown by the tracker (wandb).")
    logs.add_argument(
        "--push_to_hub", action="store_true", help="Upload the embeddings, model card and images to the Hub at the end."
    )
    logs.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id. Default: the --output_dir name.")
    logs.add_argument("--hub_token", type=str, default=None, help="Hub token. Default: the one `hf auth login` saved.")
    logs.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    logs.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' or a checkpoint-N folder (in --output_dir, or a path) to continue from.",
    )

    args = parser.parse_args(input_args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1:
        args.local_rank = env_local_rank
    return args


def validate_args(args):
    """Check the arguments that argparse cannot; fill in method-dependent defaults."""
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[args.method]
    if args.kappa is None:
        args.kappa = DEFAULT_KAPPA if args.method == "dti" else 0.0
    if args.crossinit_lambda is None:
        args.crossinit_lambda = DEFAULT_CROSSINIT_LAMBDA if args.method == "crossinit" else 0.0
    checks = [
        (args.learning_rate > 0 and math.isfinite(args.learning_rate), "--learning_rate must be a positive number"),
        (args.kappa >= 0 and math.isfinite(args.kappa), "--kappa must be zero or positive"),
        (
            args.crossinit_lambda >= 0 and math.isfinite(args.crossinit_lambda),
            "--crossinit_lambda must be zero or a positive number",
        ),
        (0 <= args.beta < 1, "--beta must be in [0, 1)"),
        (args.resolution > 0 and args.resolution % 8 == 0, "--resolution must be a positive multiple of 8"),
        (args.train_batch_size >= 1, "--train_batch_size must be at least 1"),
        (args.max_train_steps >= 1, "--max_train_steps must be at least 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (args.repeats >= 1, "--repeats must be at least 1"),
        (args.num_vectors is None or args.num_vectors >= 1, "--num_vectors must be at least 1"),
        (args.concepts_per_step is None or args.concepts_per_step >= 1, "--concepts_per_step must be at least 1"),
        (args.num_validation_images >= 0, "--num_validation_images must be zero or positive"),
        (args.validation_steps >= 1, "--validation_steps must be at least 1"),
        (args.save_steps >= 1, "--save_steps must be at least 1"),
        (args.checkpointing_steps >= 1, "--checkpointing_steps must be at least 1"),
        (args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 1, "--checkpoints_total_limit >= 1"),
        (args.dataloader_num_workers >= 0, "--dataloader_num_workers must be zero or positive"),
        (args.max_nonfinite_steps >= 1, "--max_nonfinite_steps must be at least 1"),
        (args.logging_steps >= 1, "--logging_steps must be at least 1"),
        (args.method == "dti" or args.kappa == 0, f"--kappa applies to --method dti only ({args.method} has no prior)"),
        (
            args.method == "crossinit" or args.crossinit_lambda == 0,
            "--crossinit_lambda applies to --method crossinit only; drop it or add --method crossinit",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message}.")
    if args.use_8bit_adam and args.method == "dti" and args.optimizer == "rsgd" and not args.lora_rank:
        raise ValueError(
            "--use_8bit_adam needs an AdamW: --optimizer adamw, --method ti or crossinit, or a LoRA (--lora_rank)."
        )
    check_lora_args(args)
    if args.quantize_frozen == "8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError("--quantize_frozen 8bit needs bitsandbytes: pip install bitsandbytes.") from error
    if args.report_to not in ("none", "tensorboard", "wandb", "all"):
        raise ValueError(f"--report_to must be tensorboard, wandb, all or none, got {args.report_to!r}.")
    if args.hub_token is not None and args.report_to in ("wandb", "all"):
        raise ValueError("--hub_token with --report_to wandb would expose the token; log in with `hf auth login`.")
    return args


def validate_concept(args):
    """Check one concept's own flags (a --concepts_list entry's keys): its token, its initializer, one data source."""
    if args.placeholder_token is None or args.initializer_token is None:
        raise ValueError("Give --placeholder_token and --initializer_token (one concept) or --concepts_list (several).")
    checks = [
        (args.placeholder_token.strip() != "", "--placeholder_token must not be empty"),
        (not re.search(r"\s", args.placeholder_token), "--placeholder_token must not contain spaces"),
        (args.initializer_token.strip() != "", "--initializer_token must not be empty"),
        (args.num_vectors is None or args.num_vectors >= 1, "--num_vectors must be at least 1"),
        (args.learnable_property in ("object", "style"), "--learnable_property must be object or style"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message}.")
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("Give exactly one of --train_data_dir (a folder of images) and --dataset_name.")
    return args


def read_concepts(args):
    """The run's concepts, each an argument namespace of its own: the flags' one concept, or one per --concepts_list
    entry (its keys over the shared flags; outputs in --output_dir/<placeholder>/ unless it names an output_dir; Hub
    repo <--hub_model_id>-<placeholder>). Every entry is checked here, before anything loads."""
    args.concept_index = None
    if args.concepts_list is None:
        return [validate_concept(args)]
    given = [f"--{key}" for key in CONCEPT_KEYS[:4] if getattr(args, key) is not None]
    if given:
        raise ValueError(f"--concepts_list replaces {', '.join(given)}: give these in each entry of the list instead.")
    concepts = [concept_args(args, index, entry) for index, entry in enumerate(read_concepts_file(args.concepts_list))]
    for key, value_of in (("placeholder_token", lambda c: c.placeholder_token),
                          ("output folder", lambda c: os.path.abspath(c.output_dir))):  # fmt: skip
        seen = {}
        for concept in concepts:
            first = seen.setdefault(value_of(concept), concept.concept_index)
            if first != concept.concept_index:
                raise ValueError(
                    f"--concepts_list entries {first} and {concept.concept_index} have the same {key} "
                    f"{value_of(concept)!r}; give each concept its own."
                )
    return concepts


def read_concepts_file(path):
    """The entries of the --concepts_list JSON file: a non-empty list."""
    try:
        entries = json.loads(Path(path).read_text())
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"--concepts_list {path} cannot be read ({reason}); give a JSON file of concepts.") from None
    except ValueError as error:
        raise ValueError(f"--concepts_list {path} is not JSON ({error}); give a list of concept objects.") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--concepts_list {path} must hold a non-empty JSON list of concept objects.")
    return entries


class ConceptArgs(argparse.Namespace):
    """A --concepts_list entry's own keys over the run's flags, which are read through (the seed and learning rate
    the run settles later included)."""

    def __init__(self, shared, **own):
        super().__init__(**own)
        self.shared = shared

    def __getattr__(self, name):  # only asked for what the entry does not set
        if name == "shared":
            raise AttributeError(name)
        return getattr(self.shared, name)


def concept_args(args, index, entry):
    """The argument namespace of --concepts_list entry `index`: the shared flags with the entry's keys over them."""
    where = f"--concepts_list entry {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a {type(entry).__name__}, not an object with placeholder_token, etc.")
    unknown = sorted(set(entry) - set(CONCEPT_KEYS))
    if unknown:
        raise ValueError(f"{where} has the unknown key {unknown[0]!r}; the keys are {', '.join(CONCEPT_KEYS)}.")
    missing = [key for key in CONCEPT_KEYS[:2] if key not in entry]
    missing += [] if {"train_data_dir", "dataset_name"} & set(entry) else ["train_data_dir (or dataset_name)"]
    if missing:
        raise ValueError(
            f"{where} has no {missing[0]}; every entry needs placeholder_token, initializer_token and "
            "train_data_dir or dataset_name."
        )
    for key, value in entry.items():
        kind = int if key == "num_vectors" else str
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be {'an integer' if kind is int else 'a string'}, got {value!r}.")
    concept = ConceptArgs(args, **entry, concept_index=index)
    stem = concept_name(concept.placeholder_token)
    concept.output_dir = entry.get("output_dir") or str(Path(args.output_dir) / stem)
    concept.hub_model_id = f"{args.hub_model_id}-{stem}" if args.hub_model_id else None
    try:
        return validate_concept(concept)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def ignored_flags(args):
    """Warnings for the DTI-only flags a baseline (--method ti or crossinit) ignores: it has no sphere and no norm."""
    if args.method == "dti":
        return []
    defaults = {"--optimizer": (args.optimizer, "rsgd"), "--token_scale": (args.token_scale, "mean"),
                "--beta": (args.beta, 0.0), "--init_method": (args.init_method, "token")}  # fmt: skip
    return [
        f"{flag} is ignored with --method {args.method} (it learns free rows with AdamW, without a fixed norm)."
        for flag, (value, default) in defaults.items()
        if value != default
    ]


def check_inputs(args):
    """The checks of numbers and paths that need no model, run before anything loads: optimizer numbers, the seed
    range, the output paths and the folder or checkpoint named by --resume_from_checkpoint."""
    finite = math.isfinite
    checks = [
        (0 <= args.adam_beta1 < 1, "--adam_beta1 must be in [0, 1)"),
        (0 <= args.adam_beta2 < 1, "--adam_beta2 must be in [0, 1)"),
        (
            finite(args.adam_weight_decay) and args.adam_weight_decay >= 0,
            "--adam_weight_decay must be zero or positive",
        ),
        (finite(args.adam_epsilon) and args.adam_epsilon >= 0, "--adam_epsilon must be zero or positive"),
        (finite(args.beta), "--beta must be in [0, 1)"),
        (args.lr_warmup_steps >= 0, "--lr_warmup_steps must be zero or positive"),
        (args.seed is None or 0 <= args.seed < 2**32, "--seed must be in [0, 2**32 - 1]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message}.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; give a folder.")
    logging_dir = output_dir / args.logging_dir
    if args.report_to != "none" and logging_dir.exists() and not logging_dir.is_dir():
        raise ValueError(f"--logging_dir {logging_dir} is a file; give a folder.")
    if args.resume_from_checkpoint not in (None, "latest"):
        find_checkpoint(args)  # a missing or damaged named checkpoint is refused now, not after the models load
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def stable_seed(*key):
    """A 63-bit seed derived from a tuple of ints and strings, identical in every process and run."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") >> 1


def to_rgb(image, resolution=None):
    """An RGB copy of a PIL image: first frame, EXIF rotation applied, 16-bit scaled to 8 bits, transparency
    composited on white. Images far above `resolution` are reduced while decoding, so huge photos cost little memory;
    the size before that is kept in .info["original_size"] = (height, width) for SDXL's size conditioning."""
    image.seek(0)  # first frame of animated images
    width, height = image.size
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # an EXIF rotation by 90 degrees swaps the sides
        width, height = height, width
    if resolution and image.format == "JPEG":
        image.draft("RGB", (2 * resolution, 2 * resolution))  # decode at 1/2, 1/4 or 1/8 scale
    image = ImageOps.exif_transpose(image)
    if resolution and min(image.size) >= 4 * resolution:
        image = image.reduce(min(image.size) // (2 * resolution))
    if image.mode.startswith(("I", "F")):  # 16- and 32-bit integer or float grayscale
        image = Image.fromarray(gray_to_8bit(np.asarray(image)))
    if image.mode not in CONVERTIBLE_MODES:  # PIL would convert LAB, HSV, ... channel by channel: wrong colours
        raise ValueError(f"image mode {image.mode} cannot be converted to RGB faithfully; save it as RGB")
    if image.mode in ("RGBA", "LA", "P", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    rgb = image.convert("RGB")
    rgb.info["original_size"] = (height, width)
    return rgb


def gray_to_8bit(values):
    """A 16- or 32-bit integer or float grayscale array as uint8: integers by the bit depth their values need (8,
    16 or 32 bits), floats up to 1 as fractions of white, larger floats as 0-255 values (clipped)."""
    is_float = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64), nan=0.0)
    peak = values.max(initial=0)
    if is_float and peak <= 1:
        values = values * 255
    elif not is_float and peak > 255:
        values = values / 2 ** (8 if peak < 2**16 else 24)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def open_image(source, resolution):
    """to_rgb of an image file or file object; a decompression bomb (more than twice PIL's pixel limit) raises
    ValueError like any unreadable file."""
    try:
        with Image.open(source) as image:
            return to_rgb(image, resolution)
    except Image.DecompressionBombError as error:
        raise ValueError(f"too many pixels for an image: {error}") from None


def warn_small_images(images, resolution):
    for name, image in images:
        if min(image.size) < resolution:
            logger.warning(
                f"{Path(str(name)).name} is {image.width}x{image.height}, smaller than --resolution; upscaled."
            )
    return images


def load_training_images(train_data_dir, resolution):
    """Read every image of the folder: EXIF rotation applied, converted to RGB. Returns [(path, PIL.Image)]."""
    folder = Path(train_data_dir)
    if not folder.is_dir():
        raise ValueError(f"--train_data_dir {folder} is not a folder; point it at a folder of images.")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    images = []
    for path in paths:
        try:
            images.append((path, open_image(path, resolution)))
        except (OSError, ValueError) as error:
            logger.warning(f"Skipping {path}: not a readable image ({error}).")
    if not images:
        raise ValueError(f"--train_data_dir {folder} holds no readable image ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return warn_small_images(images, resolution)


def load_dataset_images(args):
    """The images of --dataset_name's train split (a Hub id, an image folder, or parquet / arrow files)."""
    try:
        import datasets
    except ImportError as error:
        raise ValueError("--dataset_name needs datasets: pip install datasets.") from error
    name, path = args.dataset_name, Path(args.dataset_name)
    builder = {".parquet": "parquet", ".arrow": "arrow"}.get(path.suffix) if path.is_file() else None
    try:
        if builder:
            dataset = datasets.load_dataset(builder, data_files=str(path), cache_dir=args.cache_dir, split="train")
        else:
            dataset = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir, split="train")
    except (OSError, ValueError, ConnectionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--dataset_name {name!r} could not be loaded ({reason}).") from error
    if args.image_column not in dataset.column_names:
        columns = ", ".join(dataset.column_names)
        raise ValueError(f"--image_column {args.image_column!r} is not a column of {name}; its columns: {columns}.")
    if isinstance(dataset.features[args.image_column], datasets.Image):  # decoded below, as image files are
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    images = []
    for i, item in enumerate(dataset[args.image_column]):
        row = f"{path.name or name}[{i}]"
        try:
            if isinstance(item, dict) and (item.get("bytes") or item.get("path")):
                source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            elif isinstance(item, (str, bytes)) and item:
                source = io.BytesIO(item) if isinstance(item, bytes) else item
            else:
                raise ValueError(f"a {type(item).__name__}, not an image")
            images.append((row, open_image(source, args.resolution)))
        except (OSError, ValueError) as error:
            logger.warning(f"Skipping row {i} of --image_column {args.image_column!r}: not a readable image ({error}).")
    if not images:
        raise ValueError(
            f"--dataset_name {name!r}: no row of --image_column {args.image_column!r} holds a readable image."
        )
    return warn_small_images(images, args.resolution)


class DTIDataset(Dataset):
    """An endless, deterministic stream of training samples.

    Item `position` is the position-th sample of the stream: epoch `position // len(self)` visits the images
    `repeats` times in an order drawn from (seed, epoch); every random choice of the sample (template, crop, flip)
    is drawn from (seed, position). So a resumed run, or a run split over several processes, sees exactly the
    samples an uninterrupted single-process run sees.
    """

    def __init__(self, images, prompt_token, tokenize, resolution, center_crop, random_flip, templates, repeats, seed):
        self.images = [self._resize(image, resolution) for _, image in images]
        self.original_sizes = [image.info.get("original_size", image.size[::-1]) for _, image in images]
        self.prompt_token = prompt_token
        self.tokenize = tokenize  # prompt -> {name: list of ids}, as the pipeline tokenizes
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.templates = templates
        self.repeats = repeats
        self.seed = seed
        self.with_pixels = True  # False once the latents are cached: no image work per sample then
        self._order = (None, None)

    @staticmethod
    def _resize(image, resolution):
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)

    def __len__(self):
        return len(self.images) * self.repeats

    @property
    def crops_are_fixed(self):
        """True when every crop is the same each time an image is drawn, so its latents can be cached."""
        return self.center_crop or all(image.size == (self.resolution,) * 2 for image in self.images)

    def _image_index(self, position):
        epoch, offset = divmod(position, len(self))
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(stable_seed(self.seed, "order", epoch))
            self._order = (epoch, torch.randperm(len(self), generator=generator).tolist())
        return self._order[1][offset] % len(self.images)

    def _crop(self, image, rng):
        height, width, size = image.height, image.width, self.resolution
        if self.center_crop:
            return (height - size) // 2, (width - size) // 2
        return rng.randint(0, height - size), rng.randint(0, width - size)

    def pixels(self, index, top, left, flip):
        """The crop of image `index` as a [3, H, W] float tensor in [-1, 1]."""
        image = self.images[index].crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            image = ImageOps.mirror(image)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def __getitem__(self, position):
        rng = random.Random(stable_seed(self.seed, "sample", position))
        index = self._image_index(position)
        prompt = rng.choice(self.templates).format(self.prompt_token)
        top, left = self._crop(self.images[index], rng)
        flip = self.random_flip and rng.random() < 0.5
        crop_left = self.images[index].width - left - self.resolution if flip else left
        return {
            "position": position,
            "image_index": index,
            "flip": flip,
            "pixel_values": self.pixels(index, top, left, flip) if self.with_pixels else None,
            "original_size": torch.tensor(self.original_sizes[index]),
            "crop_top_left": torch.tensor((top, crop_left)),
            "text": self.tokenize(prompt),
            "prompt": prompt,
        }


def collate(samples):
    return {
        "position": torch.tensor([s["position"] for s in samples]),
        "image_index": torch.tensor([s["image_index"] for s in samples]),
        "flip": torch.tensor([s["flip"] for s in samples], dtype=torch.long),
        "pixel_values": None
        if samples[0]["pixel_values"] is None
        else torch.stack([s["pixel_values"] for s in samples]),
        "original_size": torch.stack([s["original_size"] for s in samples]),
        "crop_top_left": torch.stack([s["crop_top_left"] for s in samples]),
        "text": {key: torch.tensor([s["text"][key] for s in samples]) for key in samples[0]["text"]},
        "prompt": [s["prompt"] for s in samples],
    }


class StreamSampler(Sampler):
    """Positions of the sample stream for one process, from `start` on, forever.

    Global batch b holds positions [b * G, (b + 1) * G) with G = batch_size * num_processes; process r takes the
    r-th slice of batch_size positions. One process with batch 2 and two processes with batch 1 see the same
    samples in the same global batches.
    """

    def __init__(self, start, batch_size, process_index, num_processes):
        self.start, self.batch_size = start, batch_size
        self.process_index, self.num_processes = process_index, num_processes

    def __iter__(self):
        global_batch = self.batch_size * self.num_processes
        batch = self.start // global_batch
        while True:
            first = batch * global_batch + self.process_index * self.batch_size
            yield from range(first, first + self.batch_size)
            batch += 1

    def __len__(self):  # endless; DataLoader only needs it for len(), which we never call
        return sys.maxsize


# ----------------------------------------------------------------------------------------------------------------
# The DTI core
# ----------------------------------------------------------------------------------------------------------------


def vocabulary_norms(embedding_table):
    """Norms of the pretrained rows W_i (fp32), zero rows dropped. embedding_table: [V, d]."""
    norms = embedding_table.float().norm(dim=-1)
    return norms[norms > 0]


def resolve_norm_scale(norms, token_scale):
    """m* = mean, min or max of the vocabulary norms, or a given positive float."""
    if isinstance(token_scale, float):
        return token_scale
    return getattr(norms, token_scale)().item()


def token_stats(embeddings, prior_direction, initial):
    """What the paper plots, as means over the k vectors [k, d]: norm, cosine to the prior, degrees turned."""
    direction, start = F.normalize(embeddings, dim=-1), F.normalize(initial, dim=-1)
    angle = 2 * torch.asin(((direction - start).norm(dim=-1) / 2).clamp(max=1))  # accurate for small angles
    cos_prior = (direction * prior_direction).sum(-1)
    return torch.stack([embeddings.norm(dim=-1).mean(), cos_prior.mean(), torch.rad2deg(angle).mean()])


class DirectionalTokens(torch.nn.Module):
    """k new token embeddings e_j = norm_scale * v_j with each direction v_j on the unit sphere (fp32).

    step(lr) is Riemannian SGD with normalised steps (the spec's five steps), for each token j independently:
        g = dL/dv_j - kappa * mu_j                    (data gradient plus the vMF prior toward mu_j)
        g = g - (v_j . g) v_j                         (tangent space at v_j)
        s = beta s + (1 - beta) |g|^2;  g = g / (sqrt(s / (1 - beta^t)) + eps)   (beta = 0: g / (|g| + eps))
        v_j = (v_j - lr g) / |v_j - lr g|             (retraction; turns v_j by atan(lr) when |g| >> eps)
    """

    def __init__(
        self, prior_direction, initial_direction, norm_scale, kappa=0.0, beta=0.0, eps=1e-8, dtype=torch.float32
    ):
        super().__init__()
        self.direction = torch.nn.Parameter(F.normalize(initial_direction.to(dtype), dim=-1))
        self.register_buffer("prior_direction", F.normalize(prior_direction.to(dtype), dim=-1))
        self.register_buffer("initial_direction", self.direction.detach().clone())
        self.register_buffer("second_moment", torch.zeros(len(initial_direction), dtype=dtype))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.norm_scale, self.kappa, self.beta, self.eps = float(norm_scale), kappa, beta, eps

    def embeddings(self):
        """The vectors the text encoder sees, [k, d] fp32: norm_scale * v."""
        return self.norm_scale * self.direction

    @torch.no_grad()
    def step(self, lr, only_if=None):
        """One update; only_if (a bool tensor on the device) keeps the old state where False, without a host sync."""
        v, g = self.direction, self.direction.grad
        g = g - self.kappa * self.prior_direction
        g = g - (v * g).sum(-1, keepdim=True) * v
        num_steps = self.num_steps + 1
        second_moment = self.beta * self.second_moment + (1 - self.beta) * g.square().sum(-1)
        bias_correction = 1 - self.beta ** num_steps.to(g.dtype)
        g = g / ((second_moment / bias_correction).sqrt() + self.eps).unsqueeze(-1)
        new_direction = F.normalize(v - lr * g, dim=-1)
        for state, new in ((v, new_direction), (self.second_moment, second_moment), (self.num_steps, num_steps)):
            state.copy_(new if only_if is None else torch.where(only_if, new, state))

    @torch.no_grad()
    def add_prior_gradient(self):
        """For the AdamW ablation: the gradient of -kappa * mu . v, added before the optimizer step."""
        self.direction.grad.sub_(self.kappa * self.prior_direction)

    @torch.no_grad()
    def retract(self):
        """For the AdamW ablation: project the directions back onto the sphere after the optimizer step."""
        self.direction.copy_(F.normalize(self.direction, dim=-1))

    @torch.no_grad()
    def stats(self):
        return token_stats(self.embeddings(), self.prior_direction, self.initial_direction)


class TextualInversionTokens(torch.nn.Module):
    """Plain Textual Inversion (the paper's baseline): k free rows [k, d] in fp32, optimised by AdamW."""

    def __init__(self, prior_direction, initial_rows):
        super().__init__()
        self.rows = torch.nn.Parameter(initial_rows.float().clone())
        self.register_buffer("prior_direction", F.normalize(prior_direction.float(), dim=-1))
        self.register_buffer("initial_rows", initial_rows.float().clone())

    def embeddings(self):
        return self.rows

    @torch.no_grad()
    def stats(self):
        return token_stats(self.rows, self.prior_direction, self.initial_rows)


class CrossInitTokens(TextualInversionTokens):
    """The CrossInit baseline: free rows [k, d] fp32, optimised by AdamW, that start at the text encoder's output for
    the class word and are pulled back to that start by regularizer() = lambda * mean((rows - initial_rows)^2), the
    mean over the k x d elements (its gradient: 2 lambda (rows - initial_rows) / (k d))."""

    def __init__(self, prior_direction, initial_rows, crossinit_lambda):
        super().__init__(prior_direction, initial_rows)
        self.crossinit_lambda = crossinit_lambda

    def regularizer(self):
        return self.crossinit_lambda * (self.rows - self.initial_rows).square().mean()


class RiemannianSGD(torch.optim.Optimizer):
    """Drives DirectionalTokens.step from an optimizer, so LR schedulers and the fp16 grad scaler work as usual."""

    def __init__(self, tokens, lr):
        self.tokens = list(tokens)
        self.only_if = None  # device flags set per step, one per tokens: an update is kept only where its flag is True
        super().__init__([{"params": [t.direction]} for t in self.tokens], {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for i, (group, tokens) in enumerate(zip(self.param_groups, self.tokens, strict=True)):
            tokens.step(group["lr"], None if self.only_if is None else self.only_if[i])


def inject_learned_tokens(text_encoder, first_token_id, tokens):
    """Make the encoder's input embedding return tokens.embeddings() for ids first_token_id .. first_token_id+k-1.

    Only the k learned rows take part in autograd; the embedding table itself is never written or differentiated.
    """
    num_vectors = len(tokens.embeddings())

    def hook(module, inputs, output):
        offset = inputs[0] - first_token_id
        is_learned = (offset >= 0) & (offset < num_vectors)
        scale = getattr(module, "embed_scale", 1.0)  # Gemma's embedding scales its rows by sqrt(d) in transformers 5
        learned = (tokens.embeddings() * scale).to(output.dtype)[offset.clamp(0, num_vectors - 1)]
        return torch.where(is_learned.unsqueeze(-1), learned, output)

    return text_encoder.get_input_embeddings().register_forward_hook(hook)


def check_prompts_fit(args, tokenize, templates, placeholder_ids, num_vectors):
    """Every learned vector must reach the text encoder: refuse a token whose expansion (<tok> <tok>_1 ...) is cut
    off by the encoder's context in a training template or the validation prompt. tokenize: prompt -> {key: ids}."""
    prompt_token = placeholder_prompt_token(args.placeholder_token, num_vectors)
    prompts = [template.format(prompt_token) for template in templates]
    if args.num_validation_images and args.placeholder_token in validation_prompt(args):
        prompts.append(validation_prompt(args).replace(args.placeholder_token, prompt_token))
    for prompt in prompts:
        tokenized = tokenize(prompt)
        keys = [key for key in tokenized if key.startswith("input_ids")]
        for key, ids in zip(keys, placeholder_ids, strict=True):
            if not set(ids) <= set(tokenized[key]):
                raise ValueError(
                    f"--num_vectors {num_vectors}: the prompt {prompt!r} does not fit the text encoder's context "
                    f"({len(tokenized[key])} tokens) with every learned vector; use fewer vectors or a shorter prompt."
                )


def placeholder_names(placeholder_token, num_vectors):
    """diffusers' names of a k-vector token: <tok>, <tok>_1, ..., <tok>_{k-1}."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


def placeholder_prompt_token(placeholder_token, num_vectors):
    """What the token becomes in a prompt: the expansion diffusers' maybe_convert_prompt makes at inference."""
    return " ".join(placeholder_names(placeholder_token, num_vectors))


def add_placeholder_tokens(tokenizer, placeholder_token, num_vectors):
    """Add <tok>, <tok>_1, ... to the tokenizer; return their ids (consecutive, after the pretrained vocabulary)."""
    names = placeholder_names(placeholder_token, num_vectors)
    vocabulary_size = len(tokenizer)
    for name in names:
        pieces = tokenizer.tokenize(name)
        if name in tokenizer.get_vocab() or (
            len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) < vocabulary_size
        ):
            suggestion = f"<{name.strip('<>')}-1>"
            raise ValueError(f"--placeholder_token {name!r} is already in the vocabulary; choose e.g. {suggestion!r}.")
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(vocabulary_size, vocabulary_size + num_vectors)):
        raise ValueError(
            f"--placeholder_token {placeholder_token!r} could not be added as new tokens; choose another string."
        )
    tokenized = tokenizer(" ".join(names), add_special_tokens=False).input_ids  # Gemma adds "▁" between them
    if [i for i in tokenized if i in ids] != ids:
        raise ValueError(
            f"--placeholder_token {placeholder_token!r} does not survive tokenization; use e.g. '<my-concept>'."
        )
    return ids


def initializer_token_ids(tokenizer, initializer_token, num_vectors, in_prompt=True):
    """The initializer's token ids, one per learned vector: k = n by default, or one token repeated k times.
    in_prompt: the pieces the word is inside a prompt, after a space (Gemma: "▁robot"); else those of the bare word
    (Gemma: "robot", as the authors' code takes it). CLIP gives the same ids either way."""
    ids = tokenizer((" " if in_prompt else "") + initializer_token, add_special_tokens=False).input_ids
    ids = [i for i in ids if tokenizer.decode([i]).strip()]  # a lone word-boundary token carries no meaning
    if (
        tokenizer.unk_token_id is not None
        and tokenizer.unk_token_id in ids
        and tokenizer.unk_token_id != getattr(tokenizer, "eos_token_id", None)
    ):
        raise ValueError(f"--initializer_token {initializer_token!r} is unknown to the tokenizer; use a common word.")
    if not ids:
        raise ValueError(
            f"--initializer_token {initializer_token!r} tokenizes to nothing; use a class word like 'dog'."
        )
    if num_vectors is None or num_vectors == len(ids):
        return ids
    if len(ids) == 1:
        return ids * num_vectors
    raise ValueError(
        f"--initializer_token {initializer_token!r} is {len(ids)} tokens but --num_vectors is {num_vectors}; "
        f"use a one-token initializer or --num_vectors {len(ids)}."
    )


def content_positions(tokenizer, ids, initializer_token, num_vectors):
    """Where the initializer's content tokens sit in its own tokenized prompt ids (not BOS, EOS, padding or a lone
    word-boundary token), one position per learned vector (one token repeated k times, as for the rows)."""
    special = set(tokenizer.all_special_ids)
    positions = [i for i, t in enumerate(ids) if t not in special and tokenizer.decode([t]).strip()]
    if len(positions) == num_vectors:
        return positions
    if len(positions) == 1:
        return positions * num_vectors
    raise ValueError(
        f"--initializer_token {initializer_token!r} is {len(positions)} tokens when encoded alone but {num_vectors} "
        f"inside a prompt; --method crossinit needs one vector per token: use a one-token initializer."
    )


def make_learned_tokens(args, text_encoder, init_ids, seed, name, vocabulary_size, contextual=None):
    """Build DirectionalTokens (dti), TextualInversionTokens (ti) or CrossInitTokens (crossinit, from the contextual
    vectors [k, d]) for one text encoder from its pretrained table (the first vocabulary_size rows: the tokenizer's
    vocabulary before the new tokens)."""
    table = text_encoder.get_input_embeddings().weight.detach()[:vocabulary_size].float()
    prior = table[init_ids]
    if args.method == "ti":
        return TextualInversionTokens(prior, prior)
    if args.method == "crossinit":
        return CrossInitTokens(prior, contextual, args.crossinit_lambda)
    norms = vocabulary_norms(table)
    norm_scale = resolve_norm_scale(norms, args.token_scale)
    if args.init_method == "token":
        initial = prior
    elif args.init_method == "mean":
        initial = table.mean(0, keepdim=True).expand_as(prior)
    else:
        generator = torch.Generator().manual_seed(stable_seed(seed, "init", name))
        initial = torch.randn(prior.shape, generator=generator)
    beta = args.beta if args.optimizer == "rsgd" else 0.0
    return DirectionalTokens(prior, initial, norm_scale, kappa=args.kappa, beta=beta)


# ----------------------------------------------------------------------------------------------------------------
# SDXL conditioning and loss
# ----------------------------------------------------------------------------------------------------------------


def set_pooled_output(text_encoder, tokenizer, pooled_output):
    """Where a CLIP encoder pools: eos pools at the first end-of-text token whatever the config says; argmax
    restores the config's pooling. The published SDXL configs say eos_token_id 2, with which transformers pools
    at argmax(input_ids): the end-of-text token for ordinary prompts, the new token once a prompt holds one."""
    eos = tokenizer.eos_token_id if pooled_output == "eos" else text_encoder.config.eos_token_id
    getattr(text_encoder, "text_model", text_encoder).eos_token_id = eos  # what the pooling reads (transformers 4, 5)


def tokenize_prompt(tokenizers, prompt):
    """Token ids of both CLIP tokenizers, padded to 77 as StableDiffusionXLPipeline.encode_prompt pads them."""
    return {
        key: tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        for key, tokenizer in zip(("input_ids", "input_ids_2"), tokenizers, strict=True)
    }


def encode_prompt(text_encoders, text):
    """SDXL text conditioning: penultimate hidden states of both encoders concatenated, CLIP-G's pooled output
    (pooled where set_pooled_output says). text: {"input_ids": [B, 77], "input_ids_2": [B, 77]}."""
    hidden_states = []
    for text_encoder, ids in zip(text_encoders, (text["input_ids"], text["input_ids_2"]), strict=True):
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output.text_embeds


def encode_initializer(args, tokenizers, text_encoders, num_vectors):
    """CrossInit's start, {encoder: [k, d] fp32}: each encoder's last hidden state (after its final layer norm) at the
    initializer's content positions when the initializer alone is encoded as a prompt (<bos> word <eos> pad...)."""
    text, vectors = tokenize_prompt(tokenizers, args.initializer_token), {}
    for name, tokenizer, text_encoder, ids in zip(TEXT_ENCODERS, tokenizers, text_encoders, text.values(), strict=True):
        positions = content_positions(tokenizer, ids, args.initializer_token, num_vectors)
        with torch.no_grad():
            hidden_states = text_encoder(torch.tensor([ids], device=text_encoder.device)).last_hidden_state
        vectors[name] = hidden_states[0, positions].float()
    return vectors


def keyed_generators(seed, positions, device):
    """One torch.Generator per sample, seeded from (seed, stream position): the noise of a sample never depends
    on which process draws it or whether the run was resumed."""
    return [torch.Generator(device).manual_seed(stable_seed(seed, "noise", int(p))) for p in positions]


def training_loss(batch, latent_mean, latent_std, unet, text_encoders, noise_scheduler, vae_scale, seed, resolution):
    """The SDXL noise-prediction loss of each sample of a batch, [B] (the mean over its elements). latent_mean,
    latent_std: [B, 4, H/8, W/8] VAE posterior, fp32."""
    device, dtype = latent_mean.device, unet.dtype
    generators = keyed_generators(seed, batch["position"].tolist(), device)
    shape = latent_mean.shape[1:]
    num_timesteps = noise_scheduler.config.num_train_timesteps
    sample_noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g, device=device) for g in generators])
    latents = (latent_mean + latent_std * sample_noise) * vae_scale
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    encoder_hidden_states, pooled = encode_prompt(text_encoders, batch["text"])
    target_size = torch.tensor([resolution, resolution]).expand(len(latents), 2)
    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target_size], dim=1).to(device, dtype)
    model_pred = unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states.to(dtype),
        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids},
    ).sample

    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def vae_posterior(vae, pixel_values):
    """Mean and std of the VAE posterior, fp32. pixel_values: [B, 3, H, W] in [-1, 1]."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


class LatentCache:
    """VAE posteriors of every training image (and of its mirror image with --random_flip), encoded once.

    Exact only when each image always gets the same crop (DTIDataset.crops_are_fixed); the flip is cached as a pair.
    """

    def __init__(self, dataset, vae):
        means, stds = [], []
        for index, image in enumerate(dataset.images):
            top, left = (image.height - dataset.resolution) // 2, (image.width - dataset.resolution) // 2
            flips = (False, True) if dataset.random_flip else (False,)
            mean, std = vae_posterior(vae, torch.stack([dataset.pixels(index, top, left, f) for f in flips]))
            means.append(mean)
            stds.append(std)
        self.mean, self.std = torch.stack(means), torch.stack(stds)  # [N, flips, 4, h, w]

    def __call__(self, batch):
        index, flip = batch["image_index"].to(self.mean.device), batch["flip"].to(self.mean.device)
        return self.mean[index, flip], self.std[index, flip]


# ----------------------------------------------------------------------------------------------------------------
# Validation and saving
# ----------------------------------------------------------------------------------------------------------------


def stop_if_disk_full(error, path):
    """A full disk (or quota) while writing `path` stops the run in one line; other errors are left to the caller.
    Writers that wrap the OSError (torch.save, safetensors) are recognised by the free space left."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(Path(path).parent).free < MIN_FREE_BYTES // 2
    if full:
        raise TrainingStopped(
            f"The disk is full: {path} could not be written, the last complete checkpoint and embeddings in "
            f"{Path(path).parent} are kept. Free some space, then resume with --resume_from_checkpoint latest."
        ) from None


def write_atomically(path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a half-written file."""
    write_all_atomically({path: write})


def write_all_atomically(writes):
    """{path: write}: call every write(tmp_path) first, then rename them all, so a failure (a full disk) leaves the
    previous set of files whole instead of a mix of old and new ones."""
    umask = os.umask(0)
    os.umask(umask)
    renames = {Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp"): Path(path) for path in writes}
    try:
        for tmp, write in zip(renames, writes.values(), strict=True):
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files
        for tmp, path in renames.items():
            os.replace(tmp, path)
    except Exception as error:
        stop_if_disk_full(error, next(iter(renames.values())))
        raise
    finally:
        for tmp in renames:
            tmp.unlink(missing_ok=True)


def validation_prompt(args):
    return args.validation_prompt.replace("{}", args.placeholder_token)


def log_validation(components, noise_scheduler, args, accelerator, seed, step):
    """Generate --num_validation_images with the current token (DPM-Solver, 25 steps); save a grid; log them."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
    from diffusers.utils import make_image_grid

    prompt = validation_prompt(args)
    logger.info(f"Validation at step {step}: {args.num_validation_images} images of {prompt!r}.")
    pipeline = StableDiffusionXLPipeline(
        **components, scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config), add_watermarker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    device = accelerator.device
    images = [
        pipeline(
            prompt,
            num_inference_steps=25,
            height=args.resolution,
            width=args.resolution,
            generator=torch.Generator(device).manual_seed(seed + i),
        ).images[0]
        for i in range(args.num_validation_images)
    ]
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid = make_image_grid(images, rows=1, cols=len(images))
    write_atomically(folder / f"step-{step}.png", lambda tmp: grid.save(tmp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{i}: {prompt}") for i, im in enumerate(images)]})
    return images


def concept_name(placeholder_token):
    """The placeholder without angle brackets, safe as a file name: '<my-dog>' -> 'my-dog'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", placeholder_token.strip("<>")) or "concept"


def embedding_metadata(args, learned, vocabulary_mean_norms, step):
    """safetensors metadata (str -> str): enough to tell how the vectors were learned."""
    metadata = {
        "format": "pt",
        "method": args.method,
        "optimizer": args.optimizer if args.method == "dti" else "adamw",
        "base_model": args.pretrained_model_name_or_path,
        "placeholder_token": args.placeholder_token,
        "initializer_token": args.initializer_token,
        "num_vectors": str(len(next(iter(learned.values())).embeddings())),
        "token_scale": str(args.token_scale) if args.method == "dti" else "free",
        "kappa": repr(args.kappa),
        "beta": repr(args.beta if args.method == "dti" and args.optimizer == "rsgd" else 0.0),
        "learning_rate": repr(args.learning_rate),
        **({"crossinit_lambda": repr(args.crossinit_lambda)} if args.method == "crossinit" else {}),
        "steps": str(step),
        "resolution": str(args.resolution),
        "script": Path(__file__).name,
        "script_version": __version__,
        "seed": str(args.seed),
    }
    for name, tokens in learned.items():
        metadata[f"norm_scale_{name}"] = repr(tokens.norm_scale) if args.method == "dti" else "free"
        metadata[f"vocabulary_mean_norm_{name}"] = repr(vocabulary_mean_norms[name])
    return metadata


def save_embeddings(learned, args, vocabulary_mean_norms, step, suffix="", lora=None):
    """Write the spec's output files: one {"<tok>": [k, d]} file per encoder and the combined {clip_l, clip_g}; with
    a LoRA also pytorch_lora_weights.safetensors and <concept>_lora.safetensors (kohya layout). All or none."""
    output_dir = Path(args.output_dir)
    metadata = embedding_metadata(args, learned, vocabulary_mean_norms, step) | {"pooled_output": args.pooled_output}
    metadata |= lora_metadata(args)
    vectors = {name: tokens.embeddings().detach().float().cpu().contiguous() for name, tokens in learned.items()}
    files = {f"{EMBEDDING_FILES[name]}{suffix}.safetensors": {args.placeholder_token: v} for name, v in vectors.items()}
    files[f"{concept_name(args.placeholder_token)}{suffix}.safetensors"] = {
        COMBINED_KEYS[name]: v for name, v in vectors.items()
    }
    writes = {output_dir / name: partial(save_file, tensors, metadata=metadata) for name, tensors in files.items()}
    if lora is not None:
        writes |= lora.files(output_dir, suffix, metadata, kohya_name=f"{concept_name(args.placeholder_token)}_lora")
    write_all_atomically(writes)
    logger.info(f"Saved the embeddings of step {step} to {output_dir} ({', '.join(p.name for p in writes)}).")


def check_output_names(args):
    """The combined file is named after the placeholder; refuse one that would overwrite the per-encoder files
    (learned_embeds*.safetensors; compared without case, as some file systems do)."""
    name = concept_name(args.placeholder_token)
    for taken in ("learned_embeds", *(["pytorch_lora_weights"] if args.lora_rank else [])):
        if name.lower().startswith(taken):
            raise ValueError(
                f"--placeholder_token {args.placeholder_token!r} would name the combined file {name}.safetensors, "
                f"which clashes with the {taken} files; choose another token."
            )


def hub_repo_id(args):
    return args.hub_model_id or Path(args.output_dir).resolve().name


def hub_token(args):
    """With --push_to_hub: the token, checked with whoami before any training time is spent; else None."""
    if not args.push_to_hub:
        return None
    from huggingface_hub import get_token, whoami

    token = args.hub_token or get_token()
    if not token:
        raise ValueError("--push_to_hub needs Hub credentials: run `hf auth login` or pass --hub_token.")
    try:
        whoami(token=token)
    except Exception as error:  # any failure here means the upload at the end would fail too
        raise ValueError(
            f"--push_to_hub: the Hub refused the token or cannot be reached ({type(error).__name__})."
        ) from None
    return token


def base_model_license(args):
    """The base model's license from its model card: a local folder's README.md, or the Hub's card of a Hub id
    (never asked for under HF_HUB_OFFLINE=1); None where there is none."""
    from huggingface_hub import ModelCard, constants

    path = Path(args.pretrained_model_name_or_path)
    if path.is_dir() and not (path / "README.md").is_file():
        return None
    if not path.is_dir() and constants.HF_HUB_OFFLINE:
        return None
    try:
        card = path / "README.md" if path.is_dir() else args.pretrained_model_name_or_path
        return ModelCard.load(card).data.license
    except Exception:  # an unreadable card, no network: the card then simply has no license field
        return None


def upload_ignore_patterns(args):
    """What upload_folder leaves out: checkpoints, tracker logs, temporary and hidden files."""
    return ["checkpoint-*", ".*", "*/.*", f"{Path(args.logging_dir).as_posix()}/*", "*.tmp"]


def create_hub_repo(args, token):
    """The diffusers way: create (or reuse) the repo first; returns its full id (namespace/name)."""
    from huggingface_hub import create_repo

    return create_repo(hub_repo_id(args), exist_ok=True, private=args.hub_private_repo, token=token).repo_id


def push_to_hub(args, repo_id, token):
    """Upload the output folder (embeddings, card, images) to the repo; checkpoints and logs stay home."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=upload_ignore_patterns(args),
        token=token,
    )
    logger.info(f"Uploaded {args.output_dir} to https://huggingface.co/{repo_id}.")


def model_card_header(args, family, step, extra_tags=()):
    """The card's YAML metadata (a Hub page renders it) for output_dir/README.md."""
    from huggingface_hub import ModelCardData

    grid = Path(args.output_dir) / "validation" / f"step-{step}.png"
    widget = [{"text": validation_prompt(args), "output": {"url": f"validation/{grid.name}"}}] if grid.is_file() else []
    data = ModelCardData(
        base_model=args.pretrained_model_name_or_path,
        library_name="diffusers",
        license=base_model_license(args),
        tags=["text-to-image", "diffusers", "diffusers-training", "textual-inversion", "dti", family, *extra_tags],
        instance_prompt=args.placeholder_token,
        widget=widget,
    )
    return f"---\n{data.to_yaml()}\n---\n", widget


def method_description(args):
    """How the vectors were learned, one clause for the model card."""
    return {
        "dti": "Directional Textual Inversion (DTI, arXiv 2512.13672): its norm is fixed to the mean norm of the "
        "vocabulary and only its direction was learned",
        "ti": "plain Textual Inversion, the baseline of DTI (arXiv 2512.13672): AdamW on free rows, norm unconstrained",
        "crossinit": "CrossInit, a baseline of DTI (arXiv 2512.13672): free rows started at the text encoder's output "
        f"for the class word, learned with AdamW and pulled back to that start (lambda {args.crossinit_lambda:g})",
    }[args.method]


def training_table(args, learned, num_processes):
    rows = [("method", f"{args.method}" + (f" ({args.optimizer})" if args.method == "dti" else " (AdamW)"))]
    rows += [
        (f"norm m* ({name})", f"{tokens.norm_scale:.6g}") for name, tokens in learned.items() if args.method == "dti"
    ]
    rows += [("crossinit lambda", f"{args.crossinit_lambda:g}")] if args.method == "crossinit" else []
    rows += [
        ("kappa", f"{args.kappa:g}"),
        ("steps", str(args.max_train_steps)),
        ("learning rate", f"{args.learning_rate:g}"),
    ]
    rows += [("batch (global)", str(args.train_batch_size * args.gradient_accumulation_steps * num_processes))]
    rows += [("resolution", str(args.resolution)), ("initializer", args.initializer_token)]
    if args.lora_rank:
        rows += [("LoRA", f"{lora_description(args)}; lr {args.lora_learning_rate:g} from step {args.lora_start_step}")]
    return "| setting | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def save_model_card(args, learned, step, num_processes, repo_id):
    """output_dir/README.md: what the token is, how it was trained, how to use it, the validation images."""
    tags = ["stable-diffusion-xl-diffusers", *(["lora"] if args.lora_rank else [])]
    header, widget = model_card_header(args, "stable-diffusion-xl", step, tags)
    token, name = args.placeholder_token, concept_name(args.placeholder_token)
    prompt = f"a painting of {token} in the style of Van Gogh"
    images = "".join(f"![{w['text']}]({w['output']['url']})\n" for w in widget)
    pooling_line = POOL_AT_END_OF_TEXT + "\n" if args.pooled_output == "eos" else ""
    lora_line = f'pipe.load_lora_weights("{repo_id}", weight_name="{LORA_WEIGHT_NAME}")\n' if args.lora_rank else ""
    lora_sentence = f" A LoRA of the UNet was trained with it ({lora_description(args)})." if args.lora_rank else ""
    lora_loader = " and `load_lora_weights`" if args.lora_rank else ""
    lora_note = (
        f" With the LoRA: put `{name}_lora.safetensors` in ComfyUI's `models/loras/` (a LoraLoader node) or A1111's "
        f"`models/Lora/` (`<lora:{name}_lora:1>` in the prompt) as well."
        if args.lora_rank
        else ""
    )
    body = f"""
# {token}: a DTI concept for {args.pretrained_model_name_or_path}

`{token}` is a concept token learned on both SDXL text encoders from the class word "{args.initializer_token}" with
{method_description(args)}.{lora_sentence} The files load with diffusers'
`load_textual_inversion`{lora_loader}, in ComfyUI and in A1111.

## Use it

```python
import torch
from diffusers import StableDiffusionXLPipeline

base_model = "{args.pretrained_model_name_or_path}"
pipe = StableDiffusionXLPipeline.from_pretrained(base_model, dtype=torch.float16).to("cuda")
{pooling_line}pipe.load_textual_inversion(
    "{repo_id}", weight_name="learned_embeds.safetensors", token="{token}",
    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
)
pipe.load_textual_inversion(
    "{repo_id}", weight_name="learned_embeds_2.safetensors", token="{token}",
    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2,
)
{lora_line}image = pipe("{prompt}").images[0]
```

ComfyUI: put `{name}.safetensors` in `models/embeddings/` and write `embedding:{name}`. A1111 / Forge: put it in
`embeddings/` and write `{name}`.{lora_note}

## Training

{training_table(args, learned, num_processes)}| pooled text embedding | {args.pooled_output} |

## Validation images

{images or "No validation images were made (--num_validation_images 0)."}
"""
    write_atomically(Path(args.output_dir) / "README.md", lambda tmp: tmp.write_text(header + body))


def checkpoint_identity(args, num_vectors):
    """What a checkpoint must match to be resumed by this run."""
    return {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "placeholder_token": args.placeholder_token,
        "initializer_token": args.initializer_token,
        "method": args.method,
        "optimizer": args.optimizer if args.method == "dti" else "adamw",
        "token_scale": str(args.token_scale),
        "num_vectors": num_vectors,
        "lora": lora_description(args) if args.lora_rank else None,
    }


def run_identity(args, concepts):
    """checkpoint_identity of the run: its one concept's, or in a --concepts_list run the shared part and, under
    "concepts", each concept's token, initializer and number of vectors, in the list's order."""
    identities = [checkpoint_identity(c.args, c.num_vectors) for c in concepts]
    if args.concepts_list is None:
        return identities[0]
    own = ("placeholder_token", "initializer_token", "num_vectors")
    shared = {key: value for key, value in identities[0].items() if key not in own}
    return shared | {"concepts": [{key: identity[key] for key in own} for identity in identities]}


def list_checkpoints(output_dir):
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_checkpoint(accelerator, args, step, seed, identity):
    """accelerate state (learned tokens, optimizer, scheduler, RNG) in output_dir/checkpoint-<step>: kilobytes.
    Written under a temporary name with a manifest of its files (sizes, SHA-256) and renamed; only then are old
    checkpoints beyond --checkpoints_total_limit removed, so a failed write never leaves fewer good checkpoints."""
    output_dir = Path(args.output_dir)
    final, tmp = output_dir / f"checkpoint-{step}", output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        accelerator.save_state(str(tmp))
        files = {p.relative_to(tmp).as_posix(): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {name: {"size": p.stat().st_size, "sha256": file_digest(p)} for name, p in files.items()}
        state = {"step": step, "seed": seed, **identity, "files": manifest}
        write_atomically(tmp / CHECKPOINT_STATE, lambda path: path.write_text(json.dumps(state, indent=2)))
        old = output_dir / f".checkpoint-{step}.old"
        if final.exists():  # a checkpoint of the same step from an earlier run: replaced, never left missing
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)
        stop_if_disk_full(error, final)
        raise
    logger.info(f"Saved {final}.")
    if args.checkpoints_total_limit is not None:
        existing = [p for p in list_checkpoints(output_dir) if p != final]
        for folder in existing[: max(0, len(existing) + 1 - args.checkpoints_total_limit)]:
            logger.info(f"Removing {folder.name} (--checkpoints_total_limit {args.checkpoints_total_limit}).")
            shutil.rmtree(folder)


def checkpoint_damage(path):
    """None if checkpoint folder `path` is complete, else what is wrong with it (a missing, cut or changed file).
    Checkpoints written before the manifest existed are checked for their state file only."""
    path = Path(path)
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
    except (OSError, ValueError):
        return f"{CHECKPOINT_STATE} is missing or unreadable"
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} is {file.stat().st_size} bytes, {expected['size']} were written"
        if file_digest(file) != expected["sha256"]:
            return f"{name} has changed since it was written"
    return None


def find_checkpoint(args, identity=None):
    """The folder --resume_from_checkpoint names, or None for 'latest' in a fresh output_dir. 'latest' is the newest
    complete checkpoint (damaged newer ones are passed over with a warning); a named damaged one is refused, and so
    is one made by another run (when `identity` is given)."""
    checkpoint = choose_checkpoint(args)
    if checkpoint is not None and identity is not None:
        read_checkpoint_state(checkpoint, identity)
    return checkpoint


def choose_checkpoint(args):
    """find_checkpoint's choice of folder, before the identity check."""
    if args.resume_from_checkpoint == "latest":
        for checkpoint in reversed(list_checkpoints(args.output_dir)):
            damage = checkpoint_damage(checkpoint)
            if damage is None:
                return checkpoint
            logger.warning(f"Passing over the damaged {checkpoint} ({damage}); trying the one before.")
        logger.info(f"No complete checkpoint in {args.output_dir}: starting a new run.")
        return None
    path = Path(args.resume_from_checkpoint)
    path = path if path.is_dir() else Path(args.output_dir) / args.resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint there; use 'latest'.")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise ValueError(f"--resume_from_checkpoint {path} is damaged ({damage}); name another or use 'latest'.")
    return path


def same_model(a, b):
    """Whether two --pretrained_model_name_or_path values name the same model (a local folder written another way,
    e.g. with a trailing slash or relative, is the same folder)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return isinstance(a, str) and isinstance(b, str) and a.rstrip("/") == b.rstrip("/")


def read_checkpoint_state(path, identity):
    state = json.loads((Path(path) / CHECKPOINT_STATE).read_text())
    for key, value in identity.items():
        same = same_model if key == "pretrained_model_name_or_path" else (lambda a, b: a == b)
        if key == "concepts" and state.get(key) != value:
            made = [c["placeholder_token"] for c in state.get(key) or [state]]
            raise ValueError(
                f"--resume_from_checkpoint {path} was made with the concepts {made}, this run has "
                f"{[c['placeholder_token'] for c in value]}; resume with the --concepts_list it was made with."
            )
        if not same(state.get(key), value):
            made, this = ("no LoRA" if v is None and key == "lora" else f"{key} {v!r}" for v in (state.get(key), value))
            raise ValueError(f"--resume_from_checkpoint {path} was made with {made}, this run has {this}.")
    return state


# ----------------------------------------------------------------------------------------------------------------
# DTI + LoRA (pivotal tuning): a LoRA of the denoiser trained next to the token, which stays on the sphere
# ----------------------------------------------------------------------------------------------------------------


def check_lora_args(args):
    """The --lora_* checks that need no model; fills in --lora_alpha."""
    if args.lora_rank < 0:
        raise ValueError("--lora_rank must be zero (no LoRA) or positive.")
    if args.lora_rank and args.concepts_list:
        raise ValueError(
            "--lora_rank with --concepts_list: a LoRA belongs to one concept; train a LoRA in a run of its own."
        )
    if not args.lora_rank:
        defaults = {"--lora_alpha": (args.lora_alpha, None), "--lora_start_step": (args.lora_start_step, 0),
                    "--lora_learning_rate": (args.lora_learning_rate, DEFAULT_LORA_LEARNING_RATE),
                    "--lora_target_modules": (args.lora_target_modules, DEFAULT_LORA_TARGETS)}  # fmt: skip
        for flag, (value, default) in defaults.items():
            if value != default:
                raise ValueError(f"{flag} applies to a LoRA only: add --lora_rank (e.g. 16) or drop {flag}.")
        return args
    args.lora_alpha = float(args.lora_rank) if args.lora_alpha is None else args.lora_alpha
    checks = [
        (math.isfinite(args.lora_alpha) and args.lora_alpha > 0, "--lora_alpha must be a positive number"),
        (
            math.isfinite(args.lora_learning_rate) and args.lora_learning_rate > 0,
            "--lora_learning_rate must be a positive number",
        ),
        (
            0 <= args.lora_start_step < args.max_train_steps,
            f"--lora_start_step must be in [0, --max_train_steps {args.max_train_steps}) for the LoRA to train",
        ),
        (lora_targets(args), "--lora_target_modules must name at least one layer, e.g. to_q,to_k,to_v,to_out.0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message}.")
    if importlib.util.find_spec("peft") is None:  # imported where the LoRA is made, after the library noise is quieted
        raise ValueError("--lora_rank needs peft: pip install peft.")
    return args


def lora_targets(args):
    return [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]


def check_lora_targets(denoiser, targets):
    """Every target must match a linear layer of the denoiser (peft's rule: the layer's name ends with it)."""
    linear = [name for name, module in denoiser.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            short = sorted({".".join(n.split(".")[-2 if n[-1].isdigit() else -1 :]) for n in linear})
            raise ValueError(
                f"--lora_target_modules: no linear layer of the {type(denoiser).__name__} is named {target!r}; "
                f"some that exist: {', '.join(short[:12])}."
            )


def lora_description(args):
    return f"rank {args.lora_rank}, alpha {args.lora_alpha:g}, targets {','.join(lora_targets(args))}"


def lora_metadata(args):
    """What the output files record about the LoRA (nothing without one)."""
    if not args.lora_rank:
        return {}
    return {"lora_rank": str(args.lora_rank), "lora_alpha": repr(args.lora_alpha),
            "lora_learning_rate": repr(args.lora_learning_rate), "lora_start_step": str(args.lora_start_step),
            "lora_target_modules": ",".join(lora_targets(args))}  # fmt: skip


class DenoiserLoRA:
    """A LoRA on the denoiser's linear layers, added through peft as diffusers' LoRA scripts add it: output
    W x + (alpha / rank) B A x, B [out, rank] starts at zero (the denoiser is unchanged at step 0), A [rank, in] is
    drawn from the run's seed (every process starts from the same LoRA). The parameters stay fp32 under fp16/bf16.
    state_dict / load_state_dict let accelerate checkpoint it."""

    def __init__(self, denoiser, args, seed, prefix):
        from peft import LoraConfig

        targets = lora_targets(args)
        check_lora_targets(denoiser, targets)
        self.rank, self.alpha, self.prefix = args.lora_rank, args.lora_alpha, prefix
        self.start_step = args.lora_start_step
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian", target_modules=targets)
        with torch.random.fork_rng(devices=[]):  # peft draws A on the CPU before moving it to the layer's device
            torch.manual_seed(stable_seed(seed, "lora"))
            denoiser.add_adapter(config)
        self.weights = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
        for parameter in self.weights.values():
            parameter.data = parameter.data.float()

    def parameters(self):
        return list(self.weights.values())

    def trains_at(self, step):
        """Whether the LoRA trains in this step (from --lora_start_step on); before, it takes no gradients at all."""
        trains = step >= self.start_step
        for parameter in self.weights.values():
            parameter.requires_grad_(trains)
        return trains

    def state_dict(self):
        return {name: p.detach().cpu().clone() for name, p in self.weights.items()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for name, parameter in self.weights.items():
                parameter.copy_(state[name])

    def diffusers_state_dict(self):
        """{"<prefix>.<layer>.lora_A.weight": [rank, in], "...lora_B.weight": [out, rank]}: the names
        load_lora_weights reads. B carries alpha / rank, so the file means the same at scale 1 in every loader."""
        scale = self.alpha / self.rank
        tensors = {}
        for name, parameter in self.weights.items():
            value = parameter.detach().float().cpu()
            if ".lora_B." in name and scale != 1:
                value = value * scale
            tensors[f"{self.prefix}.{name.replace('.default.', '.')}"] = value.contiguous()
        return tensors

    def kohya_state_dict(self, diffusers_tensors):
        """diffusers_state_dict() in the layout ComfyUI and A1111 / Forge read: lora_unet_<layer path, dots as
        underscores> with .lora_down (A), .lora_up (B) and .alpha (the rank here: B already carries the scale)."""
        tensors = {}
        for key, value in diffusers_tensors.items():
            layer, kind = key.removeprefix(f"{self.prefix}.").removesuffix(".weight").rsplit(".", 1)
            base = "lora_unet_" + layer.replace(".", "_")
            tensors[f"{base}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = value
            tensors[f"{base}.alpha"] = torch.tensor(float(self.rank))
        return tensors

    def files(self, output_dir, suffix, metadata, kohya_name=None):
        """{path: writer} of the LoRA's output files, for write_all_atomically."""
        metadata = metadata | {"format": "pt"}
        name = LORA_WEIGHT_NAME.replace(".safetensors", f"{suffix}.safetensors")
        tensors = self.diffusers_state_dict()
        files = {output_dir / name: partial(save_file, tensors, metadata=metadata)}
        if kohya_name:
            files[output_dir / f"{kohya_name}{suffix}.safetensors"] = partial(
                save_file, self.kohya_state_dict(tensors), metadata=metadata
            )
        return files


class TokenAndLoRAOptimizer(torch.optim.Optimizer):
    """The token's optimizer and the LoRA's AdamW stepped as one optimizer: accelerate's fp16 grad scaler unscales
    and checks both in one step, and one lr schedule drives both (each group at its own rate). The LoRA steps only
    when `lora_trains` is set (from --lora_start_step on, and in finite steps)."""

    def __init__(self, token_optimizer, lora_optimizer):
        self.token_optimizer, self.lora_optimizer, self.lora_trains = token_optimizer, lora_optimizer, False
        super().__init__(token_optimizer.param_groups + lora_optimizer.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        self.token_optimizer.step()
        if self.lora_trains:
            self.lora_optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.token_optimizer.zero_grad(set_to_none=set_to_none)
        self.lora_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"token": self.token_optimizer.state_dict(), "lora": self.lora_optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        self.token_optimizer.load_state_dict(state_dict["token"])
        self.lora_optimizer.load_state_dict(state_dict["lora"])


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def check_output_dir(args):
    """Refuse an --output_dir that holds another concept's run (unless --overwrite) or that cannot be written."""
    output_dir = Path(args.output_dir)
    previous = output_dir / "learned_embeds.safetensors"
    if previous.is_file() and not args.overwrite:
        try:
            with safe_open(previous, framework="pt") as f:
                other = (f.metadata() or {}).get("placeholder_token")
        except Exception:  # an unreadable file there is someone else's too
            other = None
        if other != args.placeholder_token:
            raise ValueError(
                f"--output_dir {output_dir} holds the run of {other!r}; pick another folder or --overwrite."
            )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        free = shutil.disk_usage(output_dir).free
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"--output_dir {output_dir} cannot be written ({reason}); pick another folder.") from None
    if free < MIN_FREE_BYTES:
        raise ValueError(
            f"--output_dir {output_dir}: only {free / 2**20:.0f} MiB free on its disk, {MIN_FREE_BYTES // 2**20} MiB "
            "are needed; free some space or pick another folder."
        )


def process_start_time(pid):
    """When process `pid` started (clock ticks since boot, Linux), to tell a live owner from a reused pid; else None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def lock_owner_alive(owner):
    """Whether the process recorded in a lock file ({"pid", "start", "host"}) still runs."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: cannot be checked, so assume it runs
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return owner.get("start") is None or owner.get("start") == process_start_time(pid)


def claim_output_dir(args, accelerator):
    """Refuse an --output_dir that a running training process uses; else mark it as this run's until exit. Only the
    main process holds the lock; a lock left by a process that died is taken over."""
    if not accelerator.is_main_process:
        return
    lock = Path(args.output_dir) / OUTPUT_LOCK
    me = {"pid": os.getpid(), "start": process_start_time(os.getpid()), "host": socket.gethostname()}
    for _ in range(3):  # created exclusively, so of two runs starting at once only one gets it
        try:
            with open(lock, "x") as file:
                file.write(json.dumps(me))
            break
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = None
            if isinstance(owner, dict) and owner.get("pid") != me["pid"] and lock_owner_alive(owner):
                raise ValueError(
                    f"--output_dir {args.output_dir} is in use by training process {owner.get('pid')} on "
                    f"{owner.get('host')}; wait for it or pick another folder (delete {lock} if it is gone)."
                ) from None
            lock.unlink(missing_ok=True)  # a dead process's lock, or this process's own from an earlier run

    def release():
        try:
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass

    atexit.register(release)


def load_tokenizers(args):
    """Both CLIP tokenizers, after checking that the model is an SDXL-layout diffusers checkpoint."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

    path = args.pretrained_model_name_or_path
    try:
        model_index = DiffusionPipeline.load_config(path, revision=args.revision)
        tokenizers = [
            CLIPTokenizer.from_pretrained(path, subfolder=subfolder, revision=args.revision)
            for subfolder in ("tokenizer", "tokenizer_2")
        ]
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--pretrained_model_name_or_path {path!r} could not be loaded ({reason}).") from error
    missing = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer_2") if c not in model_index]
    if missing or min(len(t) for t in tokenizers) < 1000:
        raise ValueError(f"--pretrained_model_name_or_path {path!r} is not an SDXL checkpoint (missing {missing}).")
    return tokenizers


def load_models(args, tokenizers):
    """The frozen SDXL components, fp32 (cast later, after the vocabulary statistics are taken), CLIP pooling as
    --pooled_output says."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path, common = args.pretrained_model_name_or_path, {"revision": args.revision, "variant": args.variant}
    try:
        text_encoders = [
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **common),
        ]
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **common)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=args.revision)
    except (OSError, ValueError) as error:
        raise ValueError(f"--pretrained_model_name_or_path {path!r}: a component failed to load ({error}).") from error
    for text_encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
        set_pooled_output(text_encoder, tokenizer, args.pooled_output)
    return text_encoders, vae, unet, noise_scheduler


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (a signal, or too many non-finite steps) after saving what it had."""


class StopRequest:
    """SIGTERM or SIGINT (a preempted job, Ctrl-C) asks the loop to finish its step, save and exit; a second one
    stops at once. All processes stop at the same step."""

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            term_when_launcher_dies()

    def handle(self, signum, frame):
        if self.signal is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C; a repeated SIGTERM changes nothing
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name

    def requested(self, accelerator, can_sync=True):
        """Whether to stop now. With several processes this takes an all-reduce, so it is asked at logging steps."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        if not can_sync:
            return False
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def term_when_launcher_dies():
    """Under `accelerate launch` or torchrun (Linux): ask the kernel for a SIGTERM when the launcher exits. accelerate's
    single-process launcher dies of a SIGTERM without passing it on; this way the run still saves and stops. Not under
    a shell or nohup: a training process started from those must outlive them."""
    parent = os.getppid()
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    words = {Path(os.fsdecode(word)).name for word in command[:4]}
    if not words & {"accelerate", "accelerate.commands.launch", "torchrun", "torch.distributed.run"}:
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


class NonFiniteGuard:
    """Skips an update whose loss or gradient is not finite (the directions stay as they were); after
    --max_nonfinite_steps such steps in a row, the run stops. The check stays on the device; the flags reach the
    host with the step logs (every --logging_steps), where skipped steps are reported."""

    def __init__(self, max_in_a_row, label=""):
        self.max_in_a_row, self.in_a_row, self.longest, self.skipped, self.last = max_in_a_row, 0, 0, 0, None
        self.label = label  # " of <tok>" in a --concepts_list run: each concept has its own guard

    @staticmethod
    def finite(step_losses, concepts, check_gradients=True, lora=None):
        """A bool tensor [K] on the device: each concept's loss and gradients are finite (with a LoRA, which a run of
        one concept only can have, also the LoRA's gradients). step_losses: [K]."""
        flags = []
        for step_loss, concept in zip(step_losses, concepts, strict=True):
            values = [torch.isfinite(step_loss)]
            if check_gradients:  # under fp16 the grad scaler handles overflowing gradients itself
                parameters = [*concept.learned.parameters(), *(lora.parameters() if lora else [])]
                values += [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
            flags.append(torch.stack(values).all())
        return torch.stack(flags)

    def record(self, step, finite):
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row, self.skipped, self.last = self.in_a_row + 1, self.skipped + 1, step
        self.longest = max(self.longest, self.in_a_row)
        logger.warning(
            f"Step {step}: non-finite loss or gradient{self.label}, update skipped ({self.in_a_row} in a row)."
        )

    @property
    def exhausted(self):
        return self.longest >= self.max_in_a_row


def resolve_seed(args, accelerator):
    """--seed, or a random seed drawn once and shared by every process; logged, so any run can be repeated."""
    seed = [args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)]
    broadcast_object_list(seed)
    if args.seed is None:
        logger.info(f"--seed not given: drew seed {seed[0]} (pass --seed {seed[0]} to repeat this run).")
    args.seed = seed[0]
    return seed[0]


def check_trackers(report_to):
    needed = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(report_to, [])
    for package in needed:
        try:
            __import__(package)
        except ImportError as error:
            raise ValueError(f"--report_to {report_to} needs {package}: pip install {package}.") from error
    if "wandb" in needed and not wandb_can_log():
        raise ValueError(
            f"--report_to {report_to}: wandb is not logged in; run `wandb login`, set WANDB_API_KEY, or set "
            "WANDB_MODE=offline to log locally."
        )


def wandb_can_log():
    """Whether wandb.init will run without asking for a key: offline or disabled mode, a key, or a netrc login."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_API_KEY"):
        return True
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class TqdmLogHandler(logging.StreamHandler):
    """In a terminal, log lines are written through tqdm, so that they appear above the progress bar instead of
    over it; elsewhere (a log file, a pipe) as plain lines, without redrawing the bar each time."""

    def emit(self, record):
        if not self.stream.isatty():
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler does: a failed log line must not stop the run
            self.handleError(record)


def quiet_library_noise():
    """Silence library messages that no user can act on: bitsandbytes' CPU 4-bit kernel notice (no 4-bit layer is
    used here) and transformers' notice that image processors fall back to PIL without torchvision."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    notices = logging.getLogger("transformers.utils.import_utils")
    if not any(getattr(f, "name", None) == "no-torchvision-notice" for f in notices.filters):  # once per process
        drop = logging.Filter("no-torchvision-notice")
        drop.filter = lambda record: "requires torchvision" not in record.getMessage()
        notices.addFilter(drop)


def make_accelerator(args):
    quiet_library_noise()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=world_size > 1 and not torch.cuda.is_available(),  # torchrun on CPUs: gloo, not N independent runs
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[TqdmLogHandler()])  # fmt: skip
    state = accelerator.state
    logger.info(
        f"{state.num_processes} process(es) ({state.distributed_type.value}), this one #{state.process_index} on "
        f"{state.device}, mixed precision {state.mixed_precision}.",
        main_process_only=False,
    )
    if accelerator.num_processes != world_size:
        raise ValueError(f"WORLD_SIZE is {world_size} but accelerate runs {accelerator.num_processes} process(es).")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def start_trackers(accelerator, args, project):
    """Start the --report_to trackers (main process) with the run's flags as their config. wandb takes its config at
    init (accelerate 1.10's offline wandb would start a second run to add it) and honours a user's WANDB_DIR."""
    if not accelerator.is_main_process or args.report_to == "none":
        return
    logging_dir = Path(args.output_dir) / args.logging_dir
    logging_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    wandb_kwargs = {"config": config, "name": args.run_name}
    if not os.environ.get("WANDB_DIR"):
        wandb_kwargs["dir"] = str(logging_dir)
    accelerator.init_trackers(project, init_kwargs={"wandb": wandb_kwargs})
    for tracker in accelerator.trackers:
        if tracker.name != "wandb":
            tracker.store_init_configuration(config)


def add_concept_tokens(args, tokenizers, in_prompt=True):
    """Add the placeholder to every tokenizer. Returns (initializer ids, placeholder ids) per tokenizer."""
    init_ids = [initializer_token_ids(t, args.initializer_token, args.num_vectors, in_prompt) for t in tokenizers]
    if len({len(ids) for ids in init_ids}) > 1:
        raise ValueError(f"--initializer_token {args.initializer_token!r} tokenizes differently in the tokenizers.")
    placeholder_ids = [add_placeholder_tokens(t, args.placeholder_token, len(init_ids[0])) for t in tokenizers]
    return init_ids, placeholder_ids


def attach_learned_tokens(args, text_encoders, init_ids, placeholder_ids, seed, contextual=None, vocabulary_sizes=None):
    """Build the learned tokens of each encoder from its pretrained table (crossinit: from the contextual vectors by
    encoder), then give the encoder rows and a hook that feeds it the learned vectors. vocabulary_sizes: each
    tokenizer's size before any concept's tokens were added (default: the first new id). Returns (learned tokens by
    encoder, vocabulary mean norm by encoder)."""
    learned, vocabulary_mean_norms = torch.nn.ModuleDict(), {}
    sizes = vocabulary_sizes or [new_ids[0] for new_ids in placeholder_ids]
    for name, text_encoder, ids, new_ids, size in zip(TEXT_ENCODERS, text_encoders, init_ids, placeholder_ids, sizes,
                                                      strict=True):  # fmt: skip
        table = text_encoder.get_input_embeddings().weight
        vocabulary_mean_norms[name] = vocabulary_norms(table[:size]).mean().item()
        start = contextual[name] if contextual else None
        learned[name] = make_learned_tokens(args, text_encoder, ids, seed, name, size, start)
        if len(table) <= new_ids[-1]:  # a table padded beyond the tokenizer already has rows for the new ids
            text_encoder.resize_token_embeddings(new_ids[-1] + 1, mean_resizing=False)
        with torch.no_grad():  # the new rows matter only to code that reads the table; keep them meaningful
            table = text_encoder.get_input_embeddings().weight
            table[new_ids] = learned[name].embeddings().to(table.dtype)
        inject_learned_tokens(text_encoder, new_ids[0], learned[name])
    return learned, vocabulary_mean_norms


def prepare_concepts(concept_args, tokenizers, fit, in_prompt=True):
    """Per concept, before any model loads: its tokens added to every tokenizer (after the previous concepts'), its
    prompts checked against the context (fit: prompt -> {key: ids}), its images read. Returns one namespace per
    concept; an error names its --concepts_list entry."""
    concepts = []
    for args in concept_args:
        try:
            init_ids, placeholder_ids = add_concept_tokens(args, tokenizers, in_prompt)
            num_vectors = len(init_ids[0])
            templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES
            check_prompts_fit(args, fit, templates, placeholder_ids, num_vectors)
            images = (
                load_dataset_images(args)
                if args.dataset_name
                else load_training_images(args.train_data_dir, args.resolution)
            )
        except ValueError as error:
            if args.concept_index is None:
                raise
            raise ValueError(
                f"--concepts_list entry {args.concept_index} ({args.placeholder_token}): {error}"
            ) from None
        if args.num_validation_images and args.placeholder_token not in validation_prompt(args):
            logger.warning(
                f"--validation_prompt {args.validation_prompt!r} has neither '{{}}' nor the placeholder token."
            )
        prefix = "" if args.concept_index is None else f"{concept_name(args.placeholder_token)}/"
        concepts.append(SimpleNamespace(args=args, init_ids=init_ids, placeholder_ids=placeholder_ids, images=images,
                                        num_vectors=num_vectors, templates=templates, prefix=prefix))  # fmt: skip
    return concepts


def claim_output_dirs(args, concepts, accelerator):
    """Check and claim --output_dir (checkpoints) and every concept's output folder (the same one for one concept)."""
    folders = {os.path.abspath(a.output_dir): a for a in (args, *(c.args for c in concepts))}
    for folder_args in folders.values():
        check_output_dir(folder_args)
    for folder_args in folders.values():
        claim_output_dir(folder_args, accelerator)


def attach_concepts(concepts, tokenizers, text_encoders, seed, vocabulary_sizes):
    """Give each concept its learned tokens on the text encoders (crossinit: started at the encoders' output for its
    initializer), from the pretrained tables: the first vocabulary_sizes rows."""
    for c in concepts:
        crossinit = c.args.method == "crossinit"
        start = encode_initializer(c.args, tokenizers, text_encoders, c.num_vectors) if crossinit else None
        c.learned, c.vocabulary_mean_norms = attach_learned_tokens(
            c.args, text_encoders, c.init_ids, c.placeholder_ids, seed, start, vocabulary_sizes
        )


def start_streams(concepts, args, tokenize, vae, accelerator, global_step, seed):
    """Each concept's data set, latent source and batch stream from global_step, as its own run would have them (the
    draws are keyed by seed and stream position), and its own non-finite guard."""
    for c in concepts:
        prompt_token = placeholder_prompt_token(c.args.placeholder_token, c.num_vectors)
        c.dataset = DTIDataset(c.images, prompt_token, tokenize, args.resolution, args.center_crop, args.random_flip,
                               c.templates, args.repeats, seed)  # fmt: skip
        c.latents = latent_source(args, c.dataset, vae)
        c.batches = batch_stream(args, c.dataset, accelerator, global_step)
        c.guard = NonFiniteGuard(args.max_nonfinite_steps, f" of {c.args.placeholder_token}" if c.prefix else "")


def save_all_embeddings(concepts, step, suffix="", lora=None):
    """Each concept's embedding files in its output folder (and the LoRA's, which a run of one concept only has)."""
    for c in concepts:
        save_embeddings(c.learned, c.args, c.vocabulary_mean_norms, step, suffix, lora)


def describe_concepts(concepts, args):
    """The concepts in one line for the start-of-training banner."""
    return "; ".join(
        f"{c.args.placeholder_token} ({len(c.images)} images x {args.repeats} repeats, {c.num_vectors} vector(s) "
        f"from {c.args.initializer_token!r})"
        for c in concepts
    )


def freeze(models, accelerator, weight_dtype, gradient_checkpointing, fp32=()):
    """Frozen models on the device in the mixed-precision dtype, except those named in fp32 (and the VAE under fp16,
    where it overflows)."""
    for name, module in models.items():
        module.requires_grad_(False)
        dtype = torch.float32 if name in fp32 or (name == "vae" and weight_dtype == torch.float16) else weight_dtype
        # diffusers' .to(dtype) warns about fp32 modules even when a model has none: cast those models as torch does
        cast = module.to if getattr(module, "_keep_in_fp32_modules", None) else partial(torch.nn.Module.to, module)
        cast(accelerator.device, dtype=dtype)
        if gradient_checkpointing and name != "vae":
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
                module.enable_gradient_checkpointing()
            else:  # transformers models (activation_checkpointing_enable is the name from transformers 5 on)
                (getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable)()
            module.train()  # checkpointing is active in train mode only; these models have no dropout


def make_optimizer(args, tokens, lora=None):
    """One optimizer over every concept's learned tokens (a list of token modules): RSGD and AdamW treat each
    parameter on its own, so each concept is updated as its own run would update it. With a LoRA, AdamW for it too,
    stepped with the tokens' optimizer as one."""
    adamw = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from error
        adamw = bnb.optim.AdamW8bit
    adamw = partial(adamw, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                    eps=args.adam_epsilon)  # fmt: skip
    if args.method == "dti" and args.optimizer == "rsgd":
        token_optimizer = RiemannianSGD(tokens, lr=args.learning_rate)
    else:
        token_optimizer = adamw([p for t in tokens for p in t.parameters()], lr=args.learning_rate)
    if lora is None:
        return token_optimizer
    return TokenAndLoRAOptimizer(token_optimizer, adamw(lora.parameters(), lr=args.lora_learning_rate))


def resume(args, accelerator, checkpoint, identity, seed):
    """Load the checkpoint find_checkpoint chose, if any. Returns (global step, seed) to continue with."""
    if checkpoint is None:
        return 0, seed
    state = read_checkpoint_state(checkpoint, identity)
    if state["seed"] != seed:
        logger.warning(f"Resuming with the checkpoint's seed {state['seed']} (the data stream depends on it).")
    accelerator.load_state(str(checkpoint))
    logger.info(f"Resumed from {checkpoint} at step {state['step']}.")
    args.seed = state["seed"]
    return state["step"], state["seed"]


def latent_source(args, dataset, vae):
    """batch -> (latent mean, latent std), fp32: from a cache of every image's latents when that is exact
    (--cache_latents), else from the VAE each step."""
    if args.cache_latents and dataset.crops_are_fixed:
        cache = LatentCache(dataset, vae)
        dataset.with_pixels = False  # no image work per sample any more
        logger.info(f"Cached the latents of {len(dataset.images)} images.")
        return cache
    if args.cache_latents:
        logger.warning("--cache_latents needs --center_crop or square images at --resolution: encoding each step.")
    return lambda batch: vae_posterior(vae, batch["pixel_values"])


def batch_stream(args, dataset, accelerator, global_step):
    """This process's endless iterator of batches, from the stream position of global_step."""
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    sampler = StreamSampler(
        global_step * samples_per_step, args.train_batch_size, accelerator.process_index, accelerator.num_processes
    )
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    return iter(loader)


def data_gradient(concepts, loss_fn, accelerator, accumulation_steps, concepts_per_step=None, lora=None):
    """The data loss's gradient over one global batch of every concept, left in the learned tokens' (and the LoRA's)
    .grad: accumulated over micro-batches, averaged over processes; crossinit adds its regularizer's gradient (once per
    step: 1/accumulation per micro-batch). Each forward and backward takes the micro-batches of concepts_per_step
    concepts (default: all) as one batch; the loss is the sum of the concepts' mean losses, so each concept gets
    the gradient of its own run (a sample's loss depends on its own concept's tokens only). Returns the step's data
    loss of each concept, a device tensor [K] (no host sync)."""
    step_loss = torch.zeros(len(concepts), device=accelerator.device)
    group_size = concepts_per_step or len(concepts)
    for _ in range(accumulation_steps):
        for first in range(0, len(concepts), group_size):
            group = concepts[first : first + group_size]
            batches = [next(c.batches) for c in group]
            latents = [c.latents(batch) for c, batch in zip(group, batches, strict=True)]
            losses = loss_fn(concatenate_batches(batches), *(torch.cat(parts) for parts in zip(*latents, strict=True)))
            losses = torch.stack([part.mean() for part in losses.split([len(b["position"]) for b in batches])])
            penalty = sum(t.regularizer() for c in group for t in c.learned.values() if isinstance(t, CrossInitTokens))
            accelerator.backward((losses.sum() + penalty) / accumulation_steps)
            step_loss[first : first + len(group)] += losses.detach() / accumulation_steps
    if accelerator.num_processes > 1:
        for parameter in (p for c in concepts for p in c.learned.parameters()):
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        grads = [p.grad for p in lora.parameters() if p.grad is not None] if lora is not None else []
        if grads:  # a training LoRA: one flat all-reduce for its many small tensors
            flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(mean.view_as(grad))
        step_loss = accelerator.reduce(step_loss, reduction="mean")
    return step_loss


def concatenate_batches(batches):
    """One batch of several (the concepts' micro-batches, in order): tensors joined on the batch axis."""

    def join(values):
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            return {key: join([v[key] for v in values]) for key in values[0]}
        if isinstance(values[0], list):
            return [item for v in values for item in v]
        return torch.cat(values)

    return batches[0] if len(batches) == 1 else {key: join([b[key] for b in batches]) for key in batches[0]}


def apply_update(optimizer, concepts, finite, adamw_on_sphere, lora_trains=False):
    """The update of each concept whose flag in `finite` [K] holds: RSGD masks it on the device (no host sync); the
    AdamW modes (baselines) read the flags and drop the other concepts' gradients, so AdamW leaves those alone. AdamW
    on the sphere adds the prior's gradient and retracts after the step (the ablation). A LoRA steps only when
    lora_trains (from --lora_start_step on) and the step is finite (a host read)."""
    rsgd = getattr(optimizer, "optimizer", optimizer)
    if isinstance(rsgd, TokenAndLoRAOptimizer):
        rsgd.lora_trains = lora_trains and bool(finite.all().item())
        rsgd = rsgd.token_optimizer
    if isinstance(rsgd, RiemannianSGD):
        rsgd.only_if = finite.repeat_interleave(len(concepts[0].learned))  # one flag per tokens, as rsgd.tokens
        optimizer.step()
    else:
        flags = finite.tolist()
        for concept, ok in zip(concepts, flags, strict=True):
            if not ok:
                concept.learned.zero_grad(set_to_none=True)
        if any(flags):
            kept = [t for c, ok in zip(concepts, flags, strict=True) if ok for t in c.learned.values()]
            sphere = kept if adamw_on_sphere else []  # the ablation: the prior's gradient, then back to the sphere
            for tokens in sphere:
                tokens.add_prior_gradient()
            optimizer.step()
            for tokens in sphere:
                tokens.retract()
    optimizer.zero_grad(set_to_none=True)


class StepLogs:
    """Per step: lr and, per concept, its loss, its finite flag and, per encoder, the norm, cosine to the prior and
    degrees turned (keys prefixed by the concept's name in a --concepts_list run). Kept on the device and read in one
    host sync every --logging_steps, so the loop never waits for the GPU."""

    def __init__(self, concepts):
        self.concepts, self.pending = concepts, []

    def add(self, step, step_loss, lr, finite):
        stats = [step_loss.float(), finite.float()] + [t.stats() for c in self.concepts for t in c.learned.values()]
        self.pending.append((step, lr, torch.cat(stats)))

    def read(self):
        """[(step, finite flag of each concept, logs)] of the steps added since the last read."""
        if not self.pending:
            return []
        rows, k = torch.stack([values for _, _, values in self.pending]).tolist(), len(self.concepts)
        names = [(c.prefix, name) for c in self.concepts for name in c.learned]
        records = []
        for (step, lr, _), row in zip(self.pending, rows, strict=True):
            logs = {"lr": lr} | {f"{c.prefix}loss": loss for c, loss in zip(self.concepts, row[:k], strict=True)}
            for i, (prefix, name) in enumerate(names):
                norm, cos_prior, angle = row[2 * k + 3 * i : 2 * k + 3 * i + 3]
                logs |= {f"{prefix}{name}/norm": norm, f"{prefix}{name}/cos_prior": cos_prior,
                         f"{prefix}{name}/angle_deg": angle}  # fmt: skip
            records.append((step, [flag > 0 for flag in row[k : 2 * k]], logs))
        self.pending = []
        return records


def report_steps(step_logs, concepts, accelerator, progress):
    """Read the pending step logs (one host sync): log them, account skipped steps, show the last in the bar (the
    concepts' mean loss and angle)."""
    records = step_logs.read()
    for step, flags, logs in records:
        for concept, finite in zip(concepts, flags, strict=True):
            concept.guard.record(step, finite)
        accelerator.log(logs, step=step)
    if records:  # the bar shows the last logging step's values (they are read every --logging_steps)
        step, _, logs = records[-1]
        loss = sum(logs[f"{c.prefix}loss"] for c in concepts) / len(concepts)
        angle = sum(logs[f"{c.prefix}text_encoder/angle_deg"] for c in concepts) / len(concepts)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{logs['lr']:.3g}", angle=f"{angle:.2f}", at_step=step)


def run_summary(args, started):
    """One line: what the run wrote where, and how long it took."""
    output_dir = Path(args.output_dir)
    files = sorted(p.name for p in output_dir.glob("*.safetensors") if "-steps-" not in p.name)
    files += [name for name in ("README.md", "validation/", "checkpoint-*/") if list(output_dir.glob(name))]
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    return f"Done in {minutes}m{seconds:02d}s: wrote {', '.join(files)} in {output_dir}."


def quantize_8bit(model):
    """Swap every nn.Linear of a frozen model for bitsandbytes' LLM.int8 layer (int8 weights, outlier features in
    16 bit); the weights are quantized when the model moves to its device. Gradients still reach the layer inputs,
    so the learned rows get theirs. Returns the number of layers swapped."""
    import bitsandbytes as bnb

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, device="meta")  # fmt: skip
            layer.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            swapped += 1
    return swapped


def stop_if_exhausted(concepts, args, accelerator, step, lora=None):
    """After --max_nonfinite_steps non-finite steps in a row of any concept: save the last good embeddings, stop."""
    guard = next((c.guard for c in concepts if c.guard.exhausted), None)
    if guard is None:
        return
    if accelerator.is_main_process:
        save_all_embeddings(concepts, step, lora=lora)
    raise TrainingStopped(
        f"{guard.longest} steps in a row had a non-finite loss or gradient{guard.label} (the last: step "
        f"{guard.last}); the last good embeddings are in {args.output_dir}. Lower --learning_rate or check the data."
    )


def save_and_stop(stop, concepts, args, accelerator, step, seed, identity, lora=None):
    """A stop signal: save the embeddings and a checkpoint of this step, then stop (the run resumes from it)."""
    if accelerator.is_main_process:
        save_all_embeddings(concepts, step, lora=lora)
        if step % args.checkpointing_steps:
            save_checkpoint(accelerator, args, step, seed, identity)
    accelerator.wait_for_everyone()
    raise TrainingStopped(
        f"{stop.signal or 'A stop signal'} at step {step}: saved checkpoint-{step} and the embeddings in "
        f"{args.output_dir}; continue with --resume_from_checkpoint latest."
    )


def main(args):
    started = time.monotonic()
    validate_args(args)
    concept_args = read_concepts(args)  # one concept, or one per --concepts_list entry
    check_inputs(args)
    for concept in concept_args:
        check_output_names(concept)
    check_trackers(args.report_to)
    token = hub_token(args)
    accelerator = make_accelerator(args)
    for warning in ignored_flags(args):
        logger.warning(warning)
    seed = resolve_seed(args, accelerator)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # Tokens and data first: their errors are cheap to find, the models are not.
    tokenizers = load_tokenizers(args)
    vocabulary_sizes = [len(t) for t in tokenizers]
    tokenize = partial(tokenize_prompt, tokenizers)
    concepts = prepare_concepts(concept_args, tokenizers, tokenize)
    claim_output_dirs(args, concepts, accelerator)
    identity = run_identity(args, concepts) | {"pooled_output": args.pooled_output}
    checkpoint = find_checkpoint(args, identity) if args.resume_from_checkpoint else None
    text_encoders, vae, unet, noise_scheduler = load_models(args, tokenizers)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % vae_factor:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE factor {vae_factor}.")
    if args.scale_lr:
        scale = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        args.learning_rate, args.lora_learning_rate = args.learning_rate * scale, args.lora_learning_rate * scale

    # The learned tokens in fp32 (crossinit: from the encoders' output for the initializer); every other weight
    # frozen in the mixed-precision dtype.
    attach_concepts(concepts, tokenizers, text_encoders, seed, vocabulary_sizes)
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1]}
    if args.quantize_frozen == "8bit":
        swapped = sum(quantize_8bit(model) for model in (unet, *text_encoders))
        logger.info(f"--quantize_frozen 8bit: {swapped} linear layers of the UNet and text encoders in int8.")
    freeze(models, accelerator, weight_dtype, args.gradient_checkpointing)
    for concept in concepts:
        concept.learned.to(accelerator.device)
    lora = DenoiserLoRA(unet, args, seed, prefix="unet") if args.lora_rank else None  # DTI + LoRA
    denoiser = torch.compile(unet, backend=args.compile_backend) if args.compile else unet  # for training only

    optimizer = make_optimizer(args, [t for c in concepts for t in c.learned.values()], lora)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    optimizer = accelerator.prepare(optimizer)  # the fp16 grad scaler, when there is one
    accelerator.register_for_checkpointing(*(c.learned for c in concepts), lr_scheduler, *([lora] if lora else []))
    global_step, seed = resume(args, accelerator, checkpoint, identity, seed)
    start_streams(concepts, args, tokenize, vae, accelerator, global_step, seed)
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps

    start_trackers(accelerator, args, "dti-sdxl")
    norms = ", ".join(f"{n}={t.norm_scale:.4g}" for n, t in concepts[0].learned.items() if args.method == "dti")
    logger.info(
        f"***** {args.method.upper()} on SDXL ***** {describe_concepts(concepts, args)} | m* {norms or 'free'} | "
        f"kappa {args.kappa} | lr {args.learning_rate} | {samples_per_step} samples/step per concept | "
        f"{args.max_train_steps} steps"
    )
    components = {**models, "tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1]}
    validate = args.num_validation_images > 0 and accelerator.is_main_process
    adamw_on_sphere = args.method == "dti" and args.optimizer == "adamw"
    progress = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    loss_fn = partial(training_loss, unet=denoiser, text_encoders=text_encoders, noise_scheduler=noise_scheduler,
                      vae_scale=vae.config.scaling_factor, seed=seed, resolution=args.resolution)  # fmt: skip
    logs = StepLogs(concepts)
    with StopRequest() as stop:
        while global_step < args.max_train_steps:
            # One step: the data gradient, then RSGD on the sphere (or AdamW: the baselines); a concept's update is
            # skipped if its loss or gradient is not finite.
            lora_trains = lora is not None and lora.trains_at(global_step)  # no LoRA gradients before its start
            step_loss = data_gradient(concepts, loss_fn, accelerator, args.gradient_accumulation_steps,
                                      args.concepts_per_step, lora)  # fmt: skip
            finite = NonFiniteGuard.finite(step_loss, concepts, check_gradients=accelerator.scaler is None, lora=lora)
            lr = lr_scheduler.get_last_lr()[0]
            apply_update(optimizer, concepts, finite, adamw_on_sphere, lora_trains)
            lr_scheduler.step()
            global_step += 1
            logs.add(global_step, step_loss, lr, finite)
            progress.update(1)

            at_logging_step = global_step % args.logging_steps == 0 or global_step == args.max_train_steps
            if at_logging_step:  # the loop's only host sync
                report_steps(logs, concepts, accelerator, progress)
            stop_if_exhausted(concepts, args, accelerator, global_step, lora)
            if accelerator.is_main_process:
                if global_step % args.save_steps == 0 and global_step < args.max_train_steps:
                    save_all_embeddings(concepts, global_step, f"-steps-{global_step}", lora)
                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, global_step, seed, identity)
                if validate and global_step % args.validation_steps == 0:
                    for concept in concepts:
                        log_validation(components, noise_scheduler, concept.args, accelerator, seed, global_step)

            if stop.requested(accelerator, can_sync=at_logging_step):
                report_steps(logs, concepts, accelerator, progress)
                save_and_stop(stop, concepts, args, accelerator, global_step, seed, identity, lora)
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_all_embeddings(concepts, global_step, lora=lora)
        for concept in concepts:
            if validate and global_step % args.validation_steps != 0:
                log_validation(components, noise_scheduler, concept.args, accelerator, seed, global_step)
            repo_id = create_hub_repo(concept.args, token) if args.push_to_hub else hub_repo_id(concept.args)
            save_model_card(concept.args, concept.learned, global_step, accelerator.num_processes, repo_id)
            if args.push_to_hub:
                push_to_hub(concept.args, repo_id, token)
    accelerator.end_training()
    for concept in concepts:
        logger.info(run_summary(concept.args, started))
    return SimpleNamespace(learned=concepts[0].learned, concepts=concepts, components=components,
                           placeholder_ids=concepts[0].placeholder_ids, seed=seed, lora=lora)  # fmt: skip


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, TrainingStopped) as error:
        sys.exit(f"error: {error}")

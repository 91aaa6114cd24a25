"""Arguments: the flags every family shares (the family adds its own), their checks, and the concepts of a run."""

import argparse
import difflib
import json
import math
import os
import re
from pathlib import Path

from dti.core.checkpoints import find_checkpoint
from dti.core.constants import (
    CONCEPT_KEYS,
    DEFAULT_CROSSINIT_LAMBDA,
    DEFAULT_LEARNING_RATE,
    DEFAULT_LORA_LEARNING_RATE,
    DEFAULT_LORA_TARGETS,
    DEFAULT_VALIDATION_PROMPT,
    FP32_MAX,
    MAX_NAME_BYTES,
    MAX_REPEATS,
)
from dti.core.plumbing import concept_name
from dti.core.step import check_lora_args


def parse_token_scale(value):
    """`--token_scale`: mean, min, max or a positive float."""
    if value in ("mean", "min", "max"):
        return value
    try:
        scale = float(value)
    except ValueError:
        scale = float("nan")
    if not (0 < scale <= FP32_MAX):
        raise argparse.ArgumentTypeError(
            f"expected mean, min, max or a positive number (float32's range: at most 3.4e38), got {value!r}"
        )
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
    """argparse without prefix matching (--max_train is not taken for --max_train_steps), with usage errors printed as
    one line (the flag and what is wrong; for an unknown flag, the closest known one) instead of the full usage."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_arguments(unknown, self._option_string_actions))
        return namespace

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def unknown_arguments(unknown, known_flags):
    """The message for arguments no flag takes: the first unknown flag and the known flag closest to it."""
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")]
    if not flags:
        return f"unrecognized arguments: {' '.join(unknown)}"
    known = sorted(flag for flag in known_flags if flag.startswith("--"))
    close = [flag for flag in known if flag.startswith(flags[0])] or difflib.get_close_matches(flags[0], known, n=1)
    return f"unknown flag {flags[0]}" + (f"; did you mean {close[0]}?" if close else "")  # an abbreviation: its flag


def parse_arguments(family, input_args=None):
    """The flags every family shares, the family's defaults, and the family's own flags (family.add_arguments)."""
    parser = OneLineErrorParser(
        usage="%(prog)s --pretrained_model_name_or_path MODEL --train_data_dir DIR --placeholder_token TOKEN "
        "--initializer_token WORD [options]",
        description=f"Directional Textual Inversion (DTI) for {family.title}.",
        formatter_class=HelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        required=True,
        help=family.model_help,
    )
    model.add_argument("--revision", type=str, default=None, help="Revision (branch, tag or commit) of the model.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant to load, e.g. fp16.")

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
        "--captions",
        type=str,
        default=None,
        help="With --train_data_dir: a JSON file {image file name: caption}, '{}' where the token goes ('a {} on a "
        "mossy rock'); each image then trains with its own caption instead of a random template. A key may also be "
        "'<folder>/<file name>', so one file covers several folders; keys starting with '_' are notes. Every image "
        "needs a caption.",
    )
    data.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help="With --dataset_name: the column of per-image captions, '{}' where the token goes (as --captions).",
    )
    data.add_argument(
        "--learnable_property",
        choices=["object", "style"],
        default="object",
        help="Prompt templates: 'a photo of a {}' for objects, 'a painting in the style of {}' for styles.",
    )
    data.add_argument("--repeats", type=int, default=100, help="How many times the images repeat in one epoch.")
    data.add_argument(
        "--resolution",
        type=int,
        default=family.defaults["resolution"],
        help=f"Training resolution (square); a multiple of the {family.vae_label} factor {family.vae_factor}.",
    )
    data.add_argument(
        "--center_crop", action="store_true", help="Crop the center of each image instead of a random crop."
    )
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally with probability 0.5.")
    data.add_argument(
        "--image_resampling",
        choices=["bilinear", "bicubic"],
        default="bilinear",
        help="Filter of the resize to --resolution: bilinear, or bicubic as the DTI authors' code resizes.",
    )
    data.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="Worker processes for data loading (0: main process)."
    )

    token = parser.add_argument_group("concept token")
    token.add_argument(
        "--placeholder_token",
        type=str,
        default=None,
        help=f"The new token, e.g. '<my-dog>'. {family.placeholder_rule}No spaces. Required.",
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
        "num_vectors, learnable_property, validation_prompt, output_dir, captions, caption_column, trained "
        "together in one run (each as its own run would train it). Outputs go to --output_dir/<placeholder>/ unless "
        "an entry names its output_dir; the other flags apply to every concept.",
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
        help=f"dti only. Concentration of the vMF prior toward the class word. Default: {family.default_kappa}.",
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
    lora.add_argument(
        "--dco_beta",
        type=float,
        default=0.0,
        help="With --lora_rank: train with the DCO loss (Direct Consistency Optimization), the DTI authors' DTI + "
        "LoRA recipe (beta 1000): -log sigmoid(-beta (l_model - l_ref)), l_ref the loss of the denoiser without the "
        "LoRA on the same noisy latents, timesteps and prompts. As beta -> 0 it is log 2 + beta/2 (l_model - l_ref) "
        "and its gradient beta/2 times the plain loss's. 0: the plain loss.",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default="dti-model", help="Where embeddings and checkpoints go.")
    train.add_argument(
        "--overwrite", action="store_true", help="Allow --output_dir to hold another concept's run (it is replaced)."
    )
    train.add_argument("--seed", type=int, default=None, help="Seed of every random draw. Default: a random seed.")
    train.add_argument(
        "--train_batch_size", type=int, default=family.defaults["train_batch_size"], help="Batch size per process."
    )
    train.add_argument(
        "--max_train_steps", type=int, default=family.defaults["max_train_steps"], help="Number of update steps."
    )
    train.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=family.defaults["gradient_accumulation_steps"],
        help="Batches accumulated per update step.",
    )
    train.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help=f"Recompute activations of the {family.denoiser_label} and {family.text_encoder_label} in the backward "
        "pass to save memory.",
    )
    compiled = family.denoiser_label + (f" and {family.text_encoder_label}" if family.compile_text_encoders else "")
    train.add_argument(
        "--compile",
        action="store_true",
        help=f"torch.compile the {compiled} for training (the first steps are slow while it compiles; "
        "validation is not).",
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
        help=f"8bit: the linear layers of the frozen {family.denoiser_label} and {family.text_encoder_label} in int8 "
        "(bitsandbytes LLM.int8) to save memory; gradients still reach the learned rows, the loss changes slightly.",
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
        default=family.defaults.get("validation_prompt", DEFAULT_VALIDATION_PROMPT),
        help="Prompt of the validation images; '{}' stands for the placeholder token.",
    )
    logs.add_argument(
        "--num_validation_images", type=int, default=4, help="Images per validation; 0 turns validation off."
    )
    logs.add_argument(
        "--validation_batch_size",
        type=int,
        default=None,
        help="Validation images per pipeline call; each has its own seed, so the images do not depend on it. Default: "
        "all at once (a call that runs out of GPU memory is retried at half the size).",
    )
    logs.add_argument(
        "--validation_steps",
        type=int,
        default=family.defaults.get("validation_steps", 50),
        help="Validate every N steps (and always at the end).",
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

    family.add_arguments(parser, {"model": model, "data": data, "token": token, "training": train, "logging": logs})
    return parser.parse_args(input_args)


def validate_args(args, family):
    """Check the arguments that argparse cannot; fill in method-dependent defaults (the family's kappa)."""
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE[args.method]
    if args.kappa is None:
        args.kappa = family.default_kappa if args.method == "dti" else 0.0
    if args.crossinit_lambda is None:
        args.crossinit_lambda = DEFAULT_CROSSINIT_LAMBDA if args.method == "crossinit" else 0.0
    checks = [
        (0 < args.learning_rate <= FP32_MAX, "--learning_rate must be a positive number (in float32's range)"),
        (args.kappa >= 0 and math.isfinite(args.kappa), "--kappa must be zero or positive"),
        (
            args.crossinit_lambda >= 0 and math.isfinite(args.crossinit_lambda),
            "--crossinit_lambda must be zero or a positive number",
        ),
        (0 <= args.beta < 1, "--beta must be in [0, 1)"),
        (
            args.resolution > 0 and args.resolution % family.vae_factor == 0,
            f"--resolution must be a positive multiple of the {family.vae_label} factor {family.vae_factor}",
        ),
        (args.train_batch_size >= 1, "--train_batch_size must be at least 1"),
        (args.max_train_steps >= 1, "--max_train_steps must be at least 1"),
        (args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
        (
            1 <= args.repeats <= MAX_REPEATS,
            f"--repeats must be in [1, {MAX_REPEATS}] (an epoch's order is drawn in memory)",
        ),
        (args.num_vectors is None or args.num_vectors >= 1, "--num_vectors must be at least 1"),
        (args.concepts_per_step is None or args.concepts_per_step >= 1, "--concepts_per_step must be at least 1"),
        (
            args.concepts_per_step is None or args.concepts_list is not None,
            "--concepts_per_step applies to --concepts_list runs only; drop it or give a --concepts_list",
        ),
        (args.output_dir.strip() != "", "--output_dir must not be empty; give a folder"),
        (args.num_validation_images >= 0, "--num_validation_images must be zero or positive"),
        (args.validation_steps >= 1, "--validation_steps must be at least 1"),
        (
            args.validation_batch_size is None or args.validation_batch_size >= 1,
            "--validation_batch_size must be at least 1",
        ),
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


def check_file_name(placeholder_token):
    """The placeholder names files (and, in a --concepts_list run, a folder): refuse one that names no file of its own
    ('.', '..') or one too long for the file system's 255 bytes once '-steps-N_lora.safetensors' is added."""
    name = concept_name(placeholder_token)
    if set(name) <= {"."}:
        raise ValueError(
            f"--placeholder_token {placeholder_token!r} would name its files {name!r}; use letters or digits."
        )
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(
            f"--placeholder_token is too long to name files ({len(name.encode())} bytes; at most {MAX_NAME_BYTES})."
        )


def validate_concept(args):
    """Check one concept's own flags (a --concepts_list entry's keys): its token, its initializer, one data source."""
    examples = {"--placeholder_token": "'<my-dog>' (the new token)", "--initializer_token": "dog (its class word)"}
    missing = [flag for flag in examples if getattr(args, flag[2:]) is None]
    if missing:
        give = " ".join(f"{flag} {examples[flag]}" for flag in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise ValueError(
            f"{' and '.join(missing)} {verb} missing: give {give}, or --concepts_list for several concepts."
        )
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
    check_file_name(args.placeholder_token)
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("Give exactly one of --train_data_dir (a folder of images) and --dataset_name.")
    if args.captions is not None and args.dataset_name is not None:
        raise ValueError("--captions goes with --train_data_dir; with --dataset_name give --caption_column.")
    if args.caption_column is not None and args.train_data_dir is not None:
        raise ValueError("--caption_column goes with --dataset_name; with --train_data_dir give --captions FILE.")
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
    if args.revision is not None and os.path.isdir(args.pretrained_model_name_or_path):
        raise ValueError(
            f"--revision applies to Hub ids; {args.pretrained_model_name_or_path} is a local folder: drop --revision "
            "(or check the revision out there)."
        )
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; give a folder.")
    logging_dir = output_dir / args.logging_dir
    above = next((p for p in (logging_dir, *logging_dir.parents) if p.exists() and not p.is_dir()), None)
    if args.report_to != "none" and above is not None:
        raise ValueError(f"--logging_dir {logging_dir}: {above} is a file; give a folder.")
    if args.resume_from_checkpoint not in (None, "latest"):
        find_checkpoint(args)  # a missing or damaged named checkpoint is refused now, not after the models load
    return args

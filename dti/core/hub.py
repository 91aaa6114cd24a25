"""The Hub and the model card: the repo, the upload, and the card's metadata, table and snippet."""

from pathlib import Path

from dti.core.constants import LORA_WEIGHT_NAME, logger
from dti.core.data import caption_source, validation_prompt
from dti.core.plumbing import write_atomically
from dti.core.step import lora_description


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


def hub_unreachable(timeout=3.0):
    """Why the Hub cannot be reached now (HF_HUB_OFFLINE, or the error of one request without retries), or None."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any answer, even an error status, is a reachable Hub
    except Exception as error:  # requests' or httpx's connection errors and timeouts
        return f"{constants.ENDPOINT} did not answer: {type(error).__name__}"
    return None


def check_hub_model(flag, name, revision=None, filename="model_index.json"):
    """Fail fast, in one line, when a model named by a Hub id cannot be had: not a local folder, the Hub out of reach
    and the model not in the local cache (where diffusers would retry for half a minute, then blame a missing file).
    A cached model works offline; with the Hub out of reach and HF_HUB_OFFLINE unset it loads with a warning."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).is_dir():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        return  # neither a folder nor a Hub id: the loader's own error says so
    reason = hub_unreachable()
    if reason is None:
        return
    if isinstance(try_to_load_from_cache(name, filename, revision=revision), str):
        if "HF_HUB_OFFLINE" not in reason:
            logger.warning(f"The Hugging Face Hub could not be reached ({reason}): {flag} {name!r} loads from the "
                           "local cache; set HF_HUB_OFFLINE=1 to skip the network.")  # fmt: skip
        return
    raise ValueError(
        f"{flag} {name!r} is not a local folder and the Hugging Face Hub could not be reached ({reason}), nor is it in "
        "the local cache: download it once online and run with HF_HUB_OFFLINE=1, or give a local folder (gated models "
        "need `hf auth login` first)."
    )


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


def model_card_header(args, step, tags):
    """The card's YAML metadata (a Hub page renders it) for output_dir/README.md."""
    from huggingface_hub import ModelCardData

    grid = Path(args.output_dir) / "validation" / f"step-{step}.png"
    widget = [{"text": validation_prompt(args), "output": {"url": f"validation/{grid.name}"}}] if grid.is_file() else []
    data = ModelCardData(
        base_model=args.pretrained_model_name_or_path,
        library_name="diffusers",
        license=base_model_license(args),
        tags=["text-to-image", "diffusers", "diffusers-training", "textual-inversion", "dti", *tags],
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
    if args.captions or args.caption_column:
        rows += [("prompts", f"per-image captions ({caption_source(args)})")]
    if args.lora_rank:
        rows += [("LoRA", f"{lora_description(args)}; lr {args.lora_learning_rate:g} from step {args.lora_start_step}")]
    return "| setting | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def lora_snippet_line(args, repo_id):
    """The model card snippet's line that loads the run's LoRA ("" without one)."""
    return f'pipe.load_lora_weights("{repo_id}", weight_name="{LORA_WEIGHT_NAME}")\n' if args.lora_rank else ""


def save_model_card(args, learned, step, num_processes, repo_id, family):
    """output_dir/README.md: what the token is, how it was trained, how to use it (the family's words and snippet),
    the validation images."""
    tags = [*family.card_tags, *(["lora"] if args.lora_rank else [])]
    header, widget = model_card_header(args, step, tags)
    about, usage = family.card_text(args, repo_id, method_description(args))
    rows = "".join(f"| {key} | {value} |\n" for key, value in family.card_rows(args))
    images = "".join(f"![{w['text']}]({w['output']['url']})\n" for w in widget)
    body = f"""
# {args.placeholder_token}: a DTI concept for {args.pretrained_model_name_or_path}

{about}

## Use it

{usage}
## Training

{training_table(args, learned, num_processes)}{rows}
## Validation images

{images or "No validation images were made (--num_validation_images 0)."}
"""
    write_atomically(Path(args.output_dir) / "README.md", lambda tmp: tmp.write_text(header + body))

"""Checkpoints: what a run must match to resume one, the manifest of its files, and choosing one to resume."""

import hashlib
import json
import os
import shutil
from pathlib import Path

from dti.core.constants import CHECKPOINT_STATE, logger
from dti.core.plumbing import stop_if_write_failed, write_atomically
from dti.core.step import lora_description

# Flags a resume must keep: each changes what the remaining steps compute (the data stream's position, the step
# size, the prior, the pixels). Checkpoints made before a flag was recorded are not held to it.
RESULT_FLAGS = ("learning_rate", "kappa", "train_batch_size", "gradient_accumulation_steps", "resolution",
                "center_crop", "random_flip", "image_resampling", "repeats", "lr_scheduler",
                "lr_warmup_steps")  # fmt: skip
LATER_KEYS = {*RESULT_FLAGS, "train_data_dir", "dataset_name", "captions", "caption_column"}  # older ones lack them


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
        **{flag: getattr(args, flag) for flag in RESULT_FLAGS},
        "train_data_dir": str(Path(args.train_data_dir).resolve()) if args.train_data_dir else None,
        "dataset_name": args.dataset_name,
        "captions": str(Path(args.captions).resolve()) if args.captions else None,
        "caption_column": args.caption_column,
    }


def run_identity(args, concepts):
    """checkpoint_identity of the run: its one concept's, or in a --concepts_list run the shared part and, under
    "concepts", each concept's token, initializer and number of vectors, in the list's order."""
    identities = [checkpoint_identity(c.args, c.num_vectors) for c in concepts]
    if args.concepts_list is None:
        return identities[0]
    own = ("placeholder_token", "initializer_token", "num_vectors", "train_data_dir", "dataset_name", "captions",
           "caption_column")  # fmt: skip
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
        stop_if_write_failed(error, final)
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
        step = read_checkpoint_state(checkpoint, identity)["step"]
        if step > args.max_train_steps:
            raise ValueError(
                f"--max_train_steps {args.max_train_steps} is below the step of {checkpoint} ({step}): give at least "
                f"{step}, or name an earlier checkpoint with --resume_from_checkpoint."
            )
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


def same_concepts(made, this):
    """Whether a --concepts_list checkpoint's concepts are this run's (in order; keys it lacks are not compared)."""
    if made is None or len(made) != len(this):
        return False
    return all(
        c.get(k) == v
        for c, own in zip(made, this, strict=True)
        for k, v in own.items()
        if k in c or k not in LATER_KEYS
    )


def read_checkpoint_state(path, identity):
    state = json.loads((Path(path) / CHECKPOINT_STATE).read_text())
    for key, value in identity.items():
        same = same_model if key == "pretrained_model_name_or_path" else (lambda a, b: a == b)
        if key == "concepts" and not same_concepts(state.get(key), value):
            made = [c["placeholder_token"] for c in state.get(key) or [state]]
            raise ValueError(
                f"--resume_from_checkpoint {path} was made with the concepts {made}, this run has "
                f"{[c['placeholder_token'] for c in value]}; resume with the --concepts_list it was made with."
            )
        if key in LATER_KEYS and key not in state:
            continue
        if not same(state.get(key), value):
            made, this = ("no LoRA" if v is None and key == "lora" else f"{key} {v!r}" for v in (state.get(key), value))
            raise ValueError(
                f"--resume_from_checkpoint {path} was made with {made}, this run has {this}; resume with the flags "
                "it was made with, or start a new run in another --output_dir."
            )
    return state


def set_aside_newer_checkpoints(output_dir, step):
    """Resuming from an older checkpoint abandons the newer ones: renamed abandoned-checkpoint-N (kept, but never
    taken by 'latest' again, which would go back to the abandoned branch)."""
    for folder in list_checkpoints(output_dir):
        if int(folder.name.split("-")[1]) > step:
            target = folder.with_name(f"abandoned-{folder.name}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)
            logger.warning(f"{folder.name} is newer than the resumed step {step}: renamed {target.name}.")


def resume(args, accelerator, checkpoint, identity, seed):
    """Load the checkpoint find_checkpoint chose, if any. Returns (global step, seed) to continue with."""
    if checkpoint is None:
        return 0, seed
    state = read_checkpoint_state(checkpoint, identity)
    if state["seed"] != seed:
        logger.warning(f"Resuming with the checkpoint's seed {state['seed']} (the data stream depends on it).")
    accelerator.load_state(str(checkpoint))
    logger.info(f"Resumed from {checkpoint} at step {state['step']}.")
    if accelerator.is_main_process:
        set_aside_newer_checkpoints(args.output_dir, state["step"])
    args.seed = state["seed"]
    return state["step"], state["seed"]

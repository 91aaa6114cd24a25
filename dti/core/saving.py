"""Validation images and the learned embeddings' files."""

from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dti.core.constants import __version__, logger
from dti.core.data import caption_source, validation_prompt
from dti.core.plumbing import TrainingStopped, write_all_atomically, write_atomically
from dti.core.step import lora_metadata


def generate_validation_images(components, models, args, device, seed, prompt, family):
    """--num_validation_images images of prompt, --validation_batch_size per pipeline call (default: all in one),
    image i from its own generator seeded with seed + i, so batching never changes an image. A call that runs out of
    device memory is retried at half the size, which then stays for the rest of the run."""
    images, count = [], args.num_validation_images
    while len(images) < count:
        size = min(args.validation_batch_size or count, count - len(images))
        generators = [torch.Generator(device).manual_seed(seed + i) for i in range(len(images), len(images) + size)]
        try:
            images += family.validation_images(components, models, args, prompt, generators)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            args.validation_batch_size = size // 2
            logger.warning(f"Validation of {size} images in one call ran out of memory: {size // 2} per call from now "
                           "on (--validation_batch_size sets it).")  # fmt: skip
            torch.cuda.empty_cache()
    return images


def log_validation(components, models, args, accelerator, seed, step, prompt_token, family):
    """Generate --num_validation_images with the current token (the family's pipeline, image i seeded with seed + i);
    save a grid; log them. A pipeline that cannot expand a multi-vector token gets the expansion training used."""
    from diffusers.utils import make_image_grid

    prompt = validation_prompt(args)
    if not family.pipeline_expands_tokens:
        prompt = prompt.replace(args.placeholder_token, prompt_token)
    logger.info(f"Validation at step {step}: {args.num_validation_images} images of {prompt!r}.")
    images = generate_validation_images(components, models, args, accelerator.device, seed, prompt, family)
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
        **({"captions": caption_source(args)} if args.captions or args.caption_column else {}),
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


def save_embeddings(learned, args, vocabulary_mean_norms, step, family, suffix="", lora=None):
    """Write the family's embedding files (the spec's output contract: {"<tok>": [k, d]} per text encoder, and the
    layouts other tools read) with the run's metadata; with a LoRA also its files. All or none."""
    output_dir = Path(args.output_dir)
    metadata = embedding_metadata(args, learned, vocabulary_mean_norms, step) | family.metadata(args)
    metadata |= lora_metadata(args)
    vectors = {name: tokens.embeddings().detach().float().cpu().contiguous() for name, tokens in learned.items()}
    files = family.embedding_files(args, vectors, suffix)
    writes = {output_dir / name: partial(save_file, tensors, metadata=metadata) for name, tensors in files.items()}
    if lora is not None:
        writes |= lora.files(output_dir, suffix, metadata)
        for stem, (tensors, extra) in family.lora_files(args, lora, vectors).items():
            writes[output_dir / f"{stem}{suffix}.safetensors"] = partial(save_file, tensors, metadata=metadata | extra)
    write_all_atomically(writes)
    logger.info(f"Saved the embeddings of step {step} to {output_dir} ({', '.join(p.name for p in writes)}).")


def check_finite(concepts, step):
    """Never write a non-finite vector: stop instead, the files of the last save left as they are."""
    for c in concepts:
        for name, tokens in c.learned.items():
            if not torch.isfinite(tokens.embeddings()).all():
                raise TrainingStopped(
                    f"The vectors of {c.args.placeholder_token} ({name}) are not finite at step {step}: an update "
                    f"overflowed. Nothing of step {step} was written; {c.args.output_dir} keeps the last saved "
                    "files. Lower --learning_rate (or --token_scale)."
                )


def save_all_embeddings(concepts, step, family, suffix="", lora=None):
    """Each concept's embedding files in its output folder (and the LoRA's, which a run of one concept only has),
    once every concept's vectors are known to be finite."""
    check_finite(concepts, step)
    for c in concepts:
        save_embeddings(c.learned, c.args, c.vocabulary_mean_norms, step, family, suffix, lora)

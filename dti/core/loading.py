"""Loading a checkpoint's parts for a family: its model_index and tokenizers, then its frozen components, each
failure as one line naming the model."""

import os


def load_tokenizers_and_index(args, load):
    """(model_index, load(path, revision)): the checkpoint's model_index and what `load` reads (its tokenizers)."""
    from diffusers import DiffusionPipeline

    path = args.pretrained_model_name_or_path
    try:
        return DiffusionPipeline.load_config(path, revision=args.revision), load(path, args.revision)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--pretrained_model_name_or_path {path!r} could not be loaded ({reason}).") from error


def check_layout(args, model_index, components, pipeline, other_problem=False):
    """Refuse a checkpoint whose model_index lacks one of `components` (or has another_problem): it is not a
    `pipeline` checkpoint."""
    path = args.pretrained_model_name_or_path
    missing = [c for c in components if c not in model_index]
    if missing or other_problem:
        raise ValueError(
            f"--pretrained_model_name_or_path {path!r} is not a {pipeline} checkpoint (missing {missing})."
        )
    absent = [f"{c}/" for c in components if os.path.isdir(path) and not os.path.isdir(os.path.join(path, c))]
    if absent:  # found now, not when that component loads after the others
        raise ValueError(
            f"--pretrained_model_name_or_path {path!r} lacks the folder(s) {', '.join(absent)} its model_index.json "
            "names: give a complete checkpoint folder (download it again, or copy the missing folders)."
        )


def load_components(args, load):
    """load(path, {"revision", "variant"}) -> the frozen components; a component that fails is one line."""
    path, common = args.pretrained_model_name_or_path, {"revision": args.revision, "variant": args.variant}
    try:
        return load(path, common)
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"--pretrained_model_name_or_path {path!r}: a component failed to load ({error}).") from error


def checkpoint_sampler(path, model_index, revision):
    """The checkpoint's own scheduler (the class its model_index names), for validation images."""
    import diffusers

    return getattr(diffusers, model_index["scheduler"][1]).from_pretrained(
        path, subfolder="scheduler", revision=revision
    )


def auto_tokenizer(path, revision):
    """The checkpoint's one tokenizer (tokenizer/), as a list of one for load_tokenizers_and_index."""
    from transformers import AutoTokenizer

    return [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)]

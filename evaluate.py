#!/usr/bin/env python
# Copyright 2026 The DTI diffusers authors. Licensed under the Apache License, Version 2.0.
"""Evaluate learned DTI / TI tokens as the paper does: image similarity to the subject, text similarity to the prompt.

    python evaluate.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --embeddings out-robot out-robot-ti --instance_data_dir assets/toy_robot --class_word toy --output_dir eval

For every run (a training output folder or an embedding file) and every prompt of the set, one image per seed is made
with the run's token in the prompt's `{}` slot, through infer.py's loader and sampler (for Wan, the first frame of a
video, at the run's training resolution unless `--wan_resolution pipeline`; for FLUX.2 [klein], base or distilled,
at the run's text length). Then:

- image sim: the mean cosine between the DINOv2 CLS feature of a generated image and those of the reference images;
- text sim: SigLIP's image-text probability sigmoid(logit) of the generated image and the prompt with the class word
  in the slot ("a dog in the jungle");
- optional CLIP-T (raw cosine of CLIP's image and text embeddings) and CLIP-I (CLIP image cosine to the references).

Images are kept, so a second call generates only what is missing. `--benchmark dreambooth` runs the paper's protocol
over the DreamBooth subjects and averages over subjects. `--protocol style` evaluates style tokens as the DTI authors'
StyleDrop evaluation does: their 40 style prompts, seeds 0 and 1, DINOv2 on crops of the whole short side, CLIP-T
(openai/clip-vit-large-patch14) against "A toothbrush in <class> style."; with --runs_root and --styledrop_dir, over
every style of assets/evaluation/styledrop_styles.json found, averaged over styles.
"""

import argparse
import csv
import hashlib
import io
import json
import math
import re
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tqdm.auto import tqdm

import infer

__version__ = "0.1.0"

ASSETS = Path(__file__).resolve().parent / "assets" / "evaluation"
PROMPTS_FILE = ASSETS / "eval_prompts.json"
SUBJECTS_FILE = ASSETS / "dreambooth_subjects.json"
STYLES_FILE = ASSETS / "styledrop_styles.json"
LIVE_CLASS_WORDS = ("dog", "cat")  # the DreamBooth live subjects; other class words get the object prompts
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METRIC_NAMES = {"image_sim": "image sim", "text_sim": "text sim", "clip_t": "CLIP-T", "clip_i": "CLIP-I"}
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
THUMBNAIL = 128  # largest side of an image in the contact sheets, px
# What --protocol sets where the flags are not given; without it: the simple set, seeds 0-3, no CLIP. style: the DTI
# authors' StyleDrop evaluation (their scripts/eval_style.py), its prompts, seeds and CLIP model.
PROTOCOL_DEFAULTS = {
    None: {"prompt_set": "simple", "seeds": [0, 1, 2, 3], "clip_model": None},
    "style": {"prompt_set": "style", "seeds": [0, 1], "clip_model": "openai/clip-vit-large-patch14"},
}
# settings resolved per run (the checkpoint's and the run's own), in generation.json
RUN_SAMPLING = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames", "max_sequence_length")


def parse_args(input_args=None):
    parser = infer.OneLineErrorParser(
        usage="%(prog)s --pretrained_model_name_or_path MODEL --embeddings RUN [RUN ...] --instance_data_dir DIR "
        "[options]",
        description="Score learned DTI / TI tokens: DINOv2 image similarity and SigLIP text similarity, side by side.",
        formatter_class=infer.HelpFormatter,
    )
    infer.add_pipeline_arguments(
        parser,
        dtype_help="Of the pipeline (auto: bfloat16 on CUDA, float32 on CPU); evaluation models run in float32.",
        size_help="Default: the model's (Wan: see --wan_resolution).",
        num_frames_help="Wan: frames per video, 4k + 1; the first frame is scored. Default: 1.",
    )
    parser.add_argument(
        "--wan_resolution",
        choices=["training", "pipeline"],
        default="training",
        help="Wan: the size of the images where --height / --width are not given. training: the run's training "
        "resolution (square, from its metadata); pipeline: WanPipeline's default 480x832, as the DTI authors "
        "evaluated Wan (WanPipeline's defaults: 480x832, 50 steps, CFG 5, the first frame scored).",
    )
    parser.add_argument(
        "--embeddings",
        nargs="+",
        default=[],
        help="The runs to compare: training output folders or embedding files (any format infer.py reads), one "
        "token each. A run is named after its folder (or file).",
    )
    parser.add_argument("--instance_data_dir", default=None, help="Folder of the subject's reference images.")
    parser.add_argument(
        "--class_word",
        default=None,
        help="The subject's class word, put in the prompt's slot for the text similarity. Default: the initializer "
        "token the runs recorded.",
    )
    parser.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Use the live-subject prompts (--no-live: the object prompts). Default: live for the class words "
        f"{' and '.join(LIVE_CLASS_WORDS)}; in --benchmark mode, the subject list's flag.",
    )
    parser.add_argument(
        "--prompt_set",
        default=None,
        help="simple (the DreamBooth prompts plus extras), complex_lv1, complex_lv2 or style, from "
        "assets/evaluation/eval_prompts.json; or a set of the JSON file given to --prompt_file. Default: simple "
        "(--protocol style: style).",
    )
    parser.add_argument(
        "--prompt_file",
        default=None,
        help="Custom prompts: a text file with one template per line, '{}' marking the subject's slot, or a JSON "
        "file laid out like eval_prompts.json (then --prompt_set picks the set).",
    )
    parser.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts of the set.")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="One image per prompt and seed. Default: 0 1 2 3 (--protocol style: 0 1).",
    )
    parser.add_argument(
        "--rescale",
        default=None,
        help="Rescale every run's vectors to the mean, min or max vocabulary norm, or a number, before generating "
        "(the paper's TI-rescaled baseline).",
    )
    parser.add_argument("--image_encoder", default="facebook/dinov2-base", help="Image model of the image sim.")
    parser.add_argument(
        "--text_encoder", default="google/siglip-base-patch16-512", help="SigLIP model of the text sim."
    )
    parser.add_argument(
        "--clip_model",
        default=None,
        help="Also report CLIP-T and CLIP-I with this CLIP model, e.g. openai/clip-vit-large-patch14 (the default of "
        "--protocol style, whose text score CLIP-T is).",
    )
    parser.add_argument(
        "--benchmark",
        choices=["dreambooth"],
        default=None,
        help="Evaluate every DreamBooth subject found in --dreambooth_dir, for every run folder of --runs_root.",
    )
    parser.add_argument(
        "--dreambooth_dir", default=None, help="The DreamBooth dataset: a clone of google/dreambooth or its dataset/."
    )
    parser.add_argument(
        "--protocol",
        choices=["style"],
        default=None,
        help="style: the DTI authors' style evaluation (StyleDrop): the style prompt set, seeds 0 1, CLIP-T with "
        "openai/clip-vit-large-patch14 against the prompt with the class word and a final period, DINOv2 on a center "
        "crop of the whole short side. With --runs_root and --styledrop_dir: every StyleDrop style found.",
    )
    parser.add_argument(
        "--styledrop_dir",
        default=None,
        help="--protocol style: the style images, <id>.png (or a folder <id>/) for the ids 00-22 of "
        "assets/evaluation/styledrop_styles.json.",
    )
    parser.add_argument(
        "--runs_root",
        default=None,
        help="Folder of runs to compare, laid out as ROOT/<run>/<subject>/ (--benchmark; --protocol style: "
        "ROOT/<run>/<style id>/).",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="Images per pipeline call.")
    parser.add_argument("--feature_batch_size", type=int, default=32, help="Images per evaluation model call.")
    parser.add_argument(
        "--bootstrap", type=int, default=1000, help="Resamples of the 95%% percentile bootstrap intervals."
    )
    parser.add_argument("--output_dir", default="evaluation", help="Where images, metrics and plots go.")
    return apply_protocol(parser.parse_args(input_args))


def apply_protocol(args):
    """Fill in what --protocol (or its absence) sets for the flags that were not given."""
    for key, value in PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def cosine(a, b):
    """Cosine similarities of every row of a [n, d] with every row of b [m, d]: [n, m]."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def image_similarity(generated, references):
    """Per generated image, the mean cosine to the reference images: [n, d], [r, d] -> [n]."""
    return cosine(generated, references).mean(dim=1)


def paired_cosine(a, b):
    """Cosine of row i of a with row i of b: [n, d], [n, d] -> [n]."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


def siglip_score(image_features, text_features, logit_scale, logit_bias):
    """SigLIP's probability that image i matches text i: sigmoid(cos * exp(logit_scale) + logit_bias), [n]."""
    logits = paired_cosine(image_features, text_features) * logit_scale.float().exp() + logit_bias.float()
    return torch.sigmoid(logits)


def bootstrap_interval(values, resamples, seed=BOOTSTRAP_SEED, confidence=CONFIDENCE):
    """Percentile bootstrap interval (low, high) of the mean of `values`, with a fixed-seed generator."""
    values = np.asarray(values, dtype=np.float64)
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = 50 * (1 - confidence)
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def summarize(values, resamples):
    """{"mean", "ci95": [low, high], "n"} of a list of numbers."""
    return {"mean": float(np.mean(values)), "ci95": list(bootstrap_interval(values, resamples)), "n": len(values)}


def aggregate_subjects(subject_results, metrics, resamples):
    """A run's aggregate: over its images for one subject; over the per-subject means (bootstrap over subjects)
    for several."""
    if len(subject_results) == 1:
        (result,) = subject_results.values()
        return result["aggregate"], "images"
    means = {m: [r["aggregate"][m]["mean"] for r in subject_results.values()] for m in metrics}
    return {m: summarize(values, resamples) for m, values in means.items()}, "subjects"


# ----------------------------------------------------------------------------------------------------------------
# Subjects, prompts and runs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    name: str
    class_word: str
    live: bool
    references: list  # image files


@dataclass
class Job:
    """One run on one subject: the token to load, the prompts, and the folder its images go to."""

    run: str
    subject: Subject
    concept: infer.Concept
    folder: Path
    prompts: list  # [{"index", "template", "prompt" (with the token), "text_prompt" (with the class word)}]

    def image_path(self, entry, seed):
        return self.folder / "images" / f"{entry['index']:03d}-{infer.slug(entry['text_prompt'])}-seed{seed}.png"


def read_json(path, flag):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{flag} {path}: cannot read it as JSON ({type(error).__name__}).") from None


def reference_images(folder, flag, pattern="*"):
    """The readable reference images of a folder (those whose name matches pattern), checked before any model loads;
    unreadable ones (a decompression bomb included) are skipped with a warning."""
    folder = Path(folder)
    images = sorted(p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
    readable = []
    for path in images:
        try:
            open_image(path)
            readable.append(path)
        except ValueError as error:
            print(f"warning: skipping {error}", file=sys.stderr)
    if not readable:
        extensions, unreadable = ", ".join(IMAGE_EXTENSIONS), f" ({len(images)} could not be read)" if images else ""
        raise ValueError(f"{flag} {folder}: no reference images ({extensions}) in this folder{unreadable}.")
    return readable


def open_image(path):
    try:
        with Image.open(path) as image:
            image.seek(0)
            return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path}: cannot read the image ({error}).") from None


def prompt_templates(args, live):
    """The templates of --prompt_set (object or live variant) or --prompt_file, each with a '{}' slot."""
    path = Path(args.prompt_file) if args.prompt_file else PROMPTS_FILE
    flag = "--prompt_file" if args.prompt_file else "The prompt sets file"
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file (evaluate.py reads its prompt sets from assets/evaluation/).")
    if path.suffix == ".json":
        sets = read_json(path, flag)
        choices = [name for name in sets if not name.startswith("_")]
        if args.prompt_set not in choices:
            raise ValueError(f"--prompt_set {args.prompt_set!r}: unknown; choose one of {', '.join(choices)}.")
        templates = sets[args.prompt_set]
        if isinstance(templates, dict):  # object and live-subject variants
            variant = "live" if live else "object"
            if variant not in templates:
                raise ValueError(f"{flag} {path}: the set {args.prompt_set!r} has no {variant!r} prompts.")
            templates = templates[variant]
    else:
        templates = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"{flag} {path}: the prompt {template!r} has no '{{}}' slot for the subject.")
    templates = templates[: args.max_prompts] if args.max_prompts else templates
    if not templates:
        raise ValueError(f"{flag} {path}: no prompts.")
    return templates


def make_prompts(templates, token, class_word, text_end=""):
    """The generation prompt (token in the slot) and the text-similarity prompt (class word in the slot, then
    text_end: '.' for --protocol style, as the authors' style scorer reads its prompts back from the file names)."""
    return [
        {"index": i, "template": t, "prompt": t.replace("{}", token),
         "text_prompt": t.replace("{}", class_word) + text_end}
        for i, t in enumerate(templates)
    ]  # fmt: skip


def text_end(args):
    return "." if args.protocol == "style" else ""


def run_names(specs):
    """A unique, file-safe name per run: the folder name, or the file name (its folder's for learned_embeds*)."""
    names = []
    for spec in specs:
        path = Path(spec)
        base = path.name if path.is_dir() or not path.suffix else path.stem
        if base in ("learned_embeds", "learned_embeds_2"):
            base = path.resolve().parent.name
        base = re.sub(r"[^A-Za-z0-9._-]", "_", base) or "run"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def load_run(spec):
    """The one concept of a run folder or embedding file; errors name the run."""
    concepts = infer.load_embeddings([str(spec)])
    if len(concepts) != 1:
        tokens = ", ".join(c.token for c in concepts)
        raise ValueError(f"--embeddings {spec}: holds {len(concepts)} tokens ({tokens}); give one token per run.")
    return concepts[0]


def recorded_class_word(concepts):
    words = {c.metadata.get("initializer_token") for c in concepts}
    if len(words) != 1 or None in words:
        raise ValueError("--class_word is needed: the runs record no common initializer token to use as class word.")
    return words.pop()


def single_plan(args):
    """Jobs of the plain mode: every --embeddings run on the --instance_data_dir subject."""
    if args.dreambooth_dir or args.runs_root or args.styledrop_dir:
        raise ValueError("--dreambooth_dir and --runs_root go with --benchmark dreambooth; --styledrop_dir with "
                         "--protocol style.")  # fmt: skip
    if not args.embeddings:
        raise ValueError("--embeddings is needed: training output folders or embedding files to evaluate.")
    if not args.instance_data_dir:
        raise ValueError("--instance_data_dir is needed: the folder of the subject's reference images.")
    references = reference_images(args.instance_data_dir, "--instance_data_dir")
    runs = {name: load_run(spec) for name, spec in zip(run_names(args.embeddings), args.embeddings, strict=True)}
    class_word = args.class_word or recorded_class_word(runs.values())
    live = args.live if args.live is not None else class_word.lower() in LIVE_CLASS_WORDS
    templates = prompt_templates(args, live)
    subject = Subject(Path(args.instance_data_dir).resolve().name, class_word, live, references)
    output_dir, end = Path(args.output_dir), text_end(args)
    return [
        Job(name, subject, concept, output_dir / name, make_prompts(templates, concept.token, class_word, end))
        for name, concept in runs.items()
    ]


def plan(args):
    """The jobs of the mode the flags choose: --benchmark dreambooth, --protocol style over the StyleDrop styles
    (--runs_root), or the plain mode."""
    if args.benchmark and args.protocol:
        raise ValueError(f"--benchmark {args.benchmark} and --protocol {args.protocol} are two evaluations; give one.")
    if args.benchmark:
        return dreambooth_plan(args)
    if args.protocol == "style" and (args.runs_root or args.styledrop_dir):
        return styledrop_plan(args)
    return single_plan(args)


def benchmark_runs(args, needs, data_flag, known):
    """(data folder, run folders) of a benchmark (needs: its name in errors): the folder of its data flag, the folders
    of --runs_root that hold a subject of `known`."""
    if not (getattr(args, data_flag[2:]) and args.runs_root):
        raise ValueError(f"{needs} needs {data_flag} (the images) and --runs_root (ROOT/<run>/<name>/).")
    given = [f for f in ("--embeddings", "--instance_data_dir", "--class_word") if getattr(args, f[2:])]
    if given:
        raise ValueError(f"{needs} takes the runs from --runs_root and each one's images and class word from "
                         f"{data_flag}: leave out {', '.join(given)}.")  # fmt: skip
    data, root = Path(getattr(args, data_flag[2:])), Path(args.runs_root)
    for flag, folder in ((data_flag, data), ("--runs_root", root)):
        if not folder.is_dir():
            raise ValueError(f"{flag} {folder}: no such folder.")
    return data, sorted(p for p in root.iterdir() if p.is_dir() and any((p / s).is_dir() for s in known))


def benchmark_jobs(args, known, runs, references):
    """Every run folder on every subject found: known {name: {"class", "live"}}, references {name: image files}. A
    run without a subject's folder is left out of that subject's mean, with a warning."""
    jobs, output_dir = [], Path(args.output_dir)
    for name, files in references.items():
        info = known[name]
        live = args.live if args.live is not None else info.get("live", False)
        subject = Subject(name, info["class"], live, files)
        templates = prompt_templates(args, live)
        for run in runs:
            if not (run / name).is_dir():
                print(f"warning: run {run.name} has no {name}/; its mean is over the subjects it has.", file=sys.stderr)
                continue
            concept = load_run(run / name)
            prompts = make_prompts(templates, concept.token, info["class"], text_end(args))
            jobs.append(Job(run.name, subject, concept, output_dir / name / run.name, prompts))
    return jobs


def dreambooth_plan(args):
    """Jobs of --benchmark dreambooth: every run folder ROOT/<run>/ on every subject ROOT/<run>/<subject>/ found."""
    if args.styledrop_dir:
        raise ValueError("--styledrop_dir goes with --protocol style.")
    known = read_json(SUBJECTS_FILE, "The subjects file")["subjects"]
    data, runs = benchmark_runs(args, "--benchmark dreambooth", "--dreambooth_dir", known)
    if (data / "dataset").is_dir():
        data = data / "dataset"
    subjects = [s for s in known if (data / s).is_dir() and any((run / s).is_dir() for run in runs)]
    if not subjects:
        raise ValueError(
            f"No subjects found: --dreambooth_dir {data} needs <subject>/ image folders and --runs_root "
            f"{args.runs_root} <run>/<subject>/ training outputs, named as in {SUBJECTS_FILE.name} (dog, backpack, "
            "...)."
        )
    return benchmark_jobs(args, known, runs, {s: reference_images(data / s, "--dreambooth_dir") for s in subjects})


def styledrop_plan(args):
    """Jobs of --protocol style with --runs_root: every run folder ROOT/<run>/ on every StyleDrop style
    ROOT/<run>/<id>/ found whose image --styledrop_dir holds (<id>.png, any image extension, or a folder <id>/)."""
    if args.dreambooth_dir:
        raise ValueError("--dreambooth_dir goes with --benchmark dreambooth; --protocol style takes --styledrop_dir.")
    known = read_json(STYLES_FILE, "The styles file")["styles"]
    data, runs = benchmark_runs(args, "--protocol style with --runs_root", "--styledrop_dir", known)
    found = [s for s in known if any((run / s).is_dir() for run in runs)]
    found = [s for s in found if (data / s).is_dir() or any(p.suffix.lower() in IMAGE_EXTENSIONS for p in
             data.glob(f"{s}.*"))]  # fmt: skip
    if not found:
        raise ValueError(
            f"No styles found: --styledrop_dir {data} needs the style images <id>.png and --runs_root "
            f"{args.runs_root} <run>/<id>/ training outputs, with the ids of {STYLES_FILE.name} (00 to 22)."
        )
    references = {
        s: reference_images(data / s, "--styledrop_dir") if (data / s).is_dir()
        else reference_images(data, "--styledrop_dir", f"{s}.*")
        for s in found
    }  # fmt: skip
    return benchmark_jobs(args, known, runs, references)


def check_numbers(args):
    counts = [args.batch_size, args.feature_batch_size, args.bootstrap]
    if min(counts) < 1 or (args.max_prompts is not None and args.max_prompts < 1):
        raise ValueError("--batch_size, --feature_batch_size, --bootstrap and --max_prompts must be at least 1.")
    if not all(0 <= seed < 2**32 for seed in args.seeds):
        raise ValueError(f"--seeds must be in [0, 2**32 - 1], got {' '.join(map(str, args.seeds))}.")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds must be distinct, got {' '.join(map(str, args.seeds))}.")
    infer.check_rescale(args.rescale)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def vectors_digest(concept):
    digest = hashlib.sha256()
    for tensor in sorted(concept.vectors.values(), key=lambda t: t.shape[-1]):
        digest.update(tensor.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_loras(args, concept):
    """The LoRAs a run's images are made with: the one trained with its token (DTI + LoRA), then --lora."""
    return ([concept.lora] if concept.lora else []) + args.lora


def generation_size(args, family, concept):
    """(height, width) of a run's images: --height / --width; for Wan, where they are not given, the run's training
    resolution (square, from its metadata) or, with --wan_resolution pipeline, WanPipeline's 480x832. None: the
    pipeline's own."""
    if not family.video or (args.height and args.width):
        return args.height, args.width
    if args.wan_resolution == "pipeline":
        from diffusers import WanPipeline

        default = [infer.inspect_default(WanPipeline.__call__, key) for key in ("height", "width")]
    elif "resolution" in concept.metadata:
        default = [int(concept.metadata["resolution"])] * 2
    else:
        raise ValueError(f"--embeddings {', '.join(concept.sources)}: no training resolution in its metadata; give "
                         "--height and --width, or --wan_resolution pipeline.")  # fmt: skip
    return args.height or default[0], args.width or default[1]


def generation_settings(args, family, dtype_name, concept):
    """What the images of one run depend on; stored next to them so that a resumed call cannot mix settings."""
    height, width = generation_size(args, family, concept)
    resolved = infer.sampling_settings(args, family, [concept])  # steps, guidance; Wan, FLUX.2 [klein]: text length
    return {
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "family": family.name,
        "scheduler": args.scheduler,
        "num_inference_steps": resolved["num_inference_steps"],
        "guidance_scale": resolved["guidance_scale"],
        "height": height,
        "width": width,
        **{key: resolved[key] for key in ("num_frames", "max_sequence_length") if key in resolved},
        "negative_prompt": args.negative_prompt,
        "complex_human_instruction": args.complex_human_instruction,
        "pooled_output": infer.pooled_output(args, [concept]) if family.uses_pooled_output else None,
        "rescale": args.rescale,
        "dtype": dtype_name,
        "token": concept.token,
        "vectors_sha256": vectors_digest(concept),
        "loras": [infer.lora_record(source, args.lora_scale) for source in run_loras(args, concept)],
    }


def check_settings(jobs, settings):
    for job, wanted in zip(jobs, settings, strict=True):
        file = job.folder / "generation.json"
        if file.is_file():
            found = {"loras": []} | read_json(file, "The settings file")  # files from before LoRAs: none applied
            changed = sorted(k for k in wanted.keys() | found.keys() if found.get(k) != wanted.get(k))
            if changed:
                raise ValueError(f"{job.folder}: its images were made with other settings ({', '.join(changed)}); "
                                 "use another --output_dir or delete that folder.")  # fmt: skip


def write_atomically(path, data):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    tmp.replace(path)


def put_token(pipe, family, concept, loaded, tables, rescale):
    """Load the run's vectors into the pipeline and return the name to write in its prompts. A token that an earlier
    run loaded with the same shapes gets its rows overwritten; with other shapes (runs sharing a placeholder over
    subjects with other initializers) the vectors go in under a new name: only the rows count, not the name."""
    vectors = infer.assign_encoders(concept, infer.encoder_widths(pipe, family))
    if rescale:
        vectors = {encoder: infer.rescale(v, tables[encoder], rescale) for encoder, v in vectors.items()}
    shapes = {encoder: tuple(v.shape) for encoder, v in vectors.items()}
    name = concept.token
    if name in loaded and loaded[name] != shapes:
        name = next((n for n, s in loaded.items() if s == shapes and n.startswith("<evaluate-")), None)
        name = name or f"<evaluate-{len(loaded)}>"
    if name in loaded:
        for encoder, tensor in vectors.items():
            infer.set_token_vectors(pipe, encoder, name, tensor)
        return name
    for encoder, tensor in vectors.items():
        tokenizer = getattr(pipe, infer.TOKENIZERS[encoder])
        infer.check_new_token(tokenizer, name, len(tensor), ", ".join(concept.sources))
    family.add_tokens(pipe, name, vectors)
    loaded[name] = shapes
    return name


def generate_missing(jobs, args, family, device, dtype_name, settings):
    """Make every image that is not on disk yet (the pipeline is loaded only if one is missing); returns the count."""
    todo = [[(e, s) for e in job.prompts for s in args.seeds if not job.image_path(e, s).exists()] for job in jobs]
    total = sum(map(len, todo))
    if not total:
        return 0
    pipe = infer.load_pipeline(args, family, getattr(torch, dtype_name), device)
    pipe.set_progress_bar_config(disable=True)
    adapters = infer.load_loras(pipe, [source for job in jobs for source in run_loras(args, job.concept)])
    tables = {}
    if args.rescale:  # the vocabulary before any token is added
        for encoder in family.encoders:
            tables[encoder] = infer.vocabulary_table(pipe, encoder, len(getattr(pipe, infer.TOKENIZERS[encoder])))
    loaded = {}  # name in the pipeline -> {encoder: shape}
    with tqdm(total=total, desc="Generating", unit="image") as bar:
        for job, missing, wanted in zip(jobs, todo, settings, strict=True):
            if not missing:
                continue
            name = put_token(pipe, family, job.concept, loaded, tables, args.rescale)
            infer.use_loras(pipe, adapters, run_loras(args, job.concept), args.lora_scale)
            instruction = infer.sana_instruction(args, [job.concept]) if family.uses_complex_human_instruction else None
            if family.uses_pooled_output:
                infer.set_pooled_output(pipe, wanted["pooled_output"])
            (job.folder / "images").mkdir(parents=True, exist_ok=True)
            write_atomically(job.folder / "generation.json", json.dumps(wanted, indent=2))
            sampled = {key: wanted[key] for key in RUN_SAMPLING if key in wanted}
            sampling = argparse.Namespace(**vars(args) | sampled)  # the run's own size (Wan: its training resolution)
            for entry in job.prompts:
                seeds = [seed for e, seed in missing if e is entry]
                for start in range(0, len(seeds), args.batch_size):
                    batch = seeds[start : start + args.batch_size]
                    prompt = entry["template"].replace("{}", name)
                    images = infer.generate(pipe, family, prompt, batch, sampling, instruction)
                    for seed, image in zip(batch, images, strict=True):
                        infer.save_image(image, job.image_path(entry, seed))
                    bar.update(len(batch))
    return total


# ----------------------------------------------------------------------------------------------------------------
# Evaluation models and features
# ----------------------------------------------------------------------------------------------------------------


def pooled(output):
    """transformers 4 returns get_*_features as a tensor, transformers 5 as an output with the pooled tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


@dataclass
class Encoder:
    """An evaluation model with its image processor (and tokenizer for the image-text models), in float32."""

    model: torch.nn.Module
    processor: object
    tokenizer: object = None
    options: dict = None  # the image processor's call options (--protocol style's resize)

    def images(self, paths, batch_size):
        """[n, d] features of image files. Image models (DINOv2): the CLS token of the final layer-normed hidden
        states, which is Dinov2Model's pooler_output. Image-text models: the projected image embedding."""
        device, features = next(self.model.parameters()).device, []
        for start in range(0, len(paths), batch_size):
            images = [open_image(p) for p in paths[start : start + batch_size]]
            pixels = self.processor(images=images, return_tensors="pt", **(self.options or {}))["pixel_values"]
            pixels = pixels.to(device)
            with torch.no_grad():
                if self.tokenizer is None:
                    out = self.model(pixel_values=pixels).last_hidden_state[:, 0]
                else:
                    out = pooled(self.model.get_image_features(pixel_values=pixels))
            features.append(out.float().cpu())
        return torch.cat(features)

    def texts(self, texts):
        """[n, d] projected text embeddings. Padded to the model's full length without a mask, as SigLIP was trained
        (SigLIP pools the last position); for CLIP, which pools at the end token, padding changes nothing."""
        length = self.model.config.text_config.max_position_embeddings
        ids = self.tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=ids["input_ids"].to(next(self.model.parameters()).device))
        return pooled(out).float().cpu()


def model_config(name, flag):
    from transformers import AutoConfig

    infer.check_hub_model(flag, name, filename="config.json")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{flag} {name!r}: cannot load its config ({reason}).") from None


def check_evaluation_models(args):
    """Fail before any image is made when an evaluation model is missing or of the wrong kind."""
    if hasattr(model_config(args.image_encoder, "--image_encoder"), "text_config"):
        raise ValueError(f"--image_encoder {args.image_encoder!r} is an image-text model; give an image model such as "
                         "facebook/dinov2-base.")  # fmt: skip
    kind = getattr(model_config(args.text_encoder, "--text_encoder"), "model_type", "")
    if kind != "siglip":
        raise ValueError(f"--text_encoder {args.text_encoder!r} is a {kind or 'unknown'} model; the text sim needs a "
                         "SigLIP model such as google/siglip-base-patch16-512.")  # fmt: skip
    if args.clip_model and not hasattr(model_config(args.clip_model, "--clip_model"), "text_config"):
        raise ValueError(f"--clip_model {args.clip_model!r} is not an image-text model; give a CLIP model.")


def load_encoder(name, flag, device, with_tokenizer):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(name).to(device, torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name) if with_tokenizer else None
    except ImportError as error:
        raise ValueError(f"{flag} {name!r}: {str(error).strip().splitlines()[0]} (for SigLIP's tokenizer: "
                         "pip install sentencepiece protobuf).") from None  # fmt: skip
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{flag} {name!r}: cannot load it ({reason}).") from None
    if with_tokenizer and len(tokenizer) < 10:  # a folder without tokenizer files can load as an empty tokenizer
        raise ValueError(f"{flag} {name!r}: no tokenizer found with the model.")
    return Encoder(model, processor, tokenizer)


def score_job(job, args, encoders, references, output_dir):
    """Per-image metrics of one run on one subject, per-prompt means and the run's aggregate over its images."""
    entries = [(entry, seed) for entry in job.prompts for seed in args.seeds]
    paths = [job.image_path(entry, seed) for entry, seed in entries]
    batch = args.feature_batch_size
    texts = [entry["text_prompt"] for entry in job.prompts]
    rows = [entry["index"] for entry, _ in entries]
    siglip = encoders["siglip"].model
    scores = {
        "image_sim": image_similarity(encoders["dino"].images(paths, batch), references["dino"]),
        "text_sim": siglip_score(encoders["siglip"].images(paths, batch), encoders["siglip"].texts(texts)[rows],
                                 siglip.logit_scale.detach().cpu(), siglip.logit_bias.detach().cpu()),
    }  # fmt: skip
    if "clip" in encoders:
        clip_images = encoders["clip"].images(paths, batch)
        scores["clip_t"] = paired_cosine(clip_images, encoders["clip"].texts(texts)[rows])
        scores["clip_i"] = image_similarity(clip_images, references["clip"])
    images = [
        {"prompt_index": entry["index"], "seed": seed, "file": str(path.relative_to(output_dir)),
         **{m: values[i].item() for m, values in scores.items()}}
        for i, ((entry, seed), path) in enumerate(zip(entries, paths, strict=True))
    ]  # fmt: skip
    prompts = [
        {**entry, **{m: float(np.mean([r[m] for r in images if r["prompt_index"] == entry["index"]])) for m in scores}}
        for entry in job.prompts
    ]
    aggregate = {m: summarize([r[m] for r in images], args.bootstrap) for m in scores}
    return {"subject": job.subject.name, "class_word": job.subject.class_word, "live": job.subject.live,
            "token": job.concept.token, "sources": job.concept.sources, "aggregate": aggregate, "prompts": prompts,
            "images": images}  # fmt: skip


def whole_short_side(processor):
    """--protocol style: the DTI authors' style scorer resizes the short side to the crop size (224) and center crops,
    where DINOv2's processor resizes it to 256 first. The processor options that do theirs (none for a processor
    without a center crop)."""
    crop = getattr(processor, "crop_size", None)
    if not (crop and getattr(processor, "do_center_crop", False)):
        return {}
    return {"size": {"shortest_edge": min(crop["height"], crop["width"])}}


def score(jobs, args, device, output_dir):
    """Load the evaluation models once, compute each subject's reference features once, and score every job."""
    encoders = {
        "dino": load_encoder(args.image_encoder, "--image_encoder", device, with_tokenizer=False),
        "siglip": load_encoder(args.text_encoder, "--text_encoder", device, with_tokenizer=True),
    }
    if args.protocol == "style":
        encoders["dino"].options = whole_short_side(encoders["dino"].processor)
    if args.clip_model:
        encoders["clip"] = load_encoder(args.clip_model, "--clip_model", device, with_tokenizer=True)
    references, results = {}, []
    with tqdm(total=sum(len(j.prompts) * len(args.seeds) for j in jobs), desc="Scoring", unit="image") as bar:
        for job in jobs:
            if job.subject.name not in references:
                files = job.subject.references
                references[job.subject.name] = {
                    name: encoders[name].images(files, args.feature_batch_size) for name in ("dino", "clip")
                    if name in encoders
                }  # fmt: skip
            results.append(score_job(job, args, encoders, references[job.subject.name], output_dir))
            bar.update(len(job.prompts) * len(args.seeds))
    return results


# ----------------------------------------------------------------------------------------------------------------
# Reports: metrics.json, metrics.csv, the table, the scatter plot and the contact sheets
# ----------------------------------------------------------------------------------------------------------------


def run_info(concept, rescale):
    """Method (with crossinit's lambda), norm and kappa of a run from its safetensors metadata, and the measured norms
    of its vectors."""
    metadata = concept.metadata
    norm, method = metadata.get("token_scale", "?"), metadata.get("method", "?")
    if method == "crossinit":  # the baseline's one setting, as kappa is DTI's
        method = f"crossinit (lambda {metadata.get('crossinit_lambda', '?')})"
    return {
        "method": method,
        "norm": f"{norm}, rescaled to {rescale}" if rescale else norm,
        "kappa": metadata.get("kappa", "?"),
        "lora": concept.lora,
        "vector_norms": {key: v.norm(dim=-1).mean().item() for key, v in concept.vectors.items()},
        "metadata": metadata,
    }


def collect_runs(jobs, results, metrics, args):
    runs = {}
    for job, result in zip(jobs, results, strict=True):
        run = runs.setdefault(job.run, {**run_info(job.concept, args.rescale), "subjects": {}})
        run["subjects"][job.subject.name] = result
    for run in runs.values():
        run["aggregate"], run["over"] = aggregate_subjects(run["subjects"], metrics, args.bootstrap)
    return runs


def format_table(runs, metrics):
    header = ["run", "method", "norm", "kappa", *(f"{METRIC_NAMES[m]} [95% CI]" for m in metrics)]
    rows = [header]
    for name, run in runs.items():
        norms = "/".join(f"{n:.3g}" for n in run["vector_norms"].values())
        cells = [f"{run['aggregate'][m]['mean']:.3f} [{run['aggregate'][m]['ci95'][0]:.3f}, "
                 f"{run['aggregate'][m]['ci95'][1]:.3f}]" for m in metrics]  # fmt: skip
        rows.append([name, run["method"], f"{run['norm']} ({norms})", run["kappa"], *cells])
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def metrics_csv(runs, metrics):
    """One row per image: run, subject, prompt, seed and its numbers."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", "method", "norm", "kappa", "subject", "prompt_index", "text_prompt", "seed", *metrics,
                     "file"])  # fmt: skip
    for name, run in runs.items():
        for subject, result in run["subjects"].items():
            for image in result["images"]:
                text = result["prompts"][image["prompt_index"]]["text_prompt"]
                writer.writerow([name, run["method"], run["norm"], run["kappa"], subject, image["prompt_index"], text,
                                 image["seed"], *(f"{image[m]:.6f}" for m in metrics), image["file"]])  # fmt: skip
    return buffer.getvalue()


def nice_axis(values, ticks=5):
    """A padded axis around values with ticks at multiples of 1, 2 or 5 x 10^k: (low, high, ticks, decimals)."""
    low, high = min(values), max(values)
    pad = max(high - low, 0.02) * 0.15
    raw = (high - low + 2 * pad) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor((low - pad) / step), math.ceil((high + pad) / step)
    decimals = max(0, -math.floor(math.log10(step)))
    return first * step, last * step, [k * step for k in range(first, last + 1)], decimals


def scatter_plot(points, size=720, y_label="text similarity (SigLIP)"):
    """Image sim (x) against text sim (y), one labelled point per run with its 95% intervals as error bars.
    points: [(label, {"mean", "ci95"} of x, {"mean", "ci95"} of y)]."""
    image = Image.new("RGB", (size, size), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, top, right, bottom = 80, 40, size - 30, size - 70
    *x_range, x_ticks, x_decimals = nice_axis([v for _, x, _ in points for v in (x["mean"], *x["ci95"])])
    *y_range, y_ticks, y_decimals = nice_axis([v for _, _, y in points for v in (y["mean"], *y["ci95"])])

    def to_px(x, y):
        fx = (x - x_range[0]) / (x_range[1] - x_range[0])
        fy = (y - y_range[0]) / (y_range[1] - y_range[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline="black")
    for x in x_ticks:
        px, _ = to_px(x, y_range[0])
        draw.line([px, bottom, px, bottom + 5], fill="black")
        draw.text((px, bottom + 8), f"{x:.{x_decimals}f}", fill="black", font=font, anchor="ma")
    for y in y_ticks:
        _, py = to_px(x_range[0], y)
        draw.line([left - 5, py, left, py], fill="black")
        draw.text((left - 8, py), f"{y:.{y_decimals}f}", fill="black", font=font, anchor="rm")
    draw.text(((left + right) / 2, size - 30), "image similarity (DINOv2)", fill="black", font=font, anchor="ma")
    draw.text((left, top - 25), y_label, fill="black", font=font)
    draw.text((right, top - 25), "mean and 95% interval per run", fill="gray", font=font, anchor="ra")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for k, (label, x, y) in enumerate(points):
        color = colors[k % len(colors)]
        cx, cy = to_px(x["mean"], y["mean"])
        (x0, _), (x1, _) = to_px(x["ci95"][0], 0), to_px(x["ci95"][1], 0)
        (_, y0), (_, y1) = to_px(0, y["ci95"][0]), to_px(0, y["ci95"][1])
        draw.line([x0, cy, x1, cy], fill=color, width=2)
        draw.line([cx, y0, cx, y1], fill=color, width=2)
        draw.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=color)
        draw.text((cx + 8, cy - 14), label, fill=color, font=font)
    return image


def contact_sheet(job, seeds, label_width=240):
    """The run's images as a grid, one row per prompt (labelled with the text prompt), one column per seed."""
    rows = []
    for entry in job.prompts:
        row = [open_image(job.image_path(entry, seed)) for seed in seeds]
        for image in row:
            image.thumbnail((THUMBNAIL, THUMBNAIL))
        rows.append((entry["text_prompt"], row))
    width, height = rows[0][1][0].size
    sheet = Image.new("RGB", (label_width + width * len(seeds), height * len(rows)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for r, (text, row) in enumerate(rows):
        lines = textwrap.wrap(text, 38)[: max(1, height // 12)]
        draw.multiline_text((6, r * height + 4), "\n".join(lines), fill="black", font=font)
        for c, image in enumerate(row):
            sheet.paste(image, (label_width + c * width, r * height))
    return sheet


def subject_info(subject):
    return {"class_word": subject.class_word, "live": subject.live, "references": [str(p) for p in subject.references]}


def main(args):
    started = time.monotonic()
    infer.quiet_library_noise()
    check_numbers(args)
    infer.check_loras(args)
    device = infer.check_device(args.device)
    infer.check_output_dir(args.output_dir)
    jobs = plan(args)
    family = infer.detect_family(args)
    infer.check_family_flags(args, family)
    infer.check_widths([job.concept for job in jobs], args, family)
    check_evaluation_models(args)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    settings = [generation_settings(args, family, dtype_name, job.concept) for job in jobs]
    check_settings(jobs, settings)

    output_dir = Path(args.output_dir)
    generated = generate_missing(jobs, args, family, device, dtype_name, settings)
    results = score(jobs, args, device, output_dir)
    metrics = list(results[0]["aggregate"])
    runs = collect_runs(jobs, results, metrics, args)
    summary = {
        "model": args.pretrained_model_name_or_path,
        "family": family.name,
        "benchmark": args.benchmark,
        "protocol": args.protocol,
        "prompt_set": args.prompt_file or args.prompt_set,
        "seeds": args.seeds,
        "num_inference_steps": settings[0]["num_inference_steps"],  # one checkpoint: the same for every run
        "image_encoder": args.image_encoder,
        "text_encoder": args.text_encoder,
        "clip_model": args.clip_model,
        "bootstrap": {"resamples": args.bootstrap, "confidence": CONFIDENCE, "seed": BOOTSTRAP_SEED},
        "subjects": {job.subject.name: subject_info(job.subject) for job in jobs},
        "runs": runs,
        "generated": generated,
        "settings": dict(vars(args)),
        "evaluate_version": __version__,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        infer.save_image(contact_sheet(job, args.seeds), job.folder / "contact_sheet.png")
    y, label = (
        ("clip_t", "text similarity (CLIP)") if args.protocol == "style" else ("text_sim", "text similarity (SigLIP)")
    )
    points = [(name, run["aggregate"]["image_sim"], run["aggregate"][y]) for name, run in runs.items()]
    infer.save_image(scatter_plot(points, y_label=label), output_dir / "scatter.png")
    write_atomically(output_dir / "metrics.csv", metrics_csv(runs, metrics))
    write_atomically(output_dir / "metrics.json", json.dumps(summary, indent=2))
    print(format_table(runs, metrics))
    sheets = infer.counted(len(jobs), "contact sheet")
    written = ["metrics.json", "metrics.csv", "scatter.png", f"{sheets} ({infer.counted(generated, 'new image')})"]
    print(infer.done_line(started, written, output_dir))
    return summary


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as error:
        sys.exit(f"error: {error}")

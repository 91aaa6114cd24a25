#!/usr/bin/env python
# Copyright 2026 The DTI diffusers authors. Licensed under the Apache License, Version 2.0.
"""Generate images with learned DTI / Textual Inversion tokens on SDXL, SANA, Wan 2.1 (videos too) and FLUX.2 [klein],
and blend two concepts on the sphere.

    python infer.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --embeddings out-robot \\
      --prompt "a painting of <toy-robot> in the style of Van Gogh" --num_images_per_prompt 4 --output_dir gen

The loader functions (`load_embeddings`, `add_tokens_to_sdxl`, `add_tokens_to_sana`, `add_tokens_to_wan`,
`add_tokens_to_flux2_klein`, `expand_prompt`) are what to copy into your own code; SanaPipeline, WanPipeline and
Flux2KleinPipeline have no load_textual_inversion of their own. A Wan image is the one frame of a 1-frame video;
`--num_frames 33` writes .mp4 videos instead. A FLUX.2 [klein] token trained on the base checkpoint works on the
distilled one too (4 steps by default there, without guidance).
"""

import argparse
import difflib
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from packaging import version
from safetensors import safe_open

__version__ = "0.1.0"

TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
COMBINED_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
TRAINING_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what --lora_rank training writes next to the embeddings
VIDEO_FPS = 16  # Wan 2.1's frame rate
WAN_TEMPORAL_FACTOR = 4  # the Wan 2.1 VAE compresses time 4x: a video has 4k + 1 frames


class HelpFormatter(argparse.HelpFormatter):
    """Every fixed default written one way, 'Default: X.' after the text (as in the training scripts); switches and
    None defaults (explained in the text) get none."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if default is None or default is False or default == argparse.SUPPRESS or default == [] or "Default:" in text:
            return text
        return f"{text} Default: {'on' if default is True else '%(default)s'}."


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse without prefix matching (--num_images is not taken for --num_images_per_prompt), with usage errors
    printed as one line (for an unknown flag, the closest known one), as in the training scripts."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")]
            if not flags:
                self.error(f"unrecognized arguments: {' '.join(unknown)}")
            known = sorted(flag for flag in self._option_string_actions if flag.startswith("--"))
            prefixed = [flag for flag in known if flag.startswith(flags[0])]  # an abbreviation: the flag it shortens
            close = prefixed or difflib.get_close_matches(flags[0], known, n=1)
            self.error(f"unknown flag {flags[0]}" + (f"; did you mean {close[0]}?" if close else ""))
        return namespace

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_pipeline_arguments(
    parser,
    dtype_help="auto: bfloat16 on CUDA, float32 on CPU.",
    size_help="Default: the model's (Wan: WanPipeline's 480x832).",
    num_frames_help="Wan: frames per video, 4k + 1: 1 writes a PNG of its frame, more an .mp4 at 16 fps. Default: 1.",
):
    """The flags that load a pipeline and sample from it; evaluate.py shares them."""
    parser.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="SDXL, SANA, Wan 2.1 (T2V) or FLUX.2 [klein] diffusers checkpoint.",
    )
    parser.add_argument("--revision", default=None, help="Revision of the model.")
    parser.add_argument("--variant", default=None, help="Weight variant of the model, e.g. fp16.")
    parser.add_argument("--negative_prompt", default=None, help="Negative prompt.")
    distilled = {
        family.name: f"; {family.distilled_steps} distilled" if family.distilled_steps else ""
        for family in FAMILIES.values()
    }
    steps = ", ".join(
        f"{family.default_steps} ({family.label}{distilled[family.name]})" for family in FAMILIES.values()
    )
    parser.add_argument("--num_inference_steps", type=int, default=None, help=f"Default: {steps}.")
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Default: the pipeline's (a step-distilled FLUX.2 [klein] samples without guidance: 1).",
    )
    parser.add_argument("--height", type=int, default=None, help=size_help)
    parser.add_argument("--width", type=int, default=None, help=size_help)
    parser.add_argument(
        "--scheduler",
        choices=["default", "dpm", "euler", "ddim"],
        default="default",
        help="default: DPM-Solver++ for SDXL (as the paper samples), the checkpoint's own sampler for SANA, Wan "
        "(Wan 2.1: UniPC with flow shift 3) and FLUX.2 [klein]. dpm / euler: DPM-Solver++ / Euler (Wan: with the flow "
        "shift kept; FLUX.2 [klein]: euler only, its own flow-matching Euler). ddim: DDIM, SDXL only (the DTI "
        "authors' style evaluation samples with it, 50 steps).",
    )
    parser.add_argument("--num_frames", type=int, default=None, help=num_frames_help)
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="Wan, FLUX.2 [klein]: text tokens the transformer sees. Default: the embeddings' metadata (as trained), "
        "else 512.",
    )
    parser.add_argument(
        "--complex_human_instruction",
        choices=["auto", "on", "off"],
        default="auto",
        help="SANA: prepend the pipeline's complex human instruction; auto follows the embeddings' metadata.",
    )
    parser.add_argument(
        "--pooled_output",
        choices=["auto", "eos", "argmax"],
        default="auto",
        help="SDXL: where CLIP pools the text embedding. eos: at the end-of-text token (as SDXL was trained); argmax: "
        "as the checkpoint's config says; auto follows the embeddings' metadata (eos when there is none).",
    )
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto", help=dtype_help)
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--enable_model_cpu_offload", action="store_true", help="Offload idle models to the CPU.")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        help="A diffusers LoRA to apply: a .safetensors file, a folder or a Hub repo id; repeat for several. The LoRA "
        "of a training output folder given to --embeddings (DTI + LoRA) is applied without it.",
    )
    parser.add_argument("--lora_scale", type=float, default=1.0, help="Strength of every applied LoRA.")


def parse_args(input_args=None):
    parser = OneLineErrorParser(
        usage="%(prog)s --pretrained_model_name_or_path MODEL --embeddings FILE_OR_FOLDER --prompt PROMPT [options]",
        description="Generate with learned DTI / TI tokens on SDXL, SANA, Wan 2.1 and FLUX.2 [klein].",
        formatter_class=HelpFormatter,
    )
    add_pipeline_arguments(parser)
    parser.add_argument(
        "--embeddings",
        nargs="+",
        default=[],
        help="Training output folders, .safetensors files (per encoder, combined clip_l/clip_g, diffusers or A1111 "
        "TI files) or Hub repo ids; several concepts at once.",
    )
    parser.add_argument("--weight_name", default=None, help="File to take from a Hub repo given to --embeddings.")
    parser.add_argument("--token", default=None, help="Token to use for a single file that does not name one.")
    parser.add_argument("--prompt", action="append", default=[], help="A prompt; repeat the flag for several.")
    parser.add_argument("--prompt_file", default=None, help="A text file with one prompt per line.")
    parser.add_argument("--num_images_per_prompt", type=int, default=1, help="Images per prompt (seeds seed+i).")
    parser.add_argument("--seed", type=int, default=0, help="Image i of every prompt uses seed + i.")
    parser.add_argument(
        "--interpolate",
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="Blend token A into token B: the prompt holds A; frame t uses SLERP(A, B, t) with the norm kept.",
    )
    parser.add_argument("--interpolation_steps", type=int, default=5, help="Frames of --interpolate, t from 0 to 1.")
    parser.add_argument(
        "--rescale",
        default=None,
        help="Rescale loaded vectors to the mean, min or max norm of the vocabulary, or to a number (TI-rescaled).",
    )
    parser.add_argument(
        "--report", action="store_true", help="Print the method, norm, norm percentile and nearest words."
    )
    parser.add_argument("--output_dir", default="generations", help="Where images and generations.json go.")
    return parser.parse_args(input_args)


# ----------------------------------------------------------------------------------------------------------------
# Reading embedding files
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Concept:
    """One learned token: its vectors per encoder ([k, d] fp32), where they came from, and their metadata."""

    token: str
    vectors: dict = field(default_factory=dict)  # encoder name or "width:<d>" -> [k, d]
    sources: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    lora: str | None = None  # the LoRA trained with the token (pytorch_lora_weights.safetensors of its folder)


def read_state(path):
    """(tensors, metadata) of an embedding file; a file that is empty, cut or of another format is refused in one
    line naming it. Old A1111 .pt files whose vectors sit in an nn.ParameterDict load (only that class is allowed)."""
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}  # noqa: SIM118
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, pickle and zip errors: the file is not what its name says
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        kind = "safetensors" if path.suffix == ".safetensors" else "torch (.pt / .bin)"
        raise ValueError(f"--embeddings {path}: not a readable {kind} embedding file ({reason}).") from None
    if not isinstance(state, dict):
        raise ValueError(f"--embeddings {path}: holds a {type(state).__name__}, not a dict of embeddings.")
    return state, {}


def vectors_of(path, key, tensor):
    """A [k, d] fp32 copy of one stored embedding ([d], [k, d] or [1, k, d]); anything else is refused."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise ValueError(f"--embeddings {path}: {key!r} is not a float tensor of embeddings.")
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() not in (1, 2) or tensor.numel() == 0 or tensor.shape[-1] < 2:
        raise ValueError(f"--embeddings {path}: {key!r} has shape {list(tensor.shape)}; expected [vectors, width].")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"--embeddings {path}: {key!r} holds values that are not finite.")
    return tensor.detach().float().reshape(-1, tensor.shape[-1])


def read_embedding_file(path, token=None):
    """Parse one embedding file: ours, diffusers', the SDXL clip_l/clip_g layout, A1111 .pt or .safetensors.
    Returns (token, {encoder or "width:<d>": [k, d]}, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--embeddings {path}: no such file.")
    state, metadata = read_state(path)
    name = token or metadata.get("placeholder_token") or state.get("name") or f"<{path.stem}>"
    if not isinstance(name, str):
        name = f"<{path.stem}>"
    if "string_to_param" in state:  # A1111 .pt (a dict, or an nn.ParameterDict in old files)
        params = state["string_to_param"]
        if "*" not in params:
            raise ValueError(f"--embeddings {path}: an A1111 file without the '*' vectors.")
        state = {name: params["*"]}
    elif "emb_params" in state:  # kohya's (sd-scripts) .safetensors layout
        state = {name: state["emb_params"]}
    if set(state) & set(COMBINED_KEYS):
        if not set(state) <= set(COMBINED_KEYS):
            extra = sorted(set(state) - set(COMBINED_KEYS))
            raise ValueError(f"--embeddings {path}: unexpected keys {extra} next to {sorted(COMBINED_KEYS)}.")
        return name, {COMBINED_KEYS[k]: vectors_of(path, k, v) for k, v in state.items()}, metadata
    if len(state) != 1:
        raise ValueError(f"--embeddings {path}: expected one token, found keys {sorted(state)}.")
    ((key, tensor),) = state.items()
    vectors = vectors_of(path, key, tensor)
    return token or key, {f"width:{vectors.shape[-1]}": vectors}, metadata


def embedding_files(spec, weight_name):
    """The files behind one --embeddings value: a file, a training output folder, or a Hub repo id."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [path / name for name in TRAINING_FILES if (path / name).is_file()]
        if weight_name:
            files = [path / weight_name]
        if not files:
            raise ValueError(f"--embeddings {spec}: no learned_embeds.safetensors in this folder; name a file.")
        return files
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        from huggingface_hub import hf_hub_download

        names = [weight_name] if weight_name else list(TRAINING_FILES)
        files = []
        for name in names:
            try:
                files.append(Path(hf_hub_download(spec, name)))
            except Exception as error:  # a missing second file is fine; a missing repo is not
                if name == names[0]:
                    reason = type(error).__name__
                    raise ValueError(f"--embeddings {spec}: could not download {name} ({reason}).") from None
        return files
    raise ValueError(f"--embeddings {spec}: no such file or folder.")


def load_embeddings(specs, weight_name=None, token=None):
    """Read every --embeddings value into Concepts, merging the per-encoder files of one token."""
    concepts = {}
    for spec in specs:
        for file in embedding_files(spec, weight_name):
            name, vectors, metadata = read_embedding_file(file, token)
            concept = concepts.setdefault(name, Concept(name))
            widths = {v.shape[-1] for v in concept.vectors.values()}
            if widths & {v.shape[-1] for v in vectors.values()}:  # the same encoder's vectors twice: refuse
                raise ValueError(
                    f"--embeddings: {name} comes from both {', '.join(concept.sources)} and {file}; give one of them "
                    "(or rename one with --token)."
                )
            concept.vectors.update(vectors)
            concept.sources.append(str(file))
            concept.metadata = concept.metadata or metadata
            if Path(spec).is_dir() and (Path(spec) / LORA_WEIGHT_NAME).is_file():
                concept.lora = str(Path(spec) / LORA_WEIGHT_NAME)
    return list(concepts.values())


# ----------------------------------------------------------------------------------------------------------------
# LoRAs (DTI + LoRA runs, or any diffusers LoRA)
# ----------------------------------------------------------------------------------------------------------------


def check_loras(args):
    """--lora values that are neither a file, a folder nor a Hub repo id, and a bad --lora_scale, are refused before
    any model loads."""
    if not math.isfinite(args.lora_scale):
        raise ValueError(f"--lora_scale must be a number, got {args.lora_scale}.")
    for source in args.lora:
        if not Path(source).exists() and not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            raise ValueError(f"--lora {source}: no such file or folder.")


def lora_record(source, scale):
    """What generations.json / generation.json keep of one applied LoRA (a local file also by its SHA-256)."""
    path = Path(source)
    file = path if path.is_file() else path / LORA_WEIGHT_NAME
    digest = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
    return {"source": source, "sha256": digest, "scale": scale}


def load_loras(pipe, sources):
    """Load each LoRA as its own adapter (names lora_0, lora_1, ...); returns {source: adapter name}."""
    if sources and importlib.util.find_spec("peft") is None:
        raise ValueError("Applying a LoRA needs peft: pip install peft.")
    adapters = {}
    for source in dict.fromkeys(sources):
        path, name = Path(source), f"lora_{len(adapters)}"
        if path.is_dir() and (path / LORA_WEIGHT_NAME).is_file():  # a training folder: its LoRA, not a -steps- copy
            path = path / LORA_WEIGHT_NAME
        where, kwargs = (str(path.parent), {"weight_name": path.name}) if path.is_file() else (source, {})
        try:
            pipe.load_lora_weights(where, adapter_name=name, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--lora {source}: not a LoRA this pipeline can load ({reason[:200]}).") from error
        adapters[source] = name
    return adapters


def use_loras(pipe, adapters, sources, scale):
    """Apply exactly the LoRAs of `sources` (each at `scale`); none: the base denoiser."""
    if not adapters:
        return
    if not sources:
        pipe.disable_lora()
        return
    names = [adapters[source] for source in dict.fromkeys(sources)]
    pipe.enable_lora()
    pipe.set_adapters(names, [scale] * len(names))


# ----------------------------------------------------------------------------------------------------------------
# Putting tokens into pipelines
# ----------------------------------------------------------------------------------------------------------------


def token_names(token, num_vectors):
    """diffusers' names of a k-vector token: <tok>, <tok>_1, ..., <tok>_{k-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def encoder_widths(pipe, family):
    """{encoder: width of its input embedding table} of a loaded pipeline."""
    return {name: getattr(pipe, name).get_input_embeddings().weight.shape[1] for name in family.encoders}


def config_widths(args, family):
    """{encoder: width} read from a local checkpoint's text encoder configs, without loading any weight (None for a
    Hub id or an unreadable config: the widths are then checked once the pipeline has loaded)."""
    path = Path(args.pretrained_model_name_or_path)
    widths = {}
    for name in family.encoders:
        try:
            config = json.loads((path / name / "config.json").read_text())
        except (OSError, ValueError):
            return None
        config = config.get("text_config", config)
        widths[name] = config.get("hidden_size") or config.get("d_model")
    return widths if all(isinstance(w, int) for w in widths.values()) else None


def check_widths(concepts, args, family):
    """Every concept fits the checkpoint's encoders (an SDXL file given to a SANA model, ...): found before loading."""
    widths = config_widths(args, family)
    if widths is not None:
        for concept in concepts:
            assign_encoders(concept, widths)


def assign_encoders(concept, widths):
    """Map each of the concept's vector sets to the encoder of the same width (widths: {encoder: width}); errors name
    the file and widths."""
    assigned = {}
    for key, vectors in concept.vectors.items():
        matches = [key] if key in widths else [n for n, w in widths.items() if w == vectors.shape[1]]
        if not matches or vectors.shape[1] != widths[matches[0]]:
            raise ValueError(
                f"--embeddings {', '.join(concept.sources)}: {concept.token} has width {vectors.shape[1]}, which fits "
                f"no encoder of the model ({', '.join(f'{n}: {w}' for n, w in widths.items())})."
            )
        assigned[matches[0]] = vectors
    return assigned


def check_new_token(tokenizer, token, num_vectors, source):
    for name in token_names(token, num_vectors):
        pieces = tokenizer.tokenize(name)
        exists = name in tokenizer.get_vocab() or (
            len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) < len(tokenizer)
        )
        if exists:
            raise ValueError(f"--embeddings {source}: the token {name!r} already exists in the model's tokenizer.")


def add_tokens_to_sdxl(pipe, token, vectors_by_encoder):
    """Load a token into StableDiffusionXLPipeline with diffusers' own load_textual_inversion, per encoder."""
    for encoder, vectors in vectors_by_encoder.items():
        pipe.load_textual_inversion(
            vectors, token=token, text_encoder=getattr(pipe, encoder), tokenizer=getattr(pipe, TOKENIZERS[encoder])
        )


def add_token_rows(tokenizer, text_encoder, tokens, vectors):
    """Add tokens (strings or AddedTokens) to the tokenizer and write their rows [k, d] into the encoder's input
    embedding table, resized only when an id falls past its end (a published table may have spare rows). Returns the
    token ids."""
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids([str(token) for token in tokens])
    if text_encoder.get_input_embeddings().weight.shape[0] <= max(ids):
        text_encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = vectors.to(table.device, table.dtype)
    return ids


def add_tokens_to_sana(pipe, token, vectors):
    """Load a token into SanaPipeline: add <tok>, <tok>_1, ... to the Gemma tokenizer and write the rows [k, d]
    into the input embedding table (the raw table: Gemma scales it by sqrt(d) itself). Returns the token ids."""
    return add_token_rows(pipe.tokenizer, pipe.text_encoder, token_names(token, len(vectors)), vectors)


def add_tokens_to_wan(pipe, token, vectors):
    """Load a token into WanPipeline as train_dti_wan.py added it: <tok>, <tok>_1, ... as AddedToken(lstrip=True) (the
    space before a token belongs to it, so transformers 4.56 and 5.x give the ids training saw), rows [k, d] of the
    UMT5 table (the published table has spare rows past the tokenizer: resized only when too small). Returns the
    ids."""
    from transformers import AddedToken

    tokens = [AddedToken(name, lstrip=True) for name in token_names(token, len(vectors))]
    return add_token_rows(pipe.tokenizer, pipe.text_encoder, tokens, vectors)


def add_tokens_to_flux2_klein(pipe, token, vectors):
    """Load a token into Flux2KleinPipeline as train_dti_flux2_klein.py added it: <tok>, <tok>_1, ... added plainly
    to the Qwen3 tokenizer, rows [k, d] of Qwen3's input table (the published table has spare rows past the tokenizer:
    resized only when too small). Returns the ids."""
    return add_token_rows(pipe.tokenizer, pipe.text_encoder, token_names(token, len(vectors)), vectors)


def expand_prompt(prompt, tokenizer):
    """Write a multi-vector token as <tok> <tok>_1 ..., as diffusers' maybe_convert_prompt does (SANA lacks it)."""
    added = set(tokenizer.get_added_vocab())
    for token in sorted(added, key=len, reverse=True):
        if f"{token}_1" in added and re.search(re.escape(token) + r"(?!_\d)", prompt):
            count = 1
            while f"{token}_{count}" in added:
                count += 1
            prompt = re.sub(re.escape(token) + r"(?!_\d)", " ".join(token_names(token, count)), prompt)
    return prompt


def set_token_vectors(pipe, encoder, token, vectors):
    """Overwrite the rows of an already loaded token (used by --interpolate and --rescale)."""
    tokenizer = getattr(pipe, TOKENIZERS[encoder])
    table = getattr(pipe, encoder).get_input_embeddings().weight
    with torch.no_grad():
        table[tokenizer.convert_tokens_to_ids(token_names(token, len(vectors)))] = vectors.to(table.device, table.dtype)


def slerp(a, b, t):
    """Spherical interpolation of directions a, b [k, d] at t in [0, 1], norm interpolated linearly (equal norms,
    as DTI's, stay exact). The endpoints return a and b themselves."""
    if t <= 0:
        return a
    if t >= 1:
        return b
    a64, b64 = a.double(), b.double()
    norm = (1 - t) * a64.norm(dim=-1, keepdim=True) + t * b64.norm(dim=-1, keepdim=True)
    ua, ub = F.normalize(a64, dim=-1), F.normalize(b64, dim=-1)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(omega)
    mixed = torch.where(sin > 1e-8, (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / sin, ua)
    return (F.normalize(mixed, dim=-1) * norm).to(a.dtype)


def vocabulary_table(pipe, encoder, num_rows):
    return getattr(pipe, encoder).get_input_embeddings().weight.detach()[:num_rows].float()


def rescale(vectors, table, how):
    """The paper's TI-rescaled baseline: every vector set to the mean, min or max vocabulary norm, or a number."""
    norms = table.norm(dim=-1)
    norms = norms[norms > 0]
    target = float(how) if how not in ("mean", "min", "max") else getattr(norms, how)().item()
    return F.normalize(vectors.float(), dim=-1) * target


def method_summary(metadata):
    """How a token was learned, from its metadata: the method and its setting (m* and kappa, or crossinit's lambda)."""
    method = metadata.get("method")
    if method is None:
        return "method unknown (no training metadata)"
    settings = {"dti": ("token_scale", "kappa"), "ti": (), "crossinit": ("crossinit_lambda",)}.get(method, ())
    details = ", ".join(f"{key} {metadata[key]}" for key in settings if key in metadata)
    return f"method {method}" + (f" ({details})" if details else "")


def report(vectors, table, tokenizer, top=5):
    """Per vector: norm, percentile of that norm among the vocabulary norms, and the nearest words by cosine."""
    norms = table.norm(dim=-1)
    rows = []
    for vector in vectors.float():
        cosine = F.cosine_similarity(table, vector[None], dim=-1)
        best = cosine.topk(top)
        nearest = [(tokenizer.convert_ids_to_tokens(int(i)), c.item()) for c, i in zip(*best, strict=True)]
        rows.append({
            "norm": vector.norm().item(),
            "percentile": 100.0 * (norms[norms > 0] <= vector.norm()).float().mean().item(),
            "vocabulary_mean_norm": norms[norms > 0].mean().item(),
            "nearest": nearest,
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Families: every difference between the pipelines infer.py and evaluate.py drive, in one table
# ----------------------------------------------------------------------------------------------------------------


def add_tokens_to_sana_encoders(pipe, token, vectors_by_encoder):
    """add_tokens_to_sana in the per-encoder form the family table uses (SANA has one encoder, Gemma)."""
    return add_tokens_to_sana(pipe, token, vectors_by_encoder["text_encoder"])


def sdxl_inputs(pipe, prompt, instruction):
    """SDXL's prompt as written (its pipeline expands multi-vector tokens itself) and no extra pipeline arguments."""
    return prompt, {}


def sana_inputs(pipe, prompt, instruction):
    """SANA's prompt with multi-vector tokens written out, its complex human instruction, and the asked size kept."""
    extra = {"complex_human_instruction": instruction, "use_resolution_binning": False}
    return expand_prompt(prompt, pipe.tokenizer), extra


def add_tokens_to_wan_encoders(pipe, token, vectors_by_encoder):
    """add_tokens_to_wan in the per-encoder form the family table uses (Wan has one encoder, UMT5)."""
    return add_tokens_to_wan(pipe, token, vectors_by_encoder["text_encoder"])


def wan_inputs(pipe, prompt, instruction):
    """Wan's prompt with multi-vector tokens written out (WanPipeline cannot expand them); no extra arguments."""
    return expand_prompt(prompt, pipe.tokenizer), {}


def add_tokens_to_flux2_klein_encoders(pipe, token, vectors_by_encoder):
    """add_tokens_to_flux2_klein in the per-encoder form the family table uses (one encoder, Qwen3)."""
    return add_tokens_to_flux2_klein(pipe, token, vectors_by_encoder["text_encoder"])


def flux2_klein_inputs(pipe, prompt, instruction):
    """FLUX.2 [klein]'s prompt with multi-vector tokens written out (Flux2KleinPipeline cannot expand them)."""
    return expand_prompt(prompt, pipe.tokenizer), {}


def flow_match_euler(config):
    """FlowMatchEulerDiscreteScheduler with the checkpoint's sampling shift: Wan's UniPC config names it flow_shift,
    which FlowMatchEuler's own key (shift) would otherwise leave at 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config, shift=config.get("flow_shift", 1.0))


@dataclass(frozen=True, kw_only=True)
class Family:
    """One pipeline family: how it is recognised, loaded, given tokens and sampled."""

    name: str  # what generations.json and metrics.json record
    label: str  # how help texts name it
    pipeline: str  # the diffusers pipeline class
    class_prefix: str  # model_index.json's _class_name starts with it
    encoders: tuple  # text encoder components, each with its tokenizer in TOKENIZERS
    default_steps: int  # --num_inference_steps when not given
    distilled_steps: int | None = None  # the default on a step-distilled checkpoint (model_index.json "is_distilled")
    # --scheduler value -> diffusers scheduler class name, or a function of the checkpoint's scheduler config that
    # builds one; a value not here keeps the checkpoint's own
    schedulers: dict
    add_tokens: Callable  # (pipe, token, {encoder: [k, d]}): load a learned token
    inputs: Callable  # (pipe, prompt, instruction) -> (prompt, extra pipeline arguments)
    uses_complex_human_instruction: bool = False  # --complex_human_instruction applies
    uses_pooled_output: bool = False  # --pooled_output applies (where both CLIP encoders pool)
    uses_max_sequence_length: bool = False  # --max_sequence_length applies (the embeddings' metadata gives its default)
    video: bool = False  # the pipeline makes videos: num_videos_per_prompt and num_frames in, .frames out
    fp32_modules: tuple = ()  # components kept in float32 whatever --dtype says
    size_multiple: int = 8  # --height / --width must be multiples of it (the VAE's factor times the patch size)


FAMILIES = {
    family.name: family
    for family in (
        Family(
            name="sdxl",
            label="SDXL",
            pipeline="StableDiffusionXLPipeline",
            class_prefix="StableDiffusionXL",
            encoders=("text_encoder", "text_encoder_2"),
            default_steps=25,
            # DPM-Solver++ by default: the sampler the paper's SDXL images were made with
            schedulers={
                "default": "DPMSolverMultistepScheduler",
                "dpm": "DPMSolverMultistepScheduler",
                "euler": "EulerDiscreteScheduler",
                "ddim": "DDIMScheduler",  # the DTI authors' style evaluation
            },
            add_tokens=add_tokens_to_sdxl,
            inputs=sdxl_inputs,
            uses_pooled_output=True,
        ),
        Family(
            name="sana",
            label="SANA",
            pipeline="SanaPipeline",
            class_prefix="Sana",
            encoders=("text_encoder",),
            default_steps=20,
            schedulers={"dpm": "DPMSolverMultistepScheduler", "euler": "FlowMatchEulerDiscreteScheduler"},
            add_tokens=add_tokens_to_sana_encoders,
            inputs=sana_inputs,
            uses_complex_human_instruction=True,
            size_multiple=32,  # the DC-AE's factor
        ),
        Family(
            name="wan",
            label="Wan",
            pipeline="WanPipeline",
            class_prefix="WanPipeline",
            encoders=("text_encoder",),
            default_steps=50,  # WanPipeline's own
            # the checkpoint's UniPC by default; DPM-Solver++ keeps its flow_shift through from_config
            schedulers={"dpm": "DPMSolverMultistepScheduler", "euler": flow_match_euler},
            add_tokens=add_tokens_to_wan_encoders,
            inputs=wan_inputs,
            uses_max_sequence_length=True,
            video=True,
            fp32_modules=("vae",),  # the Wan VAE decodes in float32, as training keeps it and diffusers recommends
            size_multiple=16,  # the VAE's 8 times the transformer's 2x2 patches
        ),
        Family(
            name="flux2-klein",
            label="FLUX.2 [klein]",
            pipeline="Flux2KleinPipeline",
            class_prefix="Flux2KleinPipeline",
            encoders=("text_encoder",),
            default_steps=50,  # Flux2KleinPipeline's own, for the base checkpoint
            distilled_steps=4,  # what the step-distilled checkpoint is made for
            # the checkpoint's flow-matching Euler only: the pipeline hands it custom sigmas and a shift mu
            schedulers={"euler": None},
            add_tokens=add_tokens_to_flux2_klein_encoders,
            inputs=flux2_klein_inputs,
            uses_max_sequence_length=True,
            size_multiple=16,  # the VAE's 8 times the 2x2 patches
        ),
    )
}


def listing(names):
    """Names joined as prose: 'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def counted(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def done_line(started, written, folder):
    """The last line of a run: how long it took and what it wrote where."""
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    return f"Done in {minutes}m{seconds:02d}s: wrote {listing(written)} in {folder}."


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
    and the model not in the local cache (where diffusers and transformers would retry for half a minute, then blame
    a missing file). A cached model works offline; with the Hub out of reach and HF_HUB_OFFLINE unset it loads with a
    warning."""
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
            print(f"warning: the Hugging Face Hub could not be reached ({reason}): {flag} {name!r} loads from the "
                  "local cache; set HF_HUB_OFFLINE=1 to skip the network.", file=sys.stderr)  # fmt: skip
        return
    raise ValueError(
        f"{flag} {name!r} is not a local folder and the Hugging Face Hub could not be reached ({reason}), nor is it in "
        "the local cache: download it once online and run with HF_HUB_OFFLINE=1, or give a local folder (gated models "
        "need `hf auth login` first)."
    )


def detect_family(args):
    """The Family of the checkpoint, from the _class_name of its model_index.json; any other pipeline is refused."""
    from diffusers import DiffusionPipeline

    check_hub_model("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, args.revision)
    try:
        index = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: {reason}") from error
    class_name = index.get("_class_name", "")
    for family in FAMILIES.values():
        if class_name.startswith(family.class_prefix):
            return family
    supported = listing([family.pipeline for family in FAMILIES.values()])
    raise ValueError(
        f"--pretrained_model_name_or_path is a {class_name or 'unknown pipeline'}; infer.py supports {supported} "
        "checkpoints."
    )


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(args, family, dtype, device):
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline)
    dtype_keyword = "dtype" if version.parse(diffusers.__version__).release >= (0, 40) else "torch_dtype"
    if family.fp32_modules:  # loaded in float32 from the start, not cast up after a lossy load
        dtype = {"default": dtype} | dict.fromkeys(family.fp32_modules, torch.float32)
    pipe = pipeline_class.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, **{dtype_keyword: dtype}
    )
    choice, config = family.schedulers.get(args.scheduler), pipe.scheduler.config
    if choice:
        pipe.scheduler = choice(config) if callable(choice) else getattr(diffusers, choice).from_config(config)
    if args.enable_model_cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    return pipe


def pooled_output(args, concepts):
    """SDXL: 'eos' or 'argmax', from --pooled_output or, with auto, from the embeddings' metadata. Files without
    metadata pool at end-of-text (what ComfyUI and A1111 do); files of training scripts older than the
    --pooled_output flag were trained with the config's pooling (argmax)."""
    if args.pooled_output != "auto":
        return args.pooled_output
    recorded = {
        c.token: c.metadata.get("pooled_output", "argmax" if "script_version" in c.metadata else "eos")
        for c in concepts
    }
    if len(set(recorded.values())) > 1:
        found = ", ".join(f"{token}: {how}" for token, how in recorded.items())
        raise ValueError(f"--embeddings were trained with different pooled outputs ({found}); pass --pooled_output.")
    return next(iter(recorded.values()), "eos")


def set_pooled_output(pipe, how):
    """Make both CLIP encoders of an SDXL pipeline pool at the end-of-text token (eos) or as their config says."""
    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        eos = tokenizer.eos_token_id if how == "eos" else encoder.config.eos_token_id
        getattr(encoder, "text_model", encoder).eos_token_id = eos  # what the pooling reads (transformers 4, 5)


def slug(text, length=48):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


def sample(pipe, family, prompt, seeds, args, instruction):
    """One batch of one prompt, sample i seeded with seeds[i] (CPU generators: the same on every device): PIL images,
    or for a video family videos of args.num_frames PIL frames; args as sampling_settings resolved them (text tokens:
    args.max_sequence_length where the family takes it)."""
    count = "num_videos_per_prompt" if family.video else "num_images_per_prompt"
    kwargs = {
        "num_inference_steps": args.num_inference_steps or family.default_steps,
        count: len(seeds),
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in seeds],
    }
    for key in ("guidance_scale", "height", "width", "negative_prompt"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    if family.uses_max_sequence_length:
        kwargs["max_sequence_length"] = args.max_sequence_length
    if family.video:
        kwargs |= {"num_frames": args.num_frames, "output_type": "pil"}
    prompt, extra = family.inputs(pipe, prompt, instruction)
    output = pipe(prompt=prompt, **kwargs | extra)  # by keyword: Flux2KleinPipeline's first argument is an image
    return list(output.frames) if family.video else output.images


def generate(pipe, family, prompt, seeds, args, instruction):
    """One batch of images of one prompt, image i seeded with seeds[i]; for a video family each video's first frame
    (the only one at --num_frames 1)."""
    samples = sample(pipe, family, prompt, seeds, args, instruction)
    return [frames[0] for frames in samples] if family.video else samples


def save_image(image, path):
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)
    return path.name


def save_video(frames, path):
    """PIL frames as an .mp4 at VIDEO_FPS (diffusers' export_to_video, through imageio and its ffmpeg)."""
    from diffusers.utils import export_to_video

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # imageio picks the format from the suffix
    export_to_video(frames, str(tmp), fps=VIDEO_FPS)
    tmp.replace(path)
    return path.name


def strip(images):
    from diffusers.utils import make_image_grid

    return make_image_grid(images, rows=1, cols=len(images))


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ValueError(f"--prompt_file {path}: no such file.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def sana_instruction(args, concepts):
    """The complex human instruction for SANA: on/off, or auto from the embeddings' metadata (else the pipeline's)."""
    from diffusers import SanaPipeline

    default = list(inspect_default(SanaPipeline.__call__, "complex_human_instruction"))
    if args.complex_human_instruction != "auto":
        return default if args.complex_human_instruction == "on" else None
    recorded = [
        json.loads(c.metadata["complex_human_instruction"])
        for c in concepts
        if "complex_human_instruction" in c.metadata
    ]
    return recorded[0] if recorded else default


def inspect_default(function, name):
    import inspect

    return inspect.signature(function).parameters[name].default


def check_device(device):
    """The --device to use (default: cuda if available, else cpu); one that this machine lacks is refused now."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N.") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, True):
        raise ValueError(f"--device {device}: this machine has no {kind.upper()} device that torch can use; use cpu.")
    return device


MAX_SIDE = 8192  # pixels: beyond any published checkpoint's resolution (SANA's 4K models are 4096)


def check_generation_flags(args, family):
    """The sampling numbers, before any model loads: sizes the family's VAE and patches divide (the pipelines would
    raise late or round silently), at least one step, a finite guidance scale, a finite --rescale."""
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and not (0 < value <= MAX_SIDE and value % family.size_multiple == 0):
            raise ValueError(f"{flag} must be a positive multiple of {family.size_multiple} up to {MAX_SIDE} for "
                             f"{family.label}, got {value}.")  # fmt: skip
    if args.num_inference_steps is not None and args.num_inference_steps < 1:
        raise ValueError(f"--num_inference_steps must be at least 1, got {args.num_inference_steps}.")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance_scale must be a finite number, got {args.guidance_scale}.")
    check_rescale(args.rescale)


def check_rescale(value):
    if value not in (None, "mean", "min", "max"):
        try:
            assert 0 < float(value) < float("inf")
        except (ValueError, AssertionError):
            raise ValueError(f"--rescale must be mean, min, max or a positive number, got {value!r}.") from None


def check_family_flags(args, family):
    """The flags only some families take, checked before any model loads: --num_frames (Wan only, 4k + 1 frames:
    WanPipeline would round other counts silently), --max_sequence_length (Wan, FLUX.2 [klein]) and a --scheduler
    the family has; and the sampling numbers (check_generation_flags)."""
    check_generation_flags(args, family)
    if args.scheduler != "default" and args.scheduler not in family.schedulers:
        choices = listing(["default", *family.schedulers])
        raise ValueError(f"--scheduler {args.scheduler} is not one {family.label} samples with; use {choices}.")
    if args.max_sequence_length is not None and not family.uses_max_sequence_length:
        raise ValueError(f"--max_sequence_length is for Wan and FLUX.2 [klein] checkpoints, not {family.pipeline}.")
    if args.max_sequence_length is not None and args.max_sequence_length < 2:
        raise ValueError(f"--max_sequence_length must be at least 2, got {args.max_sequence_length}.")
    if not family.video:
        if args.num_frames is not None:
            raise ValueError(f"--num_frames is for Wan (video) checkpoints; {family.pipeline} makes images.")
        return
    frames = args.num_frames
    if frames is not None and (frames < 1 or (frames - 1) % WAN_TEMPORAL_FACTOR):
        raise ValueError(f"--num_frames must be 4k + 1 (1, 5, 9, ..., 81), got {frames}: the Wan VAE groups frames "
                         f"by {WAN_TEMPORAL_FACTOR} after the first.")  # fmt: skip


def check_video_export():
    """export_to_video writes .mp4 through imageio and imageio-ffmpeg (without imageio diffusers tries OpenCV)."""
    missing = [name for name in ("imageio", "imageio_ffmpeg") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError("--num_frames above 1 writes .mp4 videos, which needs imageio and imageio-ffmpeg: pip install "
                         "imageio imageio-ffmpeg.")  # fmt: skip


def sequence_length(args, family, concepts):
    """The text length (Wan, FLUX.2 [klein]): --max_sequence_length, else the one the embeddings were trained with,
    else the pipeline's default (512)."""
    if args.max_sequence_length is not None:
        return args.max_sequence_length
    key = "max_sequence_length"
    recorded = {c.token: int(c.metadata[key]) for c in concepts if key in c.metadata}
    if len(set(recorded.values())) > 1:
        found = ", ".join(f"{token}: {length}" for token, length in recorded.items())
        raise ValueError(f"--embeddings were trained with different max_sequence_length ({found}); pass "
                         "--max_sequence_length.")  # fmt: skip
    import diffusers

    pipeline_call = getattr(diffusers, family.pipeline).__call__
    return next(iter(recorded.values()), inspect_default(pipeline_call, "max_sequence_length"))


def is_distilled(args):
    """Whether the checkpoint is step-distilled: "is_distilled": true in its model_index.json (FLUX.2 [klein])."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision)
    return bool(index.get("is_distilled", False))


def sampling_settings(args, family, concepts):
    """What the family samples with, resolved from the flags, the checkpoint and the embeddings' metadata:
    num_inference_steps and guidance_scale (None: the pipeline's), and where the family takes them, max_sequence_length
    and num_frames. A step-distilled checkpoint samples in the family's distilled_steps without guidance (1): a
    --guidance_scale above 1 or a --negative_prompt, which its pipeline would ignore, is refused."""
    settings = {"num_inference_steps": args.num_inference_steps or family.default_steps}
    settings["guidance_scale"] = args.guidance_scale
    if family.distilled_steps and is_distilled(args):
        if (args.guidance_scale or 1.0) > 1.0 or args.negative_prompt is not None:
            raise ValueError(f"--guidance_scale above 1 and --negative_prompt do nothing on a step-distilled "
                             f"{family.label} checkpoint (is_distilled in its model_index.json); leave them out, or "
                             "use the base checkpoint.")  # fmt: skip
        settings["num_inference_steps"] = args.num_inference_steps or family.distilled_steps
        settings["guidance_scale"] = 1.0  # the pipeline would warn at its default 4.0, then ignore it
    if family.uses_max_sequence_length:
        settings["max_sequence_length"] = sequence_length(args, family, concepts)
    if family.video:
        settings["num_frames"] = args.num_frames or 1
    return settings


def check_output_dir(output_dir, flag="--output_dir"):
    """A folder, or one that can be made: the nearest existing folder above it is writable (checked without writing,
    so a refused run leaves nothing behind)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder.")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder; give another folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written ({existing} is not writable); give another folder.")


def quiet_library_noise():
    """Silence library messages no user can act on: bitsandbytes' CPU 4-bit kernel notice, transformers' notices that
    image processors fall back to PIL without torchvision, that new token rows start from a normal distribution (the
    tokens' rows are set right after) and that SigLIP's config keeps CLIP's bos/eos ids (its defaults; evaluate.py
    never generates text), and the loading bars (the denoising bar stays)."""
    import logging

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    drops = {"transformers.utils.import_utils": "requires torchvision", "transformers.modeling_utils": "multivariate",
             "transformers.configuration_utils": "an integer within the vocabulary"}  # fmt: skip
    for name, text in drops.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(args):
    started = time.monotonic()
    quiet_library_noise()
    if not (args.seed >= 0 and args.seed + args.num_images_per_prompt <= 2**32):
        raise ValueError("--seed must be in [0, 2**32 - 1], with room for --num_images_per_prompt seeds after it.")
    device = check_device(args.device)
    check_output_dir(args.output_dir)
    if args.num_images_per_prompt < 1 or args.interpolation_steps < 2:
        raise ValueError("--num_images_per_prompt must be at least 1 and --interpolation_steps at least 2.")
    check_rescale(args.rescale)
    check_loras(args)
    prompts = read_prompts(args)
    concepts = load_embeddings(args.embeddings, args.weight_name, args.token)
    loras = [c.lora for c in concepts if c.lora] + args.lora
    for c in concepts:
        if c.metadata.get("lora_rank") and not c.lora:
            rank = c.metadata["lora_rank"]
            print(f"warning: {c.token} was trained with a LoRA (rank {rank}); give its training folder to "
                  f"--embeddings or its {LORA_WEIGHT_NAME} to --lora to apply it.", file=sys.stderr)  # fmt: skip
    if not prompts and not args.report:
        raise ValueError("Nothing to do: give --prompt, --prompt_file or --report.")
    if args.interpolate:
        check_interpolation(args.interpolate, {c.token: c.vectors for c in concepts})
    warn_about_prompt_tokens(prompts, [c.token for c in concepts], args.interpolate)
    family = detect_family(args)
    check_family_flags(args, family)
    check_widths(concepts, args, family)
    resolved = sampling_settings(args, family, concepts)
    videos = resolved.get("num_frames", 1) > 1
    if videos and args.interpolate:
        raise ValueError("--interpolate renders still frames; leave out --num_frames (or give 1).")
    if videos:
        check_video_export()
    sampling = argparse.Namespace(**vars(args) | resolved)  # the flags with the family's settings resolved
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    pipe = load_pipeline(args, family, getattr(torch, dtype_name), device)
    use_loras(pipe, load_loras(pipe, loras), loras, args.lora_scale)

    # Vocabulary tables before any token is added: the reference for --rescale and --report.
    tokenizers = {encoder: getattr(pipe, TOKENIZERS[encoder]) for encoder in family.encoders}
    tables = {encoder: vocabulary_table(pipe, encoder, len(tokenizers[encoder])) for encoder in family.encoders}
    loaded, reports = {}, {}
    for concept in concepts:
        vectors = assign_encoders(concept, encoder_widths(pipe, family))
        for encoder, tensor in vectors.items():
            check_new_token(tokenizers[encoder], concept.token, len(tensor), ", ".join(concept.sources))
            if args.rescale:
                vectors[encoder] = rescale(tensor, tables[encoder], args.rescale)
        missing = [e for e in family.encoders if e not in vectors]
        if missing:
            print(f"warning: {concept.token} has no vectors for {missing}; it is loaded into the others only.",
                  file=sys.stderr)  # fmt: skip
        family.add_tokens(pipe, concept.token, vectors)
        loaded[concept.token] = vectors
        if args.report:
            reports[concept.token] = {e: report(v, tables[e], tokenizers[e]) for e, v in vectors.items()}
            print(f"{concept.token}: {method_summary(concept.metadata)}")
            for encoder, rows in reports[concept.token].items():
                for j, row in enumerate(rows):
                    nearest = ", ".join(f"{word} ({cos:.3f})" for word, cos in row["nearest"])
                    print(f"{concept.token} [{encoder}] vector {j}: norm {row['norm']:.4f}, "
                          f"{row['percentile']:.1f}th percentile of the vocabulary norms (mean "
                          f"{row['vocabulary_mean_norm']:.4f}); nearest: {nearest}")  # fmt: skip

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    instruction = sana_instruction(args, concepts) if family.uses_complex_human_instruction else None
    pooling = pooled_output(args, concepts) if family.uses_pooled_output else None
    if pooling:
        set_pooled_output(pipe, pooling)
    seeds = [args.seed + i for i in range(args.num_images_per_prompt)]
    records, frames = [], []
    for p, prompt in enumerate(prompts):
        if args.interpolate:  # its frame 0 is the plain image of the prompt: nothing else to render
            frames += interpolate(pipe, family, prompt, p, loaded, sampling, instruction, output_dir)
            continue
        samples = sample(pipe, family, prompt, seeds, sampling, instruction)
        images = [clip[0] for clip in samples] if family.video else samples  # a video's first frame
        for i, (seed, image, clip) in enumerate(zip(seeds, images, samples, strict=True)):
            path = output_dir / f"p{p:02d}-i{i}-seed{seed}-{slug(prompt)}.{'mp4' if videos else 'png'}"
            file = save_video(clip, path) if videos else save_image(image, path)
            records.append({"file": file, "prompt": prompt, "prompt_index": p, "index": i, "seed": seed})
        save_image(strip(images), output_dir / f"p{p:02d}-grid-{slug(prompt)}.png")

    settings = dict(vars(args))
    summary = {
        "model": args.pretrained_model_name_or_path,
        "family": family.name,
        "dtype": dtype_name,
        "device": device,
        "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": resolved["num_inference_steps"],
        "guidance_scale": resolved["guidance_scale"],
        "complex_human_instruction": instruction,
        "pooled_output": pooling,
        "num_frames": resolved.get("num_frames"),
        "max_sequence_length": resolved.get("max_sequence_length"),
        "loras": [lora_record(source, args.lora_scale) for source in dict.fromkeys(loras)],
        "settings": settings,
        "embeddings": [
            {
                "token": c.token,
                "sources": c.sources,
                "metadata": c.metadata,
                "encoders": {e: list(v.shape) for e, v in loaded[c.token].items()},
            }
            for c in concepts
        ],  # fmt: skip
        "report": reports,
        "images": records,
        "interpolation": frames,
        "infer_version": __version__,
    }
    tmp = output_dir / ".generations.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(output_dir / "generations.json")  # never a half-written record
    written = [counted(len(records), "image"), counted(len(prompts), "grid")] if records else []
    if frames:
        written.append(f"{counted(len(frames), 'interpolation frame')} and {counted(len(prompts), 'strip')}")
    print(done_line(started, [*written, "generations.json"], output_dir))
    return summary


def check_interpolation(pair, vectors):
    """--interpolate A B, before any model loads: two loaded tokens with the same vector shapes per encoder."""
    a, b = pair
    for token in (a, b):
        if token not in vectors:
            raise ValueError(f"--interpolate {token}: not a loaded token (loaded: {', '.join(vectors)}).")
    if sorted(tuple(v.shape) for v in vectors[a].values()) != sorted(tuple(v.shape) for v in vectors[b].values()):
        raise ValueError(f"--interpolate {a} {b}: the two tokens must have the same number of vectors per encoder.")


def warn_about_prompt_tokens(prompts, tokens, interpolate=None):
    """A loaded token no prompt holds (the second token of --interpolate needs none), and a <token> in a prompt that
    nothing loaded (it would be read as plain text)."""
    if not prompts:
        return
    for token in tokens:
        if token not in (interpolate or ()) and not any(token in prompt for prompt in prompts):
            print(f"warning: {token} appears in no prompt.", file=sys.stderr)
    unknown = sorted({t for prompt in prompts for t in re.findall(r"<[^<>\s]+>", prompt)} - set(tokens))
    for token in unknown:
        print(f"warning: {token} in a prompt is no loaded token (loaded: {', '.join(tokens) or 'none'}); it is read "
              "as plain text.", file=sys.stderr)  # fmt: skip


def interpolate(pipe, family, prompt, p, loaded, args, instruction, output_dir):
    """Frames of prompt p with token A's vectors moved along SLERP(A, B, t), t = 0 .. 1, one seed for all."""
    a, b = args.interpolate
    if a not in prompt:
        print(f"warning: --interpolate: the prompt {prompt!r} does not hold {a}.", file=sys.stderr)
    frames, images = [], []
    for k in range(args.interpolation_steps):
        t = k / (args.interpolation_steps - 1)
        for encoder in loaded[a]:
            set_token_vectors(pipe, encoder, a, slerp(loaded[a][encoder], loaded[b][encoder], t))
        (image,) = generate(pipe, family, prompt, [args.seed], args, instruction)
        images.append(image)
        file = save_image(image, output_dir / f"p{p:02d}-interpolate-{k:02d}-t{t:.2f}.png")
        frames.append({"file": file, "prompt": prompt, "prompt_index": p, "t": t, "seed": args.seed})
    for encoder, vectors in loaded[a].items():
        set_token_vectors(pipe, encoder, a, vectors)
    save_image(strip(images), output_dir / f"p{p:02d}-interpolate-strip.png")
    return frames


if __name__ == "__main__":
    try:
        main(parse_args())
    except ValueError as error:
        sys.exit(f"error: {error}")

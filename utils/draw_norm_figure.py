#!/usr/bin/env python
# Copyright 2026 The DTI diffusers authors. Licensed under the Apache License, Version 2.0.
"""Draw the README's figure: the histogram of the vocabulary's embedding norms of each SDXL text encoder, with the
norm a TI token learned and the norm a DTI token keeps (m*, the vocabulary mean) marked.

    python utils/draw_norm_figure.py      # the committed assets/norm_histogram.png: tiny random-weight SDXL, offline
    python utils/draw_norm_figure.py --pretrained_model_name_or_path SDXL_DIR --ti TI_RUN --dti DTI_RUN \\
        --note "SDXL base 1.0, toy robot, 400 steps"

Without --ti / --dti it builds the tiny SDXL pipeline of the tests (random weights, the real CLIP vocabulary) and
trains the toy robot with `--method ti` and with DTI, 400 steps at 64 px each (a few minutes on a CPU). Drawn with
Pillow and numpy only.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
# (text encoder folder, tokenizer folder, embedding file of a run, what the panel says)
ENCODERS = [
    ("text_encoder", "tokenizer", "learned_embeds.safetensors", "text_encoder (CLIP ViT-L)"),
    ("text_encoder_2", "tokenizer_2", "learned_embeds_2.safetensors", "text_encoder_2 (OpenCLIP bigG)"),
]
EMBEDDING_KEYS = ("token_embedding.weight", "embed_tokens.weight", "shared.weight")
TINY_NOTE = (
    "Tiny random-weight SDXL (tests/tiny_sdxl.py, real CLIP vocabulary); TI and DTI on the toy robot, 400 steps at "
    "64 px, seed 0. The shape, not SDXL's values."
)
GREY, BLUE, RED, INK, FAINT = (154, 165, 177), (31, 111, 209), (217, 72, 15), (33, 37, 41), (222, 226, 230)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--pretrained_model_name_or_path", help="Local SDXL folder; default: the tiny pipeline.")
    parser.add_argument("--ti", help="Output folder of a `--method ti` run on that model.")
    parser.add_argument("--dti", help="Output folder of a DTI run on that model.")
    parser.add_argument("--token", default="<toy-robot>", help="The placeholder token of both runs.")
    parser.add_argument("--note", default=None, help="The line under the figure saying what was drawn.")
    parser.add_argument("--output", default=str(REPO / "assets" / "norm_histogram.png"), help="PNG to write.")
    args = parser.parse_args(input_args)
    given = [args.pretrained_model_name_or_path, args.ti, args.dti]
    if any(given) and not all(given):
        parser.error("--pretrained_model_name_or_path, --ti and --dti go together (none of them: the tiny runs).")
    return args


def tiny_runs(folder):
    """Build the tiny SDXL pipeline in `folder` and train TI and DTI on the toy robot; returns (model, ti, dti)."""
    sys.path.insert(0, str(REPO))
    from tests.tiny_sdxl import save_tiny_sdxl

    model = save_tiny_sdxl(folder / "tiny-sdxl")
    runs = {}
    for method in ("ti", "dti"):
        runs[method] = folder / f"run-{method}"
        command = [sys.executable, str(REPO / "train_dti_sdxl.py"), "--pretrained_model_name_or_path", str(model),
                   "--train_data_dir", str(REPO / "assets" / "toy_robot"), "--placeholder_token", "<toy-robot>",
                   "--initializer_token", "robot", "--resolution", "64", "--train_batch_size", "2",
                   "--max_train_steps", "400", "--num_validation_images", "0", "--seed", "0", "--method", method,
                   "--output_dir", str(runs[method])]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
    return model, runs["ti"], runs["dti"]


def vocabulary_norms(model, encoder, tokenizer):
    """(norms, d): the norms of the pretrained input-embedding rows the tokenizer can produce (zero rows left out), as
    numpy, and the width d of the table."""
    from transformers import AutoTokenizer

    for path in sorted((Path(model) / encoder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            key = next((k for k in f.keys() if k.endswith(EMBEDDING_KEYS)), None)  # noqa: SIM118
            if key is not None:
                size = len(AutoTokenizer.from_pretrained(model, subfolder=tokenizer))
                table = f.get_tensor(key)[:size].float()
                norms = torch.linalg.vector_norm(table, dim=1)
                return norms[norms > 0].numpy(), table.shape[1]
    raise SystemExit(f"{Path(model) / encoder}: no input embedding table in its .safetensors files.")


def learned_norm(run, file, token):
    return float(torch.linalg.vector_norm(load_file(str(Path(run) / file))[token].float(), dim=-1).max())


def nice_step(span, count=5):
    """A round tick step (1, 2, 2.5 or 5 times a power of ten) giving about `count` ticks over `span`."""
    raw = span / count
    power = 10 ** np.floor(np.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def font(size):
    return ImageFont.load_default(size=size)


def draw_panel(image, box, title, norms, dti, ti):
    """One histogram in `box` = (left, top, right, bottom) of the panel, its axes, ticks and marked norms."""
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box[0] + 70, box[1] + 34, box[2] - 16, box[3] - 52  # the plot area
    draw.text(((box[0] + box[2]) // 2, box[1] + 4), title, fill=INK, font=font(16), anchor="ma")
    x_max = max(ti, float(norms.max())) * 1.12
    counts, edges = np.histogram(norms, bins=140, range=(0.0, x_max))
    y_step = nice_step(counts.max() * 1.3)
    y_max = y_step * np.ceil(counts.max() * 1.3 / y_step)

    def x(value):
        return left + (right - left) * value / x_max

    def y(value):
        return bottom - (bottom - top) * value / y_max

    for tick in np.arange(0, y_max + y_step / 2, y_step):
        draw.line([(left, y(tick)), (right, y(tick))], fill=FAINT)
        draw.text((left - 6, y(tick)), f"{int(tick):,}", fill=INK, font=font(13), anchor="rm")
    x_step = nice_step(x_max)
    for tick in np.arange(0, x_max, x_step):
        draw.line([(x(tick), bottom), (x(tick), bottom + 4)], fill=INK)
        draw.text((x(tick), bottom + 7), f"{tick:g}", fill=INK, font=font(13), anchor="ma")
    for count, low, high in zip(counts, edges[:-1], edges[1:], strict=True):
        if count:
            draw.rectangle([x(low), y(count), max(x(high) - 1, x(low)), bottom], fill=GREY)
    draw.line([(left, bottom), (right, bottom)], fill=INK)
    draw.line([(left, top), (left, bottom)], fill=INK)
    draw.text(((left + right) // 2, bottom + 26), "embedding norm ||e||", fill=INK, font=font(14), anchor="ma")
    label = Image.new("RGBA", (bottom - top, 18), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((label.width // 2, 0), "vocabulary rows", fill=INK, font=font(14), anchor="ma")
    label = label.rotate(90, expand=True)
    image.paste(label, (box[0] + 4, top), label)
    for value, colour, text, anchor in (
        (dti, BLUE, f"DTI {dti:.3g} = m*", "rt"),
        (ti, RED, f"TI {ti:.3g} ({ti / dti:.1f}x m*)", "rt"),
    ):
        draw.line([(x(value), top), (x(value), bottom)], fill=colour, width=3)
        position = (x(value) - 6, top + 4) if text.startswith("TI") else (x(value) + 6, top + 4)
        draw.text(position, text, fill=colour, font=font(14), anchor=anchor if text.startswith("TI") else "lt")


def draw_figure(panels, note, output):
    """panels: [(title, vocabulary norms, DTI norm, TI norm)]; writes a PNG of one row of panels with a legend."""
    width, panel_height = 480 * len(panels), 330
    image = Image.new("RGB", (width, panel_height + 92), "white")
    draw = ImageDraw.Draw(image)
    legend = [("box", GREY, "vocabulary rows"), ("line", BLUE, "DTI token: norm fixed at m*, the vocabulary mean"),
              ("line", RED, "TI token: norm learned freely")]  # fmt: skip
    widths = [28 + draw.textlength(text, font=font(14)) + 24 for _, _, text in legend]
    cursor = (width - sum(widths)) / 2
    for (kind, colour, text), step in zip(legend, widths, strict=True):
        if kind == "box":
            draw.rectangle([cursor, 12, cursor + 18, 26], fill=colour)
        else:
            draw.line([(cursor, 19), (cursor + 18, 19)], fill=colour, width=3)
        draw.text((cursor + 26, 19), text, fill=INK, font=font(14), anchor="lm")
        cursor += step
    for index, (title, norms, dti, ti) in enumerate(panels):
        draw_panel(image, (480 * index, 40, 480 * (index + 1), 40 + panel_height), title, norms, dti, ti)
    draw.text((width // 2, panel_height + 60), note, fill=INK, font=font(13), anchor="ma")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(output, optimize=True)
    return output


def main(args):
    with tempfile.TemporaryDirectory() as folder:
        if args.ti:
            model, ti_run, dti_run, note = args.pretrained_model_name_or_path, args.ti, args.dti, args.note or ""
        else:
            model, ti_run, dti_run = tiny_runs(Path(folder))
            note = args.note or TINY_NOTE
        panels = []
        for encoder, tokenizer, file, title in ENCODERS:
            if (Path(model) / encoder).is_dir() and (Path(ti_run) / file).is_file():
                norms, width = vocabulary_norms(model, encoder, tokenizer)
                dti, ti = learned_norm(dti_run, file, args.token), learned_norm(ti_run, file, args.token)
                panels.append((f"{title}, d = {width}", norms, dti, ti))
        if not panels:
            raise SystemExit(f"{ti_run}: no learned_embeds*.safetensors matching a text encoder of {model}.")
        for title, norms, dti, ti in panels:
            print(f"{title}: vocabulary mean {norms.mean():.4f} (max {norms.max():.4f}), DTI {dti:.4f}, TI {ti:.4f}")
        print(draw_figure(panels, note, args.output))


if __name__ == "__main__":
    main(parse_args())

#!/usr/bin/env python
# Copyright 2026 The DTI diffusers authors. Licensed under the Apache License, Version 2.0.
"""Time the training step of train_dti_sdxl.py, train_dti_sana.py, train_dti_wan.py and train_dti_flux2_klein.py on
the real architectures (random weights from benchmarks/configs, nothing downloaded) or on the tiny test models,
against the floor: the frozen denoiser's forward plus its input-gradient backward, which no textual-inversion step
can avoid.

    python benchmarks/bench_step.py --family sdxl --resolution 768 --batch_size 4            # one GPU
    python benchmarks/bench_step.py --family sana --config tiny --device cpu --steps 3       # a quick check

Each variant runs the scripts' own functions (latent_source, batch_stream, data_gradient, apply_update, ...)
with the flags named in the table, from the same data stream and seed, so the DTI variants must end at the same
loss (column `loss`, relative differences in the JSON). Step times are per optimizer step (all accumulated
micro-batches), the median over --steps after --warmup steps; on CUDA they come from events, without a host sync
in the loop. FLOPs are counted once per variant with torch.utils.flop_counter.FlopCounterMode.
"""

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import train_dti_flux2_klein  # noqa: E402
import train_dti_sana  # noqa: E402
import train_dti_sdxl  # noqa: E402
import train_dti_wan  # noqa: E402

CONFIGS = REPO / "benchmarks" / "configs"
SCRIPTS = {"sdxl": train_dti_sdxl, "sana": train_dti_sana, "wan": train_dti_wan, "flux2-klein": train_dti_flux2_klein}
REAL_CONFIGS = {"sdxl": ["sdxl-base-1.0"], "sana": ["sana-1.5-1.6b", "sana-1.5-4.8b"],
                "wan": ["wan2.1-t2v-1.3b", "wan2.1-t2v-14b"],
                "flux2-klein": ["flux2-klein-base-4b", "flux2-klein-base-9b"]}  # fmt: skip
# Variant -> the scripts' flags. "floor" is the denoiser alone. Checkpointing and 8-bit variants run last: they
# change the models in place.
VARIANTS = {
    "floor": None,
    "dti": [],
    "dti+cache": ["--cache_latents"],
    "dti+cache+full_text": ["--cache_latents"],  # the text encoder over the whole padded length (SANA, Wan)
    "ti+cache": ["--method", "ti", "--cache_latents"],
    "dti+cache+compile": ["--cache_latents", "--compile"],
    "dti+lora+cache": ["--lora_rank", "16", "--cache_latents"],  # DTI + LoRA: a rank-16 LoRA of the attention
    "dti+gc": ["--gradient_checkpointing"],
    "dti+gc+cache": ["--gradient_checkpointing", "--cache_latents"],
    "dti+gc+cache+8bit": ["--gradient_checkpointing", "--cache_latents", "--quantize_frozen", "8bit"],
}
# Variants whose text encoder runs over every padded position, as before the scripts encoded the attended ones only:
# not run unless named.
FULL_TEXT = {"dti+cache+full_text"}
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; longest matching name wins.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "A100": 312.0,
                    "RTX A6000": 154.8, "L40S": 362.1}  # fmt: skip


def parse_args(input_args=None):
    parser = train_dti_sdxl.OneLineErrorParser(
        description="Time the DTI training step against the denoiser's forward + input-gradient backward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--family", choices=list(SCRIPTS), default="sdxl", help="Which script and model family.")
    parser.add_argument(
        "--config",
        default=None,
        help="tiny (the test models) or a folder name under benchmarks/configs. Default: sdxl-base-1.0 for sdxl, "
        "sana-1.5-1.6b for sana.",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu. Default: cuda if available.")
    parser.add_argument("--resolution", type=int, default=None, help="Default: 768 (sdxl), 1024 (sana), 64 (tiny).")
    parser.add_argument("--batch_size", type=int, default=None, help="Per micro-batch. Default: 4 (sdxl), 2 (sana).")
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=None, help="Default: 1 (sdxl), 2 (sana), as the authors."
    )
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                        help="Default: bf16 on CUDA, no on CPU.")  # fmt: skip
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=[v for v in VARIANTS if v not in FULL_TEXT],
        help="Variants to time, in this order (checkpointing and 8-bit ones change the models: keep them last). "
        "dti+cache+full_text (SANA, Wan; only when named): the text encoder over the whole padded length.",
    )
    parser.add_argument(
        "--num_concepts",
        type=int,
        nargs="+",
        default=[1],
        help="Run each DTI variant with K concepts in one step (--concepts_list), for each K given: e.g. 1 2 4 8.",
    )
    parser.add_argument(
        "--concepts_per_step",
        type=int,
        default=None,
        help="The scripts' --concepts_per_step: concepts per forward and backward. Default: all K at once.",
    )
    parser.add_argument(
        "--validation_images",
        type=int,
        default=0,
        help="Also time one validation of this many images: in one pipeline call, and one call per image.",
    )
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps per variant.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation happens here).")
    parser.add_argument("--compile_backend", default="inductor", help="torch.compile backend of the compile variant.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="Passed to the scripts.")
    parser.add_argument("--peak_tflops", type=float, default=None, help="The device's dense bf16 peak, if not known.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the weights and of the training stream.")
    parser.add_argument("--output", default="bench_step.json", help="JSON file with every number of the table.")
    args = parser.parse_args(input_args)
    tiny = args.config == "tiny"
    family = SCRIPTS[args.family].FAMILY.defaults  # the script's own defaults
    defaults = family["resolution"], family["train_batch_size"], family["gradient_accumulation_steps"]
    args.config = args.config or REAL_CONFIGS[args.family][0]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.resolution = args.resolution or (64 if tiny else defaults[0])
    args.batch_size = args.batch_size or defaults[1]
    args.gradient_accumulation_steps = args.gradient_accumulation_steps or defaults[2]
    args.mixed_precision = args.mixed_precision or ("bf16" if args.device.startswith("cuda") else "no")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if min(args.num_concepts) < 1 or (args.concepts_per_step is not None and args.concepts_per_step < 1):
        parser.error("--num_concepts and --concepts_per_step must be at least 1")
    if FULL_TEXT & set(args.variants) and not hasattr(SCRIPTS[args.family].FAMILY, "encode_attended_only"):
        parser.error(f"dti+cache+full_text: {args.family}'s text encoder always runs over the whole length")
    if args.validation_images < 0:
        parser.error("--validation_images must be zero or positive")
    if not tiny and not (CONFIGS / args.config).is_dir():
        parser.error(f"--config {args.config}: no folder benchmarks/configs/{args.config} (or use tiny)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def read_config(folder, name):
    config = json.loads((CONFIGS / folder / f"{name}.json").read_text())
    return {k: v for k, v in config.items() if k not in ("_class_name", "_diffusers_version", "architectures")}


def tiny_pipeline(family):
    from tests.tiny_flux2_klein import build_tiny_flux2_klein
    from tests.tiny_sana import build_tiny_sana
    from tests.tiny_sdxl import build_tiny_sdxl
    from tests.tiny_wan import build_tiny_wan

    builders = {"sdxl": build_tiny_sdxl, "sana": build_tiny_sana, "wan": build_tiny_wan,
                "flux2-klein": build_tiny_flux2_klein}  # fmt: skip
    return builders[family]()


def build_models(family, config, device):
    """{text_encoders, vae, denoiser, noise_scheduler, tokenizers}: random weights, fp32, on the device."""
    import diffusers

    seam = SCRIPTS[family].FAMILY
    if config == "tiny":
        pipe = tiny_pipeline(family)
        training = {"sdxl": diffusers.DDPMScheduler}.get(family, diffusers.FlowMatchEulerDiscreteScheduler)
        return {
            "text_encoders": [getattr(pipe, e).to(device) for e in seam.text_encoders],
            "vae": pipe.vae.to(device),
            "denoiser": getattr(pipe, seam.denoiser).to(device),
            "noise_scheduler": training.from_config(pipe.scheduler.config),
            "sampler": pipe.scheduler,
            "tokenizers": [getattr(pipe, t) for t in seam.tokenizers],
        }
    with torch.device(device):  # random init on the device: seconds, not minutes
        models = {"sdxl": real_sdxl, "sana": real_sana, "wan": real_wan, "flux2-klein": real_klein}[family](config)
    scheduler = json.loads((CONFIGS / config / "scheduler.json").read_text())
    return models | {"sampler": getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)}


def real_sdxl(config):
    import diffusers
    import transformers

    from tests.tiny_sdxl import _tokenizer

    text_encoders = [
        transformers.CLIPTextModel(transformers.CLIPTextConfig(**read_config(config, "text_encoder"))),
        transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**read_config(config, "text_encoder_2"))),
    ]
    return {
        "text_encoders": text_encoders,
        "vae": diffusers.AutoencoderKL.from_config(read_config(config, "vae")),
        "denoiser": diffusers.UNet2DConditionModel.from_config(read_config(config, "unet")),
        "noise_scheduler": diffusers.DDPMScheduler.from_config(read_config(config, "scheduler")),
        "tokenizers": [_tokenizer("<|endoftext|>"), _tokenizer("!")],  # the real CLIP vocabulary
    }


def real_sana(config):
    import diffusers
    import transformers

    from tests.tiny_sana import build_tiny_tokenizer

    gemma = read_config(config, "text_encoder")
    gemma.pop("model_type", None)
    return {
        "text_encoders": [transformers.Gemma2Model(transformers.Gemma2Config(**gemma))],
        "vae": diffusers.AutoencoderDC.from_config(read_config(config, "vae")),
        "denoiser": diffusers.SanaTransformer2DModel.from_config(read_config(config, "transformer")),
        "noise_scheduler": diffusers.FlowMatchEulerDiscreteScheduler.from_config(read_config(config, "scheduler")),
        "tokenizers": [build_tiny_tokenizer()],  # token ids index the full 256k table; the text length is fixed
    }


def real_wan(config):
    import diffusers
    import transformers

    from tests.tiny_wan import build_tiny_tokenizer

    umt5 = read_config(config, "text_encoder")
    umt5.pop("model_type", None)
    return {
        "text_encoders": [transformers.UMT5EncoderModel(transformers.UMT5Config(**umt5))],
        "vae": diffusers.AutoencoderKLWan.from_config(read_config(config, "vae")),
        "denoiser": diffusers.WanTransformer3DModel.from_config(read_config(config, "transformer")),
        "noise_scheduler": diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000),
        "tokenizers": [build_tiny_tokenizer()],  # ids index the full table; the text length (512) is fixed
    }


def real_klein(config):
    import diffusers
    import transformers

    from tests.tiny_flux2_klein import build_tiny_tokenizer

    qwen3 = read_config(config, "text_encoder")
    qwen3.pop("model_type", None)
    text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3))
    train_dti_flux2_klein.keep_conditioning_layers(text_encoder)  # as the script does
    return {
        "text_encoders": [text_encoder],
        "vae": diffusers.AutoencoderKLFlux2.from_config(read_config(config, "vae")),
        "denoiser": diffusers.Flux2Transformer2DModel.from_config(read_config(config, "transformer")),
        "noise_scheduler": diffusers.FlowMatchEulerDiscreteScheduler.from_config(read_config(config, "scheduler")),
        "tokenizers": [build_tiny_tokenizer()],  # ids index the full table; the text length (512) is fixed
    }


def set_checkpointing(module, enabled):
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing() if enabled else module.disable_gradient_checkpointing()
    elif enabled:
        module.gradient_checkpointing_enable()
    else:
        module.gradient_checkpointing_disable()
    module.train(enabled)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


class Clock:
    """Per-step wall times: CUDA events on the GPU (read once at the end, no sync in the loop), perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def count_flops(step):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def measure(step, opts, device, flops=True):
    """Run warm-up and timed steps; return times, peak memory and FLOPs of one step."""
    for _ in range(opts.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = Clock(device)
    clock.mark()
    for _ in range(opts.steps):
        step()
        clock.mark()
    times = clock.seconds()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"times": times, "peak_memory_gib": peak, "flops": count_flops(step) if flops else None}


def randn(generator, device, dtype, *shape):
    return torch.randn(*shape, generator=generator, device=device, dtype=dtype)


def sdxl_floor(denoiser, opts, generator, device, dtype, text_length):
    """(latents, text, forward(text)) of one SDXL micro-batch."""
    b, config, side = opts.batch_size, denoiser.config, opts.resolution // 8
    latents = randn(generator, device, dtype, b, config.in_channels, side, side)
    text = randn(generator, device, dtype, b, 77, config.cross_attention_dim)
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    size = [opts.resolution, opts.resolution, 0, 0, opts.resolution, opts.resolution]
    added = {"text_embeds": randn(generator, device, dtype, b, pooled_width),
             "time_ids": torch.tensor(size, device=device, dtype=dtype).expand(b, 6)}  # fmt: skip
    timesteps = torch.randint(0, 1000, (b,), generator=generator, device=device)
    return latents, text, lambda text: denoiser(latents, timesteps, text, added_cond_kwargs=added).sample


def sana_floor(denoiser, opts, generator, device, dtype, text_length):
    """(latents, text, forward(text)) of one SANA micro-batch."""
    b, config, side = opts.batch_size, denoiser.config, opts.resolution // 32
    latents = randn(generator, device, dtype, b, config.in_channels, side, side)
    text = randn(generator, device, dtype, b, text_length, config.caption_channels)
    mask = torch.ones(b, text_length, device=device, dtype=torch.long)
    timesteps = torch.rand(b, generator=generator, device=device) * 1000

    def forward(text):
        return denoiser(hidden_states=latents, encoder_hidden_states=text, encoder_attention_mask=mask,
                        timestep=timesteps, return_dict=False)[0]  # fmt: skip

    return latents, text, forward


def wan_floor(denoiser, opts, generator, device, dtype, text_length):
    """(latents, text, forward(text)) of one Wan micro-batch: images as 1-frame videos."""
    b, config, side = opts.batch_size, denoiser.config, opts.resolution // 8
    latents = randn(generator, device, dtype, b, config.in_channels, 1, side, side)
    text = randn(generator, device, dtype, b, text_length, config.text_dim)
    timesteps = torch.rand(b, generator=generator, device=device) * 1000

    def forward(text):
        return denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=text, return_dict=False)[0]

    return latents, text, forward


def klein_floor(denoiser, opts, generator, device, dtype, text_length):
    """(latents, text, forward(text)) of one FLUX.2 [klein] micro-batch: packed 2x2 patches and their ids."""
    from diffusers import Flux2KleinPipeline

    b, config, side = opts.batch_size, denoiser.config, opts.resolution // 16
    latents = randn(generator, device, dtype, b, side * side, config.in_channels)
    text = randn(generator, device, dtype, b, text_length, config.joint_attention_dim)
    image_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(b, 1, side, side)).to(device)
    text_ids = Flux2KleinPipeline._prepare_text_ids(text).to(device)
    timesteps = torch.rand(b, generator=generator, device=device)

    def forward(text):
        return denoiser(hidden_states=latents, timestep=timesteps, guidance=None, encoder_hidden_states=text,
                        txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]  # fmt: skip

    return latents, text, forward


def floor_step(family, denoiser, opts, device, dtype, text_length):
    """The denoiser's forward and the backward to its text input only (weights frozen), for every micro-batch."""
    generator = torch.Generator(device).manual_seed(opts.seed)
    inputs = {"sdxl": sdxl_floor, "sana": sana_floor, "wan": wan_floor, "flux2-klein": klein_floor}[family]
    latents, text, forward = inputs(denoiser, opts, generator, device, dtype, text_length)
    target = torch.randn(latents.shape, generator=generator, device=device)

    def step():
        for _ in range(opts.gradient_accumulation_steps):
            text_input = text.detach().requires_grad_(True)
            F.mse_loss(forward(text_input).float(), target).backward()  # the only gradient: text_input's

    return step


def script_argv(opts, flags, output_dir):
    """The scripts' command line of a variant."""
    return ["--pretrained_model_name_or_path", f"random:{opts.config}", "--train_data_dir",
            str(REPO / "assets" / "toy_robot"), "--placeholder_token", "<toy-robot>", "--initializer_token",
            "robot", "--resolution", str(opts.resolution), "--train_batch_size", str(opts.batch_size),
            "--gradient_accumulation_steps", str(opts.gradient_accumulation_steps), "--center_crop", "--seed",
            str(opts.seed), "--mixed_precision", opts.mixed_precision, "--compile_backend", opts.compile_backend,
            "--dataloader_num_workers", str(opts.dataloader_num_workers), "--max_train_steps", "100000",
            "--num_validation_images", "0", "--checkpointing_steps", "100000", "--save_steps", "100000",
            "--output_dir", str(output_dir), *flags]  # fmt: skip


def with_concepts(argv, num_concepts, folder):
    """argv with num_concepts --concepts_list entries instead of its one concept: the same toy robot images under
    other placeholders, so each concept's loss equals the one-concept run's."""
    if num_concepts == 1:
        return argv
    entries = [{"placeholder_token": f"<toy-robot-{i}>", "initializer_token": "robot",
                "train_data_dir": str(REPO / "assets" / "toy_robot")} for i in range(num_concepts)]  # fmt: skip
    concepts = folder / "concepts.json"
    concepts.write_text(json.dumps(entries))
    for flag in ("--train_data_dir", "--placeholder_token", "--initializer_token"):
        index = argv.index(flag)
        argv = argv[:index] + argv[index + 2 :]
    return [*argv, "--concepts_list", str(concepts)]


def prebuilt(script, models, full_text=False):
    """The script's family, with its models taken from `models` instead of the disk (a fresh copy of the
    tokenizers each variant; the denoiser, VAE and text encoders are shared, their learned-row hooks removed);
    full_text: its text encoder runs over the whole padded length."""

    class Prebuilt(type(script.FAMILY)):
        if full_text:
            encode_attended_only = False

        def load_tokenizers(self, args):
            return [copy.deepcopy(t) for t in models["tokenizers"]], {}

        def load_models(self, args, model_index, tokenizers):
            for text_encoder in models["text_encoders"]:
                for module in text_encoder.modules():  # the learned rows' hooks sit on the embedding modules
                    if isinstance(module, torch.nn.Embedding):
                        module._forward_hooks.clear()
            for model in (models["denoiser"], *models["text_encoders"]):
                set_checkpointing(model, False)
            frozen = list(models["text_encoders"]), models["vae"], models["denoiser"], models["noise_scheduler"]
            return script.Models(*frozen, sampler=models["sampler"])

    return Prebuilt()


def dti_step(family, models, flags, opts, folder, num_concepts=1, full_text=False):
    """A variant set up by the script's own `setup` (what its main runs before the loop); returns its step (the
    script's `train_step`), its step logs and the first concept's loss key."""
    script = SCRIPTS[family]
    folder.mkdir(parents=True, exist_ok=True)
    argv = with_concepts(script_argv(opts, flags, folder / "out"), num_concepts, folder)
    if opts.concepts_per_step and num_concepts > 1:
        argv += ["--concepts_per_step", str(opts.concepts_per_step)]
    run = script.setup(script.parse_args(argv), prebuilt(script, models, full_text))
    return partial(script.train_step, run), run.logs, f"{run.concepts[0].prefix}loss"


def validation_seconds(family, models, opts, folder):
    """Wall seconds of one validation of opts.validation_images images, as the script's log_validation makes them:
    all in one pipeline call, and one call per image (after one untimed image)."""
    script = SCRIPTS[family]
    argv = script_argv(opts, ["--num_validation_images", str(opts.validation_images)], folder / "out")
    run = script.setup(script.parse_args(argv), prebuilt(script, models))
    args = run.concepts[0].args
    prompt = script.validation_prompt(args)
    generate = partial(script.generate_validation_images, run.components, run.models, args, run.accelerator.device,
                       run.seed, prompt, run.family)  # fmt: skip
    times = {}
    for name, batch_size in (("warmup", 1), ("one_call", None), ("one_call_per_image", 1)):
        args.num_validation_images = 1 if name == "warmup" else opts.validation_images
        args.validation_batch_size = batch_size
        started = time.perf_counter()
        generate()
        times[name] = time.perf_counter() - started
    return {"images": opts.validation_images, "one_call_s": times["one_call"],
            "one_call_per_image_s": times["one_call_per_image"]}  # fmt: skip


def run(opts):
    from accelerate import Accelerator

    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    Accelerator(cpu=device.type == "cpu", mixed_precision=opts.mixed_precision)  # the floor's precision
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision, torch.float32)
    started = time.perf_counter()
    models = build_models(opts.family, opts.config, device)
    build_s = time.perf_counter() - started
    defaults = SCRIPTS[opts.family].parse_args(script_argv(opts, [], "unused"))
    text_length = getattr(defaults, "max_sequence_length", 77)  # the script's text length; CLIP's 77
    parameters = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in [("denoiser", models["denoiser"]), ("vae", models["vae"])]
        + [(f"text_encoder_{i}", m) for i, m in enumerate(models["text_encoders"])]
    }

    validation = None
    if opts.validation_images:  # first: the 8-bit variant changes the models for good
        validation = validation_seconds(opts.family, models, opts, Path(tempfile.mkdtemp(prefix="bench-validation-")))
    results = []
    runs = [(variant, k) for variant in opts.variants for k in (opts.num_concepts if VARIANTS[variant] else [1])]
    for variant, num_concepts in runs:
        flags = VARIANTS[variant]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if flags is None:
            for model in (models["vae"], *models["text_encoders"]):  # resident as in training, not in fp32
                model.to(device, dtype)
            denoiser = models["denoiser"].to(device, dtype).requires_grad_(False)
            set_checkpointing(denoiser, False)
            step, logs = floor_step(opts.family, denoiser, opts, device, dtype, text_length), None
        else:
            folder = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
            step, logs, loss_key = dti_step(
                opts.family, models, flags, opts, folder, num_concepts, variant in FULL_TEXT
            )
        counted = not {"--compile", "8bit"} & set(flags or [])  # FlopCounterMode sees neither compiled nor int8 ops
        measured = measure(step, opts, device, flops=counted)
        losses = [record[2][loss_key] for record in logs.read()] if logs else []  # the first concept's
        timed_loss = losses[opts.warmup + opts.steps - 1] if losses else None
        name = variant if num_concepts == 1 else f"{variant}+{num_concepts}concepts"
        results.append({"variant": name, "flags": flags, "concepts": num_concepts, "loss": timed_loss, **measured})
        if "--compile" in (flags or []):
            torch._dynamo.reset()
        if "--lora_rank" in (flags or []):  # the next variants train the token alone again
            models["denoiser"].delete_adapters("default")
    attention = [getattr(m.config, "_attn_implementation", None) for m in models["text_encoders"]]
    return summarize(opts, results, device, build_s, parameters, attention, validation)


def summarize(opts, results, device, build_s, parameters, attention, validation=None):
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = opts.peak_tflops
    if peak is None and device.type == "cuda":
        matches = [name for name in PEAK_BF16_TFLOPS if name in device_name]
        peak = PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None
    by_variant = {r["variant"]: r for r in results}
    floor = by_variant.get("floor")
    floor_s = statistics.median(floor["times"]) if floor else None
    reference_loss = (by_variant.get("dti") or by_variant.get("dti+cache") or {}).get("loss")
    rows = []
    for r in results:
        times = sorted(r["times"])
        median = statistics.median(times)
        flops = r["flops"]
        if flops is None:  # compiled or int8: the same math as the variant without that flag
            base = r["variant"].replace("+compile", "").replace("+8bit", "")
            flops = by_variant.get(base, {}).get("flops")
        achieved = flops / median / 1e12 if flops else None
        quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median, median, median]
        loss_diff = None
        if r["loss"] is not None and reference_loss and r["variant"].startswith("dti") and "lora" not in r["variant"]:
            loss_diff = abs(r["loss"] - reference_loss) / abs(reference_loss)
        rows.append({
            "variant": r["variant"],
            "flags": r["flags"],
            "concepts": r["concepts"],
            "median_s": median,
            "s_per_concept_step": median / r["concepts"],
            "iqr_s": quartiles[2] - quartiles[0],
            "min_s": times[0],
            "max_s": times[-1],
            "images_per_s": r["concepts"] * opts.batch_size * opts.gradient_accumulation_steps / median,
            "peak_memory_gib": r["peak_memory_gib"],
            "tflop_per_step": flops / 1e12 if flops else None,
            "achieved_tflops": achieved,
            "fraction_of_peak": achieved / peak if achieved and peak else None,
            "ratio_to_floor": median / floor_s if floor_s else None,
            "loss": r["loss"],
            "loss_rel_diff_vs_dti": loss_diff,
        })  # fmt: skip
    return {
        "family": opts.family,
        "config": opts.config,
        "device": device_name,
        "device_type": device.type,
        "peak_bf16_tflops": peak,
        "resolution": opts.resolution,
        "batch_size": opts.batch_size,
        "gradient_accumulation_steps": opts.gradient_accumulation_steps,
        "concepts_per_step": opts.concepts_per_step,
        "mixed_precision": opts.mixed_precision,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "parameters": parameters,
        "text_encoder_attention": attention,
        "build_seconds": build_s,
        "versions": {"torch": torch.__version__, **package_versions()},
        "results": rows,
        "validation": validation,
    }


def package_versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("diffusers", "transformers", "accelerate", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def table(report):
    def cell(value, fmt):
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        return "-".rjust(int(fmt.split(".")[0])) if missing else format(value, fmt)

    title = (f"{report['family']} {report['config']} | {report['resolution']} px | batch {report['batch_size']} x "
             f"accumulation {report['gradient_accumulation_steps']} | {report['mixed_precision']} | "
             f"{report['device']}")  # fmt: skip
    header = f"{'variant':<20} {'median s':>9} {'s/concept':>9} {'IQR s':>7} {'img/s':>7} {'peak GiB':>9} " \
             f"{'TFLOP':>7} {'% peak':>7} {'x floor':>8} {'loss':>9}"  # fmt: skip
    lines = [title, header, "-" * len(header)]
    for r in report["results"]:
        fraction = r["fraction_of_peak"] * 100 if r["fraction_of_peak"] is not None else None
        lines.append(
            f"{r['variant']:<20} {cell(r['median_s'], '9.4f')} {cell(r['s_per_concept_step'], '9.4f')} "
            f"{cell(r['iqr_s'], '7.4f')} "
            f"{cell(r['images_per_s'], '7.2f')} {cell(r['peak_memory_gib'], '9.2f')} "
            f"{cell(r['tflop_per_step'], '7.3f')} {cell(fraction, '7.1f')} {cell(r['ratio_to_floor'], '8.2f')} "
            f"{cell(r['loss'], '9.5f')}"
        )
    if report.get("validation"):
        v = report["validation"]
        lines.append(f"validation of {v['images']} images: {v['one_call_s']:.2f} s in one pipeline call, "
                     f"{v['one_call_per_image_s']:.2f} s in one call per image")  # fmt: skip
    return "\n".join(lines)


def main(opts):
    report = run(opts)
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(output)
    print(table(report))
    return report


if __name__ == "__main__":
    main(parse_args())

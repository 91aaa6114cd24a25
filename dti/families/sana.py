"""Directional Textual Inversion (DTI) for SANA and SANA 1.5.

Learns a personal concept token as new rows of the Gemma-2 input embedding table. The embedding norm is fixed to an
in-distribution value m* (the mean norm of the raw vocabulary rows; Gemma scales every input embedding by sqrt(d)
inside the model, so the raw table is the right space); only the direction is learned, on the unit hypersphere, by
Riemannian SGD with a von Mises-Fisher prior toward the class word (arXiv 2512.13672). The loss is SANA's rectified
flow: x_t = (1 - sigma) x_0 + sigma eps, and the transformer predicts eps - x_0.

    accelerate launch train_dti_sana.py \
      --pretrained_model_name_or_path Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers \
      --train_data_dir assets/toy_robot --placeholder_token "<my-robot>" --initializer_token robot --output_dir out

SanaPipeline has no load_textual_inversion: see README.md for the loader.
"""

import argparse
import inspect
import json
import random
from functools import partial

import torch

from dti.core.data import keyed_generators, stable_seed
from dti.core.dti import initializer_hidden_states
from dti.core.family import Family, Models
from dti.core.hub import lora_snippet_line
from dti.core.loading import (
    auto_tokenizer,
    check_layout,
    checkpoint_sampler,
    load_components,
    load_tokenizers_and_index,
)
from dti.core.step import lora_description
from dti.shared.flow_matching import (
    add_flow_matching_arguments,
    check_flow_matching_args,
    flow_matching_inputs,
    flow_matching_loss,
)
from dti.shared.text_length import encode_attended
from dti.shared.token_rows import add_token_rows

DEFAULT_KAPPA = 5e-5
ZERO_PAD_SCALE, ZERO_PAD_MAX = 2.0, 15  # --zero_pad: n ~ Exponential(scale 2), rounded down, clipped to [0, 15]
VALIDATION_INFERENCE_STEPS = 20  # SanaPipeline's default


def validate_sana_args(args):
    """The SANA-specific checks (of one concept's placeholder too, when args is a concept's)."""
    token = args.placeholder_token
    if token is not None and token != token.lower():
        where = "" if getattr(args, "concept_index", None) is None else f"--concepts_list entry {args.concept_index}: "
        raise ValueError(
            f"{where}--placeholder_token must be lowercase (SanaPipeline lowercases prompts): use {token.lower()!r}."
        )
    if args.max_sequence_length < 2:
        raise ValueError("--max_sequence_length must be at least 2.")
    return args


def complex_human_instruction(args):
    """SanaPipeline's default complex human instruction (a list of lines) if --complex_human_instruction, else None."""
    if not args.complex_human_instruction:
        return None
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def tokenize_prompt(tokenizer, max_sequence_length, instruction, prompt):
    """Token ids and mask exactly as SanaPipeline._get_gemma_prompt_embeds makes them: lowercased, the optional
    instruction first, BOS, padded on the right to max_sequence_length (plus the instruction's length)."""
    prompt, max_length = prompt.lower().strip(), max_sequence_length
    if instruction:
        instruction_text = "\n".join(instruction)
        prompt = instruction_text + prompt
        max_length = len(tokenizer.encode(instruction_text)) + max_sequence_length - 2
    tokens = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


def encode_prompt(text_encoder, text, max_sequence_length, attended_only=False):
    """SANA text conditioning: Gemma-2's last hidden state, then the first token plus the last
    max_sequence_length - 1 (SanaPipeline.encode_prompt). Returns embeds [B, L, d] and mask [B, L]. attended_only:
    Gemma runs up to the batch's longest prompt only and the padding's states are zeros. The same conditioning:
    Gemma is causal and the prompts right-padded, so a prompt's states never see the padding, and the transformer's
    cross-attention masks the padding's states (the pipeline's, or these zeros) out."""
    device = text_encoder.device

    def encode(ids, mask):
        return text_encoder(ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]  # no key-value cache

    ids, mask = text["input_ids"], text["attention_mask"]
    hidden_states = encode_attended(encode, ids, mask) if attended_only else encode(ids, mask)
    select = [0] + list(range(-max_sequence_length + 1, 0))
    return hidden_states[:, select], mask.to(device)[:, select]


def add_zero_pad_row(text_encoder, pad_id):
    """--zero_pad: give the frozen table a row of zeros at pad_id (the id after the new tokens); it is never learned
    and Gemma's sqrt(d) scaling keeps it zero. Done before the learned tokens are attached."""
    rows = text_encoder.get_input_embeddings().weight.shape[0]
    if rows <= pad_id:
        text_encoder.resize_token_embeddings(pad_id + 1, mean_resizing=False)
    with torch.no_grad():  # every new row zero, not random (the learned tokens' rows are set when they attach)
        text_encoder.get_input_embeddings().weight[min(rows, pad_id) : pad_id + 1] = 0
    return pad_id


def zero_pad_counts(seed, positions):
    """--zero_pad: the number of pad tokens of each sample, keyed by (seed, stream position) like every other draw."""
    draws = [random.Random(stable_seed(seed, "zero_pad", int(p))).expovariate(1 / ZERO_PAD_SCALE) for p in positions]
    return [min(int(draw), ZERO_PAD_MAX) for draw in draws]


def zero_pad(text, counts, pad_id):
    """Insert counts[b] attended pad ids right after sample b's BOS: the prompt shifts right, the length stays (the
    end of the padding falls off). text: {"input_ids": [B, L], "attention_mask": [B, L]}."""
    ids, mask = text["input_ids"].clone(), text["attention_mask"].clone()
    for b, n in enumerate(counts):
        if n:
            ids[b, 1 + n :], mask[b, 1 + n :] = text["input_ids"][b, 1:-n], text["attention_mask"][b, 1:-n]
            ids[b, 1 : 1 + n], mask[b, 1 : 1 + n] = pad_id, 1
    return {"input_ids": ids, "attention_mask": mask}


def encode_initializer(args, tokenizers, text_encoders, num_vectors):
    """CrossInit's start, {"text_encoder": [k, d] fp32}: Gemma-2's last hidden state (after its final norm) at the
    initializer's content positions when the initializer alone is tokenized as SanaPipeline tokenizes a prompt
    (<bos> word pad..., no instruction). Kept as raw rows, so Gemma sees them scaled by sqrt(d), as in the authors'
    CrossInit runs."""
    text = tokenize_prompt(tokenizers[0], args.max_sequence_length, None, args.initializer_token)
    start = initializer_hidden_states(
        text, tokenizers[0], text_encoders[0], args.initializer_token, num_vectors, use_cache=False
    )
    return {"text_encoder": start}


def training_loss(batch, latent_mean, latent_std, transformer, text_encoders, noise_scheduler, vae_scale, seed, args,
                  zero_pad_id=None, attended_only=True):  # fmt: skip
    """SANA's rectified-flow loss of each sample of a batch, [B] (the mean over its elements), as diffusers' SANA
    training examples compute it, the prompts zero-padded when zero_pad_id is given, Gemma run over the attended
    positions only unless attended_only is False (see encode_prompt). latent_mean: [B, C, H/32, W/32] DC-AE latents
    (latent_std is zero)."""
    device, dtype = latent_mean.device, transformer.dtype
    generators = keyed_generators(seed, batch["position"].tolist(), device)
    latents = latent_mean * vae_scale
    noisy_latents, noise, timesteps, sigmas = flow_matching_inputs(latents, generators, noise_scheduler, args)

    text = batch["text"]
    if zero_pad_id is not None:
        text = zero_pad(text, zero_pad_counts(seed, batch["position"].tolist()), zero_pad_id)
    prompt_embeds, prompt_mask = encode_prompt(text_encoders[0], text, args.max_sequence_length, attended_only)
    model_pred = transformer(
        hidden_states=noisy_latents.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        encoder_attention_mask=prompt_mask,
        timestep=timesteps,
        return_dict=False,
    )[0]
    return flow_matching_loss(model_pred, latents, noise, sigmas, args)


def vae_posterior(vae, pixel_values):
    """DC-AE latents (fp32) and a zero std: the DC-AE encoder is deterministic. pixel_values: [B, 3, H, W]."""
    with torch.no_grad():
        latent = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent.float()
    return latent, torch.zeros_like(latent)


def load_tokenizers(args):
    """[the Gemma tokenizer] and the pipeline's model_index, after checking that the model is a SanaPipeline."""
    model_index, (tokenizer,) = load_tokenizers_and_index(args, auto_tokenizer)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    check_layout(args, model_index, components, "SanaPipeline", "Sana" not in model_index.get("_class_name", ""))
    tokenizer.padding_side = "right"  # as SanaPipeline sets it
    return [tokenizer], model_index


def load_models(args, model_index):
    """The frozen SANA components, fp32 (cast later, after the vocabulary statistics are taken): the Gemma-2 text
    encoder, the DC-AE, the transformer, the flow-matching training scheduler and the checkpoint's own sampler."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import AutoModel

    def load(path, common):
        text_encoder = AutoModel.from_pretrained(path, subfolder="text_encoder", **common)
        vae = AutoencoderDC.from_pretrained(path, subfolder="vae", **common)
        transformer = SanaTransformer2DModel.from_pretrained(path, subfolder="transformer", **common)
        revision = common["revision"]
        noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            path, subfolder="scheduler", revision=revision
        )
        sampler = checkpoint_sampler(path, model_index, revision)
        return Models([text_encoder], vae, transformer, noise_scheduler, sampler)

    return load_components(args, load)


class Sana(Family):
    """SANA and SANA 1.5 as the DTI core sees them."""

    name, title = "sana", "SANA"
    model_help = "Hub id or local folder of a SanaPipeline diffusers checkpoint (SANA, SANA 1.5)."
    denoiser, denoiser_label = "transformer", "transformer"
    text_encoders, tokenizers, text_encoder_label = ("text_encoder",), ("tokenizer",), "Gemma-2"
    fp32_modules = ("vae",)  # the DC-AE in fp32
    vae_label, vae_factor = "DC-AE", 32
    defaults = {"resolution": 1024, "train_batch_size": 2, "gradient_accumulation_steps": 2, "max_train_steps": 500}
    default_kappa = DEFAULT_KAPPA
    placeholder_rule = "Lowercase (SanaPipeline lowercases prompts), "
    pipeline_expands_tokens = False  # SanaPipeline cannot expand a multi-vector token
    card_tags = ("sana",)
    encode_attended_only = True  # Gemma-2 over the batch's longest prompt, not all 300 positions (exact: encode_prompt)

    def add_arguments(self, parser, groups):
        sana = parser.add_argument_group("SANA")
        sana.add_argument(
            "--max_sequence_length", type=int, default=300, help="Text tokens the transformer sees, as in SanaPipeline."
        )
        sana.add_argument(
            "--complex_human_instruction",
            action="store_true",
            help="Prepend SanaPipeline's complex human instruction to training prompts (recorded in the metadata).",
        )
        sana.add_argument(
            "--zero_pad",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="The authors' positional augmentation: prefix each training prompt with n pad tokens whose embedding "
            f"is zero, n ~ Exponential(scale {ZERO_PAD_SCALE:g}) rounded down, at most {ZERO_PAD_MAX}; --no-zero_pad "
            "turns it off.",
        )
        sana.add_argument(
            "--initializer_form",
            choices=["in_prompt", "bare"],
            default="in_prompt",
            help="Which Gemma piece of the class word gives the prior and initial rows. in_prompt: the piece a prompt "
            "holds ('▁robot'), what inference feeds. bare: the word alone ('robot'), as the authors' code takes it.",
        )
        add_flow_matching_arguments(sana)

    def validate(self, args):
        check_flow_matching_args(args)
        return validate_sana_args(args)

    def validate_concept(self, args):
        return validate_sana_args(args)

    def load_tokenizers(self, args):
        return load_tokenizers(args)

    def prompt_tokenizers(self, args, tokenizers):
        instruction = complex_human_instruction(args)
        tokenize = partial(tokenize_prompt, tokenizers[0], args.max_sequence_length, instruction)
        fit_length = max(2, args.max_sequence_length - ZERO_PAD_MAX * args.zero_pad)  # --zero_pad pushes prompts right
        return tokenize, partial(tokenize_prompt, tokenizers[0], fit_length, instruction)

    def initializer_in_prompt(self, args):
        return args.initializer_form == "in_prompt"

    def identity(self, args):
        return {
            "complex_human_instruction": complex_human_instruction(args),
            "zero_pad": args.zero_pad,
            "initializer_form": args.initializer_form,
        }

    def load_models(self, args, model_index, tokenizers):
        return load_models(args, model_index)

    def check_models(self, args, models):
        vae_factor = 2 ** (len(models.vae.config.encoder_block_out_channels) - 1)
        if args.resolution % vae_factor:
            raise ValueError(f"--resolution {args.resolution} is not a multiple of the DC-AE factor {vae_factor}.")

    def prepare_text_encoders(self, args, models, tokenizers, first_free_id):
        """--zero_pad: the zero row sits after every concept's tokens."""
        return {"zero_pad_id": add_zero_pad_row(models.text_encoders[0], first_free_id) if args.zero_pad else None}

    def encode_initializer(self, args, tokenizers, text_encoders, num_vectors):
        return encode_initializer(args, tokenizers, text_encoders, num_vectors)

    def latent_posterior(self, vae, pixel_values):
        return vae_posterior(vae, pixel_values)

    def training_loss(self, batch, latent_mean, latent_std, models, seed, args):
        return training_loss(batch, latent_mean, latent_std, transformer=models.denoiser,
                             text_encoders=models.text_encoders, noise_scheduler=models.noise_scheduler,
                             vae_scale=models.vae.config.scaling_factor, seed=seed, args=args,
                             zero_pad_id=models.extras.get("zero_pad_id"),
                             attended_only=self.encode_attended_only)  # fmt: skip

    def validation_images(self, components, models, args, prompt, generators):
        """SanaPipeline with the checkpoint's own sampler, at the training resolution, one image per generator in one
        call."""
        from diffusers import SanaPipeline

        pipeline = SanaPipeline(**components, scheduler=models.sampler)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(
            prompt,
            num_inference_steps=VALIDATION_INFERENCE_STEPS,
            height=args.resolution,
            width=args.resolution,
            complex_human_instruction=complex_human_instruction(args),
            max_sequence_length=args.max_sequence_length,
            use_resolution_binning=False,  # generate at the training resolution
            num_images_per_prompt=len(generators),
            generator=generators,
        ).images

    def metadata(self, args):
        return {
            "max_sequence_length": str(args.max_sequence_length),
            "complex_human_instruction": json.dumps(complex_human_instruction(args)),
            "zero_pad": json.dumps(args.zero_pad),
            "initializer_form": args.initializer_form,
        }

    def embedding_files(self, args, vectors, suffix):
        """learned_embeds.safetensors = {"<tok>": [k, d]}, rows of the raw Gemma-2 input table (its LoRA goes in
        diffusers' SANA LoRA format only)."""
        return {f"learned_embeds{suffix}.safetensors": {args.placeholder_token: vectors["text_encoder"]}}

    def card_text(self, args, repo_id, method):
        token = args.placeholder_token
        prompt = f"a painting of {token} in the style of van gogh"
        lora_sentence = (
            f" A LoRA of the transformer was trained with the token ({lora_description(args)}): `load_lora_weights` "
            "loads it."
            if args.lora_rank
            else ""
        )
        lora_line = lora_snippet_line(args, repo_id)
        about = (
            f"`{token}` is a concept token learned as new rows of the Gemma-2 input embedding table from the class "
            f'word "{args.initializer_token}" with {method}. SanaPipeline has no `load_textual_inversion`; these lines '
            "add the token (they are `add_tokens_to_sana` and `expand_prompt` of the DTI repository's `infer.py`)."
            f"{lora_sentence}"
        )
        usage = f"""```python
import json

import torch
from diffusers import SanaPipeline
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import load_file

base_model, token = "{args.pretrained_model_name_or_path}", "{token}"
pipe = SanaPipeline.from_pretrained(base_model, torch_dtype=torch.bfloat16).to("cuda")
path = hf_hub_download("{repo_id}", "learned_embeds.safetensors")
vectors = load_file(path)[token]
with safe_open(path, framework="pt") as f:
    instruction = json.loads(f.metadata()["complex_human_instruction"])  # what training used
{add_token_rows()}
prompt = "{prompt}".replace(token, " ".join(names))
{lora_line}image = pipe(prompt, complex_human_instruction=instruction).images[0]
```
"""
        return about, usage

    def card_rows(self, args):
        return [
            ("max_sequence_length", args.max_sequence_length),
            ("complex human instruction", "on" if args.complex_human_instruction else "off"),
            ("zero-embedding pad prefix", "on" if args.zero_pad else "off"),
            ("class-word piece", args.initializer_form),
        ]


FAMILY = Sana()

"""Directional Textual Inversion (DTI) for Wan 2.1 text-to-video (1.3B and 14B).

Learns a personal concept token as new rows of the UMT5-XXL input embedding table (d = 4096; no embedding scale, no
absolute positions). The embedding norm is fixed to an in-distribution value m* (the mean norm of the table's rows
that the tokenizer uses: the published table has more rows than the tokenizer); only the direction is learned, on
the unit hypersphere, by Riemannian SGD with a von Mises-Fisher prior toward the class word (arXiv 2512.13672). The
training images are 1-frame videos, as the DTI authors train Wan; the token then works in generated videos. The loss
is rectified flow on the Wan VAE's normalised latents: x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0.

    accelerate launch train_dti_wan.py --pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --scale_lr \
      --train_data_dir assets/toy_robot --placeholder_token "<my-robot>" --initializer_token robot --output_dir out

WanPipeline has no load_textual_inversion: see README.md for the loader (infer.py loads the token).
"""

from functools import partial

import torch

from dti.core.data import keyed_generators
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
# The authors' training shift: their FlowMatchEulerDiscreteScheduler, built from the published scheduler config
# (a UniPC config whose key is flow_shift, 3.0, for sampling), keeps its own default shift of 1.0.
DEFAULT_TRAINING_SHIFT = 1.0
VALIDATION_INFERENCE_STEPS, VALIDATION_GUIDANCE_SCALE = 20, 5.0  # the authors' validation


def tokenize_prompt(tokenizer, max_sequence_length, prompt):
    """Token ids and mask as WanPipeline._get_t5_prompt_embeds makes them: the prompt cleaned as the pipeline cleans
    it, EOS, padded on the right to max_sequence_length."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    tokens = tokenizer(
        prompt_clean(prompt), padding="max_length", max_length=max_sequence_length, truncation=True,
        add_special_tokens=True,
    )  # fmt: skip
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


def encode_prompt(text_encoder, text, attended_only=False):
    """Wan text conditioning: UMT5's last hidden state with every position after the prompt's end set to zero, as
    WanPipeline's prompt embeddings are. text: {"input_ids": [B, L], "attention_mask": [B, L]}; returns [B, L, d].
    attended_only: UMT5 runs up to the batch's longest prompt only. The same conditioning: the padding is masked in
    every attention (its keys weigh exactly zero) and its states are zeroed anyway."""
    device = text_encoder.device

    def encode(ids, mask):
        return text_encoder(ids.to(device), attention_mask=mask.to(device)).last_hidden_state

    ids, mask = text["input_ids"], text["attention_mask"]
    hidden_states = encode_attended(encode, ids, mask) if attended_only else encode(ids, mask)
    return torch.where(mask.to(device).bool().unsqueeze(-1), hidden_states, torch.zeros_like(hidden_states))


def encode_initializer(args, tokenizers, text_encoders, num_vectors):
    """CrossInit's start, {"text_encoder": [k, d] fp32}: UMT5's last hidden state (after its final norm) at the
    initializer's content positions when the initializer alone is tokenized as WanPipeline tokenizes a prompt."""
    text = tokenize_prompt(tokenizers[0], args.max_sequence_length, args.initializer_token)
    return {"text_encoder": initializer_hidden_states(text, tokenizers[0], text_encoders[0], args.initializer_token,
                                                      num_vectors)}  # fmt: skip


def normalized_latents(vae, latents):
    """(z - latents_mean) / latents_std per channel, as WanPipeline undoes before decoding. latents: [B, C, F, h, w]."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
    return (latents - mean) / std


def training_loss(batch, latent_mean, latent_std, transformer, text_encoders, noise_scheduler, vae, seed, args,
                  attended_only=True):  # fmt: skip
    """Wan's rectified-flow loss of each sample of a batch, [B] (the mean over its elements), on images as 1-frame
    videos, UMT5 run over the attended positions only unless attended_only is False (see encode_prompt).
    latent_mean: [B, 16, 1, H/8, W/8], the VAE posterior's mode (latent_std is zero)."""
    device, dtype = latent_mean.device, transformer.dtype
    generators = keyed_generators(seed, batch["position"].tolist(), device)
    latents = normalized_latents(vae, latent_mean)
    noisy_latents, noise, timesteps, sigmas = flow_matching_inputs(latents, generators, noise_scheduler, args)
    prompt_embeds = encode_prompt(text_encoders[0], batch["text"], attended_only)
    model_pred = transformer(
        hidden_states=noisy_latents.to(dtype),
        timestep=timesteps,
        encoder_hidden_states=prompt_embeds.to(dtype),
        return_dict=False,
    )[0]
    return flow_matching_loss(model_pred, latents, noise, sigmas, args)


def vae_posterior(vae, pixel_values):
    """The Wan VAE's posterior mode (fp32) of images as 1-frame videos, and a zero std (the authors train on the
    mode). pixel_values: [B, 3, H, W] in [-1, 1]."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist
    mode = dist.mode().float()
    return mode, torch.zeros_like(mode)


def load_tokenizers(args):
    """[the UMT5 tokenizer] and the pipeline's model_index, after checking that the model is a WanPipeline."""
    model_index, (tokenizer,) = load_tokenizers_and_index(args, auto_tokenizer)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    check_layout(args, model_index, components, "WanPipeline", model_index.get("_class_name") != "WanPipeline")
    return [tokenizer], model_index


def load_models(args, model_index):
    """The frozen Wan components, fp32 (cast later, after the vocabulary statistics are taken): the UMT5 encoder, the
    VAE, the transformer, the checkpoint's own sampler and the flow-matching training scheduler (shift
    --training_shift)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    def load(path, common):
        text_encoder = UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", **common)
        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", **common)
        transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer", **common)
        sampler = checkpoint_sampler(path, model_index, common["revision"])
        steps = sampler.config.num_train_timesteps
        noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=steps, shift=args.training_shift)
        return Models([text_encoder], vae, transformer, noise_scheduler, sampler)

    return load_components(args, load)


class Wan(Family):
    """Wan 2.1 text-to-video as the DTI core sees it."""

    name, title = "wan", "Wan 2.1"
    model_help = "Hub id or local folder of a WanPipeline diffusers checkpoint (Wan 2.1 T2V 1.3B or 14B)."
    denoiser, denoiser_label = "transformer", "transformer"
    text_encoders, tokenizers, text_encoder_label = ("text_encoder",), ("tokenizer",), "UMT5 encoder"
    fp32_modules = ("vae",)  # the Wan VAE in fp32, as diffusers' Wan examples load it
    vae_label, vae_factor = "VAE", 16  # 8 (the VAE) x 2 (the transformer's patch)
    defaults = {"resolution": 512, "train_batch_size": 2, "gradient_accumulation_steps": 2, "max_train_steps": 500,
                "validation_prompt": "a {} on a beach", "validation_steps": 100}  # fmt: skip
    default_kappa = DEFAULT_KAPPA
    pipeline_expands_tokens = False  # WanPipeline cannot expand a multi-vector token
    card_tags = ("wan", "text-to-video")
    encode_attended_only = True  # UMT5 over the batch's longest prompt, not all 512 positions (exact: encode_prompt)

    def add_arguments(self, parser, groups):
        wan = parser.add_argument_group("Wan")
        wan.add_argument(
            "--max_sequence_length", type=int, default=512, help="Text tokens the transformer sees, as in WanPipeline."
        )
        wan.add_argument(
            "--training_shift",
            type=float,
            default=DEFAULT_TRAINING_SHIFT,
            help="Shift of the training sigmas (FlowMatchEulerDiscreteScheduler's shift). 1.0: as the DTI authors "
            "train (the published flow_shift 3.0 is the sampler's, for inference).",
        )
        add_flow_matching_arguments(wan)

    def validate(self, args):
        check_flow_matching_args(args)
        if args.max_sequence_length < 2:
            raise ValueError("--max_sequence_length must be at least 2.")
        if not (args.training_shift > 0 and args.training_shift < float("inf")):
            raise ValueError("--training_shift must be a positive number.")
        return args

    def load_tokenizers(self, args):
        return load_tokenizers(args)

    def add_tokens(self, tokenizer, names):
        """lstrip: the space before a new token belongs to it, so every transformers version gives the same ids
        (4.56 would put a lone "▁" before a plainly added token, 5.x not); infer.py adds them the same way."""
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(name, lstrip=True) for name in names])

    def prompt_tokenizers(self, args, tokenizers):
        tokenize = partial(tokenize_prompt, tokenizers[0], args.max_sequence_length)
        return tokenize, tokenize

    def identity(self, args):
        return {"training_shift": args.training_shift}

    def load_models(self, args, model_index, tokenizers):
        return load_models(args, model_index)

    def check_models(self, args, models):
        factor = 2 ** (len(models.vae.config.dim_mult) - 1) * models.denoiser.config.patch_size[1]
        if args.resolution % factor:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of {factor} (the VAE's factor times the "
                "transformer's patch)."
            )

    def encode_initializer(self, args, tokenizers, text_encoders, num_vectors):
        return encode_initializer(args, tokenizers, text_encoders, num_vectors)

    def latent_posterior(self, vae, pixel_values):
        return vae_posterior(vae, pixel_values)

    def training_loss(self, batch, latent_mean, latent_std, models, seed, args):
        return training_loss(batch, latent_mean, latent_std, transformer=models.denoiser,
                             text_encoders=models.text_encoders, noise_scheduler=models.noise_scheduler,
                             vae=models.vae, seed=seed, args=args, attended_only=self.encode_attended_only)  # fmt: skip

    def validation_images(self, components, models, args, prompt, generators):
        """The first (only) frame of 1-frame WanPipeline videos at the training resolution, one per generator in one
        call, with the checkpoint's own sampler (20 steps, guidance 5, as the authors validate)."""
        from diffusers import WanPipeline

        pipeline = WanPipeline(**components, scheduler=models.sampler)
        pipeline.set_progress_bar_config(disable=True)
        videos = pipeline(
            prompt,
            height=args.resolution,
            width=args.resolution,
            num_frames=1,
            num_inference_steps=VALIDATION_INFERENCE_STEPS,
            guidance_scale=VALIDATION_GUIDANCE_SCALE,
            max_sequence_length=args.max_sequence_length,
            num_videos_per_prompt=len(generators),
            generator=generators,
            output_type="pil",
        ).frames
        return [video[0] for video in videos]

    def metadata(self, args):
        return {"max_sequence_length": str(args.max_sequence_length), "training_shift": repr(args.training_shift)}

    def embedding_files(self, args, vectors, suffix):
        """learned_embeds.safetensors = {"<tok>": [k, d]}, rows of the UMT5 input table."""
        return {f"learned_embeds{suffix}.safetensors": {args.placeholder_token: vectors["text_encoder"]}}

    def card_text(self, args, repo_id, method):
        token = args.placeholder_token
        lora_sentence = (
            f" A LoRA of the transformer was trained with the token ({lora_description(args)}): `load_lora_weights` "
            "loads it."
            if args.lora_rank
            else ""
        )
        lora_line = lora_snippet_line(args, repo_id)
        about = (
            f"`{token}` is a concept token learned as new rows of the UMT5 input embedding table of Wan 2.1 from the "
            f'class word "{args.initializer_token}" with {method}, on images as 1-frame videos. WanPipeline has no '
            "`load_textual_inversion`; these lines add the token (as `infer.py` of the DTI repository does)."
            f"{lora_sentence}"
        )
        usage = f"""```python
import torch
from diffusers import WanPipeline
from diffusers.utils import export_to_video
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from transformers import AddedToken

base_model, token = "{args.pretrained_model_name_or_path}", "{token}"
pipe = WanPipeline.from_pretrained(base_model, torch_dtype=torch.bfloat16)
pipe.vae.to(torch.float32)
pipe.to("cuda")
vectors = load_file(hf_hub_download("{repo_id}", "learned_embeds.safetensors"))[token]
{add_token_rows("[AddedToken(name, lstrip=True) for name in names]")}
prompt = "a {token} on a beach".replace(token, " ".join(names))
{lora_line}video = pipe(prompt, num_frames=33).frames[0]
export_to_video(video, "video.mp4", fps=16)
```
"""
        return about, usage

    def card_rows(self, args):
        return [("max_sequence_length", args.max_sequence_length), ("training shift", f"{args.training_shift:g}")]


FAMILY = Wan()

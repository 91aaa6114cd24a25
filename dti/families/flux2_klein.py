"""Directional Textual Inversion (DTI) for FLUX.2 [klein] (4B and 9B, Qwen3 text encoder).

Learns a personal concept token as new rows of the Qwen3 input embedding table (4B: d = 2560; 9B: Qwen3-8B, d = 4096;
no embedding scale). The embedding norm is fixed to an in-distribution value m* (the mean norm of the table's rows
that the tokenizer uses: the published table is padded past the tokenizer); only the direction is learned, on the
unit hypersphere, by Riemannian SGD with a von Mises-Fisher prior toward the class word (arXiv 2512.13672). Train on
the undistilled base checkpoint; the token works on the distilled few-step checkpoint too (the same text encoder).
The prompt goes through Qwen3's chat template as in Flux2KleinPipeline; the loss is rectified flow on the packed,
normalised latents, as diffusers' FLUX.2 [klein] DreamBooth trainer computes it.

    accelerate launch train_dti_flux2_klein.py --pretrained_model_name_or_path black-forest-labs/FLUX.2-klein-base-4B \
      --scale_lr --train_data_dir assets/toy_robot --placeholder_token "<my-robot>" --initializer_token robot \
      --output_dir out

Flux2KleinPipeline has no load_textual_inversion: see README.md for the loader (infer.py loads the token). ComfyUI
loads the combined file <name>.safetensors ({"qwen3_4b" or "qwen3_8b": [k, d]}) from models/embeddings/.
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
from dti.core.plumbing import concept_name
from dti.core.step import lora_description
from dti.shared.flow_matching import (
    add_flow_matching_arguments,
    check_flow_matching_args,
    flow_matching_inputs,
    flow_matching_loss,
)
from dti.shared.token_rows import add_token_rows

DEFAULT_KAPPA = 5e-5
CONDITIONING_LAYERS = (9, 18, 27)  # the hidden states Flux2KleinPipeline stacks (hidden_states[0]: the embeddings)
COMFYUI_KEYS = {4096: "qwen3_8b"}  # ComfyUI's key of a klein embedding by encoder width; else qwen3_4b (d = 2560)
VALIDATION_INFERENCE_STEPS = {False: 28, True: 4}  # base, distilled


def tokenize_prompt(tokenizer, max_sequence_length, prompt):
    """Token ids and mask as Flux2KleinPipeline._get_qwen3_prompt_embeds makes them: the prompt as one user message
    of Qwen3's chat template (generation prompt, thinking off), padded to max_sequence_length."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    tokens = tokenizer(text, padding="max_length", truncation=True, max_length=max_sequence_length)
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


def encode_prompt(text_encoder, text):
    """FLUX.2 [klein] text conditioning: Qwen3's hidden states after layers 9, 18 and 27 side by side on the feature
    axis, [B, L, 3 d]. Runs the decoder stack alone (the language-model head is never needed)."""
    device = text_encoder.device
    ids, mask = text["input_ids"].to(device), text["attention_mask"].to(device)
    decoder = getattr(text_encoder, "model", text_encoder)
    hidden_states = decoder(ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    return torch.cat([hidden_states[k] for k in CONDITIONING_LAYERS], dim=-1)


def keep_conditioning_layers(text_encoder):
    """Drop the decoder layers after the last one the conditioning reads: hidden_states[27] is the input of layer 28,
    so layers 1..28 stay (the last one feeds only the unused final norm). Returns the number of layers dropped."""
    decoder = getattr(text_encoder, "model", text_encoder)
    keep = max(CONDITIONING_LAYERS) + 1
    dropped = max(0, len(decoder.layers) - keep)
    if dropped:
        decoder.layers = decoder.layers[:keep]
        text_encoder.config.num_hidden_layers = keep
    return dropped


def packed_latents(vae, latents):
    """The VAE posterior mode as the transformer sees it: 2x2 patches, normalised with the VAE's batch-norm
    statistics. latents: [B, C, h, w] -> [B, 4 C, h / 2, w / 2]."""
    from diffusers import Flux2KleinPipeline

    patches = Flux2KleinPipeline._patchify_latents(latents)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(patches.device, patches.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(patches.device, patches.dtype)
    return (patches - mean) / std


def training_loss(batch, latent_mean, latent_std, transformer, text_encoders, noise_scheduler, vae, seed, args):
    """FLUX.2 [klein]'s rectified-flow loss of each sample of a batch, [B] (the mean over its elements), as diffusers'
    FLUX.2 [klein] DreamBooth trainer computes it. latent_mean: [B, C, H/8, W/8], the VAE posterior's mode."""
    from diffusers import Flux2KleinPipeline

    device, dtype = latent_mean.device, transformer.dtype
    generators = keyed_generators(seed, batch["position"].tolist(), device)
    latents = packed_latents(vae, latent_mean)
    noisy_latents, noise, timesteps, sigmas = flow_matching_inputs(latents, generators, noise_scheduler, args)
    prompt_embeds = encode_prompt(text_encoders[0], batch["text"])
    latent_ids = Flux2KleinPipeline._prepare_latent_ids(latents).to(device)
    text_ids = Flux2KleinPipeline._prepare_text_ids(prompt_embeds).to(device)
    packed = Flux2KleinPipeline._pack_latents(noisy_latents)
    guidance = torch.full([len(latents)], 1.0, device=device) if transformer.config.guidance_embeds else None
    model_pred = transformer(
        hidden_states=packed.to(dtype),
        timestep=timesteps / 1000,
        guidance=guidance,
        encoder_hidden_states=prompt_embeds.to(dtype),
        txt_ids=text_ids,
        img_ids=latent_ids,
        return_dict=False,
    )[0][:, : packed.size(1)]
    model_pred = Flux2KleinPipeline._unpack_latents_with_ids(model_pred, latent_ids)
    return flow_matching_loss(model_pred, latents, noise, sigmas, args)


def vae_posterior(vae, pixel_values):
    """The FLUX.2 VAE's posterior mode (fp32) and a zero std (diffusers' trainer takes the mode). pixel_values:
    [B, 3, H, W] in [-1, 1]."""
    with torch.no_grad():
        mode = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mode().float()
    return mode, torch.zeros_like(mode)


def load_tokenizers(args):
    """[the Qwen3 tokenizer] and the pipeline's model_index, after checking that the model is a Flux2KleinPipeline."""
    model_index, (tokenizer,) = load_tokenizers_and_index(args, auto_tokenizer)
    components = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    check_layout(
        args, model_index, components, "Flux2KleinPipeline", model_index.get("_class_name") != "Flux2KleinPipeline"
    )
    return [tokenizer], model_index


def load_models(args, model_index):
    """The frozen FLUX.2 [klein] components, fp32 (cast later, after the vocabulary statistics are taken): Qwen3, the
    VAE, the transformer, and the checkpoint's flow-matching scheduler: one copy for training (its 1,000 unshifted
    sigmas, as diffusers' trainer draws them), one for validation."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    def load(path, common):
        text_encoder = Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder", **common)
        vae = AutoencoderKLFlux2.from_pretrained(path, subfolder="vae", **common)
        transformer = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer", **common)
        sampler = checkpoint_sampler(path, model_index, common["revision"])
        noise_scheduler = type(sampler).from_config(sampler.config)  # its own: validation resets the sampler's steps
        extras = {"is_distilled": model_index.get("is_distilled", False)}
        return Models([text_encoder], vae, transformer, noise_scheduler, sampler, extras)

    return load_components(args, load)


def check_diffusers():
    """Flux2KleinPipeline came with diffusers 0.37: refuse an older one in one line."""
    import diffusers

    if not hasattr(diffusers, "Flux2KleinPipeline"):
        raise ValueError(
            f"train_dti_flux2_klein.py needs diffusers with Flux2KleinPipeline (0.37 or newer; installed: "
            f"{diffusers.__version__}): pip install -U diffusers."
        )


class Flux2Klein(Family):
    """FLUX.2 [klein] as the DTI core sees it."""

    name, title = "flux2-klein", "FLUX.2 [klein]"
    model_help = "Hub id or local folder of a Flux2KleinPipeline diffusers checkpoint (FLUX.2 [klein] base 4B or 9B)."
    denoiser, denoiser_label = "transformer", "transformer"
    text_encoders, tokenizers, text_encoder_label = ("text_encoder",), ("tokenizer",), "Qwen3 encoder"
    fp32_modules = ("vae",)
    vae_label, vae_factor = "VAE", 16  # 8 (the VAE) x 2 (the 2x2 patches)
    defaults = {"resolution": 1024, "train_batch_size": 2, "gradient_accumulation_steps": 2, "max_train_steps": 500}
    default_kappa = DEFAULT_KAPPA
    pipeline_expands_tokens = False  # Flux2KleinPipeline cannot expand a multi-vector token
    card_tags = ("flux2-klein",)

    def add_arguments(self, parser, groups):
        klein = parser.add_argument_group("FLUX.2 [klein]")
        klein.add_argument(
            "--max_sequence_length",
            type=int,
            default=512,
            help="Text tokens of the chat-templated prompt, as in Flux2KleinPipeline.",
        )
        add_flow_matching_arguments(klein)

    def validate(self, args):
        check_diffusers()
        check_flow_matching_args(args)
        if args.max_sequence_length < 16:
            raise ValueError("--max_sequence_length must be at least 16 (the chat template's own tokens).")
        return args

    def load_tokenizers(self, args):
        return load_tokenizers(args)

    def prompt_tokenizers(self, args, tokenizers):
        tokenize = partial(tokenize_prompt, tokenizers[0], args.max_sequence_length)
        return tokenize, tokenize

    def load_models(self, args, model_index, tokenizers):
        return load_models(args, model_index)

    def check_models(self, args, models):
        factor = 2 ** (len(models.vae.config.block_out_channels) - 1) * 2
        if args.resolution % factor:
            raise ValueError(
                f"--resolution {args.resolution} is not a multiple of {factor} (the VAE's factor times the 2x2 patch)."
            )

    def prepare_text_encoders(self, args, models, tokenizers, first_free_id):
        """The decoder layers after the last one the conditioning reads are dropped: a quarter of the 36 layers'
        work, in every step and every validation."""
        keep_conditioning_layers(models.text_encoders[0])
        return models.extras

    def encode_initializer(self, args, tokenizers, text_encoders, num_vectors):
        """CrossInit's start: Qwen3's last computed hidden state at the class word in its chat-templated prompt."""
        text = tokenize_prompt(tokenizers[0], args.max_sequence_length, args.initializer_token)
        decoder = getattr(text_encoders[0], "model", text_encoders[0])
        return {"text_encoder": initializer_hidden_states(text, tokenizers[0], decoder, args.initializer_token,
                                                          num_vectors, use_cache=False)}  # fmt: skip

    def latent_posterior(self, vae, pixel_values):
        return vae_posterior(vae, pixel_values)

    def training_loss(self, batch, latent_mean, latent_std, models, seed, args):
        return training_loss(batch, latent_mean, latent_std, transformer=models.denoiser,
                             text_encoders=models.text_encoders, noise_scheduler=models.noise_scheduler,
                             vae=models.vae, seed=seed, args=args)  # fmt: skip

    def validation_images(self, components, models, args, prompt, generators):
        """Flux2KleinPipeline with the checkpoint's scheduler at the training resolution (28 steps on base, 4 on a
        distilled checkpoint), one image per generator in one call."""
        from diffusers import Flux2KleinPipeline

        distilled = bool(models.extras.get("is_distilled"))
        pipeline = Flux2KleinPipeline(**components, scheduler=models.sampler, is_distilled=distilled)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline(
            prompt=prompt,  # the first positional argument is a condition image
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=VALIDATION_INFERENCE_STEPS[distilled],
            max_sequence_length=args.max_sequence_length,
            num_images_per_prompt=len(generators),
            generator=generators,
        ).images

    def metadata(self, args):
        return {"max_sequence_length": str(args.max_sequence_length)}

    def embedding_files(self, args, vectors, suffix):
        """learned_embeds.safetensors = {"<tok>": [k, d]} (diffusers, infer.py) and the combined file ComfyUI reads,
        {"qwen3_4b" or "qwen3_8b": [k, d]}."""
        rows = vectors["text_encoder"]
        key = COMFYUI_KEYS.get(rows.shape[1], "qwen3_4b")
        return {
            f"learned_embeds{suffix}.safetensors": {args.placeholder_token: rows},
            f"{concept_name(args.placeholder_token)}{suffix}.safetensors": {key: rows},
        }

    def card_text(self, args, repo_id, method):
        token, name = args.placeholder_token, concept_name(args.placeholder_token)
        lora_sentence = (
            f" A LoRA of the transformer was trained with the token ({lora_description(args)}): `load_lora_weights` "
            "loads it."
            if args.lora_rank
            else ""
        )
        about = (
            f"`{token}` is a concept token learned as new rows of the Qwen3 input embedding table of FLUX.2 [klein] "
            f'from the class word "{args.initializer_token}" with {method}. Flux2KleinPipeline has no '
            "`load_textual_inversion`; these lines add the token (as `infer.py` of the DTI repository does). It "
            f"works on the distilled checkpoint too (the same text encoder).{lora_sentence}"
        )
        usage = f"""```python
import torch
from diffusers import Flux2KleinPipeline
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

base_model, token = "{args.pretrained_model_name_or_path}", "{token}"
pipe = Flux2KleinPipeline.from_pretrained(base_model, torch_dtype=torch.bfloat16).to("cuda")
vectors = load_file(hf_hub_download("{repo_id}", "learned_embeds.safetensors"))[token]
{add_token_rows()}
prompt = "a painting of {token} in the style of Van Gogh".replace(token, " ".join(names))
{lora_snippet_line(args, repo_id)}image = pipe(prompt=prompt).images[0]
```

ComfyUI: put `{name}.safetensors` in `models/embeddings/` and write `embedding:{name}` in the prompt.
"""
        return about, usage

    def card_rows(self, args):
        return [("max_sequence_length", args.max_sequence_length)]


FAMILY = Flux2Klein()

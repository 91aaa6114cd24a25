"""Directional Textual Inversion (DTI) for Stable Diffusion XL.

Learns a personal concept token on both SDXL text encoders (CLIP ViT-L and OpenCLIP bigG). The embedding norm is
fixed to an in-distribution value m* (the mean norm of the vocabulary rows); only the direction is learned, on the
unit hypersphere, by Riemannian SGD with a von Mises-Fisher prior toward the class word (arXiv 2512.13672).

    accelerate launch train_dti_sdxl.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --train_data_dir assets/toy_robot --placeholder_token "<my-robot>" --initializer_token robot --output_dir out

The outputs load with `pipe.load_textual_inversion(...)` in diffusers and in ComfyUI / A1111 (see README.md).
"""

from functools import partial

import torch
import torch.nn.functional as F

from dti.core.constants import LORA_WEIGHT_NAME
from dti.core.data import keyed_generators
from dti.core.dti import content_positions
from dti.core.family import Family, Models
from dti.core.hub import lora_snippet_line
from dti.core.loading import check_layout, load_components, load_tokenizers_and_index
from dti.core.plumbing import concept_name
from dti.core.step import lora_description, lora_targets

DEFAULT_KAPPA = 1e-4
EMBEDDING_FILES = {"text_encoder": "learned_embeds", "text_encoder_2": "learned_embeds_2"}
COMBINED_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
# The line that makes a StableDiffusionXLPipeline pool CLIP-G at end-of-text (--pooled_output eos), as training did.
POOL_AT_END_OF_TEXT = "pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id  # end-of-text"
# The metadata kohya's sd-scripts writes in an SDXL LoRA: A1111 / Forge take a LoRA for SDXL by ss_base_model_version.
KOHYA_METADATA = {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_module": "networks.lora", "ss_v2": "False"}
# Resnet layers of the SGM UNet (kohya's and A1111's names) by their diffusers names; attention layers keep theirs.
SGM_RESNET_LAYERS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip
# The SDXL UNet's linear layers outside its blocks: the time and text-time embeddings, which no kohya LoRA holds.
EMBEDDING_LAYERS = ("time_embedding.linear_1", "time_embedding.linear_2", "time_embedding.cond_proj",
                    "add_embedding.linear_1", "add_embedding.linear_2")  # fmt: skip


def set_pooled_output(text_encoder, tokenizer, pooled_output):
    """Where a CLIP encoder pools: eos pools at the first end-of-text token whatever the config says; argmax
    restores the config's pooling. The published SDXL configs say eos_token_id 2, with which transformers pools
    at argmax(input_ids): the end-of-text token for ordinary prompts, the new token once a prompt holds one."""
    eos = tokenizer.eos_token_id if pooled_output == "eos" else text_encoder.config.eos_token_id
    getattr(text_encoder, "text_model", text_encoder).eos_token_id = eos  # what the pooling reads (transformers 4, 5)


def tokenize_prompt(tokenizers, prompt):
    """Token ids of both CLIP tokenizers, padded to 77 as StableDiffusionXLPipeline.encode_prompt pads them."""
    return {
        key: tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        for key, tokenizer in zip(("input_ids", "input_ids_2"), tokenizers, strict=True)
    }


def encode_prompt(text_encoders, text):
    """SDXL text conditioning: penultimate hidden states of both encoders concatenated, CLIP-G's pooled output
    (pooled where set_pooled_output says). text: {"input_ids": [B, 77], "input_ids_2": [B, 77]}."""
    hidden_states = []
    for text_encoder, ids in zip(text_encoders, (text["input_ids"], text["input_ids_2"]), strict=True):
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        hidden_states.append(output.hidden_states[-2])
    return torch.cat(hidden_states, dim=-1), output.text_embeds


def encode_initializer(args, tokenizers, text_encoders, num_vectors):
    """CrossInit's start, {encoder: [k, d] fp32}: each encoder's last hidden state (after its final layer norm) at the
    initializer's content positions when the initializer alone is encoded as a prompt (<bos> word <eos> pad...)."""
    text, vectors = tokenize_prompt(tokenizers, args.initializer_token), {}
    for name, tokenizer, text_encoder, ids in zip(
        SDXL.text_encoders, tokenizers, text_encoders, text.values(), strict=True
    ):
        positions = content_positions(tokenizer, ids, args.initializer_token, num_vectors)
        with torch.no_grad():
            hidden_states = text_encoder(torch.tensor([ids], device=text_encoder.device)).last_hidden_state
        vectors[name] = hidden_states[0, positions].float()
    return vectors


def training_loss(batch, latent_mean, latent_std, unet, text_encoders, noise_scheduler, vae_scale, seed, resolution):
    """The SDXL noise-prediction loss of each sample of a batch, [B] (the mean over its elements). latent_mean,
    latent_std: [B, 4, H/8, W/8] VAE posterior, fp32."""
    device, dtype = latent_mean.device, unet.dtype
    generators = keyed_generators(seed, batch["position"].tolist(), device)
    shape = latent_mean.shape[1:]
    num_timesteps = noise_scheduler.config.num_train_timesteps
    sample_noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
    timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g, device=device) for g in generators])
    latents = (latent_mean + latent_std * sample_noise) * vae_scale
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    encoder_hidden_states, pooled = encode_prompt(text_encoders, batch["text"])
    target_size = torch.tensor([resolution, resolution]).expand(len(latents), 2)
    time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target_size], dim=1).to(device, dtype)
    model_pred = unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states.to(dtype),
        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids},
    ).sample

    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def vae_posterior(vae, pixel_values):
    """Mean and std of the VAE posterior, fp32. pixel_values: [B, 3, H, W] in [-1, 1]."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def decode_latents(pipeline, latents):
    """PIL images of a StableDiffusionXLPipeline's latents [B, 4, h, w], unscaled as the pipeline unscales them and
    decoded by the VAE in its own dtype: under fp16 the VAE stays fp32 (it overflows in fp16) while the UNet's latents
    are fp16, and the pipeline casts them only on MPS. In fp32 and bf16 the images are the pipeline's, bit for bit."""
    vae, config = pipeline.vae, pipeline.vae.config
    latents = latents.to(vae.device, vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean, std = (torch.tensor(v).view(1, -1, 1, 1).to(latents) for v in (config.latents_mean, config.latents_std))
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    with torch.no_grad():
        images = vae.decode(latents, return_dict=False)[0]
    return pipeline.image_processor.postprocess(images, output_type="pil")


def load_tokenizers(args):
    """Both CLIP tokenizers, after checking that the model is an SDXL-layout diffusers checkpoint."""
    from transformers import CLIPTokenizer

    def load(path, revision):
        return [
            CLIPTokenizer.from_pretrained(path, subfolder=s, revision=revision) for s in ("tokenizer", "tokenizer_2")
        ]

    model_index, tokenizers = load_tokenizers_and_index(args, load)
    components = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer_2")
    check_layout(args, model_index, components, "SDXL", min(len(t) for t in tokenizers) < 1000)
    return tokenizers


def load_models(args):
    """The frozen SDXL components, fp32 (cast later, after the vocabulary statistics are taken)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def load(path, common):
        text_encoders = [
            CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common),
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **common),
        ]
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **common)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=common["revision"])
        return Models(text_encoders, vae, unet, noise_scheduler, sampler=None)

    return load_components(args, load)


def check_output_names(args):
    """The combined file is named after the placeholder; refuse one that would overwrite the per-encoder files
    (learned_embeds*.safetensors; compared without case, as some file systems do)."""
    name = concept_name(args.placeholder_token)
    for taken in ("learned_embeds", *(["pytorch_lora_weights"] if args.lora_rank else [])):
        if name.lower().startswith(taken):
            raise ValueError(
                f"--placeholder_token {args.placeholder_token!r} would name the combined file {name}.safetensors, "
                f"which clashes with the {taken} files; choose another token."
            )


def sgm_blocks(config):
    """{diffusers block path: (SGM block path, its layers' SGM names)} of an SDXL UNet, from its config: the SGM UNet
    numbers input_blocks from conv_in (0) on, one per down-block layer (resnet .0, attention .1) and one per
    downsampler (.0.op); middle_block holds resnet, attention, resnet; output_blocks count one per up-block layer
    (layers_per_block + 1 per block), the upsampler sitting in the block's last layer (.1, or .2 after an attention)."""
    n = len(config.down_block_types)
    per_block = config.layers_per_block
    layers = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * n
    blocks, index = {}, 1
    for i, block_type in enumerate(config.down_block_types):
        for j in range(layers[i]):
            blocks[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{index}.0", SGM_RESNET_LAYERS)
            if "CrossAttn" in block_type:
                blocks[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if i < n - 1:
            blocks[f"down_blocks.{i}.downsamplers.0"] = (f"input_blocks.{index}.0", {"conv": "op"})
            index += 1
    blocks["mid_block.resnets.0"] = ("middle_block.0", SGM_RESNET_LAYERS)
    blocks["mid_block.attentions.0"] = ("middle_block.1", {})
    blocks["mid_block.resnets.1"] = ("middle_block.2", SGM_RESNET_LAYERS)
    index = 0
    for i, (block_type, per) in enumerate(zip(config.up_block_types, reversed(layers), strict=True)):
        attention = "CrossAttn" in block_type
        for j in range(per + 1):
            blocks[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{index}.0", SGM_RESNET_LAYERS)
            if attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{index}.1", {})
            index += 1
        if i < n - 1:
            blocks[f"up_blocks.{i}.upsamplers.0"] = (f"output_blocks.{index - 1}.{2 if attention else 1}", {})
    return blocks


def sgm_layer_name(layer, blocks):
    """The SGM UNet's name of a diffusers UNet layer ('down_blocks.1.attentions.0.proj_in' ->
    'input_blocks.4.1.proj_in' in SDXL), or None outside the blocks (conv_in, the embeddings, conv_out)."""
    parts = layer.split(".")
    for cut in (4, 3):  # down_blocks.i.attentions.j, mid_block.attentions.0
        if (block := ".".join(parts[:cut])) in blocks:
            name, renames = blocks[block]
            inner = ".".join(parts[cut:])
            return f"{name}.{renames.get(inner, inner)}"
    return None


def check_kohya_targets(targets, layers):
    """Refuse a --lora_target_modules entry that matches one of `layers` (peft's rule: the name ends with it), UNet
    layers that the kohya file cannot hold."""
    for target in targets:
        for layer in layers:
            if layer == target or layer.endswith(f".{target}"):
                raise ValueError(
                    f"--lora_target_modules {target!r} matches the UNet's {layer}, outside its blocks: kohya's "
                    "scripts skip such a layer and diffusers 0.37 cannot load a kohya file that has one; target "
                    "layers of the blocks instead, e.g. "
                    "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,time_emb_proj."
                )


def unnamed_linear_layers(unet):
    """The UNet's linear layers without a name in the SGM UNet (for SDXL: EMBEDDING_LAYERS that it has)."""
    blocks = sgm_blocks(unet.config)
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and sgm_layer_name(name, blocks) is None
    ]


def kohya_state_dict(lora):
    """A LoRA in the layout of kohya's SDXL LoRAs, which ComfyUI, A1111 / Forge and kohya's scripts read:
    lora_unet_<the layer's SGM name, dots as underscores> with .lora_down (A) and .lora_up (B) as trained and .alpha
    the LoRA's alpha, so that each tool applies alpha / rank once."""
    blocks, alpha, tensors = sgm_blocks(lora.config), torch.tensor(float(lora.alpha)), {}
    for layer, (down, up) in lora.layers().items():
        base = "lora_unet_" + sgm_layer_name(layer, blocks).replace(".", "_")
        tensors |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha.clone()}
    return tensors


def kohya_metadata(args):
    """The metadata kohya's sd-scripts writes, which A1111 / Forge read (SDXL, rank, alpha)."""
    return KOHYA_METADATA | {"ss_network_dim": str(args.lora_rank), "ss_network_alpha": repr(args.lora_alpha)}


class SDXL(Family):
    """Stable Diffusion XL as the DTI core sees it."""

    name, title = "sdxl", "SDXL"
    model_help = "Hub id or local folder of an SDXL-architecture diffusers checkpoint."
    denoiser, denoiser_label = "unet", "UNet"
    text_encoders, tokenizers = ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")
    text_encoder_label = "text encoders"
    compile_text_encoders = True  # CLIP always reads 77 positions: one graph, whose many small kernels fuse
    defaults = {"resolution": 768, "train_batch_size": 4, "gradient_accumulation_steps": 1, "max_train_steps": 400}
    default_kappa = DEFAULT_KAPPA
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")

    def add_arguments(self, parser, groups):
        groups["model"].add_argument(
            "--pooled_output",
            choices=["eos", "argmax"],
            default="eos",
            help="Where CLIP-G's pooled text embedding is taken. eos: at the end-of-text token, as SDXL was trained "
            "and as ComfyUI, A1111 and kohya pool. argmax: as the checkpoint's config says (the published "
            "eos_token_id 2 pools at argmax(input_ids), the new token): the legacy behaviour of plain diffusers and "
            "the authors' runs.",
        )

    def validate(self, args):
        if args.lora_rank:
            check_kohya_targets(lora_targets(args), EMBEDDING_LAYERS)
        return args

    def validate_concept(self, args):
        check_output_names(args)
        if args.lora_rank and "." in concept_name(args.placeholder_token):
            raise ValueError(
                f"--placeholder_token {args.placeholder_token!r}: with --lora_rank the token is bundled with the LoRA "
                f"in {concept_name(args.placeholder_token)}_pivotal.safetensors, whose embedding name A1111 cuts at "
                "a dot; choose a token without '.'."
            )
        return args

    def load_tokenizers(self, args):
        return load_tokenizers(args), None  # the model_index is only checked

    def prompt_tokenizers(self, args, tokenizers):
        tokenize = partial(tokenize_prompt, tokenizers)
        return tokenize, tokenize

    def identity(self, args):
        return {"pooled_output": args.pooled_output}

    def load_models(self, args, model_index, tokenizers):
        return load_models(args)

    def check_models(self, args, models):
        vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
        if args.resolution % vae_factor:
            raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE factor {vae_factor}.")
        if args.lora_rank:
            check_kohya_targets(lora_targets(args), unnamed_linear_layers(models.denoiser))

    def prepare_text_encoders(self, args, models, tokenizers, first_free_id):
        """CLIP pooling as --pooled_output says."""
        for text_encoder, tokenizer in zip(models.text_encoders, tokenizers, strict=True):
            set_pooled_output(text_encoder, tokenizer, args.pooled_output)
        return {}

    def encode_initializer(self, args, tokenizers, text_encoders, num_vectors):
        return encode_initializer(args, tokenizers, text_encoders, num_vectors)

    def latent_posterior(self, vae, pixel_values):
        return vae_posterior(vae, pixel_values)

    def training_loss(self, batch, latent_mean, latent_std, models, seed, args):
        return training_loss(batch, latent_mean, latent_std, unet=models.denoiser, text_encoders=models.text_encoders,
                             noise_scheduler=models.noise_scheduler, vae_scale=models.vae.config.scaling_factor,
                             seed=seed, resolution=args.resolution)  # fmt: skip

    def validation_images(self, components, models, args, prompt, generators):
        """DPM-Solver, 25 steps, at the training resolution, one image per generator in one call; the latents decoded
        one at a time (the VAE's memory of one image) by the VAE in its own dtype."""
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

        scheduler = DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config)
        pipeline = StableDiffusionXLPipeline(**components, scheduler=scheduler, add_watermarker=False)
        pipeline.set_progress_bar_config(disable=True)
        latents = pipeline(
            prompt,
            num_inference_steps=25,
            height=args.resolution,
            width=args.resolution,
            num_images_per_prompt=len(generators),
            generator=generators,
            output_type="latent",
        ).images
        return [decode_latents(pipeline, latent[None])[0] for latent in latents]

    def metadata(self, args):
        return {"pooled_output": args.pooled_output}

    def embedding_files(self, args, vectors, suffix):
        """One {"<tok>": [k, d]} file per encoder (diffusers' load_textual_inversion) and the combined
        {clip_l, clip_g} (ComfyUI, A1111, kohya)."""
        files = {
            f"{EMBEDDING_FILES[name]}{suffix}.safetensors": {args.placeholder_token: v} for name, v in vectors.items()
        }
        files[f"{concept_name(args.placeholder_token)}{suffix}.safetensors"] = {
            COMBINED_KEYS[name]: v for name, v in vectors.items()
        }
        return files

    def lora_files(self, args, lora, vectors):
        """<concept>_lora.safetensors: the kohya layout; <concept>_pivotal.safetensors: the same LoRA with the token as
        A1111 / Forge bundle it (bundle_emb.<concept>.clip_l / .clip_g; the prompt writes <concept>)."""
        name, tensors, metadata = concept_name(args.placeholder_token), kohya_state_dict(lora), kohya_metadata(args)
        bundle = {f"bundle_emb.{name}.{COMBINED_KEYS[encoder]}": v for encoder, v in vectors.items()}
        return {f"{name}_lora": (tensors, metadata), f"{name}_pivotal": (tensors | bundle, metadata)}

    def card_text(self, args, repo_id, method):
        token, name = args.placeholder_token, concept_name(args.placeholder_token)
        prompt = f"a painting of {token} in the style of Van Gogh"
        pooling_line = POOL_AT_END_OF_TEXT + "\n" if args.pooled_output == "eos" else ""
        lora_line = lora_snippet_line(args, repo_id)
        lora_sentence = f" A LoRA of the UNet was trained with it ({lora_description(args)})." if args.lora_rank else ""
        lora_loader = " and `load_lora_weights`" if args.lora_rank else ""
        lora_files = (
            f"""- `{LORA_WEIGHT_NAME}`: the LoRA for diffusers' `load_lora_weights` (above).
- `{name}_lora.safetensors`: the same LoRA in kohya's SDXL layout, for ComfyUI (`models/loras/`, a LoraLoader node),
  A1111 / Forge (`models/Lora/`, `<lora:{name}_lora:1>` in the prompt) and kohya's sd-scripts, next to the embedding.
- `{name}_pivotal.safetensors`: token and LoRA in one file for A1111 / Forge: put it in `models/Lora/` and write
  `<lora:{name}_pivotal:1>` and `{name}` in the prompt (diffusers' `load_lora_weights` refuses it).
"""
            if args.lora_rank
            else ""
        )
        about = (
            f"`{token}` is a concept token learned on both SDXL text encoders from the class word "
            f'"{args.initializer_token}" with {method}.{lora_sentence} The files load with diffusers\' '
            f"`load_textual_inversion`{lora_loader}, in ComfyUI and in A1111."
        )
        usage = f"""```python
import torch
from diffusers import StableDiffusionXLPipeline

base_model = "{args.pretrained_model_name_or_path}"
pipe = StableDiffusionXLPipeline.from_pretrained(base_model, dtype=torch.float16).to("cuda")
{pooling_line}pipe.load_textual_inversion(
    "{repo_id}", weight_name="learned_embeds.safetensors", token="{token}",
    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
)
pipe.load_textual_inversion(
    "{repo_id}", weight_name="learned_embeds_2.safetensors", token="{token}",
    text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2,
)
{lora_line}image = pipe("{prompt}").images[0]
```

Which file for which tool:

- `learned_embeds.safetensors`, `learned_embeds_2.safetensors`: diffusers' `load_textual_inversion` (above).
- `{name}.safetensors` (`clip_l` and `clip_g` in one file): ComfyUI (`models/embeddings/`, write `embedding:{name}`)
  and A1111 / Forge (`embeddings/`, write `{name}`).
{lora_files}"""
        return about, usage

    def card_rows(self, args):
        return [("pooled text embedding", args.pooled_output)]


FAMILY = SDXL()

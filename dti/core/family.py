"""The family seam: what the DTI core asks of a model family, and nothing more.

A family is one object with a few names and defaults and a fixed set of hooks, each with one signature. The core
calls only these and never asks which family it runs; a new family is a new subclass, not a branch in the core.
"""

from dataclasses import dataclass, field


@dataclass
class Models:
    """The frozen components a family loads, fp32 until `freeze` casts them. text_encoders: in the order of the
    family's `text_encoders` names; sampler: the validation pipeline's scheduler; extras: what the family's own
    loss needs besides (e.g. a token id it reserved)."""

    text_encoders: list
    vae: object
    denoiser: object
    noise_scheduler: object
    sampler: object
    extras: dict = field(default_factory=dict)


class Family:
    """A model family as the DTI core sees it. Subclasses set the names and defaults and implement the hooks."""

    name = ""  # short name: the tracker project is dti-<name>
    title = ""  # how --help and the start-of-training banner name the family
    model_help = ""  # --pretrained_model_name_or_path's help
    denoiser = ""  # the denoiser's component name in the pipeline (the LoRA's key prefix)
    denoiser_label = ""  # how --help names the denoiser
    text_encoders = ()  # the component names of the text encoders that get learned rows
    tokenizers = ()  # their tokenizers' component names, in the same order
    text_encoder_label = ""  # how --help names the text encoder(s)
    fp32_modules = ()  # components kept in fp32 under mixed precision
    compile_text_encoders = False  # whether --compile compiles the text encoders too (fixed-length text only)
    vae_label, vae_factor = "VAE", 8  # the autoencoder's name and its downsampling factor (for --help)
    defaults = {}  # resolution, train_batch_size, gradient_accumulation_steps, max_train_steps (and, optionally,
    # validation_prompt and validation_steps)
    default_kappa = 1e-4  # --kappa of --method dti
    placeholder_rule = ""  # what --help adds about the placeholder's spelling
    pipeline_expands_tokens = True  # whether the family's pipeline expands <tok> into <tok> <tok>_1 ... itself
    card_tags = ()  # the model card's family tags

    # Arguments: the family's own flags and checks.
    def add_arguments(self, parser, groups):
        """Add the family's flags; groups: the core's argument groups by name (model, data, token, training,
        logging)."""

    def validate(self, args):
        """Check the run's flags (a --concepts_list run's placeholder is None here); return args."""
        return args

    def validate_concept(self, args):
        """Check one concept's flags (its placeholder, its output names); return args."""
        return args

    # Tokens and text: before any model loads.
    def load_tokenizers(self, args):
        """(tokenizers in the order of `tokenizers`, the pipeline's model_index), after checking the checkpoint's
        layout."""
        raise NotImplementedError

    def prompt_tokenizers(self, args, tokenizers):
        """(tokenize, fit): prompt -> {key: ids} as training feeds the text encoders, and as the context check reads
        it (the room a prompt has)."""
        raise NotImplementedError

    def add_tokens(self, tokenizer, names):
        """Add the new tokens' names to a tokenizer (as diffusers' loaders add them: plain strings)."""
        tokenizer.add_tokens(names)

    def initializer_in_prompt(self, args):
        """Whether the class word's pieces are taken as inside a prompt (after a space) or as the bare word."""
        return True

    def identity(self, args):
        """The family's flags that a checkpoint must match to be resumed (beside the core's)."""
        return {}

    # Models.
    def load_models(self, args, model_index, tokenizers):
        """The frozen components as Models, fp32 (cast later, after the vocabulary statistics are taken)."""
        raise NotImplementedError

    def check_models(self, args, models):
        """Checks that need the loaded configs (e.g. the resolution against the autoencoder's factor)."""

    def prepare_text_encoders(self, args, models, tokenizers, first_free_id):
        """Called once the models are loaded, before the learned tokens are attached (first_free_id: the first id
        after every concept's tokens). Returns extras for Models.extras."""
        return {}

    def encode_initializer(self, args, tokenizers, text_encoders, num_vectors):
        """CrossInit's start, {text encoder name: [k, d] fp32}: the encoder's output at the class word."""
        raise NotImplementedError

    # The loss.
    def latent_posterior(self, vae, pixel_values):
        """(mean, std) of the autoencoder's posterior, fp32. pixel_values: [B, 3, H, W] in [-1, 1]."""
        raise NotImplementedError

    def training_loss(self, batch, latent_mean, latent_std, models, seed, args):
        """The loss of each sample of a batch, [B] (the mean over its elements); every draw keyed by (seed, the
        sample's stream position)."""
        raise NotImplementedError

    # Validation and outputs.
    def validation_images(self, components, models, args, prompt, generators):
        """One PIL image per generator of `prompt`, in one call of the family's pipeline built from components (a list
        of generators, one per image: image i is the one a call with generators[i] alone makes)."""
        raise NotImplementedError

    def metadata(self, args):
        """The family's safetensors metadata (str -> str) beside the core's."""
        return {}

    def embedding_files(self, args, vectors, suffix):
        """{file name: {key: tensor}} of the learned vectors; vectors: {text encoder name: [k, d] fp32}."""
        raise NotImplementedError

    def lora_files(self, args, lora, vectors):
        """{file stem: (tensors, metadata beside the run's)}: the LoRA in other tools' layouts. lora: the DenoiserLoRA
        (layers(): each layer's A and B as trained; alpha, rank; config: the denoiser's); vectors: {text encoder name:
        [k, d] fp32}, for a file that bundles the token with the LoRA."""
        return {}

    def card_text(self, args, repo_id, method):
        """(about, usage) of the model card: what the token is (method: how it was learned, one clause) and how to
        use it (markdown with the snippet)."""
        raise NotImplementedError

    def card_rows(self, args):
        """[(setting, value)]: the family's rows of the card's training table."""
        return []

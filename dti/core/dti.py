"""The DTI core: the learned directions on the sphere, the update (Riemannian SGD), the baselines' free rows, and
how the new tokens enter the tokenizers and the text encoders."""

import torch
import torch.nn.functional as F

from dti.core.data import stable_seed, validation_prompt


def vocabulary_norms(embedding_table):
    """Norms of the pretrained rows W_i (fp32), zero rows dropped. embedding_table: [V, d]."""
    norms = embedding_table.float().norm(dim=-1)
    return norms[norms > 0]


def resolve_norm_scale(norms, token_scale):
    """m* = mean, min or max of the vocabulary norms, or a given positive float."""
    if isinstance(token_scale, float):
        return token_scale
    return getattr(norms, token_scale)().item()


def token_stats(embeddings, prior_direction, initial):
    """What the paper plots, as means over the k vectors [k, d]: norm, cosine to the prior, degrees turned."""
    direction, start = F.normalize(embeddings, dim=-1), F.normalize(initial, dim=-1)
    angle = 2 * torch.asin(((direction - start).norm(dim=-1) / 2).clamp(max=1))  # accurate for small angles
    cos_prior = (direction * prior_direction).sum(-1)
    return torch.stack([embeddings.norm(dim=-1).mean(), cos_prior.mean(), torch.rad2deg(angle).mean()])


class DirectionalTokens(torch.nn.Module):
    """k new token embeddings e_j = norm_scale * v_j with each direction v_j on the unit sphere (fp32).

    step(lr) is Riemannian SGD with normalised steps (the spec's five steps), for each token j independently:
        g = dL/dv_j - kappa * mu_j                    (data gradient plus the vMF prior toward mu_j)
        g = g - (v_j . g) v_j                         (tangent space at v_j)
        s = beta s + (1 - beta) |g|^2;  g = g / (sqrt(s / (1 - beta^t)) + eps)   (beta = 0: g / (|g| + eps))
        v_j = (v_j - lr g) / |v_j - lr g|             (retraction; turns v_j by atan(lr) when |g| >> eps)
    """

    def __init__(
        self, prior_direction, initial_direction, norm_scale, kappa=0.0, beta=0.0, eps=1e-8, dtype=torch.float32
    ):
        super().__init__()
        self.direction = torch.nn.Parameter(F.normalize(initial_direction.to(dtype), dim=-1))
        self.register_buffer("prior_direction", F.normalize(prior_direction.to(dtype), dim=-1))
        self.register_buffer("initial_direction", self.direction.detach().clone())
        self.register_buffer("second_moment", torch.zeros(len(initial_direction), dtype=dtype))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))
        self.norm_scale, self.kappa, self.beta, self.eps = float(norm_scale), kappa, beta, eps

    def embeddings(self):
        """The vectors the text encoder sees, [k, d] fp32: norm_scale * v."""
        return self.norm_scale * self.direction

    @torch.no_grad()
    def step(self, lr, only_if=None):
        """One update; only_if (a bool tensor on the device) keeps the old state where False, without a host sync."""
        v, g = self.direction, self.direction.grad
        g = g - self.kappa * self.prior_direction
        g = g - (v * g).sum(-1, keepdim=True) * v
        num_steps = self.num_steps + 1
        second_moment = self.beta * self.second_moment + (1 - self.beta) * g.square().sum(-1)
        bias_correction = 1 - self.beta ** num_steps.to(g.dtype)
        g = g / ((second_moment / bias_correction).sqrt() + self.eps).unsqueeze(-1)
        new_direction = F.normalize(v - lr * g, dim=-1)
        for state, new in ((v, new_direction), (self.second_moment, second_moment), (self.num_steps, num_steps)):
            state.copy_(new if only_if is None else torch.where(only_if, new, state))

    @torch.no_grad()
    def add_prior_gradient(self):
        """For the AdamW ablation: the gradient of -kappa * mu . v, added before the optimizer step."""
        self.direction.grad.sub_(self.kappa * self.prior_direction)

    @torch.no_grad()
    def retract(self):
        """For the AdamW ablation: project the directions back onto the sphere after the optimizer step."""
        self.direction.copy_(F.normalize(self.direction, dim=-1))

    @torch.no_grad()
    def stats(self):
        return token_stats(self.embeddings(), self.prior_direction, self.initial_direction)


class TextualInversionTokens(torch.nn.Module):
    """Plain Textual Inversion (the paper's baseline): k free rows [k, d] in fp32, optimised by AdamW."""

    def __init__(self, prior_direction, initial_rows):
        super().__init__()
        self.rows = torch.nn.Parameter(initial_rows.float().clone())
        self.register_buffer("prior_direction", F.normalize(prior_direction.float(), dim=-1))
        self.register_buffer("initial_rows", initial_rows.float().clone())

    def embeddings(self):
        return self.rows

    @torch.no_grad()
    def stats(self):
        return token_stats(self.rows, self.prior_direction, self.initial_rows)


class CrossInitTokens(TextualInversionTokens):
    """The CrossInit baseline: free rows [k, d] fp32, optimised by AdamW, that start at the text encoder's output for
    the class word and are pulled back to that start by regularizer() = lambda * mean((rows - initial_rows)^2), the
    mean over the k x d elements (its gradient: 2 lambda (rows - initial_rows) / (k d))."""

    def __init__(self, prior_direction, initial_rows, crossinit_lambda):
        super().__init__(prior_direction, initial_rows)
        self.crossinit_lambda = crossinit_lambda

    def regularizer(self):
        return self.crossinit_lambda * (self.rows - self.initial_rows).square().mean()


class RiemannianSGD(torch.optim.Optimizer):
    """Drives DirectionalTokens.step from an optimizer, so LR schedulers and the fp16 grad scaler work as usual."""

    def __init__(self, tokens, lr):
        self.tokens = list(tokens)
        self.only_if = None  # device flags set per step, one per tokens: an update is kept only where its flag is True
        super().__init__([{"params": [t.direction]} for t in self.tokens], {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for i, (group, tokens) in enumerate(zip(self.param_groups, self.tokens, strict=True)):
            tokens.step(group["lr"], None if self.only_if is None else self.only_if[i])


def inject_learned_tokens(text_encoder, first_token_id, tokens):
    """Make the encoder's input embedding return tokens.embeddings() for ids first_token_id .. first_token_id+k-1:
    every embedding module that holds the input table (an encoder may look its ids up through a second module tied to
    the same table). Only the k learned rows take part in autograd; the table itself is never differentiated."""
    num_vectors = len(tokens.embeddings())

    def hook(module, inputs, output):
        offset = inputs[0] - first_token_id
        is_learned = (offset >= 0) & (offset < num_vectors)
        scale = getattr(module, "embed_scale", 1.0)  # an embedding that scales its rows (by sqrt(d)) scales these too
        learned = (tokens.embeddings() * scale).to(output.dtype)[offset.clamp(0, num_vectors - 1)]
        return torch.where(is_learned.unsqueeze(-1), learned, output)

    table = text_encoder.get_input_embeddings().weight
    modules = [m for m in text_encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is table]
    return [module.register_forward_hook(hook) for module in modules]


def check_prompts_fit(args, tokenize, templates, placeholder_ids, num_vectors, captions=()):
    """Every learned vector must reach the text encoder: refuse a token whose expansion (<tok> <tok>_1 ...) is cut
    off by the encoder's context in a training template or the validation prompt. captions: [(image name, caption)]
    of a run with per-image captions, which must fit whole. tokenize: prompt -> {key: ids}."""
    prompt_token = placeholder_prompt_token(args.placeholder_token, num_vectors)
    prompts = [template.format(prompt_token) for template in templates]
    if args.num_validation_images and args.placeholder_token in validation_prompt(args):
        prompts.append(validation_prompt(args).replace(args.placeholder_token, prompt_token))
    for prompt in prompts:
        length = cut_off_length(tokenize, prompt, placeholder_ids)
        if length:
            raise ValueError(
                f"--num_vectors {num_vectors}: the prompt {prompt!r} does not fit the text encoder's context "
                f"({length} tokens) with every learned vector; use fewer vectors or a shorter prompt."
            )
    source = f"--captions {args.captions}" if args.captions else f"--caption_column {args.caption_column!r}"
    for name, caption in captions:
        prompt = caption.replace("{}", prompt_token)
        length = cut_off_length(tokenize, prompt, placeholder_ids, whole=True)
        if length:
            raise ValueError(f"{source}: the caption of {name} is cut off by the text encoder's context ({length} "
                             f"tokens with the token's {num_vectors} vector(s)); shorten it.")  # fmt: skip


def cut_off_length(tokenize, prompt, placeholder_ids, whole=False):
    """The context length (tokens) if the prompt loses a learned vector to it (whole: or any of its text), else 0.
    A prompt the context cuts off tokenizes the same with a word appended (so one that fills it exactly counts too)."""
    tokenized = tokenize(prompt)
    keys = [key for key in tokenized if key.startswith("input_ids")]
    longer = tokenize(f"{prompt} x") if whole else tokenized
    for key, ids in zip(keys, placeholder_ids, strict=True):
        if not set(ids) <= set(tokenized[key]) or (whole and longer[key] == tokenized[key]):
            return len(tokenized[key])
    return 0


def placeholder_names(placeholder_token, num_vectors):
    """diffusers' names of a k-vector token: <tok>, <tok>_1, ..., <tok>_{k-1}."""
    return [placeholder_token] + [f"{placeholder_token}_{i}" for i in range(1, num_vectors)]


def placeholder_prompt_token(placeholder_token, num_vectors):
    """What the token becomes in a prompt: the expansion diffusers' maybe_convert_prompt makes at inference."""
    return " ".join(placeholder_names(placeholder_token, num_vectors))


def add_placeholder_tokens(tokenizer, placeholder_token, num_vectors, add_tokens=None):
    """Add <tok>, <tok>_1, ... to the tokenizer; return their ids (consecutive, after the pretrained vocabulary)."""
    names = placeholder_names(placeholder_token, num_vectors)
    vocabulary_size = len(tokenizer)
    for name in names:
        pieces = tokenizer.tokenize(name)
        if name in tokenizer.get_vocab() or (
            len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces[0]) < vocabulary_size
        ):
            suggestion = f"<{name.strip('<>')}-1>"
            raise ValueError(f"--placeholder_token {name!r} is already in the vocabulary; choose e.g. {suggestion!r}.")
    if add_tokens is None:
        tokenizer.add_tokens(names)
    else:
        add_tokens(tokenizer, names)  # the family's way
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(vocabulary_size, vocabulary_size + num_vectors)):
        raise ValueError(
            f"--placeholder_token {placeholder_token!r} could not be added as new tokens; choose another string."
        )
    tokenized = tokenizer(
        " ".join(names), add_special_tokens=False
    ).input_ids  # SentencePiece may add a word boundary between them
    if [i for i in tokenized if i in ids] != ids:
        raise ValueError(
            f"--placeholder_token {placeholder_token!r} does not survive tokenization; use e.g. '<my-concept>'."
        )
    return ids


def initializer_token_ids(tokenizer, initializer_token, num_vectors, in_prompt=True):
    """The initializer's token ids, one per learned vector: k = n by default, or one token repeated k times.
    in_prompt: the pieces the word is inside a prompt, after a space (SentencePiece: "▁robot"); else those of the
    bare word ("robot", as the authors' code takes it). A BPE tokenizer gives the same ids either way."""
    ids = tokenizer((" " if in_prompt else "") + initializer_token, add_special_tokens=False).input_ids
    ids = [i for i in ids if tokenizer.decode([i]).strip()]  # a lone word-boundary token carries no meaning
    if (
        tokenizer.unk_token_id is not None
        and tokenizer.unk_token_id in ids
        and tokenizer.unk_token_id != getattr(tokenizer, "eos_token_id", None)
    ):
        raise ValueError(f"--initializer_token {initializer_token!r} is unknown to the tokenizer; use a common word.")
    if not ids:
        raise ValueError(
            f"--initializer_token {initializer_token!r} tokenizes to nothing; use a class word like 'dog'."
        )
    if num_vectors is None or num_vectors == len(ids):
        return ids
    if len(ids) == 1:
        return ids * num_vectors
    raise ValueError(
        f"--initializer_token {initializer_token!r} is {len(ids)} tokens but --num_vectors is {num_vectors}; "
        f"use a one-token initializer or --num_vectors {len(ids)}."
    )


def content_positions(tokenizer, ids, initializer_token, num_vectors):
    """Where the initializer's content tokens sit in its own tokenized prompt ids (not BOS, EOS, padding or a lone
    word-boundary token), one position per learned vector (one token repeated k times, as for the rows)."""
    special = set(tokenizer.all_special_ids)
    positions = [i for i, t in enumerate(ids) if t not in special and tokenizer.decode([t]).strip()]
    if len(positions) == num_vectors:
        return positions
    if len(positions) == 1:
        return positions * num_vectors
    raise ValueError(
        f"--initializer_token {initializer_token!r} is {len(positions)} tokens when encoded alone but {num_vectors} "
        f"inside a prompt; --method crossinit needs one vector per token: use a one-token initializer."
    )


def initializer_hidden_states(text, tokenizer, text_encoder, initializer_token, num_vectors, **forward):
    """CrossInit's start on one text encoder, [k, d] fp32: its last hidden state (after its final norm) at the
    initializer's content positions. text: the initializer alone tokenized as a prompt, {"input_ids", "attention_mask"}
    lists; forward: extra arguments of the encoder's forward."""
    positions = content_positions(tokenizer, text["input_ids"], initializer_token, num_vectors)
    ids, mask = (torch.tensor([text[key]], device=text_encoder.device) for key in ("input_ids", "attention_mask"))
    with torch.no_grad():
        hidden_states = text_encoder(ids, attention_mask=mask, **forward).last_hidden_state
    return hidden_states[0, positions].float()


def make_learned_tokens(args, text_encoder, init_ids, seed, name, vocabulary_size, contextual=None):
    """Build DirectionalTokens (dti), TextualInversionTokens (ti) or CrossInitTokens (crossinit, from the contextual
    vectors [k, d]) for one text encoder from its pretrained table (the first vocabulary_size rows: the tokenizer's
    vocabulary before the new tokens)."""
    table = text_encoder.get_input_embeddings().weight.detach()[:vocabulary_size].float()
    prior = table[init_ids]
    if args.method == "ti":
        return TextualInversionTokens(prior, prior)
    if args.method == "crossinit":
        return CrossInitTokens(prior, contextual, args.crossinit_lambda)
    norms = vocabulary_norms(table)
    norm_scale = resolve_norm_scale(norms, args.token_scale)
    if args.init_method == "token":
        initial = prior
    elif args.init_method == "mean":
        initial = table.mean(0, keepdim=True).expand_as(prior)
    else:
        generator = torch.Generator().manual_seed(stable_seed(seed, "init", name))
        initial = torch.randn(prior.shape, generator=generator)
    beta = args.beta if args.optimizer == "rsgd" else 0.0
    return DirectionalTokens(prior, initial, norm_scale, kappa=args.kappa, beta=beta)


def add_concept_tokens(args, tokenizers, in_prompt=True, add_tokens=None):
    """Add the placeholder to every tokenizer. Returns (initializer ids, placeholder ids) per tokenizer."""
    init_ids = [initializer_token_ids(t, args.initializer_token, args.num_vectors, in_prompt) for t in tokenizers]
    if len({len(ids) for ids in init_ids}) > 1:
        raise ValueError(f"--initializer_token {args.initializer_token!r} tokenizes differently in the tokenizers.")
    k = len(init_ids[0])
    placeholder_ids = [add_placeholder_tokens(t, args.placeholder_token, k, add_tokens) for t in tokenizers]
    return init_ids, placeholder_ids


def attach_learned_tokens(
    args, names, text_encoders, init_ids, placeholder_ids, seed, contextual=None, vocabulary_sizes=None
):
    """Build the learned tokens of each encoder (names: their component names) from its pretrained table (crossinit:
    from the contextual vectors by encoder), then give the encoder rows and a hook that feeds it the learned vectors.
    vocabulary_sizes: each tokenizer's size before any concept's tokens were added (default: the first new id).
    Returns (learned tokens by encoder, vocabulary mean norm by encoder)."""
    learned, vocabulary_mean_norms = torch.nn.ModuleDict(), {}
    sizes = vocabulary_sizes or [new_ids[0] for new_ids in placeholder_ids]
    encoders = zip(names, text_encoders, init_ids, placeholder_ids, sizes, strict=True)
    for name, text_encoder, ids, new_ids, size in encoders:
        table = text_encoder.get_input_embeddings().weight
        vocabulary_mean_norms[name] = vocabulary_norms(table[:size]).mean().item()
        start = contextual[name] if contextual else None
        learned[name] = make_learned_tokens(args, text_encoder, ids, seed, name, size, start)
        rows = len(table)
        if rows <= new_ids[-1]:  # a table padded beyond the tokenizer already has rows for the new ids
            text_encoder.resize_token_embeddings(new_ids[-1] + 1, mean_resizing=False)
        with torch.no_grad():  # the new rows matter only to code that reads the table; keep them meaningful
            table = text_encoder.get_input_embeddings().weight
            table[rows : new_ids[0]] = 0  # new rows of ids no token uses (a tokenizer larger than its table)
            table[new_ids] = learned[name].embeddings().to(table.dtype)
        inject_learned_tokens(text_encoder, new_ids[0], learned[name])
    return learned, vocabulary_mean_norms

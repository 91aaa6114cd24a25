"""The training step: the frozen models, the optimizer (RSGD, or AdamW for the baselines and a LoRA), the batches,
the data gradient, the finite check, the update and the step logs."""

import importlib.util
import math
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from dti.core.constants import DEFAULT_LORA_LEARNING_RATE, DEFAULT_LORA_TARGETS, LORA_WEIGHT_NAME, logger
from dti.core.data import StreamSampler, collate, stable_seed
from dti.core.dti import CrossInitTokens, RiemannianSGD


def check_lora_args(args):
    """The --lora_* checks that need no model; fills in --lora_alpha."""
    if args.lora_rank < 0:
        raise ValueError("--lora_rank must be zero (no LoRA) or positive.")
    if args.lora_rank and args.concepts_list:
        raise ValueError(
            "--lora_rank with --concepts_list: a LoRA belongs to one concept; train a LoRA in a run of its own."
        )
    if not args.lora_rank:
        defaults = {"--lora_alpha": (args.lora_alpha, None), "--lora_start_step": (args.lora_start_step, 0),
                    "--lora_learning_rate": (args.lora_learning_rate, DEFAULT_LORA_LEARNING_RATE),
                    "--lora_target_modules": (args.lora_target_modules, DEFAULT_LORA_TARGETS),
                    "--dco_beta": (args.dco_beta, 0.0)}  # fmt: skip
        for flag, (value, default) in defaults.items():
            if value != default:
                raise ValueError(f"{flag} applies to a LoRA only: add --lora_rank (e.g. 16) or drop {flag}.")
        return args
    args.lora_alpha = float(args.lora_rank) if args.lora_alpha is None else args.lora_alpha
    checks = [
        (math.isfinite(args.lora_alpha) and args.lora_alpha > 0, "--lora_alpha must be a positive number"),
        (
            math.isfinite(args.lora_learning_rate) and args.lora_learning_rate > 0,
            "--lora_learning_rate must be a positive number",
        ),
        (
            0 <= args.lora_start_step < args.max_train_steps,
            f"--lora_start_step must be in [0, --max_train_steps {args.max_train_steps}) for the LoRA to train",
        ),
        (lora_targets(args), "--lora_target_modules must name at least one layer, e.g. to_q,to_k,to_v,to_out.0"),
        (math.isfinite(args.dco_beta) and args.dco_beta >= 0, "--dco_beta must be zero (no DCO) or positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message}.")
    if importlib.util.find_spec("peft") is None:  # imported where the LoRA is made, after the library noise is quieted
        raise ValueError("--lora_rank needs peft: pip install peft.")
    return args


def lora_targets(args):
    return [name.strip() for name in args.lora_target_modules.split(",") if name.strip()]


def check_lora_targets(denoiser, targets):
    """Every target must match a linear layer of the denoiser (peft's rule: the layer's name ends with it)."""
    linear = [name for name, module in denoiser.named_modules() if isinstance(module, torch.nn.Linear)]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            short = sorted({".".join(n.split(".")[-2 if n[-1].isdigit() else -1 :]) for n in linear})
            raise ValueError(
                f"--lora_target_modules: no linear layer of the {type(denoiser).__name__} is named {target!r}; "
                f"some that exist: {', '.join(short[:12])}."
            )


def lora_description(args):
    dco = f", DCO loss beta {args.dco_beta:g}" if args.dco_beta else ""
    return f"rank {args.lora_rank}, alpha {args.lora_alpha:g}, targets {','.join(lora_targets(args))}{dco}"


def lora_metadata(args):
    """What the output files record about the LoRA (nothing without one)."""
    if not args.lora_rank:
        return {}
    return {"lora_rank": str(args.lora_rank), "lora_alpha": repr(args.lora_alpha),
            "lora_learning_rate": repr(args.lora_learning_rate), "lora_start_step": str(args.lora_start_step),
            "lora_target_modules": ",".join(lora_targets(args)),
            **({"dco_beta": repr(args.dco_beta)} if args.dco_beta else {})}  # fmt: skip


class DenoiserLoRA:
    """A LoRA on the denoiser's linear layers, added through peft as diffusers' LoRA scripts add it: output
    W x + (alpha / rank) B A x, B [out, rank] starts at zero (the denoiser is unchanged at step 0), A [rank, in] is
    drawn from the run's seed (every process starts from the same LoRA). The parameters stay fp32 under fp16/bf16.
    state_dict / load_state_dict let accelerate checkpoint it."""

    def __init__(self, denoiser, args, seed, prefix):
        from peft import LoraConfig

        targets = lora_targets(args)
        check_lora_targets(denoiser, targets)
        self.rank, self.alpha, self.prefix, self.denoiser = args.lora_rank, args.lora_alpha, prefix, denoiser
        self.config = denoiser.config  # what other layouts of the LoRA name its layers by
        self.start_step = args.lora_start_step
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian", target_modules=targets)
        with torch.random.fork_rng(devices=[]):  # peft draws A on the CPU before moving it to the layer's device
            torch.manual_seed(stable_seed(seed, "lora"))
            denoiser.add_adapter(config)
        self.weights = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
        for parameter in self.weights.values():
            parameter.data = parameter.data.float()

    def parameters(self):
        return list(self.weights.values())

    def trains_at(self, step):
        """Whether the LoRA trains in this step (from --lora_start_step on); before, it takes no gradients at all."""
        trains = step >= self.start_step
        for parameter in self.weights.values():
            parameter.requires_grad_(trains)
        return trains

    @contextmanager
    def turned_off(self):
        """The denoiser without its LoRA: every LoRA layer at scale 0, as diffusers' `cross_attention_kwargs={"scale":
        0.0}` sets it, then back to alpha / rank (requires_grad is left alone)."""
        from diffusers.utils import scale_lora_layers, unscale_lora_layers

        scale_lora_layers(self.denoiser, 0.0)
        try:
            yield
        finally:
            unscale_lora_layers(self.denoiser, 0.0)

    def state_dict(self):
        return {name: p.detach().cpu().clone() for name, p in self.weights.items()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for name, parameter in self.weights.items():
                parameter.copy_(state[name])

    def layers(self):
        """{"<layer>": (down [rank, in], up [out, rank])}: each layer's LoRA as trained (A and B, fp32 on the CPU),
        without the alpha / rank scale; <layer> is the layer's path in the denoiser."""
        pairs = {}
        for name, parameter in self.weights.items():  # "<layer>.lora_A.default.weight"
            layer, kind = name.split(".lora_", 1)
            pairs.setdefault(layer, {})[kind[0]] = parameter.detach().float().cpu().contiguous()
        return {layer: (pair["A"], pair["B"]) for layer, pair in pairs.items()}

    def diffusers_state_dict(self):
        """{"<prefix>.<layer>.lora_A.weight": [rank, in], "...lora_B.weight": [out, rank]}: the names
        load_lora_weights reads. B carries alpha / rank, so the file means the same at scale 1 in every loader."""
        scale = self.alpha / self.rank
        tensors = {}
        for layer, (down, up) in self.layers().items():
            tensors[f"{self.prefix}.{layer}.lora_A.weight"] = down
            tensors[f"{self.prefix}.{layer}.lora_B.weight"] = up * scale if scale != 1 else up
        return tensors

    def files(self, output_dir, suffix, metadata):
        """{path: writer} of diffusers' file of the LoRA, for write_all_atomically."""
        name = LORA_WEIGHT_NAME.replace(".safetensors", f"{suffix}.safetensors")
        tensors = self.diffusers_state_dict()
        return {output_dir / name: partial(save_file, tensors, metadata=metadata | {"format": "pt"})}


class DCOLoss:
    """The DCO loss (Direct Consistency Optimization), as the DTI authors train DTI + LoRA with it. Per micro-batch:

        L = -log sigmoid(-beta (l_model - l_ref))

    l_model: the batch-mean denoising loss of the denoiser with its LoRA; l_ref: the same loss of the denoiser without
    it (LoRA scale 0, no gradient) on the same noisy latents, timesteps and prompts (the family's loss keys every draw
    by seed and stream position, so a second call draws them again; it encodes the prompts again, without gradient).
    dL = beta sigmoid(beta (l_model - l_ref)) dl_model: beta / 2 times the plain gradient while the two losses are
    equal (at the start, LoRA B = 0), fading once l_model is a few 1 / beta below l_ref, which keeps the LoRA close
    to the frozen denoiser. As beta -> 0, L = log 2 + beta / 2 (l_model - l_ref) + O(beta^2). Called as the family's
    loss: returns L for each sample of the batch, [B] (one value, so its mean is L); each micro-batch's
    [l_model, l_ref] waits in `terms` for the step logs."""

    keys = ("loss_model", "loss_reference")

    def __init__(self, loss_fn, lora, beta):
        self.loss_fn, self.lora, self.beta, self.terms = loss_fn, lora, beta, []

    def __call__(self, batch, latent_mean, latent_std):
        model = self.loss_fn(batch, latent_mean, latent_std).mean()
        with torch.no_grad(), self.lora.turned_off():
            reference = self.loss_fn(batch, latent_mean, latent_std).mean()
        self.terms.append(torch.stack([model.detach(), reference]))
        return (-F.logsigmoid(-self.beta * (model - reference))).expand(len(batch["position"]))

    def step_terms(self, accelerator):
        """[l_model, l_ref] of the step, a device tensor [2]: averaged over its micro-batches and processes."""
        terms, self.terms = torch.stack(self.terms).mean(0), []
        return accelerator.reduce(terms, reduction="mean") if accelerator.num_processes > 1 else terms


class TokenAndLoRAOptimizer(torch.optim.Optimizer):
    """The token's optimizer and the LoRA's AdamW stepped as one optimizer: accelerate's fp16 grad scaler unscales
    and checks both in one step, and one lr schedule drives both (each group at its own rate). The LoRA steps only
    when `lora_trains` is set (from --lora_start_step on, and in finite steps)."""

    def __init__(self, token_optimizer, lora_optimizer):
        self.token_optimizer, self.lora_optimizer, self.lora_trains = token_optimizer, lora_optimizer, False
        super().__init__(token_optimizer.param_groups + lora_optimizer.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        self.token_optimizer.step()
        if self.lora_trains:
            self.lora_optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.token_optimizer.zero_grad(set_to_none=set_to_none)
        self.lora_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"token": self.token_optimizer.state_dict(), "lora": self.lora_optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        self.token_optimizer.load_state_dict(state_dict["token"])
        self.lora_optimizer.load_state_dict(state_dict["lora"])


def freeze(models, accelerator, weight_dtype, gradient_checkpointing, fp32=()):
    """Frozen models on the device in the mixed-precision dtype, except those named in fp32 (and the VAE under fp16,
    where it overflows)."""
    for name, module in models.items():
        module.requires_grad_(False)
        dtype = torch.float32 if name in fp32 or (name == "vae" and weight_dtype == torch.float16) else weight_dtype
        # diffusers' .to(dtype) warns about fp32 modules even when a model has none: cast those models as torch does
        cast = module.to if getattr(module, "_keep_in_fp32_modules", None) else partial(torch.nn.Module.to, module)
        cast(accelerator.device, dtype=dtype)
        if gradient_checkpointing and name != "vae":
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
                module.enable_gradient_checkpointing()
            else:  # transformers models (activation_checkpointing_enable is the name from transformers 5 on)
                (getattr(module, "activation_checkpointing_enable", None) or module.gradient_checkpointing_enable)()
            module.train()  # checkpointing is active in train mode only; these models have no dropout


def quantize_8bit(model):
    """Swap every nn.Linear of a frozen model for bitsandbytes' LLM.int8 layer (int8 weights, outlier features in
    16 bit); the weights are quantized when the model moves to its device. Gradients still reach the layer inputs,
    so the learned rows get theirs. Returns the number of layers swapped."""
    import bitsandbytes as bnb

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, device="meta")  # fmt: skip
            layer.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            swapped += 1
    return swapped


def make_optimizer(args, tokens, lora=None):
    """One optimizer over every concept's learned tokens (a list of token modules): RSGD and AdamW treat each
    parameter on its own, so each concept is updated as its own run would update it. With a LoRA, AdamW for it too,
    stepped with the tokens' optimizer as one."""
    adamw = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes.") from error
        adamw = bnb.optim.AdamW8bit
    adamw = partial(adamw, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                    eps=args.adam_epsilon)  # fmt: skip
    if args.method == "dti" and args.optimizer == "rsgd":
        token_optimizer = RiemannianSGD(tokens, lr=args.learning_rate)
    else:
        token_optimizer = adamw([p for t in tokens for p in t.parameters()], lr=args.learning_rate)
    if lora is None:
        return token_optimizer
    return TokenAndLoRAOptimizer(token_optimizer, adamw(lora.parameters(), lr=args.lora_learning_rate))


def latent_source(args, dataset, vae, posterior):
    """batch -> (latent mean, latent std), fp32: from a cache of every image's latents when that is exact
    (--cache_latents), else from the VAE each step. posterior: the family's (vae, pixels) -> (mean, std)."""
    if args.cache_latents and dataset.crops_are_fixed:
        cache = LatentCache(dataset, partial(posterior, vae))
        dataset.with_pixels = False  # no image work per sample any more
        logger.info(f"Cached the latents of {len(dataset.images)} images.")
        return cache
    if args.cache_latents:
        logger.warning("--cache_latents needs --center_crop or square images at --resolution: encoding each step.")
    return lambda batch: posterior(vae, batch["pixel_values"])


def batch_stream(args, dataset, accelerator, global_step):
    """This process's endless iterator of batches, from the stream position of global_step."""
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    sampler = StreamSampler(
        global_step * samples_per_step, args.train_batch_size, accelerator.process_index, accelerator.num_processes
    )
    loader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    return iter(loader)


def data_gradient(concepts, loss_fn, accelerator, accumulation_steps, concepts_per_step=None, lora=None):
    """The data loss's gradient over one global batch of every concept, left in the learned tokens' (and the LoRA's)
    .grad: accumulated over micro-batches, averaged over processes; crossinit adds its regularizer's gradient (once per
    step: 1/accumulation per micro-batch). Each forward and backward takes the micro-batches of concepts_per_step
    concepts (default: all) as one batch; the loss is the sum of the concepts' mean losses, so each concept gets
    the gradient of its own run (a sample's loss depends on its own concept's tokens only). Returns the step's data
    loss of each concept, a device tensor [K] (no host sync)."""
    step_loss = torch.zeros(len(concepts), device=accelerator.device)
    group_size = concepts_per_step or len(concepts)
    for _ in range(accumulation_steps):
        for first in range(0, len(concepts), group_size):
            group = concepts[first : first + group_size]
            batches = [next(c.batches) for c in group]
            latents = [c.latents(batch) for c, batch in zip(group, batches, strict=True)]
            losses = loss_fn(concatenate_batches(batches), *(torch.cat(parts) for parts in zip(*latents, strict=True)))
            losses = torch.stack([part.mean() for part in losses.split([len(b["position"]) for b in batches])])
            penalty = sum(t.regularizer() for c in group for t in c.learned.values() if isinstance(t, CrossInitTokens))
            accelerator.backward((losses.sum() + penalty) / accumulation_steps)
            step_loss[first : first + len(group)] += losses.detach() / accumulation_steps
    if accelerator.num_processes > 1:
        for parameter in (p for c in concepts for p in c.learned.parameters()):
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")
        grads = [p.grad for p in lora.parameters() if p.grad is not None] if lora is not None else []
        if grads:  # a training LoRA: one flat all-reduce for its many small tensors
            flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            for grad, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(mean.view_as(grad))
        step_loss = accelerator.reduce(step_loss, reduction="mean")
    return step_loss


def concatenate_batches(batches):
    """One batch of several (the concepts' micro-batches, in order): tensors joined on the batch axis."""

    def join(values):
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            return {key: join([v[key] for v in values]) for key in values[0]}
        if isinstance(values[0], list):
            return [item for v in values for item in v]
        return torch.cat(values)

    return batches[0] if len(batches) == 1 else {key: join([b[key] for b in batches]) for key in batches[0]}


def apply_update(optimizer, concepts, finite, adamw_on_sphere, lora_trains=False):
    """The update of each concept whose flag in `finite` [K] holds: RSGD masks it on the device (no host sync); the
    AdamW modes (baselines) read the flags and drop the other concepts' gradients, so AdamW leaves those alone. AdamW
    on the sphere adds the prior's gradient and retracts after the step (the ablation). A LoRA steps only when
    lora_trains (from --lora_start_step on) and the step is finite (a host read)."""
    rsgd = getattr(optimizer, "optimizer", optimizer)
    if isinstance(rsgd, TokenAndLoRAOptimizer):
        rsgd.lora_trains = lora_trains and bool(finite.all().item())
        rsgd = rsgd.token_optimizer
    if isinstance(rsgd, RiemannianSGD):
        rsgd.only_if = finite.repeat_interleave(len(concepts[0].learned))  # one flag per tokens, as rsgd.tokens
        optimizer.step()
    else:
        flags = finite.tolist()
        for concept, ok in zip(concepts, flags, strict=True):
            if not ok:
                concept.learned.zero_grad(set_to_none=True)
        if any(flags):
            kept = [t for c, ok in zip(concepts, flags, strict=True) if ok for t in c.learned.values()]
            sphere = kept if adamw_on_sphere else []  # the ablation: the prior's gradient, then back to the sphere
            for tokens in sphere:
                tokens.add_prior_gradient()
            optimizer.step()
            for tokens in sphere:
                tokens.retract()
    optimizer.zero_grad(set_to_none=True)


class NonFiniteGuard:
    """Skips an update whose loss or gradient is not finite (the directions stay as they were); after
    --max_nonfinite_steps such steps in a row, the run stops. The check stays on the device; the flags reach the
    host with the step logs (every --logging_steps), where skipped steps are reported."""

    def __init__(self, max_in_a_row, label=""):
        self.max_in_a_row, self.in_a_row, self.longest, self.skipped, self.last = max_in_a_row, 0, 0, 0, None
        self.label = label  # " of <tok>" in a --concepts_list run: each concept has its own guard

    @staticmethod
    def finite(step_losses, concepts, check_gradients=True, lora=None):
        """A bool tensor [K] on the device: each concept's loss and gradients are finite (with a LoRA, which a run of
        one concept only can have, also the LoRA's gradients). step_losses: [K]."""
        flags = []
        for step_loss, concept in zip(step_losses, concepts, strict=True):
            values = [torch.isfinite(step_loss)]
            if check_gradients:  # under fp16 the grad scaler handles overflowing gradients itself
                parameters = [*concept.learned.parameters(), *(lora.parameters() if lora else [])]
                values += [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
            flags.append(torch.stack(values).all())
        return torch.stack(flags)

    def record(self, step, finite):
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row, self.skipped, self.last = self.in_a_row + 1, self.skipped + 1, step
        self.longest = max(self.longest, self.in_a_row)
        logger.warning(
            f"Step {step}: non-finite loss or gradient{self.label}, update skipped ({self.in_a_row} in a row)."
        )

    @property
    def exhausted(self):
        return self.longest >= self.max_in_a_row


class StepLogs:
    """Per step: lr and, per concept, its loss, its finite flag and, per encoder, the norm, cosine to the prior and
    degrees turned (keys prefixed by the concept's name in a --concepts_list run). Kept on the device and read in one
    host sync every --logging_steps, so the loop never waits for the GPU."""

    def __init__(self, concepts, extra_keys=()):
        self.concepts, self.pending, self.extra_keys = concepts, [], extra_keys  # extra_keys: e.g. DCOLoss.keys

    def add(self, step, step_loss, lr, finite, extra=None):
        """extra: a device tensor of the values of extra_keys (a run of one concept's)."""
        stats = [step_loss.float(), finite.float()] + [t.stats() for c in self.concepts for t in c.learned.values()]
        self.pending.append((step, lr, torch.cat(stats + ([extra.float()] if self.extra_keys else []))))

    def read(self):
        """[(step, finite flag of each concept, logs)] of the steps added since the last read."""
        if not self.pending:
            return []
        rows, k = torch.stack([values for _, _, values in self.pending]).tolist(), len(self.concepts)
        names = [(c.prefix, name) for c in self.concepts for name in c.learned]
        records = []
        for (step, lr, _), row in zip(self.pending, rows, strict=True):
            logs = {"lr": lr} | {f"{c.prefix}loss": loss for c, loss in zip(self.concepts, row[:k], strict=True)}
            for i, (prefix, name) in enumerate(names):
                norm, cos_prior, angle = row[2 * k + 3 * i : 2 * k + 3 * i + 3]
                logs |= {f"{prefix}{name}/norm": norm, f"{prefix}{name}/cos_prior": cos_prior,
                         f"{prefix}{name}/angle_deg": angle}  # fmt: skip
            extra = row[2 * k + 3 * len(names) :]
            logs |= {f"{self.concepts[0].prefix}{key}": v for key, v in zip(self.extra_keys, extra, strict=True)}
            records.append((step, [flag > 0 for flag in row[k : 2 * k]], logs))
        self.pending = []
        return records


def report_steps(step_logs, concepts, accelerator, progress):
    """Read the pending step logs (one host sync): log them, account skipped steps, show the last in the bar (the
    concepts' mean loss and angle)."""
    records = step_logs.read()
    for step, flags, logs in records:
        for concept, finite in zip(concepts, flags, strict=True):
            concept.guard.record(step, finite)
        accelerator.log(logs, step=step)
    if records:  # the bar shows the last logging step's values (they are read every --logging_steps)
        step, _, logs = records[-1]
        loss = sum(logs[f"{c.prefix}loss"] for c in concepts) / len(concepts)
        angle = sum(logs[f"{c.prefix}text_encoder/angle_deg"] for c in concepts) / len(concepts)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{logs['lr']:.3g}", angle=f"{angle:.2f}", step=step)


class LatentCache:
    """The VAE posteriors (encode: pixels -> mean, std) of every training image (and of its mirror image with
    --random_flip), encoded once.

    Exact only when each image always gets the same crop (DTIDataset.crops_are_fixed); the flip is cached as a pair.
    """

    def __init__(self, dataset, encode):
        means, stds = [], []
        for index, image in enumerate(dataset.images):
            top, left = (image.height - dataset.resolution) // 2, (image.width - dataset.resolution) // 2
            flips = (False, True) if dataset.random_flip else (False,)
            mean, std = encode(torch.stack([dataset.pixels(index, top, left, f) for f in flips]))
            means.append(mean)
            stds.append(std)
        self.mean, self.std = torch.stack(means), torch.stack(stds)  # [N, flips, C, h, w]

    def __call__(self, batch):
        index, flip = batch["image_index"].to(self.mean.device), batch["flip"].to(self.mean.device)
        return self.mean[index, flip], self.std[index, flip]

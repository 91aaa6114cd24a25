"""Main: the run's concepts, its setup (checks, tokens, data, models, the learned tokens, the optimizer, resume), one
training step, and the loop."""

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from dti.core.arguments import check_inputs, ignored_flags, read_concepts, validate_args
from dti.core.checkpoints import find_checkpoint, resume, run_identity, save_checkpoint
from dti.core.constants import MIN_TRAINING_IMAGES, OBJECT_TEMPLATES, STYLE_TEMPLATES, logger
from dti.core.data import DTIDataset, load_concept_data, validation_prompt
from dti.core.dti import add_concept_tokens, attach_learned_tokens, check_prompts_fit, placeholder_prompt_token
from dti.core.family import Models
from dti.core.hub import check_hub_model, create_hub_repo, hub_repo_id, hub_token, push_to_hub, save_model_card
from dti.core.plumbing import (
    StoppedBySignal,
    StopRequest,
    TrainingStopped,
    check_output_dir,
    check_trackers,
    claim_output_dir,
    concept_name,
    make_accelerator,
    resolve_seed,
    start_trackers,
)
from dti.core.saving import check_finite, log_validation, save_all_embeddings
from dti.core.step import (
    DCOLoss,
    DenoiserLoRA,
    NonFiniteGuard,
    StepLogs,
    apply_update,
    batch_stream,
    data_gradient,
    freeze,
    latent_source,
    make_optimizer,
    quantize_8bit,
    report_steps,
)


@dataclass
class Concept:
    """One concept of a run. Known before any model loads: its flags, token ids per tokenizer (of the initializer and
    of the new tokens), images and templates, and the images' captions (None: the templates); prefix names it in logs
    ("" for a run of one concept). Set once the models are there: its learned tokens by text encoder and the
    vocabulary's mean norms; then its data stream (dataset, latents: batch -> posterior, batches) and its non-finite
    guard."""

    args: object
    init_ids: list
    placeholder_ids: list
    images: list
    num_vectors: int
    templates: list
    prefix: str
    captions: list = None
    learned: torch.nn.ModuleDict = None
    vocabulary_mean_norms: dict = None
    dataset: DTIDataset = None
    latents: object = None
    batches: object = None
    guard: NonFiniteGuard = None


def prepare_concepts(concept_args, tokenizers, fit, in_prompt=True, add_tokens=None):
    """Per concept, before any model loads: its tokens added to every tokenizer (after the previous concepts'), its
    prompts checked against the context (fit: prompt -> {key: ids}), its images read. Returns one Concept each; an
    error names its --concepts_list entry."""
    concepts = []
    for args in concept_args:
        try:
            init_ids, placeholder_ids = add_concept_tokens(args, tokenizers, in_prompt, add_tokens)
            num_vectors = len(init_ids[0])
            templates = STYLE_TEMPLATES if args.learnable_property == "style" else OBJECT_TEMPLATES
            images, captions = load_concept_data(args)
            if captions is None:
                check_prompts_fit(args, fit, templates, placeholder_ids, num_vectors)
            else:  # the templates are not used: the captions must fit, each whole
                named = [(Path(str(name)).name, text) for (name, _), text in zip(images, captions, strict=True)]
                check_prompts_fit(args, fit, [], placeholder_ids, num_vectors, named)
        except ValueError as error:
            if args.concept_index is None:
                raise
            raise ValueError(
                f"--concepts_list entry {args.concept_index} ({args.placeholder_token}): {error}"
            ) from None
        if len(images) < MIN_TRAINING_IMAGES:
            of = "" if args.concept_index is None else f" of {args.placeholder_token}"
            logger.warning(f"Only {len(images)} training image(s){of}: {MIN_TRAINING_IMAGES} to 6 images of the "
                           "concept (other backgrounds, angles, light) learn it more reliably.")  # fmt: skip
        if args.num_validation_images and args.placeholder_token not in validation_prompt(args):
            logger.warning(
                f"--validation_prompt {args.validation_prompt!r} has neither '{{}}' nor the placeholder token."
            )
        prefix = "" if args.concept_index is None else f"{concept_name(args.placeholder_token)}/"
        concepts.append(Concept(args, init_ids, placeholder_ids, images, num_vectors, templates, prefix, captions))
    return concepts


def claim_output_dirs(args, concepts, accelerator):
    """Check and claim --output_dir (checkpoints) and every concept's output folder (the same one for one concept)."""
    folders = {os.path.abspath(a.output_dir): a for a in (args, *(c.args for c in concepts))}
    for folder_args in folders.values():
        check_output_dir(folder_args)
    for folder_args in folders.values():
        claim_output_dir(folder_args, accelerator)


def pretrained_vocabulary(vocabulary_sizes, text_encoders, family):
    """The tokenizers' sizes, cut to the rows each text encoder's table has: ids a tokenizer has beyond its table (a
    special token added to the tokenizer file) have no pretrained row, so they stay out of m* and get zero rows."""
    sizes = []
    for name, size, encoder in zip(family.text_encoders, vocabulary_sizes, text_encoders, strict=True):
        rows = encoder.get_input_embeddings().num_embeddings
        if size > rows:
            logger.warning(f"The {name} tokenizer has {size - rows} id(s) without a row in the text encoder's table "
                           f"({rows}-{size - 1}): they get zero rows and are left out of m*.")  # fmt: skip
        sizes.append(min(size, rows))
    return sizes


def attach_concepts(concepts, tokenizers, text_encoders, seed, vocabulary_sizes, family):
    """Give each concept its learned tokens on the text encoders (crossinit: started at the encoders' output for its
    initializer), from the pretrained tables: the first vocabulary_sizes rows."""
    for c in concepts:
        crossinit = c.args.method == "crossinit"
        start = family.encode_initializer(c.args, tokenizers, text_encoders, c.num_vectors) if crossinit else None
        c.learned, c.vocabulary_mean_norms = attach_learned_tokens(
            c.args, family.text_encoders, text_encoders, c.init_ids, c.placeholder_ids, seed, start, vocabulary_sizes
        )


def start_streams(concepts, args, tokenize, vae, accelerator, global_step, seed, family):
    """Each concept's data set, latent source and batch stream from global_step, as its own run would have them (the
    draws are keyed by seed and stream position), and its own non-finite guard."""
    for c in concepts:
        prompt_token = placeholder_prompt_token(c.args.placeholder_token, c.num_vectors)
        c.dataset = DTIDataset(c.images, prompt_token, tokenize, args.resolution, args.center_crop, args.random_flip,
                               c.templates, args.repeats, seed, c.captions, args.image_resampling)  # fmt: skip
        c.latents = latent_source(args, c.dataset, vae, family.latent_posterior)
        c.batches = batch_stream(args, c.dataset, accelerator, global_step)
        c.guard = NonFiniteGuard(args.max_nonfinite_steps, f" of {c.args.placeholder_token}" if c.prefix else "")


def describe_concepts(concepts, args):
    """The concepts in one line for the start-of-training banner."""
    return "; ".join(
        f"{c.args.placeholder_token} ({len(c.images)} images{' with captions' if c.captions else ''} x "
        f"{args.repeats} repeats, {c.num_vectors} vector(s) "
        f"from {c.args.initializer_token!r})"
        for c in concepts
    )


class RunPhases:
    """Where a run's wall time goes: load (all before the first step), compile (the first step, under --compile),
    training (the steps), validation, saving and upload. The clock runs in one phase at a time: `switch` moves it
    on, `with phases("saving"):` runs a block in another one and comes back. The device finishes its queued work at
    both ends of a block (once per block, never inside a step), so the work counts for the phase that queued it."""

    def __init__(self):
        self.seconds, self.counts, self.steps = {}, {}, 0  # counts: blocks per phase
        self.phase, self.device = "load", None
        self.mark = self.started = time.monotonic()

    def synchronize(self):
        device_module = getattr(torch, self.device.type, None) if self.device is not None else None
        if hasattr(device_module, "synchronize"):
            device_module.synchronize()

    def switch(self, phase):
        now = time.monotonic()
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.mark
        self.phase, self.mark = phase, now

    def start_steps(self, device, compiles):
        """The first step is next: it compiles the models under --compile."""
        self.device = device
        self.synchronize()  # the models' copies to the device are part of loading
        self.switch("compile" if compiles else "training")

    def step_done(self):
        if self.phase == "compile":
            self.synchronize()
            self.switch("training")
        else:
            self.steps += 1

    def end_steps(self):
        """The last step is done: what follows (the end-of-run saves, validation, upload) is timed by its blocks."""
        self.synchronize()
        self.switch("end")

    @contextmanager
    def __call__(self, phase):
        outer = self.phase
        self.synchronize()
        self.switch(phase)
        try:
            yield
        finally:
            self.synchronize()
            self.switch(outer)
            self.counts[phase] = self.counts.get(phase, 0) + 1

    def total(self):
        return time.monotonic() - self.started

    def summary(self):
        """The phases in one sentence: 'Load 12.0s, compile 31.2s (the first step), 399 steps 52.0s (0.13 s/step),
        8 validations 20.1s, saving 1.2s, upload 3.0s.' (a phase that did not happen is left out)."""
        parts = [f"Load {duration(self.seconds.get('load', 0.0))}"]
        if "compile" in self.seconds:
            parts.append(f"compile {duration(self.seconds['compile'])} (the first step)")
        if self.steps:
            training = self.seconds.get("training", 0.0)
            parts.append(f"{counted(self.steps, 'step')} {duration(training)} ({training / self.steps:.3g} s/step)")
        if "validation" in self.counts:
            parts.append(f"{counted(self.counts['validation'], 'validation')} {duration(self.seconds['validation'])}")
        parts += [f"{phase} {duration(self.seconds[phase])}" for phase in ("saving", "upload") if phase in self.counts]
        return ", ".join(parts) + "."

    def tracker_values(self):
        """The phases for the tracker, in seconds (time/<phase>_s) and time/s_per_step."""
        values = {f"time/{phase}_s": seconds for phase, seconds in self.seconds.items() if phase != "end"}
        values["time/total_s"] = self.total()
        if self.steps:
            values["time/s_per_step"] = self.seconds.get("training", 0.0) / self.steps
        return values


def counted(count, noun):
    return f"{count} {noun}{'s' * (count != 1)}"


def duration(seconds):
    """12.3s, 1m05s or 2h03m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


@dataclass
class Run:
    """Everything the loop works with, made by `setup`."""

    args: object
    family: object
    accelerator: object
    concepts: list
    tokenizers: list
    models: Models
    components: dict
    lora: DenoiserLoRA
    optimizer: object
    lr_scheduler: object
    loss_fn: object
    logs: StepLogs
    identity: dict
    seed: int
    step: int
    hub_token: str = None
    phases: RunPhases = field(default_factory=RunPhases)


def check_run(args, family):
    """Every check that needs no model, before anything loads. Returns the concepts' flags."""
    validate_args(args, family)
    family.validate(args)
    concept_args = [family.validate_concept(c) for c in read_concepts(args)]  # one, or one per --concepts_list entry
    check_inputs(args)
    check_trackers(args.report_to)
    return concept_args


def compiled(models, family, backend):
    """--compile: the models as training calls them, the denoiser (and the text encoders, if the family's take text
    of a fixed length) compiled; validation keeps the plain modules."""
    text_encoders = models.text_encoders
    if family.compile_text_encoders:
        text_encoders = [torch.compile(model, backend=backend) for model in text_encoders]
    return replace(models, denoiser=torch.compile(models.denoiser, backend=backend), text_encoders=text_encoders)


def setup(args, family):
    """From the flags to the first step: checks, tokens and data (cheap errors first), the models, the learned
    tokens in fp32 (every other weight frozen in the mixed-precision dtype), the optimizer, the resumed state."""
    phases = RunPhases()  # the run's clock starts: loading
    concept_args = check_run(args, family)
    token = hub_token(args)
    accelerator = make_accelerator(args)
    check_hub_model("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, args.revision)
    for warning in ignored_flags(args):
        logger.warning(warning)
    seed = resolve_seed(args, accelerator)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # Tokens and data first: their errors are cheap to find, the models are not.
    tokenizers, model_index = family.load_tokenizers(args)
    vocabulary_sizes = [len(t) for t in tokenizers]
    tokenize, fit = family.prompt_tokenizers(args, tokenizers)
    in_prompt = family.initializer_in_prompt(args)
    concepts = prepare_concepts(concept_args, tokenizers, fit, in_prompt, family.add_tokens)
    claim_output_dirs(args, concepts, accelerator)
    identity = run_identity(args, concepts) | family.identity(args)
    checkpoint = find_checkpoint(args, identity) if args.resume_from_checkpoint else None
    models = family.load_models(args, model_index, tokenizers)
    family.check_models(args, models)
    if args.scale_lr:
        scale = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
        args.learning_rate, args.lora_learning_rate = args.learning_rate * scale, args.lora_learning_rate * scale

    vocabulary_sizes = pretrained_vocabulary(vocabulary_sizes, models.text_encoders, family)
    models.extras = family.prepare_text_encoders(args, models, tokenizers, concepts[-1].placeholder_ids[0][-1] + 1)
    attach_concepts(concepts, tokenizers, models.text_encoders, seed, vocabulary_sizes, family)
    frozen = {family.denoiser: models.denoiser, "vae": models.vae, **dict(zip(family.text_encoders,
              models.text_encoders, strict=True))}  # fmt: skip
    if args.quantize_frozen == "8bit":
        swapped = sum(quantize_8bit(model) for model in (models.denoiser, *models.text_encoders))
        logger.info(f"--quantize_frozen 8bit: {swapped} linear layers of the {family.denoiser_label} and "
                    f"{family.text_encoder_label} in int8.")  # fmt: skip
    freeze(frozen, accelerator, weight_dtype, args.gradient_checkpointing, fp32=family.fp32_modules)
    for concept in concepts:
        concept.learned.to(accelerator.device)
    lora = DenoiserLoRA(models.denoiser, args, seed, prefix=family.denoiser) if args.lora_rank else None
    trained = compiled(models, family, args.compile_backend) if args.compile else models

    optimizer = make_optimizer(args, [t for c in concepts for t in c.learned.values()], lora)
    from diffusers.optimization import get_scheduler  # here: diffusers takes 1.5 s to import, --help does not wait

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps,
    )
    optimizer = accelerator.prepare(optimizer)  # the fp16 grad scaler, when there is one
    accelerator.register_for_checkpointing(*(c.learned for c in concepts), lr_scheduler, *([lora] if lora else []))
    global_step, seed = resume(args, accelerator, checkpoint, identity, seed)
    start_streams(concepts, args, tokenize, models.vae, accelerator, global_step, seed, family)
    loss_fn = partial(family.training_loss, models=trained, seed=seed, args=args)
    loss_fn = DCOLoss(loss_fn, lora, args.dco_beta) if args.dco_beta else loss_fn  # its reference: the LoRA off
    logs = StepLogs(concepts, DCOLoss.keys if args.dco_beta else ())
    components = frozen | dict(zip(family.tokenizers, tokenizers, strict=True))
    return Run(args, family, accelerator, concepts, tokenizers, models, components, lora, optimizer, lr_scheduler,
               loss_fn, logs, identity, seed, global_step, token, phases)  # fmt: skip


def train_step(run):
    """One step of the spec: the data gradient of every concept's batch, each concept's finite flag, then RSGD on
    the sphere (or AdamW: the baselines) for the concepts whose loss and gradient are finite; logs stay on the
    device."""
    args = run.args
    lora_trains = run.lora is not None and run.lora.trains_at(run.step)  # no LoRA gradients before its start
    step_loss = data_gradient(run.concepts, run.loss_fn, run.accelerator, args.gradient_accumulation_steps,
                              args.concepts_per_step, run.lora)  # fmt: skip
    finite = NonFiniteGuard.finite(step_loss, run.concepts, run.accelerator.scaler is None, run.lora)
    lr = run.lr_scheduler.get_last_lr()[0]
    adamw_on_sphere = args.method == "dti" and args.optimizer == "adamw"
    apply_update(run.optimizer, run.concepts, finite, adamw_on_sphere, lora_trains)
    run.lr_scheduler.step()
    run.step += 1
    dco_terms = run.loss_fn.step_terms(run.accelerator) if args.dco_beta else None  # l_model, l_ref
    run.logs.add(run.step, step_loss, lr, finite, dco_terms)


def validate_one_concept(run, concept):
    """Validation images of one concept at this step. A validation that fails (the pipeline, memory) never costs the
    training: one warning line names the step and the error (the traceback follows it in the log) and the run goes
    on."""
    prompt_token = placeholder_prompt_token(concept.args.placeholder_token, concept.num_vectors)
    try:
        with run.phases("validation"):
            log_validation(run.components, run.models, concept.args, run.accelerator, run.seed, run.step,
                           prompt_token, run.family)  # fmt: skip
    except TrainingStopped:  # a full disk stops the run, validation or not
        raise
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0][:300]
        of = f" of {concept.args.placeholder_token}" if concept.prefix else ""
        logger.warning(f"Validation{of} at step {run.step} failed ({type(error).__name__}: {reason}); training goes "
                       "on without its images.", exc_info=True)  # fmt: skip


def validate_concepts(run):
    """Validation images of every concept at this step."""
    for c in run.concepts:
        validate_one_concept(run, c)


def save_in_run(run, validate):
    """What the main process saves after a step: embeddings every --save_steps, a checkpoint every
    --checkpointing_steps, validation images every --validation_steps."""
    args, step = run.args, run.step
    if step % args.save_steps == 0 and step < args.max_train_steps:
        with run.phases("saving"):
            save_all_embeddings(run.concepts, step, run.family, f"-steps-{step}", run.lora)
    if step % args.checkpointing_steps == 0:
        with run.phases("saving"):
            check_finite(run.concepts, step)
            save_checkpoint(run.accelerator, args, step, run.seed, run.identity)
    if validate and step % args.validation_steps == 0:
        validate_concepts(run)


def stop_if_exhausted(run):
    """After --max_nonfinite_steps non-finite steps in a row of any concept: save the last good embeddings, stop."""
    guard = next((c.guard for c in run.concepts if c.guard.exhausted), None)
    if guard is None:
        return
    if run.accelerator.is_main_process:
        save_all_embeddings(run.concepts, run.step, run.family, lora=run.lora)
    raise TrainingStopped(
        f"{guard.longest} steps in a row had a non-finite loss or gradient{guard.label} (the last: step "
        f"{guard.last}); the last good embeddings are in {run.args.output_dir}. Lower --learning_rate or check the "
        "data."
    )


def save_and_stop(run, stop, at_the_end=False):
    """A stop signal: save the embeddings and a checkpoint of this step, then stop (the run resumes from it). At the
    end (a signal in the last validation or the upload, on the main process, the final embeddings saved): keep a
    checkpoint of the last step, so a resume does only what is left (validation, model card, upload)."""
    args, step = run.args, run.step
    if run.accelerator.is_main_process:
        if not at_the_end:
            save_all_embeddings(run.concepts, step, run.family, lora=run.lora)
        if step % args.checkpointing_steps:
            save_checkpoint(run.accelerator, args, step, run.seed, run.identity)
    if not at_the_end:
        run.accelerator.wait_for_everyone()
    saved = "the final embeddings" if at_the_end else "the embeddings"
    then = "the validation, model card and upload left are done when you resume with" if at_the_end else "resume with"
    raise StoppedBySignal(
        f"Stopped by {stop.signal or 'a stop signal'} at step {step}: saved checkpoint-{step} and {saved} in "
        f"{args.output_dir}; {then} --resume_from_checkpoint latest.",
        stop.signal,
    )


def finish(run, validate, stop):
    """The end of the run on the main process: the final embeddings, a last validation, the model card, the upload."""
    args, phases = run.args, run.phases
    if not run.accelerator.is_main_process:
        return
    with phases("saving"):
        save_all_embeddings(run.concepts, run.step, run.family, lora=run.lora)
    for c in run.concepts:
        if validate and run.step % args.validation_steps != 0:
            validate_one_concept(run, c)
        if stop.signal:
            save_and_stop(run, stop, at_the_end=True)
        repo_id = hub_repo_id(c.args)
        if args.push_to_hub:
            with phases("upload"):
                repo_id = create_hub_repo(c.args, run.hub_token)
        with phases("saving"):
            save_model_card(c.args, c.learned, run.step, run.accelerator.num_processes, repo_id, run.family)
        if args.push_to_hub:
            with phases("upload"):
                push_to_hub(c.args, repo_id, run.hub_token)


def run_summary(args, phases, with_phases=True):
    """One line: what the run wrote where, how long it took, and (with_phases) where the time went."""
    output_dir = Path(args.output_dir)
    files = sorted(p.name for p in output_dir.glob("*.safetensors") if "-steps-" not in p.name)
    files += [name for name in ("README.md", "validation/", "checkpoint-*/") if list(output_dir.glob(name))]
    minutes, seconds = divmod(round(phases.total()), 60)
    line = f"Done in {minutes}m{seconds:02d}s: wrote {', '.join(files)} in {output_dir}."
    return f"{line} {phases.summary()}" if with_phases else line


def train(args, family):
    """DTI on `family`: set up, then step until --max_train_steps, saving and validating on the way."""
    run = setup(args, family)
    accelerator, concepts, phases = run.accelerator, run.concepts, run.phases
    start_trackers(accelerator, args, f"dti-{family.name}")
    norms = ", ".join(f"{n}={t.norm_scale:.4g}" for n, t in concepts[0].learned.items() if args.method == "dti")
    samples_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** {args.method.upper()} on {family.title} ***** {describe_concepts(concepts, args)} | m* "
        f"{norms or 'free'} | kappa {args.kappa} | lr {args.learning_rate} | {samples_per_step} samples/step per "
        f"concept | {args.max_train_steps} steps"
    )
    validate = args.num_validation_images > 0 and accelerator.is_main_process
    progress = tqdm(
        range(args.max_train_steps), initial=run.step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    first_step = run.step + 1  # the bar shows the loss from the run's first step on
    phases.start_steps(accelerator.device, compiles=args.compile)
    with StopRequest() as stop:  # to the very end: a signal in the last validation or the upload is handled too
        with progress:  # closed before any way out prints its line
            while run.step < args.max_train_steps:
                train_step(run)
                phases.step_done()
                progress.update(1)
                at_logging_step = run.step % args.logging_steps == 0 or run.step in (first_step, args.max_train_steps)
                if at_logging_step:  # the host reads the step logs (LoRA and AdamW modes also read the finite flags)
                    report_steps(run.logs, concepts, accelerator, progress)
                stop_if_exhausted(run)
                if accelerator.is_main_process:
                    save_in_run(run, validate)
                if stop.requested(accelerator, can_sync=at_logging_step):
                    report_steps(run.logs, concepts, accelerator, progress)
                    save_and_stop(run, stop)
        phases.end_steps()
        accelerator.wait_for_everyone()
        finish(run, validate, stop)
    accelerator.log(phases.tracker_values(), step=run.step)
    accelerator.end_training()
    for concept in concepts:
        logger.info(run_summary(concept.args, phases, with_phases=concept is concepts[-1]))
    return SimpleNamespace(learned=concepts[0].learned, concepts=concepts, components=run.components,
                           placeholder_ids=concepts[0].placeholder_ids, seed=run.seed, lora=run.lora)  # fmt: skip

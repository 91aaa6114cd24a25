"""Plumbing: all-or-none writes, the output folder's lock, stop signals, the accelerator and trackers."""

import atexit
import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import threading
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from safetensors import safe_open
from tqdm.auto import tqdm

from dti.core.constants import MIN_FREE_BYTES, OUTPUT_LOCK, logger


def stop_if_write_failed(error, path):
    """A write of `path` that the file system refused (a full disk or quota, a read-only or vanished folder, a failed
    rename) stops the run in one line; other errors are left to the caller. Writers that wrap the OSError
    (torch.save, safetensors) are recognised by the free space left."""
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    with contextlib.suppress(OSError):
        full = full or shutil.disk_usage(Path(path).parent).free < MIN_FREE_BYTES // 2
    kept = f"the last complete checkpoint and embeddings in {Path(path).parent} are kept"
    if full:
        raise TrainingStopped(
            f"The disk is full: {path} could not be written, {kept}. Free some space, then resume with "
            "--resume_from_checkpoint latest."
        ) from None
    if isinstance(error, OSError):
        raise TrainingStopped(
            f"{path} could not be written ({error.strerror or type(error).__name__}): {kept}. Make the folder "
            "writable again, then resume with --resume_from_checkpoint latest."
        ) from None


def write_atomically(path, write):
    """Call write(tmp_path), then rename tmp_path to path: readers never see a half-written file."""
    write_all_atomically({path: write})


def keep_a_copy(path, backup):
    """backup: a hard link to path (no bytes copied), or a copy where the file system has no hard links."""
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)


def write_all_atomically(writes):
    """{path: write}: call every write(tmp_path) first, then rename them all; a failure at any point (a full disk, a
    rename refused half-way) puts back the files already replaced, so the folder shows the previous set whole,
    never a mix of old and new ones."""
    umask = os.umask(0)
    os.umask(umask)
    renames = {Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp"): Path(path) for path in writes}
    backups = {path: path.with_name(f".{path.name}.{os.getpid()}.old") for path in renames.values()}
    replaced, current = [], next(iter(renames.values()))  # current: the file being written, for the message
    try:
        for (tmp, current), write in zip(renames.items(), writes.values(), strict=True):  # noqa: B007 (read below)
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files
        for path, backup in backups.items():
            if path.exists():  # the old file stays reachable until every new one is in place
                keep_a_copy(path, backup)
        for tmp, current in renames.items():
            os.replace(tmp, current)
            replaced.append(current)
    except Exception as error:
        for path in reversed(replaced):
            with contextlib.suppress(OSError):
                if backups[path].exists():
                    os.replace(backups[path], path)
                else:  # it is new in this save
                    path.unlink()
        stop_if_write_failed(error, current)
        raise
    finally:
        for leftover in (*renames, *backups.values()):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)


def previous_run(output_dir):
    """(whether output_dir holds a run, the placeholder it recorded or None when unreadable)."""
    previous = Path(output_dir) / "learned_embeds.safetensors"
    if not previous.is_file():
        return False, None
    try:
        with safe_open(previous, framework="pt") as f:
            return True, (f.metadata() or {}).get("placeholder_token")
    except Exception:  # an unreadable file there is someone else's too
        return True, None


def check_output_dir(args):
    """Refuse an --output_dir that holds another concept's run (unless --overwrite) or that cannot be written."""
    output_dir = Path(args.output_dir)
    held, other = previous_run(output_dir)
    if held and not args.overwrite and other != args.placeholder_token:
        raise ValueError(f"--output_dir {output_dir} holds the run of {other!r}; pick another folder or --overwrite.")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        free = shutil.disk_usage(output_dir).free
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"--output_dir {output_dir} cannot be written ({reason}); pick another folder.") from None
    if free < MIN_FREE_BYTES:
        raise ValueError(
            f"--output_dir {output_dir}: only {free / 2**20:.0f} MiB free on its disk, {MIN_FREE_BYTES // 2**20} MiB "
            "are needed; free some space or pick another folder."
        )


def process_start_time(pid):
    """When process `pid` started (clock ticks since boot, Linux), to tell a live owner from a reused pid; else None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def lock_owner_alive(owner):
    """Whether the process recorded in a lock file ({"pid", "start", "host"}) still runs."""
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process: cannot be checked, so assume it runs
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return owner.get("start") is None or owner.get("start") == process_start_time(pid)


def remove_replaced_run(args):
    """--overwrite on another concept's run (a new run, not a resume): remove what that run wrote (its embeddings,
    LoRA files, -steps-N copies, checkpoints, validation images and model card), so the folder holds one run only."""
    held, other = previous_run(args.output_dir)
    if not (args.overwrite and held and other != args.placeholder_token) or args.resume_from_checkpoint:
        return
    output_dir = Path(args.output_dir)
    old_name = concept_name(other or "")
    patterns = ["learned_embeds*.safetensors", "pytorch_lora_weights*.safetensors", "README.md", "checkpoint-*",
                ".checkpoint-*", "validation", *([f"{old_name}*.safetensors"] if other else [])]  # fmt: skip
    removed = sorted({p for pattern in patterns for p in output_dir.glob(pattern)})
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info(f"--overwrite: removed the run of {other!r} from {output_dir} ({len(removed)} files and folders).")


def claim_output_dir(args, accelerator):
    """Refuse an --output_dir that a running training process uses; else mark it as this run's until exit. Only the
    main process holds the lock; a lock left by a process that died is taken over."""
    if not accelerator.is_main_process:
        return
    lock = Path(args.output_dir) / OUTPUT_LOCK
    me = {"pid": os.getpid(), "start": process_start_time(os.getpid()), "host": socket.gethostname()}
    for _ in range(3):  # created exclusively, so of two runs starting at once only one gets it
        try:
            with open(lock, "x") as file:
                file.write(json.dumps(me))
            break
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = None
            if isinstance(owner, dict) and owner.get("pid") != me["pid"] and lock_owner_alive(owner):
                raise ValueError(
                    f"--output_dir {args.output_dir} is in use by training process {owner.get('pid')} on "
                    f"{owner.get('host')}; wait for it or pick another folder (delete {lock} if it is gone)."
                ) from None
            lock.unlink(missing_ok=True)  # a dead process's lock, or this process's own from an earlier run

    remove_replaced_run(args)

    def release():
        try:
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass

    atexit.register(release)


class TrainingStopped(RuntimeError):
    """The run stopped early on purpose (a signal, or too many non-finite steps) after saving what it had."""


class StoppedBySignal(TrainingStopped):
    """Stopped as asked (SIGTERM, Ctrl-C): not an error, the exit status is the shell's 128 + the signal's number."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        self.exit_code = 128 + signal.Signals[signal_name or "SIGTERM"].value  # a peer's signal


class StopRequest:
    """SIGTERM or SIGINT (a preempted job, Ctrl-C) asks the loop to finish its step, save and exit; a second one
    stops at once. All processes stop at the same step."""

    def __init__(self):
        self.signal, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            term_when_launcher_dies()

    def handle(self, signum, frame):
        if self.signal is not None:
            if signum == signal.SIGINT:  # a second Ctrl-C; a repeated SIGTERM changes nothing
                raise KeyboardInterrupt
            return
        self.signal = signal.Signals(signum).name

    def requested(self, accelerator, can_sync=True):
        """Whether to stop now. With several processes this takes an all-reduce, so it is asked at logging steps."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        if not can_sync:
            return False
        flag = torch.tensor(float(self.signal is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def term_when_launcher_dies():
    """Under `accelerate launch` or torchrun (Linux): ask the kernel for a SIGTERM when the launcher exits. accelerate's
    single-process launcher dies of a SIGTERM without passing it on; this way the run still saves and stops. Not under
    a shell or nohup: a training process started from those must outlive them."""
    parent = os.getppid()
    try:
        command = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    words = {Path(os.fsdecode(word)).name for word in command[:4]}
    if not words & {"accelerate", "accelerate.commands.launch", "torchrun", "torch.distributed.run"}:
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def resolve_seed(args, accelerator):
    """--seed, or a random seed drawn once and shared by every process; logged, so any run can be repeated."""
    seed = [args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)]
    broadcast_object_list(seed)
    if args.seed is None:
        logger.info(f"--seed not given: drew seed {seed[0]} (pass --seed {seed[0]} to repeat this run).")
    args.seed = seed[0]
    return seed[0]


def check_trackers(report_to):
    needed = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(report_to, [])
    for package in needed:
        try:
            __import__(package)
        except ImportError as error:
            raise ValueError(f"--report_to {report_to} needs {package}: pip install {package}.") from error
    if "wandb" in needed and not wandb_can_log():
        raise ValueError(
            f"--report_to {report_to}: wandb is not logged in; run `wandb login`, set WANDB_API_KEY, or set "
            "WANDB_MODE=offline to log locally."
        )


def wandb_can_log():
    """Whether wandb.init will run without asking for a key: offline or disabled mode, a key, or a netrc login."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled") or os.environ.get("WANDB_API_KEY"):
        return True
    if os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class TqdmLogHandler(logging.StreamHandler):
    """In a terminal, log lines are written through tqdm, so that they appear above the progress bar instead of
    over it; elsewhere (a log file, a pipe) as plain lines, without redrawing the bar each time."""

    def emit(self, record):
        if not self.stream.isatty():
            return super().emit(record)
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler does: a failed log line must not stop the run
            self.handleError(record)


def quiet_library_noise():
    """Silence library messages that no user can act on: bitsandbytes' CPU 4-bit kernel notice (no 4-bit layer is
    used here), transformers' notice that image processors fall back to PIL without torchvision, and the libraries'
    loading bars (the run logs what it loads) and accelerate's per-file lines of each checkpoint save and load (the
    run logs one line per checkpoint)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    notices = logging.getLogger("transformers.utils.import_utils")
    if not any(getattr(f, "name", None) == "no-torchvision-notice" for f in notices.filters):  # once per process
        drop = logging.Filter("no-torchvision-notice")
        drop.filter = lambda record: "requires torchvision" not in record.getMessage()
        notices.addFilter(drop)


def make_accelerator(args):
    quiet_library_noise()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=world_size > 1 and not torch.cuda.is_available(),  # torchrun on CPUs: gloo, not N independent runs
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO,
                        handlers=[TqdmLogHandler()])  # fmt: skip
    state = accelerator.state
    logger.info(
        f"{state.num_processes} process(es) ({state.distributed_type.value}), this one #{state.process_index} on "
        f"{state.device}, mixed precision {state.mixed_precision}.",
        main_process_only=False,
    )
    if state.mixed_precision in ("fp16", "bf16") and state.device.type == "cpu":
        logger.warning(f"--mixed_precision {state.mixed_precision} on a machine without CUDA: CPUs run it slowly, some "
                       "operations not at all; --mixed_precision no is the CPU's precision.")  # fmt: skip
    if accelerator.num_processes != world_size:
        raise ValueError(f"WORLD_SIZE is {world_size} but accelerate runs {accelerator.num_processes} process(es).")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def start_trackers(accelerator, args, project):
    """Start the --report_to trackers (main process) with the run's flags as their config. wandb takes its config at
    init (accelerate 1.10's offline wandb would start a second run to add it) and honours a user's WANDB_DIR."""
    if not accelerator.is_main_process or args.report_to == "none":
        return
    logging_dir = Path(args.output_dir) / args.logging_dir
    logging_dir.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
    wandb_kwargs = {"config": config, "name": args.run_name}
    if not os.environ.get("WANDB_DIR"):
        wandb_kwargs["dir"] = str(logging_dir)
    accelerator.init_trackers(project, init_kwargs={"wandb": wandb_kwargs})
    for tracker in accelerator.trackers:
        if tracker.name != "wandb":
            tracker.store_init_configuration(config)


def concept_name(placeholder_token):
    """The placeholder without angle brackets, safe as a file name: '<my-dog>' -> 'my-dog'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", placeholder_token.strip("<>")) or "concept"

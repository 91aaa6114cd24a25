"""Run many command lines of one script as `python SCRIPT ARGS` runs them, paying the imports once.

    python tests/cli_driver.py SPEC.json RESULTS.json

SPEC holds {"script": path, "cases": {name: [args]}, "workers": n, "timeout": seconds}. The driver imports what the
script imports (its top-level imports and the diffusers / transformers names its functions import), then forks one
child per case. Each child is a fresh copy of that warmed-up process that has run no case, so nothing a case does
(accelerate's singletons, logging handlers, signal handlers, the environment, the working directory) reaches
another. The child points file descriptors 1 and 2 at files of its own, sets sys.argv and sys.path[0] as the
interpreter does for a script, runs the script as __main__ and leaves as the interpreter would: exit status, stdout
and stderr are those of `python SCRIPT ARGS`. RESULTS gets {name: {"returncode", "stdout", "stderr", "timed_out"}}.
"""

import ast
import atexit
import importlib
import json
import locale
import os
import runpy
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

LAZY_ROOTS = ("diffusers", "transformers")


def imported_names(script):
    """(module, names) for the script's top-level imports and its function-level imports from LAZY_ROOTS."""
    tree = ast.parse(Path(script).read_text(), filename=script)
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [(node.module, [alias.name for alias in node.names])]
        else:
            continue
        for module, names in modules:
            if id(node) in top_level or module.split(".")[0] in LAZY_ROOTS:
                found.append((module, names))
    return found


def warm_up(script):
    """Import what the script will import, so that each child finds it in sys.modules."""
    for module, names in imported_names(script):
        try:
            imported = importlib.import_module(module)
            for name in names:
                getattr(imported, name)
        except Exception:  # the child meets the same failure where the script meets it
            pass


def become(script, args, stdout_path, stderr_path):
    """In a child: run the script with args as __main__, then leave as the interpreter would; never returns."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        error = None
    except BaseException as raised:  # what leaves the script is reported below, as the interpreter reports it
        error = raised
    leave(script, error)


def leave(script, error):
    """Exit as CPython does when a script ends with `error` (None: a normal end): report a SystemExit code or print
    the traceback, wait for non-daemon threads, run the atexit callbacks and flush stdout and stderr. Only the
    teardown of every module, which prints nothing and would take seconds here, is left to os._exit."""
    status, interrupted = 0, False
    if isinstance(error, SystemExit):
        if error.code is None:
            status = 0
        elif isinstance(error.code, int):
            status = error.code
        else:
            sys.stderr.write(f"{error.code}\n")
            status = 1
    elif error is not None:
        frames = error.__traceback__
        while frames is not None and frames.tb_frame.f_code.co_filename != script:
            frames = frames.tb_next
        error.with_traceback(frames or error.__traceback__)
        sys.excepthook(type(error), error, error.__traceback__)
        status, interrupted = 1, isinstance(error, KeyboardInterrupt)
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            status = 120
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


def decode(path):
    """Bytes a child wrote, read as subprocess.run(..., text=True) reads them."""
    text = Path(path).read_bytes().decode(locale.getpreferredencoding(False))
    return text.replace("\r\n", "\n").replace("\r", "\n")


def reap(running, results, timeout):
    """Collect a finished child into results, or kill those past the timeout. Returns whether one finished."""
    pid, status = os.waitpid(-1, os.WNOHANG)
    if pid == 0:
        now = time.monotonic()
        for child, (name, started, _, _) in running.items():
            if now - started > timeout and not results.get(name, {}).get("timed_out"):
                os.kill(child, signal.SIGKILL)
                results[name] = {"timed_out": True}
        return False
    name, _, stdout_path, stderr_path = running.pop(pid)
    results[name] = {
        "returncode": os.waitstatus_to_exitcode(status),
        "stdout": decode(stdout_path),
        "stderr": decode(stderr_path),
        "timed_out": results.get(name, {}).get("timed_out", False),
    }
    return True


def run(spec, results_path):
    script = str(spec["script"])
    workers, timeout = spec.get("workers", 2), spec.get("timeout", 300)
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    warm_up(script)
    folder = tempfile.mkdtemp(prefix="cli-driver-")
    running, results = {}, {}
    for index, (name, args) in enumerate(spec["cases"].items()):
        while len(running) >= workers:
            if not reap(running, results, timeout):
                time.sleep(0.02)
        stdout_path, stderr_path = os.path.join(folder, f"{index}.out"), os.path.join(folder, f"{index}.err")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                become(script, args, stdout_path, stderr_path)
            except BaseException:
                sys.excepthook(*sys.exc_info())
            finally:  # become leaves through os._exit; a child must never go on with the loop
                os._exit(70)
        running[pid] = (name, time.monotonic(), stdout_path, stderr_path)
    while running:
        if not reap(running, results, timeout):
            time.sleep(0.02)
    Path(results_path).write_text(json.dumps({name: results[name] for name in spec["cases"]}))
    for path in Path(folder).iterdir():
        path.unlink()
    os.rmdir(folder)


def run_cases(script, cases, workers=2, timeout=300, env=None):
    """{name: args} -> {name: CompletedProcess} of `python script *args`, all cases through one driver process."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="cli-driver-") as folder:
        spec_path, results_path = Path(folder) / "spec.json", Path(folder) / "results.json"
        spec = {"script": str(script), "cases": {name: list(args) for name, args in cases.items()}}
        spec_path.write_text(json.dumps({**spec, "workers": workers, "timeout": timeout}))
        command = [sys.executable, __file__, str(spec_path), str(results_path)]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout * (1 + len(cases)))
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
        results = json.loads(results_path.read_text())
    completed = {}
    for name, args in spec["cases"].items():
        argv = [sys.executable, str(script), *args]
        if results[name]["timed_out"]:
            raise subprocess.TimeoutExpired(argv, timeout)
        completed[name] = subprocess.CompletedProcess(
            argv, results[name]["returncode"], results[name]["stdout"], results[name]["stderr"]
        )
    return completed


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])

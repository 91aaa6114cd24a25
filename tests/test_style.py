"""The code style the project holds itself to: ruff's lint and format checks over the whole repository."""

import subprocess
import sys

from tests.conftest import REPO


def test_ruff_lint_and_format_pass():
    for command in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr

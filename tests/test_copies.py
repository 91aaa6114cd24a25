"""The DTI core of train_dti_sana.py is a marked copy of train_dti_sdxl.py's, like diffusers' `# Copied from` check.

A definition preceded by `# Copied from train_dti_sdxl.<name>` must equal that definition of train_dti_sdxl.py
to the character. Change the SDXL script, then bring every marked copy up to date with

    python -m tests.test_copies --fix
"""

import ast
import re
import sys

from tests.conftest import REPO

MARKER = re.compile(r"^# Copied from train_dti_sdxl\.(\w+)$")
CORE = {"DirectionalTokens", "TextualInversionTokens", "CrossInitTokens", "RiemannianSGD", "inject_learned_tokens",
        "token_stats", "vocabulary_norms", "resolve_norm_scale", "make_learned_tokens", "add_placeholder_tokens",
        "initializer_token_ids", "placeholder_names", "placeholder_prompt_token", "content_positions"}  # fmt: skip


def definitions(source):
    """{name: (first line index, source text)} of the top-level functions and classes, decorators included."""
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            found[node.name] = (start, "\n".join(lines[start : node.end_lineno]))
    return found


def copy_mismatches(original_source, copy_source):
    """Names marked as copies whose text differs from the original (or that the original lacks)."""
    originals, lines, copied, mismatches = definitions(original_source), copy_source.splitlines(), [], []
    for name, (start, text) in definitions(copy_source).items():
        match = MARKER.match(lines[start - 1]) if start else None
        if match:
            copied.append(name)
            source_name = match.group(1)
            if source_name != name or originals.get(source_name, (None, None))[1] != text:
                mismatches.append(name)
    return copied, mismatches


def test_sana_copies_equal_their_sdxl_originals():
    sdxl, sana = (REPO / "train_dti_sdxl.py").read_text(), (REPO / "train_dti_sana.py").read_text()
    copied, mismatches = copy_mismatches(sdxl, sana)
    assert not mismatches, f"marked copies differ from train_dti_sdxl.py: {mismatches}"
    assert set(copied) >= CORE, f"the DTI core must be marked copies: {CORE - set(copied)}"


def test_fix_copies_restores_an_edited_copy():
    sdxl, sana = (REPO / "train_dti_sdxl.py").read_text(), (REPO / "train_dti_sana.py").read_text()
    edited = sana.replace("new_direction = F.normalize(v - lr * g, dim=-1)", "new_direction = v - lr * g")
    assert edited != sana and fix_copies(sdxl, edited) == fix_copies(sdxl, sana)
    assert not copy_mismatches(sdxl, fix_copies(sdxl, edited))[1]


def test_the_check_catches_an_edited_copy():
    sdxl, sana = (REPO / "train_dti_sdxl.py").read_text(), (REPO / "train_dti_sana.py").read_text()
    edited = sana.replace(
        "g = g - (v * g).sum(-1, keepdim=True) * v", "g = g - 0.5 * (v * g).sum(-1, keepdim=True) * v"
    )
    assert edited != sana
    assert copy_mismatches(sdxl, edited)[1] == ["DirectionalTokens"]
    renamed = sana.replace("# Copied from train_dti_sdxl.token_stats", "# Copied from train_dti_sdxl.step_logs")
    assert copy_mismatches(sdxl, renamed)[1] == ["token_stats"]


def fix_copies(original_source, copy_source):
    """copy_source with every marked copy replaced by the original's current text."""
    originals, lines = definitions(original_source), copy_source.splitlines()
    for start, text in sorted(definitions(copy_source).values(), reverse=True):
        match = MARKER.match(lines[start - 1]) if start else None
        if match and match.group(1) in originals:
            end = start + len(text.splitlines())
            lines[start:end] = originals[match.group(1)][1].splitlines()
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python -m tests.test_copies --fix")
    target = REPO / "train_dti_sana.py"
    target.write_text(fix_copies((REPO / "train_dti_sdxl.py").read_text(), target.read_text()))

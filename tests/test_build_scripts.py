"""The training scripts are generated (utils/build_scripts.py) from dti/core and dti/families: the committed
scripts must equal what the builder writes, and an edit of the core must reach every script."""

import subprocess
import sys

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "utils"))
import build_scripts  # noqa: E402


def test_committed_scripts_equal_their_build():
    proc = subprocess.run([sys.executable, str(REPO / "utils" / "build_scripts.py"), "--check"], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_check_names_a_stale_script(tmp_path, monkeypatch):
    stale = tmp_path / "train_dti_sana.py"
    stale.write_text("# edited by hand\n")
    monkeypatch.setattr(build_scripts, "OUTPUT", tmp_path)
    (tmp_path / "train_dti_sdxl.py").write_text(build_scripts.build("sdxl"))
    proc = subprocess.CompletedProcess([], 0)
    try:
        build_scripts.main(["--check"])
    except SystemExit as error:
        proc = subprocess.CompletedProcess([], 1, stderr=str(error))
    assert proc.returncode == 1 and "train_dti_sana.py" in proc.stderr and "train_dti_sdxl.py" not in proc.stderr


def test_an_edit_of_the_core_reaches_every_script(tmp_path, monkeypatch):
    core = REPO / "dti" / "core" / "dti.py"
    edited = tmp_path / "dti.py"
    edited.write_text(core.read_text().replace("new_direction = F.normalize(v - lr * g, dim=-1)",
                                               "new_direction = F.normalize(v - 0.5 * lr * g, dim=-1)"))  # fmt: skip
    monkeypatch.setattr(build_scripts, "SECTIONS", [(t, edited if s == core else s) for t, s in build_scripts.SECTIONS])
    for name in build_scripts.FAMILIES:
        text = build_scripts.build(name)
        assert "v - 0.5 * lr * g" in text and text != (REPO / f"train_dti_{name}.py").read_text()


def test_generated_scripts_are_self_contained_and_speak_of_their_family_only():
    for name in build_scripts.FAMILIES:
        text = (REPO / f"train_dti_{name}.py").read_text()
        imports = [line for line in text.splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in imports if line.split()[1].split(".")[0] in ("dti", "tests", "utils")]
        assert "# Copied from" not in text
    assert "gemma" not in (REPO / "train_dti_sdxl.py").read_text().lower()
    sana = (REPO / "train_dti_sana.py").read_text()
    assert not any(word in sana for word in ("UNet", "SDXL", "CLIP"))

"""Model card, Hub upload (at the huggingface_hub API boundary), datasets input and wandb, for both scripts."""

import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train_dti_sana
import train_dti_sdxl
from tests.conftest import ASSETS, training_args

SCRIPTS = {"sdxl": train_dti_sdxl, "sana": train_dti_sana}
TOKEN = "<toy-robot>"


@pytest.fixture
def run(tiny_sdxl, tiny_sana, tmp_path):
    """run(family, *flags, data=...) trains 2 steps in-process; data replaces --train_data_dir's value or, given as
    a list, the data flags themselves."""

    def train(family, *extra, output_dir=None, data=None):
        model = tiny_sdxl if family == "sdxl" else tiny_sana
        argv = training_args(model, output_dir or tmp_path / family, "--max_train_steps", "2", *extra)
        if family == "sana":
            argv += ["--gradient_accumulation_steps", "1"]
        if isinstance(data, list):
            index = argv.index("--train_data_dir")
            argv[index : index + 2] = data
        script = SCRIPTS[family]
        return script.main(script.parse_args(argv)), Path(output_dir or tmp_path / family)

    return train


def python_block(card_text):
    return re.search(r"```python\n(.*?)```", card_text, re.S).group(1)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_model_card_parses_and_its_snippet_runs(run, family, monkeypatch):
    _, out = run(family, "--num_validation_images", "1")
    card = huggingface_hub.ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["instance_prompt"] == TOKEN
    assert {"textual-inversion", "dti", "diffusers", "text-to-image"} <= set(data["tags"])
    assert ("stable-diffusion-xl" if family == "sdxl" else "sana") in data["tags"]
    assert Path(data["base_model"]).is_dir()
    (widget,) = data["widget"]
    assert TOKEN in widget["text"] and (out / widget["output"]["url"]).is_file()
    assert "| kappa |" in card.text and "| norm m* (text_encoder) |" in card.text

    # Run the snippet as written, with the repo id pointing at the local folder and a CPU-sized call.
    code = python_block(card.text).replace(f'"{out.name}"', f'"{out}"').replace('"cuda"', '"cpu"')
    code = code.replace("torch.float16", "torch.float32").replace("torch.bfloat16", "torch.float32")
    code = code.replace(").images[0]", ", num_inference_steps=2, height=64, width=64).images[0]")
    if family == "sana":
        code = code.replace("height=64, width=64", "height=64, width=64, use_resolution_binning=False")
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name: str(out / name))
    namespace = {}
    exec(compile(code, "model-card-snippet", "exec"), namespace)
    assert namespace["image"].size == (64, 64)
    pipe = namespace["pipe"]
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row, load_file(out / "learned_embeds.safetensors")[TOKEN][0])


@pytest.fixture
def fake_hub(monkeypatch):
    """The huggingface_hub calls the scripts make, recorded instead of sent."""
    calls = SimpleNamespace(create_repo=[], upload_folder=[], whoami=[])
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: calls.whoami.append(token) or {"name": "me"})

    def create_repo(repo_id, **kwargs):
        calls.create_repo.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.upload_folder.append(kwargs))
    return calls


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_push_to_hub_creates_the_repo_and_uploads_only_what_users_download(run, family, fake_hub, tmp_path):
    flags = ["--push_to_hub", "--hub_token", "hf_test", "--hub_model_id", "robot-concept", "--hub_private_repo",
             "--checkpointing_steps", "1", "--num_validation_images", "1", "--save_steps", "1"]  # fmt: skip
    _, out = run(family, *flags)
    assert fake_hub.whoami == ["hf_test"]
    assert fake_hub.create_repo == [("robot-concept", {"exist_ok": True, "private": True, "token": "hf_test"})]
    (upload,) = fake_hub.upload_folder
    assert upload["repo_id"] == "me/robot-concept" and Path(upload["folder_path"]) == out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    uploaded = set(huggingface_hub.utils.filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    embeddings = {"learned_embeds.safetensors", "learned_embeds-steps-1.safetensors"}
    if family == "sdxl":
        embeddings |= {"learned_embeds_2.safetensors", "learned_embeds_2-steps-1.safetensors"}
        embeddings |= {"toy-robot.safetensors", "toy-robot-steps-1.safetensors"}
    assert uploaded == embeddings | {"README.md", "validation/step-2.png"}
    assert any(f.startswith("checkpoint-2/") for f in files)
    assert '"me/robot-concept"' in (out / "README.md").read_text()


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_push_to_hub_fails_before_training_without_a_valid_token(run, family, fake_hub, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="--push_to_hub needs Hub credentials"):
        run(family, "--push_to_hub", output_dir=tmp_path / "a")

    def refuse(token=None):
        raise huggingface_hub.errors.HfHubHTTPError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "whoami", refuse)
    with pytest.raises(ValueError, match="--push_to_hub: the Hub refused the token"):
        run(family, "--push_to_hub", "--hub_token", "hf_bad", output_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no model was even loaded
    assert fake_hub.create_repo == [] and fake_hub.upload_folder == []


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_a_local_image_folder_dataset_trains_exactly_like_train_data_dir(run, family, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(ASSETS, folder)
    _, from_folder = run(family, output_dir=tmp_path / "folder", data=["--train_data_dir", str(folder)])
    _, from_dataset = run(family, output_dir=tmp_path / "dataset", data=["--dataset_name", str(folder)])
    a = load_file(from_folder / "learned_embeds.safetensors")[TOKEN]
    assert torch.equal(a, load_file(from_dataset / "learned_embeds.safetensors")[TOKEN])


def test_a_parquet_dataset_with_its_own_image_column(run, tmp_path):
    import datasets

    images = [Image.open(p).convert("RGB") for p in sorted(ASSETS.iterdir()) if p.suffix in (".jpg", ".png")]
    table = datasets.Dataset.from_dict({"caption": ["robot"] * len(images), "img": images})
    table.cast_column("img", datasets.Image()).to_parquet(tmp_path / "robot.parquet")
    result, out = run("sdxl", data=["--dataset_name", str(tmp_path / "robot.parquet"), "--image_column", "img"])
    assert load_file(out / "learned_embeds.safetensors")[TOKEN].shape == (1, 32)
    with pytest.raises(
        ValueError, match=r"--image_column 'image' is not a column of .*robot.parquet; its columns: caption, img"
    ):
        run("sdxl", output_dir=tmp_path / "bad", data=["--dataset_name", str(tmp_path / "robot.parquet")])


def test_exactly_one_data_source(run, tmp_path):
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        run("sdxl", data=[])
    with pytest.raises(ValueError, match="exactly one of --train_data_dir"):
        run("sdxl", data=["--train_data_dir", str(ASSETS), "--dataset_name", str(ASSETS)])


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_wandb_offline_run_holds_the_logged_keys_and_run_name(run, family, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, out = run(family, "--report_to", "wandb", "--run_name", f"dti-{family}-test", "--num_validation_images", "1")
    (run_dir,) = (out / "logs" / "wandb").glob("offline-run-*")
    (records,) = run_dir.glob("run-*.wandb")
    keys = (b"loss", b"lr", b"text_encoder/norm", b"text_encoder/cos_prior", b"text_encoder/angle_deg",
            f"dti-{family}-test".encode(), b"validation")  # fmt: skip
    for _ in range(60):  # wandb's service process may still be writing the offline file when the run has ended
        data = records.read_bytes()
        if all(key in data for key in keys):
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key
    assert list((run_dir / "files" / "media").rglob("*.png")), "the validation images were logged"

"""Tests of evaluate.py: tiny pipelines, embeddings from the training scripts, tiny random DINOv2 / SigLIP / CLIP."""

import contextlib
import csv
import io
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate
import infer
from tests.conftest import ASSETS, REPO, assert_one_line_error, run_commands, training_args

ROBOT, TI = "<toy-robot>", "<toy-ti>"


def train_in_process(script, model, output_dir, *extra):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    script.main(script.parse_args(training_args(model, output_dir, "--max_train_steps", "1", *extra)))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return output_dir


def derive_run(dti_folder, folder, token, method="ti", repeat=1):
    """A run derived from a DTI run: another token, the vectors x3 (off the norm) repeated `repeat` times, the metadata
    of `method`; the same files as the training script writes."""
    folder.mkdir()
    combined = {}
    for name, key in (("learned_embeds.safetensors", "clip_l"), ("learned_embeds_2.safetensors", "clip_g")):
        with safe_open(dti_folder / name, framework="pt") as f:
            metadata = f.metadata()
        metadata |= {"method": method, "token_scale": "free", "kappa": "0.0", "placeholder_token": token}
        combined[key] = 3 * load_file(dti_folder / name)[ROBOT].repeat(repeat, 1)
        save_file({token: combined[key]}, folder / name, metadata=metadata)
    save_file(combined, folder / f"{token.strip('<>')}.safetensors", metadata=metadata)
    return folder


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory):
    from tests.tiny_evaluators import save_tiny_evaluators

    return save_tiny_evaluators(tmp_path_factory.mktemp("evaluators"))


@pytest.fixture(scope="module")
def runs(tiny_sdxl, tiny_sana, tmp_path_factory):
    """One-step DTI runs of the training scripts on both tiny pipelines, and a TI-like SDXL run derived from one."""
    import train_dti_sana
    import train_dti_sdxl

    root = tmp_path_factory.mktemp("runs")
    sdxl = train_in_process(train_dti_sdxl, tiny_sdxl, root / "sdxl-dti")
    sana = train_in_process(train_dti_sana, tiny_sana, root / "sana-dti", "--gradient_accumulation_steps", "1")
    return {"sdxl": sdxl, "sana": sana, "ti": derive_run(sdxl, root / "sdxl-ti", TI)}


def evaluate_args(model, evaluators, output_dir, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--image_encoder", str(evaluators["dinov2"]),
            "--text_encoder", str(evaluators["siglip"]), "--height", "64", "--width", "64", "--num_inference_steps",
            "2", "--seeds", "0", "1", "--max_prompts", "2", "--batch_size", "2", "--bootstrap", "200", "--device",
            "cpu", "--output_dir", str(output_dir), *extra]  # fmt: skip


def run_evaluate(argv):
    """evaluate.main in-process; returns (summary, the pipeline calls as (prompt, seeds), stdout)."""
    calls, original = [], infer.generate

    def counting(pipe, family, prompt, seeds, args, instruction):
        calls.append((prompt, list(seeds)))
        return original(pipe, family, prompt, seeds, args, instruction)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(infer, "generate", counting)
        summary = evaluate.main(evaluate.parse_args(argv))
    return summary, calls, stdout.getvalue()


@pytest.fixture(scope="module")
def sdxl_eval(runs, tiny_sdxl, evaluators, tmp_path_factory):
    """Two runs (a folder and a combined file) on the toy robot, 2 prompts x 2 seeds, with CLIP."""
    output_dir = tmp_path_factory.mktemp("eval") / "out"
    argv = evaluate_args(tiny_sdxl, evaluators, output_dir, "--embeddings", str(runs["sdxl"]),
                         str(runs["ti"] / "toy-ti.safetensors"), "--instance_data_dir", str(ASSETS), "--class_word",
                         "toy", "--clip_model", str(evaluators["clip"]))  # fmt: skip
    summary, calls, stdout = run_evaluate(argv)
    return {"argv": argv, "summary": summary, "calls": calls, "stdout": stdout, "out": output_dir}


def test_metric_functions_against_hand_computations():
    generated, references = torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    # cosines: (24/25, 8/10) and (4/5, 0)
    assert evaluate.image_similarity(generated, references).tolist() == pytest.approx([0.88, 0.4])
    image, text = torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert evaluate.paired_cosine(image, text).tolist() == pytest.approx([1 / math.sqrt(2), -1.0])
    scale, bias = torch.tensor([math.log(10.0)]), torch.tensor([-2.0])
    expected = [1 / (1 + math.exp(-(10 / math.sqrt(2) - 2))), 1 / (1 + math.exp(12))]
    assert evaluate.siglip_score(image, text, scale, bias).tolist() == pytest.approx(expected, rel=1e-6)


def test_features_and_scores_equal_the_models_own_forward(evaluators):
    from transformers import Dinov2Model, SiglipModel

    files = sorted(ASSETS.iterdir())[:2]
    dino = evaluate.load_encoder(str(evaluators["dinov2"]), "--image_encoder", "cpu", with_tokenizer=False)
    pixels = dino.processor(images=[evaluate.open_image(f) for f in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cls = Dinov2Model.from_pretrained(evaluators["dinov2"])(pixel_values=pixels).pooler_output
    assert pixels.shape[-2:] == (28, 28) and torch.allclose(dino.images(files, 1), cls, atol=1e-6)

    siglip = evaluate.load_encoder(str(evaluators["siglip"]), "--text_encoder", "cpu", with_tokenizer=True)
    texts = ["a toy in the jungle", "a dog on the beach"]
    ids = siglip.tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")["input_ids"]
    assert ids.shape == (2, 64) and ids[0, 5].item() == 1 and ids[0, -1].item() == 1  # </s> ends and pads
    model = SiglipModel.from_pretrained(evaluators["siglip"])
    pixels = siglip.processor(images=[evaluate.open_image(f) for f in files], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = torch.sigmoid(model(input_ids=ids, pixel_values=pixels).logits_per_image).diagonal()
    got = evaluate.siglip_score(siglip.images(files, 2), siglip.texts(texts), model.logit_scale, model.logit_bias)
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, torch.full((2,), 0.5), atol=1e-3)


def test_bootstrap_and_aggregation_on_known_numbers():
    constant = evaluate.summarize([0.3] * 7, 500)
    assert constant["mean"] == pytest.approx(0.3) and constant["ci95"][0] == constant["ci95"][1] == constant["mean"]
    # Resampled means of {0, 1} are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: the 2.5% and 97.5% points are 0 and 1.
    assert evaluate.bootstrap_interval([0.0, 1.0], 1000) == (0.0, 1.0)
    summary = evaluate.summarize([1.0, 2.0, 3.0, 6.0], 1000)
    assert summary["mean"] == 3.0 and summary["n"] == 4 and 1.0 <= summary["ci95"][0] < 3.0 < summary["ci95"][1] <= 6
    assert summary == evaluate.summarize([1.0, 2.0, 3.0, 6.0], 1000)  # a fixed seed: the same interval every time
    subjects = {
        "dog": {"aggregate": {"image_sim": {"mean": 0.2}, "text_sim": {"mean": 0.7}}},
        "cat": {"aggregate": {"image_sim": {"mean": 0.6}, "text_sim": {"mean": 0.7}}},
    }
    aggregate, over = evaluate.aggregate_subjects(subjects, ["image_sim", "text_sim"], 1000)
    assert over == "subjects" and aggregate["image_sim"]["mean"] == pytest.approx(0.4)
    assert aggregate["image_sim"]["ci95"] == pytest.approx([0.2, 0.6]) and aggregate["text_sim"]["n"] == 2
    assert evaluate.aggregate_subjects({"dog": subjects["dog"]}, ["image_sim"], 10) == (subjects["dog"]["aggregate"],
                                                                                       "images")  # fmt: skip


@pytest.mark.parametrize(
    ("values", "ticks", "decimals"),
    [([0.2146, 0.2166], [0.21, 0.212, 0.214, 0.216, 0.218, 0.22], 3), ([0.3, 0.7], [0.2, 0.4, 0.6, 0.8], 1)],
)
def test_plot_axes_cover_the_values_with_round_ticks(values, ticks, decimals):
    low, high, got, got_decimals = evaluate.nice_axis(values)
    assert got == pytest.approx(ticks) and (low, high) == (got[0], got[-1]) and got_decimals == decimals
    assert low < min(values) and max(values) < high


def test_prompts_put_the_token_and_the_class_word_in_the_slot(runs, tiny_sdxl, evaluators, tmp_path):
    assert evaluate.make_prompts(["a {} in the jungle", "a red {}"], ROBOT, "toy") == [
        {"index": 0, "template": "a {} in the jungle", "prompt": f"a {ROBOT} in the jungle",
         "text_prompt": "a toy in the jungle"},
        {"index": 1, "template": "a red {}", "prompt": f"a red {ROBOT}", "text_prompt": "a red toy"},
    ]  # fmt: skip

    def plan(*extra):
        argv = evaluate_args(tiny_sdxl, evaluators, tmp_path / "out", "--embeddings", str(runs["sdxl"]),
                             "--instance_data_dir", str(ASSETS), "--max_prompts", "12", *extra)  # fmt: skip
        return evaluate.single_plan(evaluate.parse_args(argv))

    (default,) = plan()  # the class word recorded in the run's metadata, object prompts
    assert default.subject.class_word == "robot" and not default.subject.live
    assert default.prompts[10]["text_prompt"] == "a robot with a wheat field in the background"
    (dog,) = plan("--class_word", "dog")  # a live class word: the live-subject prompts
    assert dog.subject.live and dog.prompts[10]["text_prompt"] == "a dog wearing a red hat"
    assert dog.prompts[10]["prompt"] == f"a {ROBOT} wearing a red hat"
    (forced,) = plan("--class_word", "dog", "--no-live", "--prompt_set", "complex_lv1")
    assert forced.prompts[1]["text_prompt"] == "On a marble floor, a dog resting"
    assert not (tmp_path / "out").exists()


def test_evaluation_writes_metrics_table_plot_and_contact_sheets(sdxl_eval, evaluators):
    out, summary = sdxl_eval["out"], sdxl_eval["summary"]
    assert sorted(sdxl_eval["calls"]) == sorted(
        (f"a {token} in the {place}", [0, 1]) for token in (ROBOT, TI) for place in ("jungle", "snow")
    )
    recorded = json.loads((out / "metrics.json").read_text())
    assert recorded == json.loads(json.dumps(summary)) and recorded["generated"] == 8
    assert list(recorded["runs"]) == ["sdxl-dti", "toy-ti"]
    dti, ti = recorded["runs"]["sdxl-dti"], recorded["runs"]["toy-ti"]
    assert (dti["method"], dti["norm"], dti["kappa"]) == ("dti", "mean", "0.0001")
    assert (ti["method"], ti["norm"], ti["kappa"]) == ("ti", "free", "0.0")
    result = dti["subjects"]["toy_robot"]
    assert [(i["prompt_index"], i["seed"]) for i in result["images"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [p["text_prompt"] for p in result["prompts"]] == ["a toy in the jungle", "a toy in the snow"]
    for metric in ("image_sim", "text_sim", "clip_t", "clip_i"):
        values = [i[metric] for i in result["images"]]
        aggregate = dti["aggregate"][metric]
        assert aggregate["mean"] == pytest.approx(np.mean(values)) and aggregate["n"] == 4
        assert min(values) <= aggregate["ci95"][0] <= aggregate["mean"] <= aggregate["ci95"][1] <= max(values)
        assert result["prompts"][1][metric] == pytest.approx(np.mean(values[2:]))
    assert dti["over"] == "images" and all(0 < i["text_sim"] < 1 for i in result["images"])

    # The SigLIP text is the prompt with the class word: recompute one score from the saved image.
    siglip = evaluate.load_encoder(str(evaluators["siglip"]), "--text_encoder", "cpu", with_tokenizer=True)
    image = out / result["images"][2]["file"]
    assert image.name == "001-a-toy-in-the-snow-seed0.png"
    score = evaluate.siglip_score(siglip.images([image], 1), siglip.texts(["a toy in the snow"]),
                                  siglip.model.logit_scale, siglip.model.logit_bias)  # fmt: skip
    assert score.item() == pytest.approx(result["images"][2]["text_sim"], abs=1e-6)

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and rows[0]["run"] == "sdxl-dti" and rows[-1]["text_prompt"] == "a toy in the snow"
    assert float(rows[0]["image_sim"]) == pytest.approx(result["images"][0]["image_sim"], abs=1e-6)
    assert Image.open(out / "scatter.png").size == (720, 720)
    assert Image.open(out / "toy-ti" / "contact_sheet.png").size == (240 + 2 * 64, 2 * 64)
    table = sdxl_eval["stdout"].splitlines()
    assert table[0].split()[:4] == ["run", "method", "norm", "kappa"]
    assert table[2].split()[:3] == ["toy-ti", "ti", "free"]
    assert f"{dti['aggregate']['text_sim']['mean']:.3f}" in table[1]
    wrote = "wrote metrics.json, metrics.csv, scatter.png and 2 contact sheets (8 new images) in " + str(out)
    assert re.fullmatch(rf"Done in \d+m\d\ds: {re.escape(wrote)}\.", table[-1])


def test_a_second_call_generates_nothing_and_gives_the_same_metrics(sdxl_eval):
    out, first = sdxl_eval["out"], sdxl_eval["summary"]
    images = sorted(out.glob("*/images/*.png"))
    stamps = [p.stat().st_mtime_ns for p in images]
    summary, calls, _ = run_evaluate(sdxl_eval["argv"])
    assert calls == [] and summary["generated"] == 0 and [p.stat().st_mtime_ns for p in images] == stamps
    assert summary["runs"] == first["runs"]
    (out / "toy-ti" / "images" / "001-a-toy-in-the-snow-seed1.png").unlink()
    summary, calls, _ = run_evaluate(sdxl_eval["argv"])
    assert calls == [(f"a {TI} in the snow", [1])] and summary["generated"] == 1
    with pytest.raises(ValueError, match=r"made with other settings \(num_inference_steps\)"):
        evaluate.main(evaluate.parse_args([*sdxl_eval["argv"], "--num_inference_steps", "3"]))


def test_benchmark_mode_averages_over_the_subjects_found(runs, tiny_sdxl, evaluators, tmp_path):
    dataset, root = tmp_path / "dreambooth" / "dataset", tmp_path / "runs"
    pictures = sorted(ASSETS.iterdir())
    for subject, files in {"robot_toy": pictures[:3], "dog": pictures[3:], "not_a_subject": pictures[:1]}.items():
        (dataset / subject).mkdir(parents=True)
        for file in files:
            shutil.copy(file, dataset / subject / file.name)
    for subject in ("robot_toy", "dog"):
        shutil.copytree(runs["sdxl"], root / "dti" / subject)
    shutil.copytree(runs["ti"], root / "ti" / "robot_toy")
    # The same placeholder as the dti runs with two vectors (as for a two-word initializer): loaded under another name.
    derive_run(runs["sdxl"], root / "ti" / "dog", ROBOT, repeat=2)
    argv = evaluate_args(tiny_sdxl, evaluators, tmp_path / "out", "--benchmark", "dreambooth", "--dreambooth_dir",
                         str(tmp_path / "dreambooth"), "--runs_root", str(root), "--max_prompts", "1", "--seeds",
                         "0")  # fmt: skip
    summary, calls, _ = run_evaluate(argv)
    assert summary["subjects"].keys() == {"dog", "robot_toy"}
    assert sorted(calls) == [("a <evaluate-1> in the jungle", [0]), (f"a {ROBOT} in the jungle", [0]),
                             (f"a {ROBOT} in the jungle", [0]), (f"a {TI} in the jungle", [0])]  # fmt: skip
    assert summary["runs"]["ti"]["subjects"]["dog"]["prompts"][0]["prompt"] == f"a {ROBOT} in the jungle"
    assert summary["subjects"]["dog"]["live"] and summary["subjects"]["robot_toy"]["class_word"] == "toy"
    assert len(summary["subjects"]["dog"]["references"]) == 2
    dti = summary["runs"]["dti"]
    assert dti["over"] == "subjects" and dti["aggregate"]["image_sim"]["n"] == 2
    means = [dti["subjects"][s]["aggregate"]["image_sim"]["mean"] for s in ("dog", "robot_toy")]
    assert dti["aggregate"]["image_sim"]["mean"] == pytest.approx(np.mean(means))
    assert dti["subjects"]["dog"]["prompts"][0]["text_prompt"] == "a dog in the jungle"
    assert (tmp_path / "out" / "dog" / "ti" / "images" / "000-a-dog-in-the-jungle-seed0.png").is_file()
    assert len((tmp_path / "out" / "metrics.csv").read_text().splitlines()) == 1 + 4


def test_sana_runs_through_the_sana_path(runs, tiny_sana, evaluators, tmp_path):
    argv = evaluate_args(tiny_sana, evaluators, tmp_path / "out", "--embeddings", str(runs["sana"]),
                         "--instance_data_dir", str(ASSETS), "--max_prompts", "1")  # fmt: skip
    summary, calls, _ = run_evaluate(argv)
    assert summary["family"] == "sana" and calls == [(f"a {ROBOT} in the jungle", [0, 1])]
    result = summary["runs"]["sana-dti"]["subjects"]["toy_robot"]
    assert result["prompts"][0]["text_prompt"] == "a robot in the jungle" and len(result["images"]) == 2
    assert json.loads((tmp_path / "out" / "sana-dti" / "generation.json").read_text())["num_inference_steps"] == 2


def test_wan_runs_are_scored_on_the_first_frame_at_the_training_resolution(tiny_wan, evaluators, tmp_path):
    import train_dti_wan

    run = train_in_process(train_dti_wan, tiny_wan, tmp_path / "wan-dti", "--gradient_accumulation_steps", "1")
    argv = evaluate_args(tiny_wan, evaluators, tmp_path / "out", "--embeddings", str(run), "--instance_data_dir",
                         str(ASSETS), "--max_prompts", "1")  # fmt: skip
    del argv[argv.index("--height") : argv.index("--height") + 4]  # no --height / --width: the training resolution
    summary, calls, _ = run_evaluate(argv)
    assert summary["family"] == "wan" and calls == [(f"a {ROBOT} in the jungle", [0, 1])]
    result = summary["runs"]["wan-dti"]["subjects"]["toy_robot"]
    assert result["prompts"][0]["text_prompt"] == "a robot in the jungle" and len(result["images"]) == 2
    assert all(0 < image["text_sim"] < 1 for image in result["images"])
    settings = json.loads((tmp_path / "out" / "wan-dti" / "generation.json").read_text())
    assert (settings["height"], settings["width"], settings["num_frames"], settings["max_sequence_length"]) == (
        64, 64, 1, 512
    )  # fmt: skip
    assert Image.open(tmp_path / "out" / result["images"][0]["file"]).size == (64, 64)

    def size(*flags, concept=None):
        args, wan = evaluate.parse_args([*argv, *flags]), infer.FAMILIES["wan"]
        settings = evaluate.generation_settings(args, wan, "float32", concept or evaluate.load_run(run))
        return settings["height"], settings["width"]

    assert size("--wan_resolution", "pipeline") == (480, 832)  # WanPipeline's default, as the DTI authors evaluated
    assert size("--height", "32", "--width", "48", "--wan_resolution", "pipeline") == (32, 48)
    with pytest.raises(ValueError, match="no training resolution in its metadata; give --height and --width"):
        size(concept=infer.Concept(ROBOT, {"width:32": torch.ones(1, 32)}, ["robot.safetensors"]))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no reference images", r"--instance_data_dir .*empty: no reference images"),
        ("unknown prompt set", r"--prompt_set 'fancy': unknown; choose one of simple, complex_lv1, complex_lv2, style"),
        ("run without embeddings", r"--embeddings .*empty: no learned_embeds.safetensors"),
        ("prompt without slot", r"the prompt 'a photo' has no '\{\}' slot"),
        ("benchmark without folders", r"--benchmark dreambooth needs --dreambooth_dir"),
        ("no subjects found", r"No subjects found: --dreambooth_dir"),
        ("no styles found", r"No styles found: --styledrop_dir"),
        ("style protocol with the benchmark", r"--benchmark dreambooth and --protocol style are two evaluations"),
        ("styledrop without the protocol", r"--styledrop_dir with --protocol style"),
        (
            "style runs with embeddings",
            r"--protocol style with --runs_root takes the runs from --runs_root .* leave out "
            r"--embeddings",
        ),
        ("text encoder not SigLIP", r"--text_encoder .* is a dinov2 model"),
        ("frames for an image model", r"--num_frames is for Wan \(video\) checkpoints; StableDiffusionXLPipeline"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(runs, tiny_sdxl, evaluators, tmp_path, case, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "prompts.txt").write_text("a {} on the beach\na photo\n")
    single = ["--embeddings", str(runs["sdxl"]), "--instance_data_dir", str(ASSETS)]
    extra = {
        "no reference images": ["--embeddings", str(runs["sdxl"]), "--instance_data_dir", str(empty)],
        "unknown prompt set": [*single, "--prompt_set", "fancy"],
        "run without embeddings": ["--embeddings", str(runs["sdxl"]), str(empty), "--instance_data_dir", str(ASSETS)],
        "prompt without slot": [*single, "--prompt_file", str(tmp_path / "prompts.txt")],
        "benchmark without folders": ["--benchmark", "dreambooth", "--runs_root", str(empty)],
        "no subjects found": ["--benchmark", "dreambooth", "--dreambooth_dir", str(empty), "--runs_root", str(empty)],
        "no styles found": ["--protocol", "style", "--styledrop_dir", str(empty), "--runs_root", str(empty)],
        "style protocol with the benchmark": ["--benchmark", "dreambooth", "--protocol", "style"],
        "styledrop without the protocol": [*single, "--styledrop_dir", str(empty)],
        "style runs with embeddings": [
            *single,
            "--protocol",
            "style",
            "--runs_root",
            str(empty),
            "--styledrop_dir",
            str(empty),
        ],
        "text encoder not SigLIP": [*single, "--text_encoder", str(evaluators["dinov2"])],
        "frames for an image model": [*single, "--num_frames", "5"],
    }[case]
    with pytest.raises(ValueError, match=expected):
        evaluate.main(evaluate.parse_args(evaluate_args(tiny_sdxl, evaluators, tmp_path / "out", *extra)))
    assert not (tmp_path / "out").exists()


def test_a_pipeline_of_no_known_family_is_refused_before_any_image(tmp_path, monkeypatch):
    model = tmp_path / "sd3"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    save_file({ROBOT: torch.randn(1, 32)}, tmp_path / "robot.safetensors")
    monkeypatch.setattr(infer, "load_pipeline", lambda *args: pytest.fail("a pipeline was loaded"))
    argv = ["--pretrained_model_name_or_path", str(model), "--embeddings", str(tmp_path / "robot.safetensors"),
            "--instance_data_dir", str(ASSETS), "--image_encoder", "none", "--text_encoder", "none", "--device",
            "cpu", "--class_word", "toy", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(ValueError, match="is a StableDiffusion3Pipeline; infer.py supports StableDiffusionXLPipeline,"):
        evaluate.main(evaluate.parse_args(argv))
    assert not (tmp_path / "out").exists()


def test_command_line_error_is_one_line(runs, tiny_sdxl, evaluators, tmp_path):
    (tmp_path / "empty").mkdir()
    argv = evaluate_args(tiny_sdxl, evaluators, tmp_path / "out", "--embeddings", str(runs["sdxl"]),
                         "--instance_data_dir", str(tmp_path / "empty"))  # fmt: skip
    proc = run_commands({"no references": [str(REPO / "evaluate.py"), *argv]})["no references"]
    assert_one_line_error(proc, "--instance_data_dir")
    assert "no reference images" in proc.stderr and not (tmp_path / "out").exists()


def test_klein_runs_are_scored_at_the_runs_text_length(tiny_flux2_klein, evaluators, tmp_path):
    import train_dti_flux2_klein

    flags = ["--gradient_accumulation_steps", "1", "--max_sequence_length", "64"]
    run = train_in_process(train_dti_flux2_klein, tiny_flux2_klein, tmp_path / "klein-dti", *flags)
    argv = evaluate_args(tiny_flux2_klein, evaluators, tmp_path / "out", "--embeddings", str(run),
                         "--instance_data_dir", str(ASSETS), "--max_prompts", "1")  # fmt: skip
    summary, calls, _ = run_evaluate(argv)
    assert summary["family"] == "flux2-klein" and calls == [(f"a {ROBOT} in the jungle", [0, 1])]
    result = summary["runs"]["klein-dti"]["subjects"]["toy_robot"]
    assert result["prompts"][0]["text_prompt"] == "a robot in the jungle" and len(result["images"]) == 2
    assert all(0 < image["text_sim"] < 1 and -1 <= image["image_sim"] <= 1 for image in result["images"])
    settings = json.loads((tmp_path / "out" / "klein-dti" / "generation.json").read_text())
    assert (settings["num_inference_steps"], settings["max_sequence_length"], settings["height"]) == (2, 64, 64)
    assert Image.open(tmp_path / "out" / result["images"][0]["file"]).size == (64, 64)


STYLE_PROMPTS = json.loads(evaluate.PROMPTS_FILE.read_text())["style"]


def style_image(folder, name="00.png"):
    """A tiny stand-in for a StyleDrop image (the real ones are not in the repository): 48 x 40 stripes."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((40, 48, 3), dtype=np.uint8)
    pixels[:, ::4] = (200, 40, 90)
    Image.fromarray(pixels).save(folder / name)
    return folder


def test_style_protocol_scores_the_40_style_prompts_as_the_authors_style_evaluation(runs, tiny_sdxl, evaluators,
                                                                                   tmp_path):  # fmt: skip
    argv = evaluate_args(tiny_sdxl, evaluators, tmp_path / "out", "--protocol", "style", "--embeddings",
                         str(runs["sdxl"]), "--instance_data_dir", str(style_image(tmp_path / "style")),
                         "--class_word", "watercolor painting", "--clip_model", str(evaluators["clip"]))  # fmt: skip
    at = argv.index("--max_prompts")
    del argv[at : at + 2]  # all the protocol's prompts
    protocol = evaluate.parse_args(argv[: argv.index("--seeds")] + argv[argv.index("--seeds") + 3 :])
    assert (protocol.prompt_set, protocol.seeds, protocol.clip_model) == ("style", [0, 1], str(evaluators["clip"]))
    assert evaluate.parse_args(["--pretrained_model_name_or_path", "m", "--protocol", "style"]).clip_model == (
        "openai/clip-vit-large-patch14"
    )
    assert len(STYLE_PROMPTS) == 40 and STYLE_PROMPTS[0] == "A toothbrush in {} style"
    cheap = ["--seeds", "0", "--num_inference_steps", "1", "--height", "32", "--width", "32"]  # 40 images on a CPU
    with pytest.MonkeyPatch.context() as patch:  # their sampler: DDIM from the checkpoint's scheduler config
        schedulers = []
        patch.setattr(infer, "load_pipeline", lambda *a, load=infer.load_pipeline: schedulers.append(load(*a)) or
                      schedulers[-1])  # fmt: skip
        summary, calls, _ = run_evaluate([*argv, *cheap, "--scheduler", "ddim"])
    assert [type(pipe.scheduler).__name__ for pipe in schedulers] == ["DDIMScheduler"]
    assert calls == [(p.replace("{}", ROBOT), [0]) for p in STYLE_PROMPTS]  # the 40 prompts, the token in the slot
    recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (recorded["protocol"], recorded["prompt_set"]) == ("style", "style")
    result = recorded["runs"]["sdxl-dti"]["subjects"]["style"]
    assert len(result["images"]) == 40 and result["aggregate"].keys() == {"image_sim", "text_sim", "clip_t", "clip_i"}
    assert result["prompts"][0]["text_prompt"] == "A toothbrush in watercolor painting style."  # as theirs reads it
    for metric, aggregate in result["aggregate"].items():  # a style's number: the mean over its images
        values = [image[metric] for image in result["images"]]
        assert aggregate["mean"] == pytest.approx(np.mean(values)) and aggregate["n"] == 40

    # CLIP-T (their text score): the CLIP cosine of the image and the prompt with the class word and a period.
    # Image sim: DINOv2 on a center crop of the whole short side (theirs: resize to 224, crop 224), not of 32/28.
    first = tmp_path / "out" / result["images"][0]["file"]
    clip = evaluate.load_encoder(str(evaluators["clip"]), "--clip_model", "cpu", with_tokenizer=True)
    cosine = evaluate.paired_cosine(clip.images([first], 1), clip.texts(["A toothbrush in watercolor painting style."]))
    assert cosine.item() == pytest.approx(result["images"][0]["clip_t"], abs=1e-6)
    dino = evaluate.load_encoder(str(evaluators["dinov2"]), "--image_encoder", "cpu", with_tokenizer=False)
    plain = evaluate.image_similarity(
        dino.images([first], 1), dino.images(recorded["subjects"]["style"]["references"], 1)
    )
    dino.options = {"size": {"shortest_edge": 28}}
    theirs = evaluate.image_similarity(dino.images([first], 1), dino.images([tmp_path / "style" / "00.png"], 1))
    assert theirs.item() == pytest.approx(result["images"][0]["image_sim"], abs=1e-6)
    assert abs(plain.item() - theirs.item()) > 1e-4  # the crop matters


def test_style_protocol_over_the_styledrop_styles_averages_over_the_styles(runs, tiny_sdxl, evaluators, tmp_path):
    styles, root = tmp_path / "styledrop", tmp_path / "runs"
    style_image(styles, "00.png")  # an image file per style, as the authors' data/styledrop/<id>.png ...
    style_image(styles / "05", "05.png")  # ... or a folder per style, as training needs them
    style_image(styles, "07.png")  # no run has this style: left out
    for style in ("00", "05"):
        shutil.copytree(runs["sdxl"], root / "dti" / style)
    shutil.copytree(runs["ti"], root / "ti" / "00")
    argv = evaluate_args(tiny_sdxl, evaluators, tmp_path / "out", "--protocol", "style", "--styledrop_dir",
                         str(styles), "--runs_root", str(root), "--clip_model", str(evaluators["clip"]),
                         "--max_prompts", "1", "--seeds", "0")  # fmt: skip
    summary, calls, _ = run_evaluate(argv)
    assert summary["subjects"].keys() == {"00", "05"}
    assert sorted(calls) == sorted([(f"A toothbrush in {ROBOT} style", [0])] * 2 + [(f"A toothbrush in {TI} style",
                                   [0])])  # fmt: skip
    assert summary["subjects"]["05"]["class_word"] == "line drawing"  # the class word of styledrop_styles.json
    assert summary["runs"]["dti"]["subjects"]["00"]["prompts"][0]["text_prompt"] == (
        "A toothbrush in watercolor painting style."
    )
    dti = summary["runs"]["dti"]
    assert dti["over"] == "subjects" and dti["aggregate"]["clip_t"]["n"] == 2
    means = [dti["subjects"][s]["aggregate"]["clip_t"]["mean"] for s in ("00", "05")]
    assert dti["aggregate"]["clip_t"]["mean"] == pytest.approx(np.mean(means))
    assert summary["runs"]["ti"]["over"] == "images"  # one style


def test_the_style_table_is_the_authors_23_styles():
    styles = json.loads(evaluate.STYLES_FILE.read_text())
    assert "_source" in styles and list(styles["styles"]) == [f"{i:02d}" for i in range(23)]
    assert styles["styles"]["00"] == {
        "class": "watercolor painting",
        "initializer": "watercolor painting",
        "template": "A canyon in {} style.",
        "url": styles["styles"]["00"]["url"],
    }
    assert all("{}" in s["template"] for s in styles["styles"].values())
    assert styles["styles"]["21"]["class"] != styles["styles"]["21"]["initializer"]  # the one style where they differ

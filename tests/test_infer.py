"""Tests of infer.py on the tiny SDXL, SANA and Wan pipelines, with embeddings made by the training scripts."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import infer
from tests.conftest import REPO, assert_one_line_error, run_script_cases, training_args

ROBOT, CAT = "<toy-robot>", "<toy-cat>"
PACK = "<red-pack>"  # a Wan token of two vectors ("red backpack" is two pieces)


def train_in_process(script, model, output_dir, *extra):
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    result = script.main(script.parse_args(training_args(model, output_dir, *extra)))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return result


@pytest.fixture(scope="module")
def runs(tiny_sdxl, tiny_sana, tmp_path_factory):
    """Two concepts per family, trained for 2 steps: folders with the training scripts' outputs."""
    import train_dti_sana
    import train_dti_sdxl

    root = tmp_path_factory.mktemp("runs")
    cat = ["--placeholder_token", CAT, "--initializer_token", "cat"]
    steps = ["--max_train_steps", "2"]
    return {
        "sdxl_robot": train_in_process(train_dti_sdxl, tiny_sdxl, root / "sdxl-robot", *steps),
        "sdxl_cat": train_in_process(train_dti_sdxl, tiny_sdxl, root / "sdxl-cat", *steps, *cat),
        "sdxl_ti": train_in_process(
            train_dti_sdxl,
            tiny_sdxl,
            root / "sdxl-ti",
            *steps,
            "--method",
            "ti",
            "--learning_rate",
            "0.05",
            "--placeholder_token",
            "<toy-ti>",
        ),  # fmt: skip
        "sana_robot": train_in_process(train_dti_sana, tiny_sana, root / "sana-robot", *steps),
        "sana_cat": train_in_process(train_dti_sana, tiny_sana, root / "sana-cat", *steps, *cat),
        "root": root,
    }


def run_infer(model, output_dir, *extra):
    argv = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), "--height", "64",
            "--width", "64", "--num_inference_steps", "2", "--device", "cpu", *extra]  # fmt: skip
    return infer.main(infer.parse_args(argv))


def row(pipe, encoder, token):
    tokenizer = getattr(pipe, infer.TOKENIZERS[encoder])
    return getattr(pipe, encoder).get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)].detach()


@pytest.mark.parametrize("form", ["folder", "two files", "combined file", "a1111 file"])
def test_sdxl_loads_every_format_into_both_encoders(runs, tiny_sdxl, tmp_path, form):
    folder = runs["root"] / "sdxl-robot"
    l_vector = load_file(folder / "learned_embeds.safetensors")[ROBOT]
    g_vector = load_file(folder / "learned_embeds_2.safetensors")[ROBOT]
    specs, token = {
        "folder": ([folder], None),
        "two files": ([folder / "learned_embeds.safetensors", folder / "learned_embeds_2.safetensors"], None),
        "combined file": ([folder / "toy-robot.safetensors"], None),
        "a1111 file": ([tmp_path / "a1111.safetensors"], ROBOT),
    }[form]
    save_file({"emb_params": l_vector}, tmp_path / "a1111.safetensors")
    concepts = infer.load_embeddings(specs, token=token)
    assert [c.token for c in concepts] == [ROBOT]
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    vectors = infer.assign_encoders(concepts[0], infer.encoder_widths(pipe, infer.FAMILIES["sdxl"]))
    infer.add_tokens_to_sdxl(pipe, ROBOT, vectors)
    assert torch.equal(row(pipe, "text_encoder", ROBOT), l_vector[0])
    if form != "a1111 file":
        assert torch.equal(row(pipe, "text_encoder_2", ROBOT), g_vector[0])
    else:
        assert set(vectors) == {"text_encoder"}


def test_generation_files_and_generations_json(runs, tiny_sdxl, tmp_path, capsys):
    summary = run_infer(tiny_sdxl, tmp_path / "gen", "--embeddings", str(runs["root"] / "sdxl-robot"), "--prompt",
                        f"a photo of {ROBOT}", "--prompt", f"{ROBOT} on a beach", "--num_images_per_prompt", "2",
                        "--seed", "7")  # fmt: skip
    files = sorted(p.name for p in (tmp_path / "gen").iterdir())
    assert files == sorted([
        "generations.json", "p00-i0-seed7-a-photo-of-toy-robot.png", "p00-i1-seed8-a-photo-of-toy-robot.png",
        "p00-grid-a-photo-of-toy-robot.png", "p01-i0-seed7-toy-robot-on-a-beach.png",
        "p01-i1-seed8-toy-robot-on-a-beach.png", "p01-grid-toy-robot-on-a-beach.png",
    ])  # fmt: skip
    assert Image.open(tmp_path / "gen" / "p01-grid-toy-robot-on-a-beach.png").size == (128, 64)
    recorded = json.loads((tmp_path / "gen" / "generations.json").read_text())
    assert recorded == json.loads(json.dumps(summary))
    assert recorded["family"] == "sdxl" and recorded["scheduler"] == "DPMSolverMultistepScheduler"
    assert [(r["prompt_index"], r["index"], r["seed"]) for r in recorded["images"]] == [
        (0, 0, 7), (0, 1, 8), (1, 0, 7), (1, 1, 8)
    ]  # fmt: skip
    assert recorded["embeddings"][0]["encoders"] == {"text_encoder": [1, 32], "text_encoder_2": [1, 48]}
    assert recorded["settings"]["num_inference_steps"] == 2 and recorded["embeddings"][0]["metadata"]["method"] == "dti"
    last = capsys.readouterr().out.splitlines()[-1]
    wrote = "wrote 4 images, 2 grids and generations.json in " + re.escape(str(tmp_path / "gen"))
    assert re.fullmatch(rf"Done in \d+m\d\ds: {wrote}\.", last)


def test_sana_loader_gives_the_prompt_embeddings_training_computed(runs, tiny_sana):
    from diffusers import SanaPipeline

    import train_dti_sana

    result = runs["sana_robot"]
    pipe = SanaPipeline.from_pretrained(tiny_sana)
    (concept,) = infer.load_embeddings([runs["root"] / "sana-robot"])
    infer.add_tokens_to_sana(pipe, concept.token, concept.vectors["width:64"])
    prompt = f"a photo of {ROBOT} in the snow"
    embeds, mask, _, _ = pipe.encode_prompt(
        infer.expand_prompt(prompt, pipe.tokenizer), do_classifier_free_guidance=False, complex_human_instruction=None
    )
    text = train_dti_sana.tokenize_prompt(result.components["tokenizer"], 300, None, prompt)
    text = {key: torch.tensor([ids]) for key, ids in text.items()}
    with torch.no_grad():
        trained, trained_mask = train_dti_sana.encode_prompt(result.components["text_encoder"], text, 300)
    assert torch.equal(mask, trained_mask) and torch.equal(embeds, trained)


def test_expand_prompt_matches_diffusers_maybe_convert_prompt(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.load_textual_inversion(
        torch.randn(3, 32), token="<a>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        torch.randn(1, 32), token="<b>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    for prompt in ["a photo of <a>", "<a> and <b> and <a>", "<b> alone", "no token"]:
        assert infer.expand_prompt(prompt, pipe.tokenizer) == pipe.maybe_convert_prompt(prompt, pipe.tokenizer)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_interpolation_endpoints_equal_plain_generations_and_frames_keep_the_norm(
    runs, tiny_sdxl, tiny_sana, tmp_path, family, capsys
):
    model = tiny_sdxl if family == "sdxl" else tiny_sana
    embeddings = ["--embeddings", str(runs["root"] / f"{family}-robot"), str(runs["root"] / f"{family}-cat")]
    run_infer(model, tmp_path / "blend", *embeddings, "--prompt", f"a photo of {ROBOT}", "--interpolate", ROBOT, CAT,
              "--interpolation_steps", "4", "--seed", "3")  # fmt: skip
    assert "appears in no prompt" not in capsys.readouterr().err  # the blend's second token needs no prompt
    run_infer(model, tmp_path / "cat", *embeddings, "--prompt", f"a photo of {CAT}", "--seed", "3")
    run_infer(model, tmp_path / "robot", *embeddings, "--prompt", f"a photo of {ROBOT}", "--seed", "3")
    assert not list((tmp_path / "blend").glob("p00-i0-*")) and not list((tmp_path / "blend").glob("p00-grid-*"))
    frames = sorted((tmp_path / "blend").glob("p00-interpolate-0*.png"))
    times = ["0.00", "0.33", "0.67", "1.00"]
    assert [f.name for f in frames] == [f"p00-interpolate-0{k}-t{t}.png" for k, t in enumerate(times)]
    pixels = [np.asarray(Image.open(f)) for f in frames]
    plain_robot = np.asarray(Image.open(next((tmp_path / "robot").glob("p00-i0-seed3-*.png"))))
    plain_cat = np.asarray(Image.open(next((tmp_path / "cat").glob("p00-i0-seed3-*.png"))))
    assert np.array_equal(pixels[0], plain_robot) and np.array_equal(pixels[-1], plain_cat)
    assert not np.array_equal(pixels[1], pixels[0])
    assert Image.open(tmp_path / "blend" / "p00-interpolate-strip.png").size == (256, 64)
    concepts = {c.token: c for c in infer.load_embeddings(embeddings[1:])}
    for key, a in concepts[ROBOT].vectors.items():
        b = concepts[CAT].vectors[key]
        for t in (0.25, 0.5, 0.75):
            mixed = infer.slerp(a, b, t)
            assert torch.allclose(mixed.norm(dim=-1), a.norm(dim=-1), rtol=1e-6)
            angle = lambda x, y: torch.arccos(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1))  # noqa: E731
            assert torch.allclose(angle(a, mixed), t * angle(a, b), atol=1e-6)


def test_rescale_sets_the_norms_to_the_vocabulary_statistic(runs, tiny_sdxl, tmp_path):
    from transformers import CLIPTextModel

    table = CLIPTextModel.from_pretrained(tiny_sdxl, subfolder="text_encoder").get_input_embeddings().weight.detach()
    ti = load_file(runs["root"] / "sdxl-ti" / "learned_embeds.safetensors")["<toy-ti>"]
    assert abs(ti.norm() - table.norm(dim=1).mean()) > 1e-3
    for how, expected in [("mean", table.norm(dim=1).mean().item()), ("max", table.norm(dim=1).max().item()),
                          ("2.5", 2.5)]:  # fmt: skip
        rescaled = infer.rescale(ti, table, how)
        assert rescaled.norm(dim=-1).tolist() == pytest.approx([expected], rel=1e-6)
        assert torch.allclose(
            torch.nn.functional.normalize(rescaled, dim=-1), torch.nn.functional.normalize(ti, dim=-1)
        )
    summary = run_infer(tiny_sdxl, tmp_path / "r", "--embeddings", str(runs["root"] / "sdxl-ti"), "--rescale", "mean",
                        "--report")  # fmt: skip
    assert summary["report"]["<toy-ti>"]["text_encoder"][0]["norm"] == pytest.approx(
        table.norm(dim=1).mean().item(), rel=1e-6
    )


def test_report_numbers_against_a_hand_computation(runs, tiny_sdxl, tmp_path, capsys):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    summary = run_infer(tiny_sdxl, tmp_path / "r", "--embeddings", str(runs["root"] / "sdxl-ti"), "--report")
    vector = load_file(runs["root"] / "sdxl-ti" / "learned_embeds_2.safetensors")["<toy-ti>"][0].double()
    table = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    table = table.get_input_embeddings().weight.detach().double()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")
    (got,) = summary["report"]["<toy-ti>"]["text_encoder_2"]
    norms = sorted(table.norm(dim=1).tolist())
    assert got["norm"] == pytest.approx(vector.norm().item(), rel=1e-6)
    assert got["percentile"] == pytest.approx(
        100 * sum(n <= vector.norm().item() for n in norms) / len(norms), abs=0.01
    )
    cosines = (table @ vector) / (table.norm(dim=1) * vector.norm())
    expected = [tokenizer.convert_ids_to_tokens(i) for i in cosines.argsort(descending=True)[:5].tolist()]
    assert [word for word, _ in got["nearest"]] == expected
    assert "<toy-ti> [text_encoder_2] vector 0: norm" in capsys.readouterr().out


def test_sana_generation_follows_the_recorded_instruction_setting(runs, tiny_sana, tmp_path):
    summary = run_infer(tiny_sana, tmp_path / "g", "--embeddings", str(runs["root"] / "sana-robot"), "--prompt",
                        f"a {ROBOT}")  # fmt: skip
    assert summary["family"] == "sana" and summary["complex_human_instruction"] is None
    forced = run_infer(tiny_sana, tmp_path / "h", "--embeddings", str(runs["root"] / "sana-robot"), "--prompt",
                       f"a {ROBOT}", "--complex_human_instruction", "on")  # fmt: skip
    assert forced["complex_human_instruction"] and isinstance(forced["complex_human_instruction"], list)
    a, b = (np.asarray(Image.open(next(d.glob("p00-i0-*.png")))) for d in (tmp_path / "g", tmp_path / "h"))
    assert not np.array_equal(a, b)


ERROR_CASES = {
    "missing file": (["--embeddings", "/nonexistent/learned_embeds.safetensors"], "--embeddings"),
    "width fits no encoder": (["--embeddings", "WIDTH40"], "width 40, which fits no encoder"),
    "token already exists": (["--embeddings", "ROBOTWORD"], "already exists"),
    "unsupported pipeline": (["--pretrained_model_name_or_path", "OTHERPIPE"], "supports StableDiffusionXLPipeline"),
    "bad rescale": (["--rescale", "median"], "--rescale"),
    "video flag on an image model": (["--num_frames", "5"], "--num_frames is for Wan (video) checkpoints; Stable"),
}


@pytest.fixture(scope="module")
def infer_error_runs(runs, tiny_sdxl, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("infer-errors")
    save_file({"<w40>": torch.randn(1, 40)}, tmp_path / "w40.safetensors")
    save_file({"robot": torch.randn(1, 32)}, tmp_path / "robot.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    substitutions = {"WIDTH40": str(tmp_path / "w40.safetensors"), "ROBOTWORD": str(tmp_path / "robot.safetensors"),
                     "OTHERPIPE": str(other)}  # fmt: skip
    argvs = {}
    for name, (extra, _) in ERROR_CASES.items():
        extra = [substitutions.get(x, x) for x in extra]
        argv = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--prompt", "a photo", "--output_dir",
                str(tmp_path / "out"), *extra]  # fmt: skip
        if "--embeddings" not in extra:
            argv += ["--embeddings", str(runs["root"] / "sdxl-robot")]
        argvs[name] = argv
    procs = run_script_cases(REPO / "infer.py", argvs)
    results = {name: (proc, ERROR_CASES[name][1]) for name, proc in procs.items()}
    results["out"] = tmp_path / "out"
    return results


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_gives_one_line_error(infer_error_runs, name):
    assert_one_line_error(*infer_error_runs[name])
    assert not list(infer_error_runs["out"].glob("*.png"))


def test_a_pipeline_of_no_known_family_is_refused_in_one_line_before_loading(tmp_path):
    model = tmp_path / "sd3"
    model.mkdir()  # model_index.json alone: a run that got past detection would fail on the missing weights
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    save_file({ROBOT: torch.randn(1, 32)}, tmp_path / "robot.safetensors")
    argv = ["--pretrained_model_name_or_path", str(model), "--embeddings", str(tmp_path / "robot.safetensors"),
            "--prompt", f"a {ROBOT}", "--device", "cpu", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    proc = run_script_cases(REPO / "infer.py", {"sd3": argv})["sd3"]
    assert_one_line_error(proc, "is a StableDiffusion3Pipeline; infer.py supports StableDiffusionXLPipeline, "
                                "SanaPipeline, WanPipeline and Flux2KleinPipeline checkpoints.")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_token_in_no_prompt_is_warned(runs, tiny_sdxl, tmp_path, capsys):
    run_infer(tiny_sdxl, tmp_path / "g", "--embeddings", str(runs["root"] / "sdxl-robot"), "--prompt", "a photo")
    assert f"warning: {ROBOT} appears in no prompt." in capsys.readouterr().err


def test_prompt_file_sampler_guidance_and_negative_prompt_reach_the_pipeline(runs, tiny_sdxl, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of {ROBOT}\n\n{ROBOT} in the snow\n")
    common = ["--embeddings", str(runs["root"] / "sdxl-robot"), "--prompt_file", str(prompts), "--seed", "1"]
    plain = run_infer(tiny_sdxl, tmp_path / "plain", *common)
    tuned = run_infer(tiny_sdxl, tmp_path / "tuned", *common, "--scheduler", "euler", "--guidance_scale", "9",
                      "--negative_prompt", "blurry")  # fmt: skip
    assert [r["prompt"] for r in plain["images"]] == [f"a photo of {ROBOT}", f"{ROBOT} in the snow"]
    assert plain["scheduler"] == "DPMSolverMultistepScheduler" and tuned["scheduler"] == "EulerDiscreteScheduler"
    assert tuned["settings"]["guidance_scale"] == 9 and tuned["settings"]["negative_prompt"] == "blurry"
    a, b = (np.asarray(Image.open(d / plain["images"][0]["file"])) for d in (tmp_path / "plain", tmp_path / "tuned"))
    assert not np.array_equal(a, b)


def test_hub_ids_and_weight_name_resolve_to_files(runs, monkeypatch):
    import huggingface_hub

    folder = runs["root"] / "sdxl-robot"
    asked = []

    def download(repo_id, filename):
        asked.append((repo_id, filename))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert infer.embedding_files("me/robot-concept", None) == [folder / name for name in infer.TRAINING_FILES]
    assert asked == [("me/robot-concept", name) for name in infer.TRAINING_FILES]
    assert infer.embedding_files(str(folder), "toy-robot.safetensors") == [folder / "toy-robot.safetensors"]
    (concept,) = infer.load_embeddings(["me/robot-concept"])
    assert set(concept.vectors) == {"width:32", "width:48"} and concept.token == ROBOT


# ----------------------------------------------------------------------------------------------------------------
# Wan 2.1
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_run(tiny_wan, tmp_path_factory):
    """(training result, output folder) of a two-vector token trained for 2 steps on the tiny Wan pipeline, with
    64 text tokens (not WanPipeline's 512: infer.py must take the length from the metadata)."""
    import train_dti_wan

    folder = tmp_path_factory.mktemp("wan") / "red-pack"
    flags = ["--max_train_steps", "2", "--gradient_accumulation_steps", "1", "--placeholder_token", PACK,
             "--initializer_token", "red backpack", "--max_sequence_length", "64"]  # fmt: skip
    result = train_in_process(train_dti_wan, tiny_wan, folder, *flags)
    return result, folder


def wan_frame_by_hand(model, folder, prompt, seed):
    """The 64 px first frame WanPipeline makes after the rows are put in as README.md shows (AddedToken, lstrip)."""
    from diffusers import WanPipeline
    from transformers import AddedToken

    pipe = WanPipeline.from_pretrained(model)
    vectors = load_file(folder / "learned_embeds.safetensors")[PACK]
    names = [PACK, f"{PACK}_1"]
    pipe.tokenizer.add_tokens([AddedToken(name, lstrip=True) for name in names])
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[pipe.tokenizer.convert_tokens_to_ids(names)] = vectors
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt.replace(PACK, " ".join(names)), height=64, width=64, num_frames=1, num_inference_steps=2,
                max_sequence_length=64, generator=generator, output_type="pil").frames[0][0]  # fmt: skip


def test_wan_writes_the_first_frame_as_a_png_and_a_5_frame_mp4(wan_run, tiny_wan, tmp_path):
    imageio = pytest.importorskip("imageio.v2", reason="pip install imageio imageio-ffmpeg")
    _, folder = wan_run
    prompt = f"a photo of a {PACK} on a beach"
    still = run_infer(tiny_wan, tmp_path / "still", "--embeddings", str(folder), "--prompt", prompt, "--seed", "3")
    assert (still["family"], still["scheduler"], still["num_frames"]) == ("wan", "UniPCMultistepScheduler", 1)
    assert still["max_sequence_length"] == 64 and still["embeddings"][0]["encoders"] == {"text_encoder": [2, 32]}
    png = tmp_path / "still" / "p00-i0-seed3-a-photo-of-a-red-pack-on-a-beach.png"
    assert still["images"][0]["file"] == png.name
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(wan_frame_by_hand(tiny_wan, folder, prompt, 3)))

    video = run_infer(tiny_wan, tmp_path / "video", "--embeddings", str(folder), "--prompt", prompt, "--seed", "3",
                      "--num_frames", "5", "--scheduler", "euler")  # fmt: skip
    assert video["scheduler"] == "FlowMatchEulerDiscreteScheduler" and video["num_frames"] == 5
    assert json.loads((tmp_path / "video" / "generations.json").read_text())["num_frames"] == 5
    (mp4,) = (tmp_path / "video").glob("*.mp4")
    assert video["images"][0]["file"] == mp4.name == png.with_suffix(".mp4").name
    with imageio.get_reader(mp4, format="FFMPEG") as reader:
        assert reader.count_frames() == 5 and reader.get_meta_data()["fps"] == 16
        assert reader.get_data(0).shape == (64, 64, 3)
    assert Image.open(tmp_path / "video" / "p00-grid-a-photo-of-a-red-pack-on-a-beach.png").size == (64, 64)


def test_the_wan_token_changes_the_image(wan_run, tiny_wan, tmp_path):
    _, folder = wan_run
    run_infer(tiny_wan, tmp_path / "token", "--embeddings", str(folder), "--prompt", f"a photo of a {PACK}")
    run_infer(tiny_wan, tmp_path / "words", "--prompt", "a photo of a red backpack")
    token, words = (np.asarray(Image.open(next((tmp_path / d).glob("p00-i0-*.png")))) for d in ("token", "words"))
    assert token.shape == words.shape == (64, 64, 3) and not np.array_equal(token, words)  # the tiny text path is weak


def test_infer_feeds_wan_the_ids_training_fed(wan_run, tiny_wan, tmp_path, monkeypatch):
    """The ids the UMT5 encoder gets from infer.py (the token added as training adds it, the prompt expanded) are the
    ids train_dti_wan.tokenize_prompt gives the same prompt with the training's tokenizer."""
    import train_dti_wan

    result, folder = wan_run
    fed, load = [], infer.load_pipeline

    def load_and_watch(*args):
        pipe = load(*args)
        pipe.text_encoder.register_forward_pre_hook(lambda module, inputs: fed.extend(inputs[0].tolist()))
        return pipe

    monkeypatch.setattr(infer, "load_pipeline", load_and_watch)
    prompt = f"a photo of a {PACK} on a beach"
    run_infer(tiny_wan, tmp_path / "g", "--embeddings", str(folder), "--prompt", prompt, "--guidance_scale", "1")
    tokenizer = result.components["tokenizer"]
    trained = train_dti_wan.tokenize_prompt(tokenizer, 64, prompt.replace(PACK, f"{PACK} {PACK}_1"))["input_ids"]
    new_ids = tokenizer.convert_tokens_to_ids([PACK, f"{PACK}_1"])
    assert fed == [trained] and trained[4:6] == new_ids and new_ids[0] >= len(tokenizer) - 2


def test_wan_samplers_keep_the_flow_shift_and_the_vae_stays_float32(tiny_wan):
    def load(scheduler):
        args = infer.parse_args(["--pretrained_model_name_or_path", str(tiny_wan), "--scheduler", scheduler])
        return infer.load_pipeline(args, infer.FAMILIES["wan"], torch.bfloat16, "cpu")

    default, dpm, euler = load("default"), load("dpm"), load("euler")
    assert type(default.scheduler).__name__ == "UniPCMultistepScheduler" and default.scheduler.config.flow_shift == 3
    assert type(dpm.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert (dpm.scheduler.config.flow_shift, dpm.scheduler.config.use_flow_sigmas) == (3.0, True)
    assert type(euler.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and euler.scheduler.config.shift == 3
    assert default.vae.dtype == torch.float32  # the rest in the asked dtype
    assert default.transformer.dtype == default.text_encoder.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--num_frames", "4"], r"--num_frames must be 4k \+ 1 \(1, 5, 9, ..., 81\), got 4"),
        (["--num_frames", "5", "--interpolate", PACK, PACK], "--interpolate renders still frames"),
        (["--max_sequence_length", "1"], "--max_sequence_length must be at least 2, got 1."),
    ],
)
def test_wan_video_flags_are_refused_before_loading(wan_run, tiny_wan, tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(infer, "load_pipeline", lambda *args: pytest.fail("a pipeline was loaded"))
    with pytest.raises(ValueError, match=expected):
        run_infer(tiny_wan, tmp_path / "out", "--embeddings", str(wan_run[1]), "--prompt", f"a {PACK}", *flags)
    assert not (tmp_path / "out").exists()


def test_wan_videos_without_imageio_are_refused_before_loading(wan_run, tiny_wan, tmp_path, monkeypatch):
    import importlib.util

    _, folder = wan_run
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name.startswith("imageio") else
                        find_spec(name, *rest))  # fmt: skip
    monkeypatch.setattr(infer, "load_pipeline", lambda *args: pytest.fail("a pipeline was loaded"))
    with pytest.raises(ValueError, match=r"needs imageio and imageio-ffmpeg: pip install imageio imageio-ffmpeg\.$"):
        run_infer(tiny_wan, tmp_path / "out", "--embeddings", str(folder), "--prompt", f"a {PACK}", "--num_frames", "5")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------

BOT = "<klein-bot>"  # a FLUX.2 [klein] token of two vectors


@pytest.fixture(scope="module")
def klein_run(tiny_flux2_klein, tmp_path_factory):
    """(training result, output folder) of a two-vector token trained for 2 steps on the tiny base klein pipeline,
    with 64 text tokens (not the pipeline's 512: infer.py must take the length from the metadata)."""
    import train_dti_flux2_klein

    folder = tmp_path_factory.mktemp("klein") / "klein-bot"
    flags = ["--max_train_steps", "2", "--gradient_accumulation_steps", "1", "--placeholder_token", BOT,
             "--num_vectors", "2", "--max_sequence_length", "64"]  # fmt: skip
    return train_in_process(train_dti_flux2_klein, tiny_flux2_klein, folder, *flags), folder


@pytest.fixture(scope="module")
def tiny_klein_distilled(tmp_path_factory):
    """The tiny klein pipeline with "is_distilled": true (the same weights as the base one)."""
    from tests.tiny_flux2_klein import save_tiny_flux2_klein

    return save_tiny_flux2_klein(tmp_path_factory.mktemp("tiny-klein-distilled") / "pipeline", distilled=True)


def run_klein(model, output_dir, *extra):
    """infer.main on a klein pipeline at 64 px, with the family's own step default unless extra names one."""
    argv = ["--pretrained_model_name_or_path", str(model), "--output_dir", str(output_dir), "--height", "64",
            "--width", "64", "--device", "cpu", *extra]  # fmt: skip
    summary = infer.main(infer.parse_args(argv))
    return summary, np.asarray(Image.open(output_dir / summary["images"][0]["file"]))


def test_klein_token_generates_on_base_and_distilled_with_their_defaults(klein_run, tiny_flux2_klein,
                                                                        tiny_klein_distilled, tmp_path):  # fmt: skip
    _, folder = klein_run
    token_prompt = ["--embeddings", str(folder), "--prompt", f"a photo of {BOT}"]
    words = ["--prompt", "a photo of robot"]
    base, base_image = run_klein(tiny_flux2_klein, tmp_path / "base", *token_prompt, "--num_inference_steps", "2")
    assert (base["family"], base["scheduler"], base["max_sequence_length"]) == (
        "flux2-klein", "FlowMatchEulerDiscreteScheduler", 64
    )  # fmt: skip
    assert base["guidance_scale"] is None and base["embeddings"][0]["encoders"]["text_encoder"][0] == 2
    _, base_words = run_klein(tiny_flux2_klein, tmp_path / "base-words", *words, "--num_inference_steps", "2")
    assert base_image.shape == (64, 64, 3) and not np.array_equal(base_image, base_words)

    distilled, image = run_klein(tiny_klein_distilled, tmp_path / "distilled", *token_prompt)
    assert (distilled["num_inference_steps"], distilled["guidance_scale"]) == (4, 1.0)  # no guidance to ignore
    _, distilled_words = run_klein(tiny_klein_distilled, tmp_path / "distilled-words", *words)
    assert image.shape == (64, 64, 3) and not np.array_equal(image, distilled_words)

    def resolved(model, *flags):
        args = infer.parse_args(["--pretrained_model_name_or_path", str(model), *flags])
        return infer.sampling_settings(args, infer.FAMILIES["flux2-klein"], [])

    assert resolved(tiny_flux2_klein) == {"num_inference_steps": 50, "guidance_scale": None, "max_sequence_length": 512}
    assert resolved(tiny_klein_distilled, "--num_inference_steps", "8")["num_inference_steps"] == 8
    for flags in (["--guidance_scale", "4"], ["--negative_prompt", "blurry"]):
        with pytest.raises(ValueError, match="do nothing on a step-distilled FLUX.2 \\[klein\\] checkpoint"):
            resolved(tiny_klein_distilled, *flags)
    with pytest.raises(ValueError, match="--scheduler dpm is not one FLUX.2 \\[klein\\] samples with; use default"):
        run_klein(tiny_flux2_klein, tmp_path / "dpm", *token_prompt, "--scheduler", "dpm")


def test_infer_feeds_klein_the_ids_training_fed(klein_run, tiny_flux2_klein, tmp_path, monkeypatch):
    """The ids Qwen3 gets from infer.py (the token added as training adds it, the prompt expanded, the chat template)
    are the ids train_dti_flux2_klein.tokenize_prompt gives the same prompt with the training's tokenizer."""
    import train_dti_flux2_klein

    result, folder = klein_run
    fed, load = [], infer.load_pipeline

    def load_and_watch(*args):
        pipe = load(*args)
        hook = lambda module, inputs, kwargs: fed.extend(kwargs["input_ids"].tolist())  # noqa: E731 (by keyword)
        pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
        return pipe

    monkeypatch.setattr(infer, "load_pipeline", load_and_watch)
    prompt = f"a photo of {BOT} on a beach"
    run_klein(tiny_flux2_klein, tmp_path / "g", "--embeddings", str(folder), "--prompt", prompt, "--guidance_scale",
              "1", "--num_inference_steps", "1")  # fmt: skip
    tokenizer = result.components["tokenizer"]
    trained = train_dti_flux2_klein.tokenize_prompt(tokenizer, 64, prompt.replace(BOT, f"{BOT} {BOT}_1"))["input_ids"]
    new_ids = tokenizer.convert_tokens_to_ids([BOT, f"{BOT}_1"])
    assert fed == [trained] and set(new_ids) <= set(trained) and min(new_ids) >= len(tokenizer) - 2


def test_embeddings_of_another_family_are_refused_before_loading(runs, tiny_sdxl, tiny_sana, tmp_path, monkeypatch):
    """A SANA run given to an SDXL model (and the other way round): the widths come from the encoders' configs."""
    monkeypatch.setattr(infer, "load_pipeline", lambda *args: pytest.fail("a pipeline was loaded"))
    for model, run in ((tiny_sdxl, "sana-robot"), (tiny_sana, "sdxl-robot")):
        with pytest.raises(ValueError, match=r"which fits no encoder of the model \(text_encoder: "):
            run_infer(model, tmp_path / "out", "--embeddings", str(runs["root"] / run), "--prompt", f"a {ROBOT}")
    assert not (tmp_path / "out").exists()

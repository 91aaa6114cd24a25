"""Per-image captions (--captions, --caption_column, a --concepts_list entry's captions): a sample's prompt is its
image's caption with the token in the slot, and every other draw of the stream is the one a run without captions
makes. Bad caption input is refused in tests/test_bad_input.py, for the four scripts."""

import json
import random

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import train_dti_sdxl as dti
from tests.conftest import ASSETS, training_args

TOKEN = "<toy-robot>"
EVALUATION = ASSETS.parent / "evaluation"  # the style table and the DreamBooth captions
NAMES = sorted(p.name for p in ASSETS.iterdir())
# "01_wood_table.jpg" -> "a {} on the wood table", ...
CAPTIONS = {name: f"a {{}} on the {name.split('_', 1)[1].rsplit('.', 1)[0].replace('_', ' ')}" for name in NAMES}


def no_text(prompt):
    return {}


def draws(sample):
    return sample["image_index"], sample["flip"], sample["crop_top_left"].tolist()


def test_a_samples_prompt_is_its_images_caption_and_the_other_draws_do_not_change():
    images = dti.load_training_images(ASSETS, 64)
    captions = [CAPTIONS[path.name] for path, _ in images]
    common = (TOKEN, no_text, 64, False, True, dti.OBJECT_TEMPLATES, 3)  # random crops (02_studio is wide) and flips
    plain = dti.DTIDataset(images, *common, seed=5)
    captioned = dti.DTIDataset(images, *common, seed=5, captions=captions)
    samples = [(plain[p], captioned[p]) for p in range(len(plain))]
    for position, (without, with_captions) in enumerate(samples):
        name = images[with_captions["image_index"]][0].name
        assert with_captions["prompt"] == CAPTIONS[name].replace("{}", TOKEN)
        assert draws(with_captions) == draws(without)
        assert torch.equal(with_captions["pixel_values"], without["pixel_values"])
        # Without captions the prompt is the template drawn first from the sample's own generator, as it always was.
        template = random.Random(dti.stable_seed(5, "sample", position)).choice(dti.OBJECT_TEMPLATES)
        assert without["prompt"] == template.format(TOKEN)
    assert {s["flip"] for s, _ in samples} == {True, False} and len({tuple(draws(s)[2]) for s, _ in samples}) > 2


def check_prompts(concept, tokenizers, expected):
    """Every sample of an epoch trains on expected[image name] with the token, tokenized as the pipeline does."""
    dataset = concept.dataset
    for position in range(len(dataset)):
        sample = dataset[position]
        name = concept.images[sample["image_index"]][0]
        prompt = expected[str(name)].replace("{}", TOKEN)
        assert sample["prompt"] == prompt
        assert sample["text"] == dti.tokenize_prompt(tokenizers, prompt)
        assert set(concept.placeholder_ids[0]) <= set(sample["text"]["input_ids"])


def test_a_run_with_a_captions_file_trains_on_its_captions_and_records_them(train, tmp_path):
    captions = {f"toy_robot/{name}": caption for name, caption in CAPTIONS.items()}  # '<folder>/<file>' keys first
    captions |= {"_source": "notes are left out", NAMES[0]: "unused {}: the folder's key wins", NAMES[1]: "a {} alone"}
    del captions[f"toy_robot/{NAMES[1]}"]
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    result, out = train("--captions", str(tmp_path / "captions.json"), "--max_train_steps", "1")
    tokenizers = [result.components["tokenizer"], result.components["tokenizer_2"]]
    check_prompts(result.concepts[0], tokenizers, {str(ASSETS / n): c for n, c in CAPTIONS.items()} | {
        str(ASSETS / NAMES[1]): "a {} alone"})  # fmt: skip
    with safe_open(out / "learned_embeds.safetensors", framework="pt") as f:
        assert f.metadata()["captions"] == "captions.json"
    assert "| prompts | per-image captions (captions.json) |" in (out / "README.md").read_text()


def test_a_dataset_trains_on_its_caption_column_row_by_row(tiny_sdxl, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"bytes": (ASSETS / name).read_bytes(), "path": None} for name in NAMES[:3]]
    rows.insert(1, {"bytes": b"\x89PNG garbage", "path": None})  # skipped: the captions stay with their images
    texts = [CAPTIONS[NAMES[0]], "a {} that cannot be read", CAPTIONS[NAMES[1]], CAPTIONS[NAMES[2]]]
    pq.write_table(pa.table({"image": rows, "text": texts}), tmp_path / "robot.parquet")
    argv = training_args(tiny_sdxl, tmp_path / "out", "--max_train_steps", "1")
    at = argv.index("--train_data_dir")
    argv[at : at + 2] = ["--dataset_name", str(tmp_path / "robot.parquet"), "--caption_column", "text"]
    result = dti.main(dti.parse_args(argv))
    tokenizers = [result.components["tokenizer"], result.components["tokenizer_2"]]
    expected = {"robot.parquet[0]": texts[0], "robot.parquet[2]": texts[2], "robot.parquet[3]": texts[3]}
    check_prompts(result.concepts[0], tokenizers, expected)
    with safe_open(tmp_path / "out" / "learned_embeds.safetensors", framework="pt") as f:
        assert f.metadata()["captions"] == "column text"


def test_a_concepts_list_entry_takes_its_own_captions(tiny_sdxl, tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    entries = [{"placeholder_token": TOKEN, "initializer_token": "robot", "train_data_dir": str(ASSETS),
                "captions": str(tmp_path / "captions.json")},
               {"placeholder_token": "<toy-b>", "initializer_token": "robot",
                "train_data_dir": str(ASSETS)}]  # fmt: skip
    (tmp_path / "concepts.json").write_text(json.dumps(entries))
    argv = training_args(tiny_sdxl, tmp_path / "out", "--max_train_steps", "1")
    for flag in ("--train_data_dir", "--placeholder_token", "--initializer_token"):
        at = argv.index(flag)
        del argv[at : at + 2]
    result = dti.main(dti.parse_args([*argv, "--concepts_list", str(tmp_path / "concepts.json")]))
    captioned, plain = result.concepts
    tokenizers = [result.components["tokenizer"], result.components["tokenizer_2"]]
    check_prompts(captioned, tokenizers, {str(ASSETS / n): c for n, c in CAPTIONS.items()})
    assert plain.captions is None and plain.dataset[0]["prompt"] in [t.format("<toy-b>") for t in dti.OBJECT_TEMPLATES]


@pytest.mark.parametrize(
    ("captions", "fits"),
    [("a {} " + "red " * 72, True), ("a {} " + "red " * 73, False), ("red " * 75 + "{}", False)],
)
def test_a_caption_must_fit_the_context_whole(tiny_sdxl, captions, fits):
    """CLIP: <bos>, 75 tokens, <eos>. The token's one vector and the whole caption must fit: 'a', the token and 72
    words do; with 73 they fill the context exactly, which is refused too (it looks the same as a caption cut off);
    so is a token past the end."""
    from transformers import CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    ids = [dti.add_placeholder_tokens(t, TOKEN, 1) for t in tokenizers]
    args = dti.parse_args(training_args(tiny_sdxl, "out", "--captions", "captions.json"))
    fit = lambda: dti.check_prompts_fit(args, dti.FAMILY.prompt_tokenizers(args, tokenizers)[1], [], ids, 1,  # noqa: E731
                                        [("a.png", captions)])  # fmt: skip
    if fits:
        fit()
    else:
        with pytest.raises(ValueError, match=r"^--captions captions.json: the caption of a.png is cut off by the text"):
            fit()


def test_read_captions_reads_unicode_and_leaves_notes_out(tmp_path):
    file = tmp_path / "c.json"
    file.write_bytes(json.dumps({"_source": "MIT", "café.png": "un {} au café"}, ensure_ascii=False).encode())
    assert dti.read_captions(file) == {"café.png": "un {} au café"}


def test_the_style_recipe_trains_one_image_on_its_template(train, tmp_path):
    """The StyleDrop recipe: one style image, a captions file of one entry holding its template, the style's
    initializer (two words: two vectors on SDXL), every sample the template with the token's expansion."""
    style = tmp_path / "styledrop" / "00"
    style.mkdir(parents=True)
    Image.new("RGB", (80, 64), (30, 90, 160)).save(style / "00.png")
    styles = json.loads((EVALUATION / "styledrop_styles.json").read_text())["styles"]
    (tmp_path / "captions.json").write_text(json.dumps({"00.png": styles["00"]["template"]}))
    result, out = train("--train_data_dir", str(style), "--captions", str(tmp_path / "captions.json"),
                        "--initializer_token", styles["00"]["initializer"], "--max_train_steps", "1")  # fmt: skip
    concept = result.concepts[0]
    assert concept.num_vectors == 2 and len(concept.images) == 1
    prompts = {concept.dataset[p]["prompt"] for p in range(len(concept.dataset))}
    assert prompts == {f"A canyon in {TOKEN} {TOKEN}_1 style."}


def test_the_dreambooth_captions_cover_every_subject_and_read_as_a_captions_file():
    captions = dti.read_captions(EVALUATION / "dreambooth_captions.json")
    subjects = json.loads((EVALUATION / "dreambooth_subjects.json").read_text())["subjects"]
    assert len(captions) == 158 and {key.split("/")[0] for key in captions} == set(subjects)
    assert captions["backpack/00.jpg"].startswith("A {} adorned with colorful patches")

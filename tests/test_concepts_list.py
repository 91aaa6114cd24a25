"""--concepts_list: K concepts trained in one run end where their single runs end, for both scripts."""

import json
import os
import shutil
import signal
import sys

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors import safe_open
from safetensors.torch import load_file

import train_dti_sana
import train_dti_sdxl
from tests.conftest import ASSETS, REPO, torchrun_ranks, training_args

SCRIPTS = {"sdxl": train_dti_sdxl, "sana": train_dti_sana}
# Different initializers, vector counts, images and templates per concept; "<toy-c>" sits in a batch with "<toy-a>".
CONCEPTS = [
    {"placeholder_token": "<toy-a>", "initializer_token": "robot", "images": [0, 1]},
    {"placeholder_token": "<toy-c>", "initializer_token": "dog", "num_vectors": 3, "images": [1, 4]},
    {"placeholder_token": "<toy-b>", "initializer_token": "toy", "num_vectors": 2, "images": [2, 3],
     "learnable_property": "style"},
]  # fmt: skip
FLAGS = ["--max_train_steps", "3", "--save_steps", "2", "--random_flip", "--lr_scheduler", "cosine",
         "--gradient_accumulation_steps", "1"]  # fmt: skip


def fresh_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(script, argv):
    fresh_state()
    return script.main(script.parse_args(argv))


def image_folders(root):
    """Each concept's images: a folder with its own subset of the toy robot photos."""
    names = sorted(os.listdir(ASSETS))
    folders = []
    for concept in CONCEPTS:
        folder = root / "data" / concept["placeholder_token"].strip("<>")
        folder.mkdir(parents=True, exist_ok=True)
        for index in concept["images"]:
            shutil.copy(ASSETS / names[index], folder / names[index])
        folders.append(folder)
    return folders


def entries(folders, which):
    """--concepts_list entries of the concepts numbered `which`."""
    return [
        {**{k: v for k, v in CONCEPTS[i].items() if k != "images"}, "train_data_dir": str(folders[i])} for i in which
    ]


def single_args(model, out, entry):
    extra = ["--placeholder_token", entry["placeholder_token"], "--initializer_token", entry["initializer_token"]]
    extra += ["--num_vectors", str(entry["num_vectors"])] if "num_vectors" in entry else []
    extra += ["--learnable_property", entry["learnable_property"]] if "learnable_property" in entry else []
    return training_args(model, out, *extra, *FLAGS, data_dir=entry["train_data_dir"])


def list_args(model, out, concepts_file, *extra):
    argv = training_args(model, out, *FLAGS, *extra)
    for flag in ("--train_data_dir", "--placeholder_token", "--initializer_token"):
        at = argv.index(flag)
        del argv[at : at + 2]
    return [*argv, "--concepts_list", str(concepts_file)]


def write_list(path, items):
    path.write_text(json.dumps(items))
    return path


def stem(entry):
    return entry["placeholder_token"].strip("<>")


def nan_for(monkeypatch, script, token, call):
    """The `call`-th loss computation that holds samples of `token` gives those samples a non-finite loss (and
    gradient); the other samples of the batch keep theirs."""
    calls, original = [0], getattr(script.training_loss, "unwrapped", script.training_loss)

    def loss(batch, *args, **kwargs):
        losses = original(batch, *args, **kwargs)
        mine = torch.tensor([token in prompt for prompt in batch["prompt"]])
        if mine.any():
            calls[0] += 1
            if calls[0] == call:
                losses = losses * torch.where(mine, float("nan"), 1.0)
        return losses

    loss.unwrapped = original
    monkeypatch.setattr(script, "training_loss", loss)


def assert_close(a, b, atol=None):
    """Equal to 1e-5 of the vectors' norm (or to atol)."""
    atol = 1e-5 * b.norm(dim=-1).max() if atol is None else atol
    assert a.shape == b.shape and (a - b).abs().max() <= atol, (a - b).abs().max()


def visible_files(folder):
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
    )


@pytest.fixture(scope="module")
def sdxl_runs(tiny_sdxl, tmp_path_factory):
    """Three single runs and one run of the three concepts (two per step), "<toy-c>" non-finite at its step 2."""
    root = tmp_path_factory.mktemp("concepts-sdxl")
    folders = image_folders(root)
    items = entries(folders, range(3))
    with pytest.MonkeyPatch.context() as monkeypatch:
        singles = {}
        for entry in items:
            nan_for(monkeypatch, train_dti_sdxl, "<toy-c>", 2)
            singles[stem(entry)] = run(train_dti_sdxl, single_args(tiny_sdxl, root / "single" / stem(entry), entry))
        concepts_file = write_list(root / "concepts.json", items)
        many = list_args(
            tiny_sdxl, root / "list", concepts_file, "--concepts_per_step", "2", "--checkpointing_steps", "2"
        )
        nan_for(monkeypatch, train_dti_sdxl, "<toy-c>", 2)
        result = run(train_dti_sdxl, many)
    return {"root": root, "folders": folders, "items": items, "singles": singles, "list": result, "argv": many}


def test_three_concepts_end_where_their_single_runs_end_and_write_what_they_write(sdxl_runs, caplog):
    root = sdxl_runs["root"]
    for entry in sdxl_runs["items"]:
        single, listed = root / "single" / stem(entry), root / "list" / stem(entry)
        assert visible_files(listed) == visible_files(single)
        for name in ("learned_embeds", "learned_embeds_2"):
            for suffix in ("", "-steps-2"):
                file = f"{name}{suffix}.safetensors"
                assert_close(load_file(listed / file)[entry["placeholder_token"]],
                             load_file(single / file)[entry["placeholder_token"]])  # fmt: skip
                with safe_open(listed / file, "pt") as a, safe_open(single / file, "pt") as b:
                    assert a.metadata() == b.metadata()
        assert (listed / "README.md").read_text() == (single / "README.md").read_text()
    assert visible_files(root / "list") == sorted(
        [f"checkpoint-2/{name}" for name in visible_files(root / "list" / "checkpoint-2")]
        + [f"{stem(e)}/{name}" for e in sdxl_runs["items"] for name in visible_files(root / "single" / stem(e))]
    )
    assert len(list((root / "list" / "checkpoint-2").glob("custom_checkpoint_*.pkl"))) == 3 + 1  # + the scheduler


def test_one_concepts_non_finite_step_skips_only_that_concept(sdxl_runs):
    """<toy-c>'s step 2 was skipped in its single run and in the list run, where <toy-a> shared its batch: <toy-a>
    and <toy-b> still end as their single runs, which had no bad step (the test above)."""
    listed = sdxl_runs["list"]
    guards = {c.args.placeholder_token: c.guard for c in listed.concepts}
    assert guards["<toy-c>"].skipped == 1 and guards["<toy-c>"].last == 2
    assert guards["<toy-a>"].skipped == guards["<toy-b>"].skipped == 0


def test_sigterm_in_the_middle_of_the_list_then_resume_is_bit_identical(sdxl_runs, monkeypatch):
    """SIGTERM while step 2's second group (<toy-b>) is computed: the step ends, all concepts are saved, the run
    stops; the resumed run ends bit-identical to the uninterrupted one."""
    root, argv = sdxl_runs["root"], sdxl_runs["argv"]
    out = root / "interrupted"
    argv = [*argv[: argv.index("--output_dir") + 1], str(out), *argv[argv.index("--output_dir") + 2 :]]
    nan_for(monkeypatch, train_dti_sdxl, "<toy-c>", 2)
    calls, original = [0], train_dti_sdxl.training_loss

    def loss(batch, *args, **kwargs):
        if any("<toy-b>" in prompt for prompt in batch["prompt"]):
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(train_dti_sdxl, "training_loss", loss)
    with pytest.raises(train_dti_sdxl.TrainingStopped, match="SIGTERM at step 2"):
        run(train_dti_sdxl, argv)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    run(train_dti_sdxl, [*argv, "--resume_from_checkpoint", "latest"])
    for entry in sdxl_runs["items"]:
        token, name = entry["placeholder_token"], stem(entry)
        for file in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
            assert torch.equal(load_file(out / name / file)[token], load_file(root / "list" / name / file)[token])


def test_resuming_with_another_list_is_refused(sdxl_runs, tiny_sdxl):
    root = sdxl_runs["root"]
    other = write_list(root / "other.json", sdxl_runs["items"][:2])
    argv = list_args(tiny_sdxl, root / "list", other, "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match=r"made with the concepts \['<toy-a>', '<toy-c>', '<toy-b>'\], this run has"):
        run(train_dti_sdxl, argv)


def test_two_processes_equal_one_with_two_concepts(sdxl_runs, tiny_sdxl, tmp_path):
    """Two concepts all at once, the batch of each split over two processes, end where their single runs end."""
    items = [sdxl_runs["items"][i] for i in (0, 2)]
    argv = list_args(tiny_sdxl, tmp_path / "ddp", write_list(tmp_path / "two.json", items), "--train_batch_size", "1")
    ranks = torchrun_ranks("train_dti_sdxl", argv, tmp_path / "dump", port=29538)
    for a, b in zip(ranks[0]["history"], ranks[1]["history"], strict=True):
        assert torch.equal(a, b)
    for entry, final in zip(items, ranks[0]["concepts"], strict=True):
        single = sdxl_runs["singles"][stem(entry)]
        for name, tokens in single.learned.items():
            assert_close(final[name], tokens.embeddings().detach())


def test_sana_two_and_three_concepts_end_where_their_single_runs_end(tiny_sana, tmp_path):
    folders = image_folders(tmp_path)
    items = entries(folders, range(3))
    short = ["--max_sequence_length", "32", "--num_validation_images", "1", "--validation_steps", "2"]
    singles = {}
    for entry in items:
        argv = [*single_args(tiny_sana, tmp_path / "single" / stem(entry), entry), *short]
        singles[stem(entry)] = run(train_dti_sana, argv)
    three = write_list(tmp_path / "three.json", items)
    run(train_dti_sana, [*list_args(tiny_sana, tmp_path / "three", three), *short])
    two = write_list(tmp_path / "two.json", items[1:])
    run(train_dti_sana, [*list_args(tiny_sana, tmp_path / "two", two, "--concepts_per_step", "1"), *short])
    for out, which in ((tmp_path / "three", items), (tmp_path / "two", items[1:])):
        for entry in which:
            token, listed = entry["placeholder_token"], out / stem(entry)
            single = tmp_path / "single" / stem(entry)
            assert visible_files(listed) == visible_files(single)
            assert {"validation/step-2.png", "validation/step-3.png"} <= set(visible_files(listed))
            assert_close(load_file(listed / "learned_embeds.safetensors")[token],
                         load_file(single / "learned_embeds.safetensors")[token])  # fmt: skip


def test_each_entry_gets_its_folder_and_hub_repo(tmp_path):
    items = [{"placeholder_token": "<a>", "initializer_token": "dog", "train_data_dir": "x"},
             {"placeholder_token": "<b>", "initializer_token": "cat", "dataset_name": "y", "output_dir": "elsewhere",
              "num_vectors": 2, "validation_prompt": "a {} on a beach"}]  # fmt: skip
    argv = ["--pretrained_model_name_or_path", "m", "--output_dir", str(tmp_path / "out"), "--hub_model_id", "me/dti",
            "--concepts_list", str(write_list(tmp_path / "c.json", items)), "--num_vectors", "4"]  # fmt: skip
    for script in SCRIPTS.values():
        args = script.validate_args(script.parse_args(argv), script.FAMILY)
        a, b = script.read_concepts(args)
        assert (a.output_dir, b.output_dir) == (str(tmp_path / "out" / "a"), "elsewhere")
        assert (script.hub_repo_id(a), script.hub_repo_id(b)) == ("me/dti-a", "me/dti-b")
        assert (a.num_vectors, b.num_vectors, a.train_data_dir, b.dataset_name) == (4, 2, "x", "y")
        assert script.validation_prompt(b) == "a <b> on a beach" and a.learning_rate == args.learning_rate
        args.placeholder_token = "<c>"
        with pytest.raises(ValueError, match="--concepts_list replaces --placeholder_token: give these in each entry"):
            script.read_concepts(args)


def test_the_benchmark_times_one_and_two_concepts_per_step(tmp_path):
    """bench_step.py --num_concepts: each K gets a row with the time per concept-step; the first concept's loss
    equals the one-concept loss (the same images and seed)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_step

    argv = ["--family", "sana", "--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--variants",
            "dti+cache", "--num_concepts", "1", "2", "--output", str(tmp_path / "bench.json")]  # fmt: skip
    rows = {row["variant"]: row for row in bench_step.main(bench_step.parse_args(argv))["results"]}
    assert list(rows) == ["dti+cache", "dti+cache+2concepts"] and rows["dti+cache+2concepts"]["concepts"] == 2
    assert rows["dti+cache+2concepts"]["s_per_concept_step"] == rows["dti+cache+2concepts"]["median_s"] / 2
    assert rows["dti+cache+2concepts"]["loss_rel_diff_vs_dti"] < 1e-5
    assert json.loads((tmp_path / "bench.json").read_text())["results"][1]["variant"] == "dti+cache+2concepts"


def test_adamw_baselines_skip_one_concepts_non_finite_step_and_equal_their_single_runs(
    tiny_sdxl, tmp_path, monkeypatch
):
    """--method ti (AdamW): <toy-c>'s step 2 is not finite; AdamW leaves it (and its state) alone while <toy-a>, in
    the same batch, steps. Both end as their single runs, which met the same step."""
    items = entries(image_folders(tmp_path), range(2))
    ti = ["--method", "ti", "--max_train_steps", "3"]
    for entry in items:
        nan_for(monkeypatch, train_dti_sdxl, "<toy-c>", 2)
        run(train_dti_sdxl, [*single_args(tiny_sdxl, tmp_path / "single" / stem(entry), entry), *ti])
    nan_for(monkeypatch, train_dti_sdxl, "<toy-c>", 2)
    result = run(
        train_dti_sdxl, [*list_args(tiny_sdxl, tmp_path / "list", write_list(tmp_path / "l.json", items)), *ti]
    )
    assert [c.guard.skipped for c in result.concepts] == [0, 1]
    for entry in items:
        token, name = entry["placeholder_token"], stem(entry)
        for file in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
            # AdamW divides each element's step by that element's own gradient size, so an element whose gradient is
            # near zero turns the rounding of the larger batch into ~1e-6 of movement: compared to 1e-5, not 1e-5 |e|.
            assert_close(load_file(tmp_path / "list" / name / file)[token],
                         load_file(tmp_path / "single" / name / file)[token], atol=1e-5)  # fmt: skip

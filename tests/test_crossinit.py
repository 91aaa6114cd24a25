"""--method crossinit (the CrossInit baseline) in train_dti_sdxl.py and train_dti_sana.py, on the tiny pipelines."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import train_dti_sana
import train_dti_sdxl
from tests.conftest import REPO, assert_one_line_error, assert_stopped_by, run_script_cases, training_args

PLACEHOLDER = "<toy-robot>"


def output_after(final_norm, encoder, *inputs, **kwargs):
    """encoder(*inputs, **kwargs), checking that its last_hidden_state is the output of its final norm."""
    seen = {}
    handle = final_norm.register_forward_hook(lambda module, args, output: seen.update(output=output))
    with torch.no_grad():
        output = encoder(*inputs, **kwargs)
    handle.remove()
    assert torch.equal(output.last_hidden_state, seen["output"])
    return output


def clip_contextual(model, subfolder, word):
    """Independently: CLIP's last hidden state at the word's tokens in `<bos> word <eos> pad...` (77 tokens)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder=subfolder.replace("text_encoder", "tokenizer"))
    model_class = CLIPTextModel if subfolder == "text_encoder" else CLIPTextModelWithProjection
    encoder = model_class.from_pretrained(model, subfolder=subfolder)
    words = tokenizer(word, add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *words, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (77 - len(ids))
    final_norm = getattr(encoder, "text_model", encoder).final_layer_norm  # transformers 4 nests it
    output = output_after(final_norm, encoder, torch.tensor([ids]))
    return output.last_hidden_state[0, 1 : 1 + len(words)]


def gemma_contextual(model, word, max_length=300):
    """Independently: Gemma-2's last hidden state (after its final norm) at the word's tokens in `<bos> word pad...`,
    padded on the right to max_sequence_length as SanaPipeline tokenizes a prompt."""
    from transformers import AutoTokenizer, Gemma2Model

    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    encoder = Gemma2Model.from_pretrained(model, subfolder="text_encoder")
    words = tokenizer(word.lower(), add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *words] + [tokenizer.pad_token_id] * (max_length - 1 - len(words))
    mask = [1] * (1 + len(words)) + [0] * (max_length - 1 - len(words))
    output = output_after(encoder.norm, encoder, torch.tensor([ids]), attention_mask=torch.tensor([mask]))
    return output.last_hidden_state[0, 1 : 1 + len(words)], encoder.config.hidden_size


# ------------------------------------------------------------------------------------------------ the start


def test_sdxl_rows_start_at_each_encoders_last_hidden_state_one_per_token(train, tiny_sdxl, caplog):
    caplog.set_level(logging.WARNING)
    result, out = train("--method", "crossinit", "--initializer_token", "red robot", "--max_train_steps", "1",
                        "--optimizer", "adamw", "--token_scale", "min")  # fmt: skip
    for name in ("text_encoder", "text_encoder_2"):
        expected = clip_contextual(tiny_sdxl, name, "red robot")
        tokens = result.learned[name]
        assert isinstance(tokens, train_dti_sdxl.CrossInitTokens) and tokens.initial_rows.shape == expected.shape
        assert expected.shape[0] == 2 and not torch.allclose(expected[0], expected[1])
        assert torch.allclose(tokens.initial_rows, expected, rtol=1e-5, atol=1e-6)
    assert "--optimizer is ignored with --method crossinit" in caplog.text
    assert "--token_scale is ignored with --method crossinit" in caplog.text
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        metadata = f.metadata()
    assert (metadata["method"], metadata["crossinit_lambda"], metadata["kappa"]) == ("crossinit", "1e-05", "0.0")
    assert (metadata["optimizer"], metadata["token_scale"], metadata["norm_scale_text_encoder"]) == ("adamw",) + (
        "free",
    ) * 2
    card = (out / "README.md").read_text()
    assert "| method | crossinit (AdamW) |" in card and "| crossinit lambda | 1e-05 |" in card


def test_sana_rows_start_at_gemmas_last_hidden_state_and_gemma_sees_them_times_sqrt_d(train_sana, tiny_sana):
    result, out = train_sana("--method", "crossinit", "--initializer_token", "red robot", "--max_train_steps", "1")
    expected, hidden_size = gemma_contextual(tiny_sana, "red robot")
    tokens = result.learned["text_encoder"]
    assert expected.shape[0] == 2 and tokens.initial_rows.shape == expected.shape
    assert torch.allclose(tokens.initial_rows, expected, rtol=1e-5, atol=1e-6)
    # The authors' CrossInit: the contextual vector is the raw row, so the encoder's input is it times sqrt(d).
    # What the first decoder layer receives (transformers 5 scales in the embedding module, 4.x in the model).
    encoder, captured = result.components["text_encoder"], []
    hook = encoder.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        encoder(torch.tensor([result.placeholder_ids[0]]), use_cache=False)
    hook.remove()
    seen = captured[0][0].float()
    assert torch.allclose(seen, tokens.rows.detach() * math.sqrt(hidden_size), rtol=1e-5)
    with safe_open(out / "learned_embeds.safetensors", "pt") as f:
        assert f.metadata()["method"] == "crossinit"


def test_content_positions_skip_special_tokens_and_repeat_a_one_token_initializer(tiny_sdxl):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")  # pads with "!", not <eos>
    ids = tokenizer("red robot", padding="max_length", max_length=77).input_ids
    assert train_dti_sdxl.content_positions(tokenizer, ids, "red robot", 2) == [1, 2]
    one = tokenizer("robot", padding="max_length", max_length=77).input_ids
    assert train_dti_sdxl.content_positions(tokenizer, one, "robot", 3) == [1, 1, 1]
    with pytest.raises(ValueError, match="--initializer_token 'red robot' is 2 tokens"):
        train_dti_sdxl.content_positions(tokenizer, ids, "red robot", 3)


# ------------------------------------------------------------------------------------------------ the regulariser


def one_concept(tokens, micro_batches):
    """What data_gradient reads of a concept: its learned tokens, a stream of one-sample batches, a latent source."""
    batches = iter([{"position": torch.zeros(1)}] * micro_batches)
    learned = torch.nn.ModuleDict({"text_encoder": tokens})
    return SimpleNamespace(learned=learned, batches=batches, latents=lambda batch: ())


def test_regularizer_gradient_is_two_lambda_times_the_offset_over_k_d():
    """lambda * mean((rows - initial)^2) over the k x d elements is added to the loss once per optimizer step."""
    generator = torch.Generator().manual_seed(0)
    initial, data_direction = torch.randn(3, 8, generator=generator), torch.randn(3, 8, generator=generator)
    tokens = train_dti_sdxl.CrossInitTokens(initial, initial, crossinit_lambda=0.25)
    with torch.no_grad():
        tokens.rows.add_(torch.randn(3, 8, generator=generator))
    offset = tokens.rows.detach() - initial
    assert tokens.regularizer().item() == pytest.approx(0.25 * offset.square().mean().item(), rel=1e-6)

    accelerator = SimpleNamespace(backward=torch.Tensor.backward, num_processes=1, device=torch.device("cpu"))
    loss_fn = lambda batch: (tokens.rows * data_direction).sum().reshape(1)  # noqa: E731  (data gradient: data_direction)
    step_loss = train_dti_sdxl.data_gradient([one_concept(tokens, 2)], loss_fn, accelerator, 2)
    expected = data_direction + 2 * 0.25 * offset / offset.numel()
    assert torch.allclose(tokens.rows.grad, expected, rtol=1e-6, atol=1e-7)
    assert step_loss.item() == pytest.approx((tokens.rows * data_direction).sum().item(), rel=1e-6)  # data term only


def test_sana_data_gradient_adds_the_same_regularizer():
    initial = torch.ones(2, 4)
    tokens = train_dti_sana.CrossInitTokens(initial, initial, crossinit_lambda=1.0)
    with torch.no_grad():
        tokens.rows.mul_(3.0)
    accelerator = SimpleNamespace(backward=torch.Tensor.backward, num_processes=1, device=torch.device("cpu"))
    train_dti_sana.data_gradient([one_concept(tokens, 1)], lambda b: tokens.rows.sum().reshape(1) * 0, accelerator, 1)
    assert torch.equal(tokens.rows.grad, torch.full((2, 4), 2 * 2.0 / 8))


# ------------------------------------------------------------------------------------------------ checkpoints


def test_resume_is_bit_identical_and_a_crossinit_checkpoint_refuses_another_method(train, tmp_path, tiny_sdxl):
    common = ["--method", "crossinit", "--crossinit_lambda", "0.5", "--checkpointing_steps", "2", "--repeats", "1",
              "--gradient_accumulation_steps", "2", "--learning_rate", "0.05"]  # fmt: skip
    train("--max_train_steps", "4", *common, output_dir=tmp_path / "straight")
    train("--max_train_steps", "2", *common, output_dir=tmp_path / "resumed")
    half_way = load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[PLACEHOLDER]
    result, _ = train("--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common,
                      output_dir=tmp_path / "resumed")  # fmt: skip
    for file in ("learned_embeds.safetensors", "learned_embeds_2.safetensors"):
        straight = load_file(tmp_path / "straight" / file)[PLACEHOLDER]
        assert torch.equal(straight, load_file(tmp_path / "resumed" / file)[PLACEHOLDER])
    assert not torch.equal(half_way, load_file(tmp_path / "resumed" / "learned_embeds.safetensors")[PLACEHOLDER])
    assert torch.allclose(
        result.learned["text_encoder"].initial_rows, clip_contextual(tiny_sdxl, "text_encoder", "robot")
    )
    ti = train_dti_sdxl.parse_args([*training_args(tiny_sdxl, tmp_path / "straight"), "--method", "ti"])
    with pytest.raises(ValueError, match="method 'crossinit'.*'ti'"):
        train_dti_sdxl.read_checkpoint_state(
            tmp_path / "straight" / "checkpoint-2", train_dti_sdxl.checkpoint_identity(ti, 1)
        )


# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("script", [train_dti_sdxl, train_dti_sana])
def test_defaults_and_the_dti_flags_a_baseline_ignores(script, tiny_sdxl, tmp_path):
    def parsed(*extra):
        return script.validate_args(script.parse_args([*training_args(tiny_sdxl, tmp_path), *extra]), script.FAMILY)

    args = parsed("--method", "crossinit")
    assert (args.learning_rate, args.kappa, args.crossinit_lambda) == (5e-3, 0.0, 1e-5)
    assert script.ignored_flags(args) == [] and script.ignored_flags(parsed("--beta", "0.5")) == []
    for method in ("crossinit", "ti"):
        flags = ["--optimizer", "adamw", "--token_scale", "2.0", "--beta", "0.5", "--init_method", "mean"]
        warnings = script.ignored_flags(parsed("--method", method, *flags))
        assert [w.split()[0] for w in warnings] == flags[::2]
        assert all(f"ignored with --method {method}" in w for w in warnings)


SDXL_ERRORS = {
    "negative lambda": (["--method", "crossinit", "--crossinit_lambda", "-1e-5"], "--crossinit_lambda"),
    "infinite lambda": (["--method", "crossinit", "--crossinit_lambda", "inf"], "--crossinit_lambda"),
    "nan lambda": (["--method", "crossinit", "--crossinit_lambda", "nan"], "--crossinit_lambda"),
    "lambda without crossinit": (["--crossinit_lambda", "1e-4"], "--crossinit_lambda"),
    "kappa with crossinit": (["--method", "crossinit", "--kappa", "1e-4"], "--kappa"),
}
SANA_ERRORS = {"negative lambda": (["--method", "crossinit", "--crossinit_lambda", "-2"], "--crossinit_lambda")}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Each case with a model path that does not exist: the error must come before any model is loaded."""
    tmp_path = tmp_path_factory.mktemp("crossinit-errors")
    runs = {}
    for script, cases in (("train_dti_sdxl.py", SDXL_ERRORS), ("train_dti_sana.py", SANA_ERRORS)):
        argvs = {name: [*training_args(tmp_path / "no-model", tmp_path / f"out-{i}"), *extra]
                 for i, (name, (extra, _)) in enumerate(cases.items())}  # fmt: skip
        for name, proc in run_script_cases(REPO / script, argvs).items():
            runs[(script, name)] = (proc, cases[name][1])
    return runs


@pytest.mark.parametrize(
    "key", [("train_dti_sdxl.py", name) for name in SDXL_ERRORS] + [("train_dti_sana.py", n) for n in SANA_ERRORS]
)
def test_bad_crossinit_input_gives_one_line_error_before_any_model_loads(error_runs, key):
    proc, expected = error_runs[key]
    assert_one_line_error(proc, expected)


def test_sigterm_then_resume_ends_where_an_uninterrupted_run_does(train, tiny_sdxl, tmp_path):
    import signal

    from tests.test_reliability import SimpleProc, start, wait_for

    flags = ["--method", "crossinit", "--crossinit_lambda", "0.5", "--max_train_steps", "12", "--save_steps", "1",
             "--checkpointing_steps", "100", "--repeats", "1"]  # fmt: skip
    straight, _ = train(*flags, output_dir=tmp_path / "straight")
    out = tmp_path / "interrupted"
    proc = start("sdxl", tiny_sdxl, out, *flags)
    wait_for(out / "learned_embeds-steps-3.safetensors", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert_stopped_by(SimpleProc(proc.returncode, stderr), signal.SIGTERM)
    proc = start("sdxl", tiny_sdxl, out, *flags, "--resume_from_checkpoint", "latest")
    _, stderr = proc.communicate(timeout=300)  # drain the pipes while it runs
    assert proc.returncode == 0, stderr[-2000:]
    for name, file in (
        ("text_encoder", "learned_embeds.safetensors"),
        ("text_encoder_2", "learned_embeds_2.safetensors"),
    ):
        assert torch.equal(load_file(out / file)[PLACEHOLDER], straight.learned[name].embeddings().detach())


def test_two_processes_end_identical_and_equal_a_single_process_run(train, tiny_sdxl, tmp_path):
    from tests.conftest import torchrun_ranks

    # AdamW turns a gradient element near its epsilon into a step of about lr/2 whatever its size, so fp32 rounding
    # of the averaged gradient would show there: an epsilon well above that rounding keeps the comparison exact.
    flags = ["--method", "crossinit", "--crossinit_lambda", "0.5", "--learning_rate", "0.05", "--adam_epsilon", "1e-4"]
    argv = training_args(tiny_sdxl, tmp_path / "ddp", "--train_batch_size", "1", *flags)
    ranks = torchrun_ranks("train_dti_sdxl", argv, tmp_path / "dump", port=29537)
    result, _ = train("--train_batch_size", "2", *flags, output_dir=tmp_path / "single")
    for name in ("text_encoder", "text_encoder_2"):
        assert torch.equal(ranks[0]["final"][name], ranks[1]["final"][name])
        single = result.learned[name].embeddings().detach()
        start = result.learned[name].initial_rows
        assert not torch.allclose(single, start)
        assert torch.allclose(single, ranks[0]["final"][name], atol=1e-5 * single.norm().item())


# ------------------------------------------------------------------------------------------------ reports


def test_evaluate_tables_and_infer_report_name_the_method():
    import evaluate
    import infer

    metadata = {"method": "crossinit", "crossinit_lambda": "1e-05", "token_scale": "free", "kappa": "0.0"}
    concept = SimpleNamespace(metadata=metadata, vectors={"clip_l": torch.ones(1, 4)}, lora=None)
    info = evaluate.run_info(concept, None)
    assert (info["method"], info["norm"], info["kappa"]) == ("crossinit (lambda 1e-05)", "free", "0.0")
    assert infer.method_summary(metadata) == "method crossinit (crossinit_lambda 1e-05)"
    assert infer.method_summary({"method": "dti", "token_scale": "mean", "kappa": "0.0001"}) == (
        "method dti (token_scale mean, kappa 0.0001)"
    )
    assert infer.method_summary({}) == "method unknown (no training metadata)"

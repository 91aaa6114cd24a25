"""DTI + LoRA with the DCO loss (--dco_beta): L = -log sigmoid(-beta (l_model - l_ref)) per micro-batch, l_ref the
batch-mean loss of the denoiser without its LoRA on the same noisy latents, timesteps and prompts; its beta -> 0
limit; a run with it writes finite embeddings and the LoRA and logs the model and reference losses (SDXL, SANA).
The flag without --lora_rank is refused in tests/test_bad_input.py."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import train_dti_sana
import train_dti_sdxl
from tests.conftest import training_args
from tests.test_lora import lora_state

SCRIPTS = {"sdxl": train_dti_sdxl, "sana": train_dti_sana}
TOKEN = "<toy-robot>"
DCO = ["--lora_rank", "4", "--lora_target_modules", "to_q,to_k,to_v", "--lora_start_step", "1"]


def model_of(family, tiny_sdxl, tiny_sana):
    return {"sdxl": tiny_sdxl, "sana": tiny_sana}[family]


def set_up(script, model, out, beta=1000.0):
    """The run's setup with a LoRA whose B is random (so the LoRA changes the denoiser) and one fixed batch."""
    run = script.setup(script.parse_args(training_args(model, out, *DCO, "--dco_beta", str(beta))), script.FAMILY)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in run.lora.weights.items():
            if ".lora_B." in name:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    concept = run.concepts[0]
    batch = next(concept.batches)
    return run, (batch, *concept.latents(batch))


def plain_loss(run, denoiser=None):
    """The family's own loss (no DCO) of the run, with another denoiser if given."""
    models = run.models if denoiser is None else replace(run.models, denoiser=denoiser)
    return lambda *batch: run.family.training_loss(*batch, models=models, seed=run.seed, args=run.args)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_the_reference_is_the_denoiser_without_its_lora_and_the_loss_is_dco_of_the_batch_means(
    family, tiny_sdxl, tiny_sana, tmp_path
):
    script, model_folder = SCRIPTS[family], model_of(family, tiny_sdxl, tiny_sana)
    run, batch = set_up(script, model_folder, tmp_path / "out")
    fresh = type(run.models.denoiser).from_pretrained(model_folder, subfolder=run.family.denoiser)
    dco = run.loss_fn(*batch)
    model, reference = run.loss_fn.terms[-1]
    with torch.no_grad():
        expected_model = plain_loss(run)(*batch).mean()
        expected_reference = plain_loss(run, fresh)(*batch).mean()  # a denoiser that never had a LoRA
    assert model.item() == pytest.approx(expected_model.item(), rel=1e-6)
    assert reference.item() == pytest.approx(expected_reference.item(), rel=1e-6)
    assert abs(model - reference) > 1e-4  # the LoRA changes the loss
    assert dco.shape == (len(batch[0]["position"]),) and torch.equal(dco, dco[:1].expand_as(dco))
    assert dco[0].item() == pytest.approx(-F.logsigmoid(-1000 * (model - reference)).item(), rel=1e-6)


@pytest.mark.parametrize("beta", [1000.0, 10.0])
def test_sdxl_dco_equals_the_unet_called_with_and_without_the_lora(beta, tiny_sdxl, tmp_path):
    """The UNet gets the same inputs twice; its outputs with the LoRA and from a UNet loaded without one, against
    the noise drawn as the SDXL loss draws it (per sample: latent sample, then noise), give the same loss."""
    from diffusers import UNet2DConditionModel

    run, batch = set_up(train_dti_sdxl, tiny_sdxl, tmp_path / "out", beta)
    unet, calls = run.models.denoiser, []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        dco = run.loss_fn(*batch)[0].item()
    finally:
        hook.remove()
    assert len(calls) == 2
    (args, kwargs), (ref_args, ref_kwargs) = calls
    assert all(torch.equal(a, b) for a, b in zip(args, ref_args, strict=True))
    assert kwargs.keys() == ref_kwargs.keys() == {"added_cond_kwargs"}
    assert all(torch.equal(v, ref_kwargs["added_cond_kwargs"][k]) for k, v in kwargs["added_cond_kwargs"].items())

    generators = train_dti_sdxl.keyed_generators(run.seed, batch[0]["position"].tolist(), "cpu")
    shape = batch[1].shape[1:]
    noise = []
    for g in generators:
        torch.randn(shape, generator=g)  # the latent sample's draw
        noise.append(torch.randn(shape, generator=g))
    noise = torch.stack(noise)
    without = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")

    def batch_mse(prediction):  # summed as the loss sums (per sample, then the batch): beta amplifies rounding
        return F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)).mean()

    with torch.no_grad():
        model = batch_mse(unet(*args, **kwargs).sample)  # the LoRA is back at scale alpha / rank
        reference = batch_mse(without(*args, **kwargs).sample)
    expected = -F.logsigmoid(-beta * (model - reference)).item()
    assert abs(model - reference) > 1e-4
    assert dco == pytest.approx(expected, rel=1e-6, abs=1e-6)


def gradients(loss, run):
    """The gradient of loss w.r.t. the token directions and the LoRA, flattened."""
    parameters = [*run.concepts[0].learned.parameters(), *run.lora.parameters()]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, parameters)])


def test_as_beta_goes_to_zero_dco_is_log_2_plus_beta_half_the_loss_gap_and_its_gradient_beta_half_the_plain(
    tiny_sdxl, tmp_path
):
    run, batch = set_up(train_dti_sdxl, tiny_sdxl, tmp_path / "out")
    lora, plain = run.lora, run.loss_fn.loss_fn
    with torch.no_grad():
        run.loss_fn(*batch)
        gap = (run.loss_fn.terms[-1][0] - run.loss_fn.terms[-1][1]).item()
    errors = []
    for beta in (0.02 / abs(gap), 0.002 / abs(gap)):  # beta * gap = 0.02, 0.002
        value = train_dti_sdxl.DCOLoss(plain, lora, beta)(*batch)[0].item()
        errors.append(abs((value - math.log(2)) / (beta / 2) - gap) / abs(gap))  # beta * gap / 4 in exact arithmetic
    assert errors[0] < 0.01 and errors[1] < 0.002 and errors[1] < errors[0] / 5

    plain_gradient = gradients(plain(*batch).mean(), run)
    for beta in (1e-4, 1000.0):  # dL = beta sigmoid(beta gap) dl_model: beta / 2 dl_model as beta -> 0
        dco = train_dti_sdxl.DCOLoss(plain, lora, beta)
        gradient = gradients(dco(*batch).mean(), run)
        scale = beta * torch.sigmoid(torch.tensor(beta * gap, dtype=torch.float64)).item()
        atol = 1e-5 * scale * plain_gradient.abs().max().item()
        torch.testing.assert_close(gradient, scale * plain_gradient, rtol=1e-4, atol=atol)
    small = train_dti_sdxl.DCOLoss(plain, lora, 1e-4)
    torch.testing.assert_close(gradients(small(*batch).mean(), run) / 5e-5, plain_gradient, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family", ["sdxl", "sana"])
def test_a_dco_run_writes_finite_embeddings_and_the_lora_and_logs_model_and_reference_losses(
    family, tiny_sdxl, tiny_sana, tmp_path, monkeypatch
):
    from accelerate import Accelerator

    script, out, logged = SCRIPTS[family], tmp_path / "out", []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.append((step, values)))
    argv = training_args(model_of(family, tiny_sdxl, tiny_sana), out, *DCO, "--dco_beta", "1000",
                         "--gradient_accumulation_steps", "1")  # fmt: skip
    script.main(script.parse_args(argv))
    for path in out.glob("learned_embeds*.safetensors"):
        assert torch.isfinite(load_file(path)[TOKEN]).all()
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    assert any(t.any() for name, t in lora.items() if ".lora_B." in name)
    with safe_open(out / "pytorch_lora_weights.safetensors", framework="pt") as f:
        assert f.metadata()["dco_beta"] == "1000.0"
    logged = [(step, values) for step, values in logged if "loss" in values]  # the step logs, not the run's phases
    assert [step for step, _ in logged] == [1, 2, 3]
    assert all({"loss", "loss_model", "loss_reference"} <= set(values) for _, values in logged)
    for step, values in logged:
        gap = values["loss_model"] - values["loss_reference"]
        if step <= 2:  # B = 0 until the LoRA's first update (it trains from step index 1, the second step)
            assert gap == 0 and values["loss"] == pytest.approx(math.log(2), rel=1e-6)
        else:
            assert gap != 0
            assert values["loss"] == pytest.approx(math.log1p(math.exp(1000 * gap)), rel=1e-4, abs=1e-6)
    card = (out / "README.md").read_text()
    assert "DCO loss beta 1000" in card


def token_state(checkpoint):
    """The learned tokens' state a checkpoint holds (accelerate's first registered object)."""
    return torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)


def test_a_non_finite_reference_loss_skips_the_step_of_token_and_lora(tiny_sdxl, tmp_path, monkeypatch, caplog):
    script, out, calls = train_dti_sdxl, tmp_path / "out", []
    original = script.training_loss

    def loss(*args, **kwargs):  # NaN for the reference pass (no gradient) of step 2
        value = original(*args, **kwargs)
        if not torch.is_grad_enabled():
            calls.append(len(calls) + 1)
            return value * float("nan") if len(calls) == 2 else value
        return value

    monkeypatch.setattr(script, "training_loss", loss)
    argv = training_args(tiny_sdxl, out, *DCO, "--dco_beta", "1000", "--lora_start_step", "0",
                         "--checkpointing_steps", "1")  # fmt: skip
    with caplog.at_level("WARNING"):
        result = script.main(script.parse_args(argv))
    assert "Step 2: non-finite loss or gradient, update skipped (1 in a row)." in caplog.text
    for state in (lora_state, token_state):  # step 2 changed neither; step 3 both
        states = {step: state(out / f"checkpoint-{step}") for step in (1, 2, 3)}
        assert all(torch.equal(states[1][n], states[2][n]) for n in states[1])
        assert any(not torch.equal(states[2][n], states[3][n]) for n in states[1])
    assert torch.isfinite(result.learned["text_encoder"].direction).all()

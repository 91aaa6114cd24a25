"""Rectified flow (flow matching), as diffusers' flow-matching training examples compute it: the noisy latents, the
timesteps and sigmas drawn per sample, the velocity target and the loss weighting, and their flags."""

from functools import partial

import torch


def add_flow_matching_arguments(group):
    """The timestep-sampling flags of diffusers' flow-matching examples, in `group`."""
    group.add_argument(
        "--weighting_scheme",
        choices=["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"],
        default="none",
        help="Timestep sampling / loss weighting of the flow-matching loss, as in diffusers' flow-matching examples.",
    )
    group.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal timestep density.")
    group.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit_normal timestep density.")
    group.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode timestep density.")


def check_flow_matching_args(args):
    """The timestep densities' ranges: a logit_normal std that is positive, a mode scale in [-1, 7.2] (outside it the
    mode density leaves [0, 1] and draws timesteps that do not exist)."""
    import math

    checks = [
        (math.isfinite(args.logit_mean), "--logit_mean must be a finite number"),
        (0 < args.logit_std < float("inf"), "--logit_std must be a positive number"),
        (-1.0 <= args.mode_scale <= 7.2, "--mode_scale must be in [-1, 7.2]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message}.")


def flow_matching_inputs(latents, generators, noise_scheduler, args):
    """(noisy latents, noise, timesteps [B], sigmas) of x_t = (1 - sigma) x_0 + sigma eps; sample b's noise and
    timestep drawn from generators[b]. latents: [B, C, ...] fp32; sigmas broadcast over the latent dims."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    device = latents.device
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g, device=device) for g in generators])
    density = partial(compute_density_for_timestep_sampling, args.weighting_scheme, 1, args.logit_mean,
                      args.logit_std, args.mode_scale)  # fmt: skip
    u = torch.cat([density(device=device, generator=g).to(device) for g in generators])
    indices = (u * noise_scheduler.config.num_train_timesteps).long().clamp(max=len(noise_scheduler.timesteps) - 1)
    timesteps = noise_scheduler.timesteps.to(device)[indices]
    sigmas = noise_scheduler.sigmas.to(device)[indices].reshape(-1, *[1] * (latents.ndim - 1))
    return (1.0 - sigmas) * latents + sigmas * noise, noise, timesteps, sigmas


def flow_matching_loss(model_pred, latents, noise, sigmas, args):
    """The weighted squared error of the predicted velocity against eps - x_0, per sample [B]."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
    target = noise - latents
    return (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(len(latents), -1).mean(1)

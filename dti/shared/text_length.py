"""Text encoding up to the batch's last attended position: the positions after it are padding nothing reads."""

import torch.nn.functional as F


def encode_attended(encode, ids, mask):
    """encode(ids, mask) -> [B, n, d] on positions 0 .. n - 1 only, n the batch's last attended position + 1, padded
    with zeros to the full length L. ids, mask: [B, L], on the CPU as batches come (reading n syncs no device).
    Exact when no attended position reads the ones after n: a causal encoder, or a bidirectional one whose masked keys
    weigh exactly zero. The zeros stand where the denoiser masks the text out or the pipeline zeroes it."""
    attended = mask.any(0).nonzero().flatten().tolist()
    n = attended[-1] + 1 if attended else 1
    return F.pad(encode(ids[:, :n], mask[:, :n]), (0, 0, 0, ids.shape[1] - n))

"""RoPE re-rotation of cached keys: move keys computed at position p to position p + delta.

RoPE is a rotation whose angle is linear in the position, so rotating a stored (post-RoPE) key by the angle
for ``delta`` gives exactly the key the model would have computed at ``p + delta``. Values carry no position.
Done in fp32 from ``inv_freq`` directly (never from the rotary module's cos/sin, which YaRN-style scalings
multiply by ``attention_scaling``: applying that twice would be wrong).

>>> import torch
>>> from kvmas.agents.rope import rotate_keys
>>> k = torch.randn(1, 2, 3, 8)
>>> inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
>>> back = rotate_keys(rotate_keys(k, torch.tensor([5]), inv), torch.tensor([-5]), inv)
>>> bool(torch.allclose(back, k, atol=1e-5))
True
"""

from __future__ import annotations

import torch

from kvmas.errors import BadInputError


def inv_freq_of(hf_model) -> torch.Tensor:
    """The rotary inverse frequencies of a transformers model (fp32)."""
    base = getattr(hf_model, hf_model.base_model_prefix, hf_model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise BadInputError(f"{type(hf_model).__name__} has no rotary embedding: keys cannot be re-rotated")
    if getattr(rotary, "rope_type", "default") == "dynamic":
        raise BadInputError("dynamic-NTK RoPE changes inv_freq with length: re-rotation would be wrong")
    return rotary.inv_freq.detach().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``keys`` [B, H, T, D] by ``delta`` positions (shape [B] or [B, T]), in fp32.

    Partial-rotary models (rotary dim < head dim) rotate only the first ``2 * len(inv_freq)`` dims.
    """
    rot = 2 * inv_freq.numel()
    delta = delta.to(torch.float32)
    if delta.dim() == 1:
        delta = delta[:, None].expand(keys.shape[0], keys.shape[2])
    freqs = delta[..., None] * inv_freq.to(keys.device)  # [B, T, rot/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, rot]
    k32 = keys.float()
    k_rot, k_pass = k32[..., :rot], k32[..., rot:]
    out = k_rot * emb.cos() + _rotate_half(k_rot) * emb.sin()
    return torch.cat((out, k_pass), dim=-1).to(keys.dtype)

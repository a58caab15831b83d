"""LatentMAS input-output realignment: map a last-layer hidden state back into input-embedding space.

W_a solves the ridge regression  min ||W_out W_a - W_in||^2 + lam ||W_a||^2, i.e.
W_a = (W_out^T W_out + lam I)^-1 W_out^T W_in  (d x d, fp32), and each aligned vector is rescaled to the mean
L2 norm of the input-embedding rows (LatentMAS code; replaces the paper's 1/beta). Computed once per model and
cached on disk as safetensors under the model's derived dir. With tied embeddings W_a is the identity up to
the ridge term: we detect that and say so (``Realigner.tied``).

>>> from kvmas.testing import tiny_model
>>> from kvmas.agents.realign import Realigner
>>> r = Realigner.for_model(tiny_model("qwen", tie=True), cache=False)
>>> r.tied
True
"""

from __future__ import annotations

from dataclasses import dataclass

import safetensors.torch as st
import torch

from kvmas.paths import atomic_write_bytes

RIDGE = 1e-5


@dataclass
class Realigner:
    matrix: torch.Tensor  # [d, d]
    target_norm: float
    tied: bool
    identity_error: float  # max |W_a - I|: how far from the identity the realignment is

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Aligned input embedding(s) for hidden state(s) [..., d]."""
        aligned = hidden.float() @ self.matrix
        norm = aligned.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return (aligned / norm * self.target_norm).to(hidden.dtype)

    @classmethod
    def compute(cls, model) -> "Realigner":
        w_in = model.embedding.weight.detach().float()
        w_out = model.hf.get_output_embeddings().weight.detach().float()
        eye = torch.eye(w_out.shape[1], device=w_in.device)
        gram = w_out.T @ w_out + RIDGE * eye
        matrix = torch.linalg.solve(gram, w_out.T @ w_in)
        target = float(w_in.norm(dim=-1).mean())
        ident = float((matrix - eye).abs().max())
        return cls(matrix=matrix, target_norm=target, tied=model.ties_embeddings, identity_error=ident)

    @classmethod
    def for_model(cls, model, cache: bool = True) -> "Realigner":
        """The model's realigner: made once per model (``Model.derived``), from the on-disk cache when
        ``cache`` (computed and written there otherwise)."""
        return model.derived("realigner", lambda: cls._load_or_compute(model) if cache else cls.compute(model))

    @classmethod
    def _load_or_compute(cls, model) -> "Realigner":
        path = model.derived_dir() / "realign.safetensors"
        if path.exists():
            try:
                t = st.load_file(str(path), device=str(model.device))
                return cls(t["matrix"], float(t["target_norm"]), bool(t["tied"]), float(t["identity_error"]))
            except Exception:  # corrupt cache file: recompute and overwrite atomically
                pass
        r = cls.compute(model)
        atomic_write_bytes(path, st.save({
            "matrix": r.matrix.cpu().contiguous(),
            "target_norm": torch.tensor(r.target_norm),
            "tied": torch.tensor(r.tied),
            "identity_error": torch.tensor(r.identity_error),
        }))
        return r

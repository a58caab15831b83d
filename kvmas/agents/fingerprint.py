"""What identifies a model for KV exchange: raw KV only moves between identical weights.

>>> from kvmas.testing import tiny_model
>>> fp = tiny_model("qwen").fingerprint
>>> fp.check(fp)  # the same model: accepted
>>> len(fp.key)
16
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from kvmas.errors import FingerprintMismatchError


class ModelFingerprint(BaseModel):
    """What identifies a model for KV exchange: raw KV only moves between identical weights."""

    model_config = ConfigDict(frozen=True)

    name: str
    revision: str  # hash of config + a sample of the weights
    dtype: str
    arch: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope: dict[str, Any]

    @property
    def key(self) -> str:
        """A short stable id: equal keys mean interchangeable caches."""
        blob = json.dumps(self.model_dump(exclude={"name"}), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def check(self, other: "ModelFingerprint", what: str = "state") -> None:
        if self.key != other.key:
            raise FingerprintMismatchError(
                f"{what} was made by model {other.name} ({other.key}), refusing it for {self.name} ({self.key})"
            )

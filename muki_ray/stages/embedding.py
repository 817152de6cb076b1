"""Text embeddings for `integration.prototypes`: a Ray Data callable class, like the teacher stage.

Embedding = the encoder's last hidden state, mean-pooled over real tokens and scaled to unit
length (the sentence-transformers recipe MiniLM-L6 was trained with). One forward per text,
against the N x (K + 1) forwards of the teacher stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from muki_ray.config.schema import PrototypesConfig, TeacherResources, default
from muki_ray.data.sources import list_column
from muki_ray.core.hardware import actor_device
from muki_ray.core.hf_folder import load_encoder, load_tokenizer
from muki_ray.core.stage import Stage


@dataclass(frozen=True)
class EmbeddingSpec:
    model_path: str
    max_length: int = default(PrototypesConfig, "max_length")
    threads: int = TeacherResources().actor_threads
    trust_remote_code: bool = False  # the student's settings apply to its own model (pipeline.embedding_stage)
    allow_pickle: bool = False


class EmbeddingStage(Stage):
    """Ray Data stage: {"text": (B,), ...} -> the same batch plus "embedding" (B,) of (D,) float32 unit vectors."""

    outputs = ("embedding",)

    def setup(self) -> None:
        s = self.spec
        self.device = actor_device(s.threads)
        self.tokenizer = load_tokenizer(s.model_path, trust_remote_code=s.trust_remote_code)
        self.model = load_encoder(s.model_path, trust_remote_code=s.trust_remote_code,
                                  allow_pickle=s.allow_pickle).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch["embedding"] = list_column(self.embed([str(t) for t in batch["text"]]))
        return batch

    def embed(self, texts: list[str]) -> np.ndarray:
        """(B,) texts -> (B, D) float32 unit rows."""
        import torch

        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        enc = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length, padding=True,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

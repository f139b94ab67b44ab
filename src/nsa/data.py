"""Offline data for ``nsa train``: tokenizers, a corpus of text files, a token cache on disk,
and packed batches with exact resume.

The pipeline, each step a function a test can call:

1. :func:`make_tokenizer` / :func:`load_tokenizer`: :class:`ByteTokenizer` (UTF-8 bytes, no
   training) or :class:`BPETokenizer` (byte-level BPE trained locally with the optional
   ``tokenizers`` library). Both have ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``,
   ``encode``, ``decode``, ``save`` and a ``fingerprint`` (what the token cache is keyed on).
2. :func:`find_documents`: ``--data`` paths (files, directories, globs) to a sorted list of
   text files; ``None`` is the default corpus, the ``.py`` files of the running
   interpreter's standard library and installed packages.
3. :func:`split_documents`: a seeded train/validation split by file.
4. :class:`TokenStore`: every document as ``[bos] + encode(text) + [eos]`` in one flat binary
   file of token ids plus an index of document offsets, built one document at a time (never
   the whole corpus in memory), written atomically, memory-mapped when opened, cached under
   ``cache_dir/<key>/`` where the key hashes the tokenizer and every file's (path, size,
   mtime_ns).
5. :class:`PackedBatches`: an infinite stream of ``batch_tokens``-token batches with
   ``cu_seqlens``, seeded per-epoch document order, rank sharding and an O(1) exact resume;
   :class:`DocumentBatches`: the same with whole documents per batch (padded, never cut at a
   batch end; the retrieval tasks' documents, whose question needs its context), optionally
   with the loss on each document's answers only; :func:`eval_batches`: the first batches of
   a store in order, for validation.

:func:`load_corpus` runs 2 to 4 for the training loop.
"""

from __future__ import annotations

import array
import codecs
import glob
import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

__all__ = [
    "ByteTokenizer",
    "BPETokenizer",
    "load_tokenizer",
    "make_tokenizer",
    "cached_tokenizer",
    "find_documents",
    "split_documents",
    "read_text",
    "iter_texts",
    "TokenStore",
    "PackedBatches",
    "DocumentBatches",
    "eval_batches",
    "load_corpus",
]

TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
SNIFF_BYTES = 8192  # how much of a file decides whether it is text (NUL byte, UTF-8)


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")


def _atomic_write_bytes(path: Path, data: bytes):
    """Write ``path`` through a temporary file in the same directory and ``os.replace``: a
    reader sees the old file or the whole new one, never a partial one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then ``bos_id=256``, ``eos_id=257``, ``pad_id=258``
    (``vocab_size=259``). Needs no training and no library."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` (no special tokens)."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        return [self.encode(t) for t in texts]

    def _encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        # the store's fast path: a bytes view instead of a list of Python ints
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids) -> str:
        """Text of ``ids`` (a sequence of ints or an integer tensor on any device); special
        tokens are skipped, byte sequences that are not UTF-8 become U+FFFD; an id outside
        ``[0, vocab_size)`` is a ValueError."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: {i} is outside the vocabulary [0, {self.vocab_size})")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def config(self) -> dict:
        """What ``tokenizer_config.json`` holds: type, vocab_size and the special ids."""
        return {"type": "byte", "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id}

    @property
    def fingerprint(self) -> str:
        """sha256 of the configuration: equal fingerprints tokenize every text alike."""
        return hashlib.sha256(_canonical_json(self.config()).encode()).hexdigest()

    def save(self, directory: str | os.PathLike):
        """Write ``tokenizer_config.json`` into ``directory`` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(directory / TOKENIZER_CONFIG, json.dumps(self.config(), indent=2).encode())

    def __repr__(self):
        return "ByteTokenizer()"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ValueError(
            "the BPE tokenizer needs the 'tokenizers' library: pip install tokenizers "
            "(or use --tokenizer byte)"
        ) from e
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2 style: any text round-trips) trained locally with the
    ``tokenizers`` library, which is imported only when a BPE tokenizer is made or loaded.

    Same interface as :class:`ByteTokenizer`; the special tokens ``<|bos|>``, ``<|eos|>``,
    ``<|pad|>`` take ids 0, 1, 2. Make one with :meth:`train` or :meth:`load`.
    """

    SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")

    def __init__(self, tokenizer):
        """Wrap a ``tokenizers.Tokenizer`` that has the three special tokens."""
        ids = [tokenizer.token_to_id(t) for t in self.SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"tokenizer: needs the special tokens {self.SPECIAL_TOKENS}")
        self._tok = tokenizer
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._fingerprint = None

    @classmethod
    def train(cls, files_iterator_or_texts: Iterable[str | os.PathLike], vocab_size: int) -> BPETokenizer:
        """Train on an iterable of texts (``str``) or files (``os.PathLike``, read as UTF-8).

        Args:
            files_iterator_or_texts: consumed once, one item at a time.
            vocab_size: the vocabulary wanted, >= 260 (256 bytes + 3 specials + 1 merge); a
                small corpus may yield fewer merges, and then ``vocab_size`` is smaller.
        """
        _positive_int("vocab_size", vocab_size)
        if vocab_size < 260:
            raise ValueError(f"vocab_size: a byte-level BPE needs at least 260, got {vocab_size}")
        tk = _import_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(cls.SPECIAL_TOKENS),
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )

        def texts():
            for item in files_iterator_or_texts:
                yield item if isinstance(item, str) else read_text(item)

        tok.train_from_iterator(texts(), trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BPETokenizer:
        """Read ``tokenizer.json`` from ``directory`` (as written by :meth:`save`)."""
        tk = _import_tokenizers()
        path = Path(directory) / TOKENIZER_JSON
        if not path.is_file():
            raise ValueError(f"tokenizer: {path} not found")
        return cls(tk.Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (in parallel inside ``tokenizers``)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def _encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids) -> str:
        """Text of ``ids`` (a sequence of ints or an integer tensor on any device); special tokens
        are skipped; an id outside ``[0, vocab_size)`` is a ValueError."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=True)

    def config(self) -> dict:
        """What ``tokenizer_config.json`` holds: type, vocab_size, the special ids and tokens."""
        return {"type": "bpe", "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id,
                "special_tokens": list(self.SPECIAL_TOKENS)}

    @property
    def fingerprint(self) -> str:
        """sha256 of the configuration and the canonical ``tokenizer.json``."""
        if self._fingerprint is None:
            vocab = _canonical_json(json.loads(self._tok.to_str()))
            self._fingerprint = hashlib.sha256((_canonical_json(self.config()) + vocab).encode()).hexdigest()
        return self._fingerprint

    def save(self, directory: str | os.PathLike):
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(directory / TOKENIZER_JSON, self._tok.to_str(pretty=True).encode())
        _atomic_write_bytes(directory / TOKENIZER_CONFIG, json.dumps(self.config(), indent=2).encode())

    def __repr__(self):
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(directory: str | os.PathLike) -> ByteTokenizer | BPETokenizer:
    """The tokenizer saved in ``directory`` (its ``tokenizer_config.json`` names the type)."""
    path = Path(directory) / TOKENIZER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer: cannot read {path}: {e}") from e
    kind = config.get("type")
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "bpe":
        tok = BPETokenizer.load(directory)
    else:
        raise ValueError(f"tokenizer: {path} has type {kind!r}, expected 'byte' or 'bpe'")
    for name in ("vocab_size", "bos_id", "eos_id", "pad_id"):
        if name in config and config[name] != getattr(tok, name):
            raise ValueError(f"tokenizer: {path} says {name}={config[name]}, the tokenizer has {getattr(tok, name)}")
    return tok


def make_tokenizer(
    spec: str, texts_iter_factory: Callable[[], Iterable[str | os.PathLike]] | None = None
) -> ByteTokenizer | BPETokenizer:
    """The tokenizer that ``--tokenizer spec`` names.

    Args:
        spec: ``'byte'``; ``'bpe:VOCAB'`` (VOCAB an int >= 260: train a byte-level BPE); or a
            directory written by a tokenizer's ``save`` (loaded, not trained).
        texts_iter_factory: called once for ``'bpe:VOCAB'``; returns the training texts or
            files, e.g. ``lambda: train_docs``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"--tokenizer: expected a string, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            vocab = None
        if vocab is None or vocab < 260:
            raise ValueError(f"--tokenizer: 'bpe:VOCAB' needs an integer VOCAB >= 260, got {spec!r}")
        if texts_iter_factory is None:
            raise ValueError("--tokenizer: training a BPE tokenizer needs texts (texts_iter_factory)")
        return BPETokenizer.train(texts_iter_factory(), vocab)
    if (Path(spec) / TOKENIZER_CONFIG).is_file():
        return load_tokenizer(spec)
    raise ValueError(
        f"--tokenizer: expected 'byte', 'bpe:VOCAB' (VOCAB >= 260) or a saved tokenizer directory, got {spec!r}"
    )


def cached_tokenizer(
    spec: str, docs: Sequence[str | os.PathLike], cache_dir: str | os.PathLike
) -> ByteTokenizer | BPETokenizer:
    """:func:`make_tokenizer` for ``spec`` trained on ``docs``, saved under
    ``cache_dir/tokenizer-<key>/`` and loaded from there next time (training a BPE on
    ~150 MB takes minutes). The key hashes ``spec`` and each document's (path, size,
    mtime_ns); ``'byte'`` and saved directories need no training and are not cached."""
    if not (isinstance(spec, str) and spec.startswith("bpe:")):
        return make_tokenizer(spec)
    docs = [Path(d).resolve() for d in docs]
    h = hashlib.sha256(f"nsa-tokenizer\0{spec}\0".encode())
    _hash_stats(h, docs)
    directory = Path(cache_dir) / f"tokenizer-{h.hexdigest()[:32]}"
    if (directory / TOKENIZER_CONFIG).is_file():
        try:
            return load_tokenizer(directory)
        except ValueError:
            pass  # unreadable: train again
    tok = make_tokenizer(spec, lambda: iter_texts(docs))
    tok.save(directory)
    return tok


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


def _looks_like_text(head: bytes, complete: bool) -> bool:
    """No NUL byte and valid UTF-8 (a multi-byte character cut at the end of an incomplete
    head is fine)."""
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
    except UnicodeDecodeError:
        return False
    return True


def _is_document(path: Path) -> bool:
    """A non-empty file whose first 8 KiB look like UTF-8 text."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES + 1)
    except OSError:
        return False
    return bool(head) and _looks_like_text(head[:SNIFF_BYTES], complete=len(head) <= SNIFF_BYTES)


def _walk_files(root: Path, skip_dirs: Iterable[str] = ()) -> Iterator[Path]:
    """Files under ``root`` in sorted order; hidden directories and files are skipped."""
    skip = set(skip_dirs)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in skip)
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath, name)


def _default_corpus() -> list[Path]:
    """The ``.py`` files of this interpreter's standard library and of the running
    environment's site-packages: non-empty, UTF-8, one file per distinct content (the first
    path in sorted order), sorted."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    sites = sorted({Path(paths[k]).resolve() for k in ("purelib", "platlib")})
    by_size: dict[int, list[Path]] = {}
    seen = set()
    # a base interpreter's own site-packages may lie inside stdlib: the running environment's
    # packages are exactly purelib/platlib
    roots = [(stdlib, ("site-packages", "dist-packages"))] + [(s, ()) for s in sites]
    for root, skip in roots:
        for path in _walk_files(root, skip):
            if path.suffix != ".py" or path in seen:
                continue
            seen.add(path)
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size:
                by_size.setdefault(size, []).append(path)
    unique = []
    for group in by_size.values():
        if len(group) == 1:
            unique.extend(group)
            continue
        # identical files have equal sizes: only these need hashing
        digests = set()
        for path in sorted(group):
            try:
                digest = hashlib.sha256(path.read_bytes()).digest()
            except OSError:
                continue
            if digest not in digests:
                digests.add(digest)
                unique.append(path)
    docs = sorted(p for p in unique if _is_document(p))
    if not docs:
        raise ValueError(f"--data: the default corpus (.py files under {stdlib} and {sites}) is empty")
    return docs


def find_documents(paths: Sequence[str | os.PathLike] | None) -> list[Path]:
    """The text documents that ``--data`` names, resolved, de-duplicated and sorted.

    Args:
        paths: each a file, a directory (searched recursively for non-empty UTF-8 text files;
            binaries (a NUL byte or invalid UTF-8 in the first 8 KiB), empty files and hidden
            files and directories are skipped) or a glob (``**`` recurses; matched directories
            are searched as above). ``None``: the default corpus, the ``.py`` files of the
            running interpreter's standard library and installed packages, one per distinct
            content.

    Raises:
        ValueError naming ``--data`` and the path: a path that does not exist, a named file that
        is empty or not UTF-8 text, a directory or glob that yields no document.
    """
    if paths is None:
        return _default_corpus()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(os.path.expanduser(os.fspath(raw)))
        if path.is_file():
            if not _is_document(path):
                raise ValueError(f"--data: {raw} is not a non-empty UTF-8 text file")
            hits = [path]
        elif path.is_dir():
            hits = [p for p in _walk_files(path) if _is_document(p)]
            if not hits:
                raise ValueError(f"--data: directory {raw} holds no text files")
        elif any(c in os.fspath(path) for c in "*?["):
            hits = []
            for match in sorted(glob.glob(os.fspath(path), recursive=True)):
                m = Path(match)
                if m.is_dir():
                    hits.extend(p for p in _walk_files(m) if _is_document(p))
                elif _is_document(m):
                    hits.append(m)
            if not hits:
                raise ValueError(f"--data: {raw} matches no text files")
        else:
            raise ValueError(f"--data: {raw} does not exist")
        for hit in hits:
            found.setdefault(hit.resolve(), None)
    if not found:
        raise ValueError("--data: no documents given")
    return sorted(found)


def read_text(path: str | os.PathLike) -> str:
    """A document's text: its bytes decoded as UTF-8, invalid sequences as U+FFFD; line
    endings kept as they are."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def iter_texts(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """The text of each document, one at a time (e.g. BPE training:
    ``make_tokenizer(spec, lambda: iter_texts(train_docs))``)."""
    for path in paths:
        yield read_text(path)


def split_documents(
    docs: Sequence[str | os.PathLike], val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Split documents into (train, validation) by file.

    A document goes to validation when ``sha256(seed, its path relative to the documents'
    common directory)`` read as a number in [0, 1) is below ``val_fraction``: a document's
    side depends on the seed and its relative path only, not on where the corpus lies, so
    adding files (below the same common directory) never moves old ones. If one side comes
    out empty, the document with the smallest (largest) hash moves to validation (training).

    Returns:
        ``(train_docs, val_docs)`` as Paths, each in the input order; both non-empty.
    """
    docs = [Path(d) for d in docs]
    if len(docs) < 2:
        raise ValueError(f"--data: need at least 2 documents to split train/validation, got {len(docs)}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    resolved = [os.path.abspath(d) for d in docs]
    root = os.path.commonpath(resolved)
    if root in resolved:  # all documents are one file
        root = os.path.dirname(root)
    scores = []
    for path in resolved:
        rel = Path(os.path.relpath(path, root)).as_posix()
        digest = hashlib.sha256(f"{seed}\0{rel}".encode()).digest()
        scores.append(int.from_bytes(digest[:8], "big") / 2**64)
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val


# --------------------------------------------------------------------------------------------
# Token store
# --------------------------------------------------------------------------------------------

STORE_FORMAT = 1
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
META_FILE = "meta.json"
DOCUMENTS_FILE = "documents.txt"
ENCODE_CHUNK_CHARS = 4 << 20  # texts tokenized together (tokenizers' encode_batch is parallel)


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def _cache_key(docs: Sequence[Path], tokenizer) -> str:
    """sha256 of the store format, the tokenizer's fingerprint and every document's
    (resolved path, size, mtime_ns)."""
    h = hashlib.sha256(f"nsa-token-store-{STORE_FORMAT}\0{tokenizer.fingerprint}\0".encode())
    _hash_stats(h, docs)
    return h.hexdigest()[:32]


def _hash_stats(h, docs: Sequence[Path]):
    for path in docs:
        try:
            st = path.stat()
        except OSError as e:
            raise ValueError(f"--data: cannot read {path}: {e}") from e
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


class TokenStore:
    """Tokenized documents on disk: ``tokens`` (a read-only ``numpy.memmap`` of all token ids,
    uint16 when ``vocab_size <= 65535``, else int32) and ``offsets`` (int64
    ``[num_documents + 1]``: document i is ``tokens[offsets[i]:offsets[i + 1]]``, which is
    ``[bos] + encode(text) + [eos]``). ``len(store)`` is the number of tokens.

    Make one with :meth:`build` (tokenize, or reuse the cache) or :meth:`open` (a built
    directory).
    """

    def __init__(self, path: Path, meta: dict, tokens: np.ndarray, offsets: np.ndarray):
        self.path = path
        self.meta = meta
        self.tokens = tokens
        self.offsets = offsets
        self.vocab_size: int = meta["vocab_size"]
        self.bos_id: int = meta["bos_id"]
        self.eos_id: int = meta["eos_id"]
        self.pad_id: int = meta["pad_id"]

    def __len__(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def num_documents(self) -> int:
        """Documents in the store (``len(offsets) - 1``)."""
        return int(self.meta["num_documents"])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a view into the memory map)."""
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def __repr__(self):
        return f"TokenStore({str(self.path)!r}, documents={self.num_documents}, tokens={len(self)})"

    @classmethod
    def open(cls, path: str | os.PathLike) -> TokenStore:
        """Memory-map a built store directory (nothing is read into memory at once)."""
        path = Path(path)
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"token store: cannot read {path / META_FILE}: {e}") from e
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"token store: {path} has format {meta.get('format')!r}, expected {STORE_FORMAT}")
        dtype = np.dtype(meta["dtype"])
        n_tok, n_doc = int(meta["num_tokens"]), int(meta["num_documents"])
        try:
            offsets = np.load(path / OFFSETS_FILE, mmap_mode="r")
            size = (path / TOKENS_FILE).stat().st_size
        except (OSError, ValueError) as e:
            raise ValueError(f"token store: {path} is incomplete: {e}") from e
        if (offsets.shape != (n_doc + 1,) or offsets.dtype != np.int64 or offsets[0] != 0
                or offsets[-1] != n_tok or size != n_tok * dtype.itemsize or n_tok == 0):
            raise ValueError(f"token store: {path} is corrupt (sizes disagree with {META_FILE})")
        tokens = np.memmap(path / TOKENS_FILE, dtype=dtype, mode="r", shape=(n_tok,))
        return cls(path, meta, tokens, offsets)

    @classmethod
    def build(
        cls, docs: Sequence[str | os.PathLike], tokenizer, cache_dir: str | os.PathLike, *, progress: bool = False
    ) -> TokenStore:
        """Tokenize ``docs`` into ``cache_dir/<key>/`` and open it; reuse it if already built.

        The key hashes the tokenizer's fingerprint and each document's (path, size,
        mtime_ns): a changed file or tokenizer builds a new store. Documents are read and
        tokenized a few MB at a time and appended to the token file, so memory stays
        bounded whatever the corpus size. The store is written into a temporary directory
        and renamed into place, so an interrupted build leaves no store behind (at most a
        ``.tmp-*`` directory). Concurrent builders of the same key (e.g. several ranks) each
        write their own temporary copy and the first rename wins.

        Args:
            docs: document paths, in the order the store keeps them.
            tokenizer: a :class:`ByteTokenizer` or :class:`BPETokenizer` (anything with
                ``encode``, ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, ``fingerprint``).
            cache_dir: parent of the store directories (created if missing).
            progress: show a progress bar over documents.
        """
        docs = [Path(d).resolve() for d in docs]
        if not docs:
            raise ValueError("--data: no documents to tokenize")
        cache_dir = Path(cache_dir)
        final = cache_dir / _cache_key(docs, tokenizer)
        if (final / META_FILE).is_file():
            try:
                return cls.open(final)
            except ValueError:
                pass  # a corrupt store (edited by hand?): build it again
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
        try:
            _write_store(tmp, docs, tokenizer, progress)
            _install_dir(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(final)


def _write_store(out: Path, docs: list[Path], tokenizer, progress: bool):
    dtype = _token_dtype(tokenizer.vocab_size)
    offsets = array.array("q", [0])
    encode = getattr(tokenizer, "_encode_arrays", None) or (
        lambda texts: [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]
    )

    def flush(texts, f):
        for ids in encode(texts):
            if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(f"tokenizer: produced ids outside [0, {tokenizer.vocab_size})")
            row = np.empty(len(ids) + 2, dtype=dtype)
            row[0], row[-1] = tokenizer.bos_id, tokenizer.eos_id
            row[1:-1] = ids
            f.write(row.tobytes())
            offsets.append(offsets[-1] + len(row))

    with open(out / TOKENS_FILE, "wb") as f:
        texts, chars = [], 0
        for path in tqdm(docs, desc="tokenize", unit="doc", disable=not progress):
            texts.append(read_text(path))
            chars += len(texts[-1])
            if chars >= ENCODE_CHUNK_CHARS:
                flush(texts, f)
                texts, chars = [], 0
        if texts:
            flush(texts, f)
        f.flush()
        os.fsync(f.fileno())
    np.save(out / OFFSETS_FILE, np.frombuffer(offsets, dtype=np.int64))
    (out / DOCUMENTS_FILE).write_text("".join(f"{p}\n" for p in docs))
    meta = {
        "format": STORE_FORMAT,
        "dtype": dtype.name,
        "num_tokens": offsets[-1],
        "num_documents": len(docs),
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "tokenizer": tokenizer.fingerprint,
    }
    _atomic_write_bytes(out / META_FILE, json.dumps(meta, indent=2).encode())


def _install_dir(tmp: Path, final: Path):
    """Rename the finished ``tmp`` to ``final``; if ``final`` exists, keep it when it opens
    (a concurrent builder finished first), else replace it."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    try:
        TokenStore.open(final)
        return
    except ValueError:
        pass
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{final.name}-", dir=final.parent))
    os.rename(final, trash / "old")
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _init_stream(obj, store, batch_tokens, seq_len, seed, rank, world_size, shuffle):
    """The arguments shared by :class:`PackedBatches` and :class:`DocumentBatches`, checked and
    set on ``obj`` (with the documents' starts and lengths)."""
    _positive_int("batch_tokens", batch_tokens)
    _positive_int("seq_len", seq_len)
    _positive_int("world_size", world_size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, world_size={world_size}), got {rank!r}")
    obj.store = store
    obj.batch_tokens = batch_tokens
    obj.seq_len = seq_len
    obj.seed = seed
    obj.rank = rank
    obj.world_size = world_size
    obj.shuffle = bool(shuffle)
    obj._starts = np.asarray(store.offsets[:-1], dtype=np.int64)
    obj._lengths = np.diff(np.asarray(store.offsets, dtype=np.int64))


def _checked_position(state: dict, identity: dict) -> int:
    """The ``batches`` of a stream's ``state``, after checking that the state is of a stream with
    this ``identity`` (the fields that must match for a resume)."""
    for name, value in identity.items():
        if state.get(name) != value:
            raise ValueError(f"state: {name}={state.get(name)!r} does not match this stream's {value!r}")
    batches = state.get("batches")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise ValueError(f"state: batches must be an int >= 0, got {batches!r}")
    return batches


class PackedBatches:
    """An infinite stream of packed batches of exactly ``batch_tokens`` tokens.

    The global stream: epochs follow one another; epoch e concatenates the documents in
    order (``shuffle=False``) or in a permutation seeded by ``(seed, e)``. A document is cut
    into pieces at every multiple of ``seq_len`` from its start, and the stream is cut into
    batches every ``batch_tokens`` tokens; every cut starts a new sequence in ``cu_seqlens``
    (so a piece cut by a batch end continues in the next batch as a new sequence, and no
    sequence spans two documents). Global batch g holds stream tokens
    ``[g * batch_tokens, (g + 1) * batch_tokens)``.

    Data parallel: rank r of ``world_size`` yields global batches r, r + world_size,
    r + 2 * world_size, ...: the ranks' k-th batches together are global batches
    ``k * world_size .. (k + 1) * world_size - 1``, which a single process iterates in turn.

    Each item is a dict of CPU tensors (move them to the model's device):

    - ``input_ids``: int64 ``[1, batch_tokens]``;
    - ``cu_seqlens``: int32 ``[N + 1]``, 0 first, ``batch_tokens`` last, strictly increasing,
      every sequence at most ``seq_len`` tokens;
    - ``labels``: int64 ``[1, batch_tokens]``, equal to ``input_ids`` (the model shifts them
      inside each sequence).

    A batch costs O(batch_tokens + log num_documents) (memory-map slices); the first batch of
    each epoch also computes that epoch's order, O(num_documents).

    Resume: :meth:`state_dict` is a small JSON-able dict; the stream is a function of
    (store, batch_tokens, seq_len, seed, shuffle), so the state's ``batches`` (global batches
    consumed) is the position. It is the same on every rank at the same step, and can be
    loaded with another ``world_size`` (the ranks then go on from the same global batch).

    Args:
        store: the :class:`TokenStore` to read.
        batch_tokens: tokens per batch (per rank), >= 1.
        seq_len: the longest sequence, >= 1 (may exceed ``batch_tokens``).
        seed: seeds the per-epoch document order (an int >= 0). Default 0.
        rank, world_size: this process's share of the global stream. Default 0, 1.
        shuffle: permute documents each epoch. Default True.
    """

    def __init__(self, store: TokenStore, batch_tokens: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        _init_stream(self, store, batch_tokens, seq_len, seed, rank, world_size, shuffle)
        self._total = len(store)
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._batches = 0  # global batches before this rank group's next step

    # -- the global stream --------------------------------------------------------------

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens in the store: one pass over every document."""
        return self._total

    @property
    def epoch(self) -> float:
        """Epochs consumed so far by all ranks together (fractional)."""
        return self._batches * self.batch_tokens / self._total

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order, cumulative end of each ordered document) of ``epoch``."""
        if epoch not in self._orders:
            n = len(self._lengths)
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            else:
                perm = np.arange(n)
            if len(self._orders) >= 2:  # a batch rarely spans more than two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = (perm, np.cumsum(self._lengths[perm]))
        return self._orders[epoch]

    def _batch(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens (int64 ``[B]``) and cu_seqlens (int32) of global batch ``g``."""
        B, L = self.batch_tokens, self.seq_len
        epoch, pos = divmod(g * B, self._total)
        tokens, cuts = [], [np.array([B], dtype=np.int64)]
        filled = 0
        while filled < B:
            perm, cum_end = self._order(epoch)
            n = min(B - filled, self._total - pos)
            a, b = pos, pos + n  # this part covers epoch tokens [a, b)
            i0 = int(np.searchsorted(cum_end, a, side="right"))
            i1 = int(np.searchsorted(cum_end, b - 1, side="right")) + 1
            docs = perm[i0:i1]
            doc_end = cum_end[i0:i1]
            doc_start = doc_end - self._lengths[docs]
            lo = np.maximum(doc_start, a) - doc_start  # segment [lo, hi) in document offsets
            hi = np.minimum(doc_end, b) - doc_start
            seg_len = hi - lo
            out = filled + np.maximum(doc_start, a) - a  # where each segment lands in the batch
            src = np.repeat(self._starts[docs] + lo - out, seg_len) + np.arange(filled, filled + n)
            tokens.append(self.store.tokens[src])
            # every segment starts a sequence; so does every multiple of L inside it
            n_cut = (hi - 1) // L - lo // L
            first = out + (lo // L + 1) * L - lo
            k = np.arange(int(n_cut.sum())) - np.repeat(np.cumsum(n_cut) - n_cut, n_cut)
            cuts += [out, np.repeat(first, n_cut) + k * L]
            filled += n
            epoch, pos = (epoch + 1, 0) if b == self._total else (epoch, b)
        cu = np.sort(np.concatenate(cuts)).astype(np.int32)
        return np.concatenate(tokens).astype(np.int64), cu

    # -- iteration --------------------------------------------------------------------

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokens, cu = self._batch(self._batches + self.rank)
        self._batches += self.world_size
        input_ids = torch.from_numpy(tokens).view(1, -1)
        return {"input_ids": input_ids, "cu_seqlens": torch.from_numpy(cu), "labels": input_ids.clone()}

    # -- resume -----------------------------------------------------------------------

    def _identity(self) -> dict:
        return {"seed": self.seed, "shuffle": self.shuffle, "batch_tokens": self.batch_tokens,
                "seq_len": self.seq_len, "num_tokens": self._total,
                "num_documents": self.store.num_documents}

    def state_dict(self) -> dict:
        """The position, JSON-able: ``batches`` (global batches consumed by all ranks) is what
        :meth:`load_state_dict` uses; ``epoch``, ``document`` (index into the epoch's order)
        and ``offset`` (tokens into that document) describe where the next step starts; the
        rest identifies the stream and must match on load."""
        epoch, pos = divmod(self._batches * self.batch_tokens, self._total)
        _, cum_end = self._order(epoch)
        doc = int(np.searchsorted(cum_end, pos, side="right"))
        offset = pos - (int(cum_end[doc - 1]) if doc else 0)
        return {"version": 1, "batches": self._batches, "epoch": epoch, "document": doc,
                "offset": offset, **self._identity()}

    def load_state_dict(self, state: dict):
        """Continue from ``state`` (from :meth:`state_dict` of a stream with the same store,
        batch_tokens, seq_len, seed and shuffle; world_size may differ)."""
        if state.get("packing", "tokens") != "tokens":
            raise ValueError(f"state: packing={state.get('packing')!r} is the state of another stream "
                             f"(DocumentBatches); this one cuts documents")
        self._batches = _checked_position(state, self._identity())


class DocumentBatches:
    """An infinite stream of batches of ``batch_tokens`` tokens made of whole documents.

    Like :class:`PackedBatches` (same items, same rank sharding, same resume), except that no
    document is cut at a batch end: epoch e takes the documents in a permutation seeded by
    ``(seed, e)`` (or in order) and fills a batch with the next ones while they fit; the rest
    of the batch is one padding sequence (``pad_id``, labels ``-100``). A document longer than
    ``min(seq_len, batch_tokens)`` is cut into pieces of that length, each kept whole. Meant for
    documents that fit ``seq_len`` (the retrieval tasks of :mod:`nsa.evals.tasks`, whose
    question must stay with the text that answers it).

    ``loss_from`` (optional int array, one entry per document): the labels of document i's
    tokens before position ``loss_from[i]`` (0 = ``bos``) are ``-100``, so only the tokens from
    there on (the answers) carry loss; a negative entry keeps every label of the document.

    Global batch g is batch ``g - (batches of earlier epochs)`` of its epoch; an epoch's packing
    costs O(num_documents), computed when first needed (a resume walks the epochs before its
    position once). ``state_dict`` / ``load_state_dict`` as in :class:`PackedBatches`.

    Args:
        store, batch_tokens, seq_len, seed, rank, world_size, shuffle: as in
            :class:`PackedBatches`.
        loss_from: None or ``store.num_documents`` ints (see above).
    """

    def __init__(self, store: TokenStore, batch_tokens: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, loss_from=None):
        _init_stream(self, store, batch_tokens, seq_len, seed, rank, world_size, shuffle)
        if loss_from is not None:
            loss_from = np.asarray(loss_from, dtype=np.int64)
            if loss_from.shape != (store.num_documents,):
                raise ValueError(f"loss_from: expected {store.num_documents} entries (one per document), "
                                 f"got shape {tuple(loss_from.shape)}")
        self.loss_from = loss_from
        self._piece = min(seq_len, batch_tokens)
        self._plans: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._epoch_ends: list[int] = []  # global batches up to the end of epoch e
        self._batches = 0

    def _plan(self, epoch: int):
        """(document, offset, length) of every piece of ``epoch`` in order, and the index of
        each batch's first piece (plus the end): the greedy packing of that epoch."""
        if epoch not in self._plans:
            n = len(self._lengths)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            lengths = self._lengths[perm]
            pieces = -(-lengths // self._piece)
            doc = np.repeat(perm, pieces)
            k = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
            off = k * self._piece
            ln = np.minimum(np.repeat(lengths, pieces) - off, self._piece)
            firsts, fill = [0], 0
            for i, m in enumerate(ln.tolist()):
                if fill + m > self.batch_tokens:
                    firsts.append(i)
                    fill = 0
                fill += m
            firsts.append(len(ln))
            if len(self._plans) >= 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = (doc, off, ln, np.asarray(firsts, dtype=np.int64))
        return self._plans[epoch]

    def _locate(self, g: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of global batch ``g``."""
        while not self._epoch_ends or self._epoch_ends[-1] <= g:
            e = len(self._epoch_ends)
            count = len(self._plan(e)[3]) - 1
            self._epoch_ends.append((self._epoch_ends[-1] if self._epoch_ends else 0) + count)
        e = int(np.searchsorted(np.asarray(self._epoch_ends), g, side="right"))
        return e, g - (self._epoch_ends[e - 1] if e else 0)

    def _batch(self, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, labels (int64 ``[B]``) and cu_seqlens (int32) of global batch ``g``."""
        epoch, j = self._locate(g)
        doc, off, ln, firsts = self._plan(epoch)
        a, b = int(firsts[j]), int(firsts[j + 1])
        tokens = np.full(self.batch_tokens, self.store.pad_id, dtype=np.int64)
        labels = np.full(self.batch_tokens, -100, dtype=np.int64)
        cu, pos = [0], 0
        for d, o, m in zip(doc[a:b].tolist(), off[a:b].tolist(), ln[a:b].tolist()):
            s = int(self._starts[d]) + o
            tokens[pos:pos + m] = self.store.tokens[s:s + m]
            first = 0
            if self.loss_from is not None and self.loss_from[d] >= 0:
                first = min(max(int(self.loss_from[d]) - o, 0), m)
            labels[pos + first:pos + m] = tokens[pos + first:pos + m]
            pos += m
            cu.append(pos)
        if pos < self.batch_tokens:
            cu.append(self.batch_tokens)
        return tokens, labels, np.asarray(cu, dtype=np.int32)

    def __iter__(self) -> DocumentBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        tokens, labels, cu = self._batch(self._batches + self.rank)
        self._batches += self.world_size
        return {"input_ids": torch.from_numpy(tokens).view(1, -1), "cu_seqlens": torch.from_numpy(cu),
                "labels": torch.from_numpy(labels).view(1, -1)}

    def batches_per_epoch(self, epoch: int = 0) -> int:
        """Global batches in ``epoch``."""
        return len(self._plan(epoch)[3]) - 1

    def _identity(self) -> dict:
        return {"packing": "documents", "seed": self.seed, "shuffle": self.shuffle,
                "batch_tokens": self.batch_tokens, "seq_len": self.seq_len, "num_tokens": len(self.store),
                "num_documents": self.store.num_documents}

    def state_dict(self) -> dict:
        """The position, JSON-able: ``batches`` (global batches consumed by all ranks) is what
        :meth:`load_state_dict` uses; ``epoch`` and ``epoch_batch`` describe it; the rest
        identifies the stream and must match on load."""
        epoch, j = self._locate(self._batches)
        return {"version": 1, "batches": self._batches, "epoch": epoch, "epoch_batch": j, **self._identity()}

    def load_state_dict(self, state: dict):
        """Continue from ``state`` (see :meth:`PackedBatches.load_state_dict`)."""
        self._batches = _checked_position(state, self._identity())


def eval_batches(store: TokenStore, batch_tokens: int, seq_len: int, max_batches: int | None, *,
                 documents: bool = False, loss_from=None) -> list[dict]:
    """Validation batches: the first batches of ``store`` in document order (no shuffle).

    At most ``max_batches`` (None: no limit), and no more than fit in one pass over the store
    (``len(store) // batch_tokens``; with ``documents``, the batches of one pass), so no token
    is counted twice; a store smaller than one batch still gives one batch (which then wraps
    around to its start, or is padded with ``documents``).

    Args:
        documents: whole documents per batch (:class:`DocumentBatches`, with ``loss_from``)
            instead of :class:`PackedBatches`.

    Returns:
        a list of batch dicts, the same on every call.
    """
    if max_batches is not None:
        _positive_int("max_batches", max_batches)
    if documents:
        it = DocumentBatches(store, batch_tokens, seq_len, shuffle=False, loss_from=loss_from)
        n = it.batches_per_epoch(0)
    else:
        it = PackedBatches(store, batch_tokens, seq_len, shuffle=False)
        n = max(1, len(store) // batch_tokens)
    if max_batches is not None:
        n = min(n, max_batches)
    return [next(it) for _ in range(n)]


def load_corpus(data: Sequence[str | os.PathLike] | None, tokenizer, cache_dir: str | os.PathLike,
                val_fraction: float = 0.05, seed: int = 0, *, progress: bool = False
                ) -> tuple[TokenStore, TokenStore]:
    """Find the documents ``data`` names (:func:`find_documents`), split them
    (:func:`split_documents`), and build or reuse both token stores under
    ``cache_dir/<key>/``.

    Returns:
        ``(train_store, val_store)``.
    """
    train_docs, val_docs = split_documents(find_documents(data), val_fraction, seed)
    return (TokenStore.build(train_docs, tokenizer, cache_dir, progress=progress),
            TokenStore.build(val_docs, tokenizer, cache_dir, progress=progress))

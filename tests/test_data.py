"""`nsa.data`: tokenizers, the corpus, the train/validation split, the token cache and packed
batches (exact sizes, cu_seqlens, one epoch == the documents, rank sharding, exact resume)."""

import json
import os

import numpy as np
import pytest
import torch

from nsa import data
from nsa.data import ByteTokenizer, PackedBatches, TokenStore

TEXTS = {
    "a.txt": "hello world\n",
    "b.md": "# Title\n\nsome *markdown* with ünïcödé and emoji 🎉\r\nCRLF line\n",
    "sub/c.py": "def f(x):\n    return x * 2\n" * 7,
    "sub/deeper/d.txt": "short",
    "sub/deeper/e.txt": "z" * 301,
    "f.txt": "the quick brown fox jumps over the lazy dog. " * 3,
}


def write_corpus(root, texts=TEXTS):
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    return root


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def store(corpus, tmp_path):
    docs = data.find_documents([str(corpus)])
    return TokenStore.build(docs, ByteTokenizer(), tmp_path / "cache")


def random_store(tmp_path, lengths, seed=0):
    """A store of documents with the given token counts (bos + random bytes + eos)."""
    rng = np.random.default_rng(seed)
    root = tmp_path / f"rand{seed}"
    texts = {f"d{i:03d}.txt": "".join(chr(c) for c in rng.integers(97, 123, n - 2)) for i, n in enumerate(lengths)}
    write_corpus(root, texts)
    return TokenStore.build([root / n for n in sorted(texts)], ByteTokenizer(), tmp_path / "cache")


# -------------------------------------------------------------------------------- tokenizers

ROUND_TRIP = ["", "hello", "ünïcödé 🎉 中文", "tabs\tand\r\nCRLF\n", "x" * 1000, "\x00\x7f"]


@pytest.mark.parametrize("text", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials skipped
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_byte_tokenizer_attributes_save_load(tmp_path):
    tok = ByteTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # invalid UTF-8 replaced
    with pytest.raises(ValueError, match="ids"):
        tok.decode([259])
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["type"] == "byte"
    loaded = data.load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ByteTokenizer) and loaded.fingerprint == tok.fingerprint
    with pytest.raises(ValueError, match="tokenizer"):
        data.load_tokenizer(tmp_path / "missing")


def test_bpe_tokenizer_round_trip_save_load(corpus, tmp_path):
    pytest.importorskip("tokenizers", reason="BPE needs the optional 'tokenizers' library")
    train = [t for t in TEXTS.values()] * 20
    tok = data.make_tokenizer("bpe:300", lambda: iter(train))
    assert isinstance(tok, data.BPETokenizer)
    assert tok.vocab_size == 300
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3 and max(tok.bos_id, tok.eos_id, tok.pad_id) < 300
    for text in ROUND_TRIP + list(TEXTS.values()):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    # merges learnt: the training text takes fewer tokens than bytes
    assert len(tok.encode(TEXTS["sub/c.py"])) < len(TEXTS["sub/c.py"]) / 2
    tok.save(tmp_path / "bpe")
    loaded = data.load_tokenizer(tmp_path / "bpe")
    assert isinstance(loaded, data.BPETokenizer)
    assert loaded.fingerprint == tok.fingerprint and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TEXTS["b.md"]) == tok.encode(TEXTS["b.md"])
    assert data.make_tokenizer(str(tmp_path / "bpe")).fingerprint == tok.fingerprint
    # trained from files (Paths) as well as from texts
    from_files = data.BPETokenizer.train(data.find_documents([str(corpus)]) * 20, 280)
    assert from_files.vocab_size == 280 and from_files.fingerprint != tok.fingerprint


def test_cached_tokenizer(corpus, tmp_path, monkeypatch):
    pytest.importorskip("tokenizers", reason="BPE needs the optional 'tokenizers' library")
    docs = data.find_documents([str(corpus)])
    tok = data.cached_tokenizer("bpe:270", docs, tmp_path / "cache")
    assert [p.name.startswith("tokenizer-") for p in (tmp_path / "cache").iterdir()] == [True]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(data.BPETokenizer, "train", no_training)
    assert data.cached_tokenizer("bpe:270", docs, tmp_path / "cache").fingerprint == tok.fingerprint
    assert isinstance(data.cached_tokenizer("byte", docs, tmp_path / "cache"), ByteTokenizer)
    (corpus / "a.txt").write_text("another text")
    with pytest.raises(AssertionError, match="trained again"):  # a changed corpus trains anew
        data.cached_tokenizer("bpe:270", docs, tmp_path / "cache")


@pytest.mark.parametrize("spec", ["bpe:259", "bpe:x", "bpe:", "word", "BYTE", "bpe:300.5"])
def test_make_tokenizer_bad_spec(spec):
    with pytest.raises(ValueError, match="--tokenizer"):
        data.make_tokenizer(spec, lambda: iter(["text"]))


def test_make_tokenizer_byte():
    assert isinstance(data.make_tokenizer("byte", None), ByteTokenizer)


# -------------------------------------------------------------------------------- corpus


def test_find_documents_files_dirs_globs(corpus):
    everything = sorted((corpus / n).resolve() for n in TEXTS)
    assert data.find_documents([str(corpus)]) == everything
    # a file, a directory and a glob that overlap: de-duplicated, sorted
    got = data.find_documents([str(corpus / "sub"), str(corpus / "a.txt"), str(corpus / "sub/*.py")])
    assert got == sorted((corpus / n).resolve() for n in ("a.txt", "sub/c.py", "sub/deeper/d.txt", "sub/deeper/e.txt"))
    assert data.find_documents([str(corpus / "**/*.txt")]) == sorted(
        (corpus / n).resolve() for n in TEXTS if n.endswith(".txt"))
    # a glob that matches directories searches them
    assert data.find_documents([str(corpus / "su?")]) == data.find_documents([str(corpus / "sub")])


def test_find_documents_skips_binaries_hidden_and_empty(corpus):
    (corpus / "nul.txt").write_bytes(b"text\x00more text")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (corpus / "late_nul.bin").write_bytes(b"a" * 9000 + b"\x00")  # NUL after 8 KiB: text
    (corpus / "cut.txt").write_bytes(b"a" * 8191 + "é".encode())  # UTF-8 char cut at 8 KiB: text
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / ".hidden.txt").write_text("hidden file")
    (corpus / ".git").mkdir()
    (corpus / ".git" / "config").write_text("hidden dir")
    names = {p.name for p in data.find_documents([str(corpus)])}
    assert names == {os.path.basename(n) for n in TEXTS} | {"late_nul.bin", "cut.txt"}


@pytest.mark.parametrize("case", ["missing", "glob_nothing", "binary_file", "empty_file", "binary_dir"])
def test_find_documents_bad_paths(tmp_path, case):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / "empty.txt").write_bytes(b"")
    path = {"missing": tmp_path / "nope", "glob_nothing": tmp_path / "*.nothing",
            "binary_file": tmp_path / "bin" / "x.bin", "empty_file": tmp_path / "empty.txt",
            "binary_dir": tmp_path / "bin"}[case]
    with pytest.raises(ValueError, match="--data") as e:
        data.find_documents([str(path)])
    assert str(path) in str(e.value)


def test_find_documents_default_corpus():
    docs = data.find_documents(None)
    assert len(docs) > 100
    assert all(p.suffix == ".py" and p.is_absolute() for p in docs)
    assert docs == sorted(set(docs))
    assert any(p.name == "os.py" for p in docs)  # the standard library is in it


# -------------------------------------------------------------------------------- split


def test_split_documents(tmp_path):
    docs = [tmp_path / f"doc{i:03d}.txt" for i in range(200)]
    train, val = data.split_documents(docs, val_fraction=0.1, seed=3)
    assert (train, val) == data.split_documents(list(docs), val_fraction=0.1, seed=3)
    assert not set(train) & set(val) and sorted(train + val) == docs
    assert 5 <= len(val) <= 40
    assert train == sorted(train) and val == sorted(val)  # input order kept
    assert data.split_documents(docs, 0.1, seed=4)[1] != val
    # a document's side depends on its path below the corpus root, not on the others
    assert data.split_documents(docs[:100], 0.1, seed=3)[1] == [d for d in val if d in docs[:100]]
    moved = [tmp_path / "elsewhere" / d.name for d in docs]
    assert [d.name for d in data.split_documents(moved, 0.1, seed=3)[1]] == [d.name for d in val]


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_split_documents_both_sides_non_empty(tmp_path, fraction):
    train, val = data.split_documents([tmp_path / "a", tmp_path / "b"], val_fraction=fraction)
    assert len(train) == len(val) == 1


def test_split_documents_errors(tmp_path):
    with pytest.raises(ValueError, match="--data.*at least 2 documents"):
        data.split_documents([tmp_path / "a"])
    with pytest.raises(ValueError, match="val_fraction"):
        data.split_documents([tmp_path / "a", tmp_path / "b"], val_fraction=1.0)


# -------------------------------------------------------------------------------- token store


def test_store_round_trip(corpus, tmp_path):
    tok = ByteTokenizer()
    docs = data.find_documents([str(corpus)])
    store = TokenStore.build(docs, tok, tmp_path / "cache")
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.uint16
    assert store.path.parent == tmp_path / "cache"
    assert store.num_documents == len(docs)
    expected = [[tok.bos_id] + tok.encode(d.read_bytes().decode()) + [tok.eos_id] for d in docs]
    assert [store.document(i).tolist() for i in range(len(docs))] == expected
    assert len(store) == sum(map(len, expected))
    again = TokenStore.open(store.path)
    assert again.tokens.tolist() == store.tokens.tolist() and again.offsets.tolist() == store.offsets.tolist()
    assert [p.name for p in tmp_path.joinpath("cache").iterdir()] == [store.path.name]  # no temporaries left


def test_store_cache_reused_and_rebuilt(corpus, tmp_path):
    tok = ByteTokenizer()
    docs = data.find_documents([str(corpus)])
    store = TokenStore.build(docs, tok, tmp_path / "cache")
    mtime = (store.path / "tokens.bin").stat().st_mtime_ns
    assert TokenStore.build(docs, tok, tmp_path / "cache").path == store.path
    assert (store.path / "tokens.bin").stat().st_mtime_ns == mtime  # reused, not rewritten
    (corpus / "a.txt").write_text("changed text, another length\n")
    changed = TokenStore.build(docs, tok, tmp_path / "cache")
    assert changed.path != store.path
    i = docs.index((corpus / "a.txt").resolve())
    assert tok.decode(changed.document(i)) == "changed text, another length\n"

    class WideTokenizer(ByteTokenizer):  # another tokenizer: another key, int32 ids
        vocab_size = 70000

        def config(self):
            return {**super().config(), "vocab_size": self.vocab_size}

    wide = TokenStore.build(docs, WideTokenizer(), tmp_path / "cache")
    assert wide.path not in (store.path, changed.path)
    assert wide.tokens.dtype == np.int32 and wide.tokens.tolist() == changed.tokens.tolist()


def test_store_interrupted_build_leaves_nothing(corpus, tmp_path):
    class Failing(ByteTokenizer):
        def _encode_arrays(self, texts):
            raise KeyboardInterrupt

    docs = data.find_documents([str(corpus)])
    with pytest.raises(KeyboardInterrupt):
        TokenStore.build(docs, Failing(), tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    # a corrupt store in the cache is rebuilt
    store = TokenStore.build(docs, ByteTokenizer(), tmp_path / "cache")
    expected = store.tokens.tolist()
    del store
    with open(next((tmp_path / "cache").iterdir()) / "tokens.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(ValueError, match="corrupt"):
        TokenStore.open(next((tmp_path / "cache").iterdir()))
    assert TokenStore.build(docs, ByteTokenizer(), tmp_path / "cache").tokens.tolist() == expected


def test_load_corpus(corpus, tmp_path):
    train, val = data.load_corpus([str(corpus)], ByteTokenizer(), tmp_path / "cache", val_fraction=0.3, seed=1)
    assert train.num_documents + val.num_documents == len(TEXTS)
    assert min(train.num_documents, val.num_documents) >= 1
    assert {train.path.parent, val.path.parent} == {tmp_path / "cache"} and train.path != val.path
    names = (train.path / "documents.txt").read_text().split() + (val.path / "documents.txt").read_text().split()
    assert sorted(names) == sorted(str((corpus / n).resolve()) for n in TEXTS)


# -------------------------------------------------------------------------------- batches

# (batch_tokens, seq_len, document lengths)
PACKING = {
    "seq_lt_docs": (64, 16, [40, 2, 100, 17, 33, 9, 64, 65]),
    "seq_gt_batch": (32, 100, [40, 2, 100, 17, 33, 9, 64, 65]),
    "seq_1": (16, 1, [3, 2, 5, 7]),
    "batch_gt_corpus": (100, 8, [3, 2, 5, 7]),  # one batch spans several epochs
    "odd": (37, 7, [2, 13, 29, 41, 3, 7, 8, 50, 11]),
}


def global_boundaries(lengths, order, batch_tokens, seq_len, total):
    """Stream positions where a sequence must start: document starts, multiples of seq_len
    inside a document, batch starts (brute force)."""
    cuts, pos = set(), 0
    while pos < total:
        for d in order(pos):
            for k in range(lengths[d]):
                if k % seq_len == 0:
                    cuts.add(pos + k)
            pos += lengths[d]
    return cuts | set(range(0, total, batch_tokens))


def check_batch(batch, batch_tokens, seq_len):
    ids, cu, labels = batch["input_ids"], batch["cu_seqlens"], batch["labels"]
    assert ids.dtype == labels.dtype == torch.long and cu.dtype == torch.int32
    assert ids.shape == labels.shape == (1, batch_tokens)
    assert torch.equal(ids, labels)
    assert cu[0] == 0 and cu[-1] == batch_tokens and bool((cu.diff() > 0).all())
    assert int(cu.diff().max()) <= seq_len


@pytest.mark.parametrize("case", PACKING.values(), ids=PACKING.keys())
def test_packing_in_order(tmp_path, case):
    batch_tokens, seq_len, lengths = case
    store = random_store(tmp_path, lengths)
    n_epochs = 3
    n_batches = -(-n_epochs * len(store) // batch_tokens)
    it = PackedBatches(store, batch_tokens, seq_len, shuffle=False)
    batches = [next(it) for _ in range(n_batches)]
    for b in batches:
        check_batch(b, batch_tokens, seq_len)
    stream = torch.cat([b["input_ids"][0] for b in batches]).numpy()
    epoch = np.asarray(store.tokens, dtype=np.int64)
    assert np.array_equal(stream[: n_epochs * len(epoch)], np.tile(epoch, n_epochs))
    # sequences start exactly at documents, multiples of seq_len inside them, and batches
    got = {g * batch_tokens + int(c) for g, b in enumerate(batches) for c in b["cu_seqlens"][:-1]}
    want = global_boundaries(lengths, lambda pos: range(len(lengths)), batch_tokens, seq_len, len(stream))
    assert got == {c for c in want if c < len(stream)}


def test_packing_shuffled_epochs(tmp_path):
    lengths = [5 + 3 * i for i in range(12)]
    store = random_store(tmp_path, lengths)
    batch_tokens, seq_len = 50, 16
    it = PackedBatches(store, batch_tokens, seq_len, seed=7)
    n_batches = -(-3 * len(store) // batch_tokens)
    batches = [next(it) for _ in range(n_batches)]
    for b in batches:
        check_batch(b, batch_tokens, seq_len)
    stream = torch.cat([b["input_ids"][0] for b in batches]).numpy()
    docs = {tuple(store.document(i).tolist()): i for i in range(store.num_documents)}
    orders = []
    for e in range(3):  # each epoch is a permutation of the documents
        part = stream[e * len(store):(e + 1) * len(store)]
        starts = np.flatnonzero(part == store.bos_id)
        pieces = np.split(part, starts[1:])
        orders.append([docs[tuple(p.tolist())] for p in pieces])
        assert sorted(orders[-1]) == list(range(store.num_documents))
    assert len({tuple(o) for o in orders}) == 3 and orders[0] != list(range(store.num_documents))
    # the same seed gives the same stream; another seed another one
    again = PackedBatches(store, batch_tokens, seq_len, seed=7)
    assert all(torch.equal(next(again)["input_ids"], b["input_ids"]) for b in batches)
    other = PackedBatches(store, batch_tokens, seq_len, seed=8)
    assert not all(torch.equal(next(other)["input_ids"], b["input_ids"]) for b in batches)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "ordered"])
def test_rank_sharding(tmp_path, world_size, shuffle):
    store = random_store(tmp_path, [40, 2, 100, 17, 33, 9, 64, 65])
    single = PackedBatches(store, 48, 20, seed=5, shuffle=shuffle)
    ranks = [PackedBatches(store, 48, 20, seed=5, rank=r, world_size=world_size, shuffle=shuffle)
             for r in range(world_size)]
    for _step in range(12):  # several epochs
        step = [next(r) for r in ranks]
        for got in step:
            want = next(single)
            for key in want:
                assert torch.equal(got[key], want[key])
    assert len({json.dumps(r.state_dict()) for r in ranks}) == 1  # the same state on every rank


@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "ordered"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_exact(tmp_path, shuffle, world_size):
    store = random_store(tmp_path, [40, 2, 100, 17, 33, 9, 64, 65])  # 330 tokens per epoch
    make = lambda rank=0, ws=world_size: PackedBatches(store, 48, 20, seed=2, rank=rank, world_size=ws, shuffle=shuffle)
    reference = make(world_size - 1)
    expected = [next(reference) for _ in range(20)]
    for stop in (0, 1, 3, 6, 7, 13):  # step 3 (world_size 2) and 6/7 (world_size 1) straddle an epoch end
        it = make(world_size - 1)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.state_dict()))
        resumed = make(world_size - 1)
        resumed.load_state_dict(state)
        for want in expected[stop:stop + 4]:
            got = next(resumed)
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_resume_state_fields_and_world_size_change(tmp_path):
    store = random_store(tmp_path, [40, 2, 100, 17, 33, 9, 64, 65])
    it = PackedBatches(store, 48, 20, shuffle=False)
    for _ in range(8):  # 384 tokens: epoch 1, 54 tokens in: document 1 (length 2) ends at 42
        next(it)
    state = it.state_dict()
    assert (state["batches"], state["epoch"], state["document"], state["offset"]) == (8, 1, 2, 12)
    # two ranks resuming a single-process state go on with global batches 8 and 9
    single = [next(it) for _ in range(2)]
    for r in range(2):
        rank = PackedBatches(store, 48, 20, shuffle=False, rank=r, world_size=2)
        rank.load_state_dict(state)
        assert torch.equal(next(rank)["input_ids"], single[r]["input_ids"])
    for key, value in [("seq_len", 21), ("seed", 1), ("shuffle", True), ("num_tokens", 1), ("batches", -1)]:
        with pytest.raises(ValueError, match=key):
            PackedBatches(store, 48, 20, shuffle=False).load_state_dict({**state, key: value})


@pytest.mark.parametrize("kwargs, name", [
    ({"batch_tokens": 0}, "batch_tokens"), ({"seq_len": 0}, "seq_len"), ({"seq_len": 2.0}, "seq_len"),
    ({"batch_tokens": True}, "batch_tokens"), ({"rank": 2, "world_size": 2}, "rank"),
    ({"rank": -1}, "rank"), ({"world_size": 0}, "world_size"), ({"seed": -1}, "seed"),
])
def test_packed_batches_bad_arguments(store, kwargs, name):
    args = {"batch_tokens": 16, "seq_len": 8, **kwargs}
    with pytest.raises(ValueError, match=name):
        PackedBatches(store, **args)


def test_eval_batches(store):
    it = PackedBatches(store, 32, 16, shuffle=False)
    got = data.eval_batches(store, 32, 16, max_batches=3)
    assert len(got) == 3
    assert all(torch.equal(g[k], want[k]) for g in got for want in [next(it)] for k in want)
    again = data.eval_batches(store, 32, 16, max_batches=3)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(got, again) for k in a)
    assert len(data.eval_batches(store, 32, 16, max_batches=10**6)) == len(store) // 32  # one pass at most
    assert len(data.eval_batches(store, 10 * len(store), 16, max_batches=5)) == 1
    with pytest.raises(ValueError, match="max_batches"):
        data.eval_batches(store, 32, 16, max_batches=0)


# -------------------------------------------------------------------------------- whole documents

def _pieces(store, piece):
    """Every (document, offset) piece of ``piece`` tokens at most (brute force)."""
    return {(d, o) for d in range(store.num_documents) for o in range(0, len(store.document(d)), piece)}


@pytest.mark.parametrize("batch_tokens, seq_len", [(64, 64), (100, 30), (48, 64), (37, 7)],
                         ids=["fit", "seq-shorter", "batch-shorter", "odd"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffle", "ordered"])
def test_document_batches_keep_documents_whole(tmp_path, batch_tokens, seq_len, shuffle):
    lengths = [40, 2, 60, 17, 33, 9, 64, 30, 5, 21]
    store = random_store(tmp_path, lengths)
    it = data.DocumentBatches(store, batch_tokens, seq_len, seed=3, shuffle=shuffle)
    piece = min(batch_tokens, seq_len)
    per_epoch = it.batches_per_epoch(0)
    seen = []
    for _ in range(per_epoch):
        b = next(it)
        ids, cu, labels = b["input_ids"][0], b["cu_seqlens"], b["labels"][0]
        assert ids.shape == labels.shape == (batch_tokens,) and cu.dtype == torch.int32
        assert cu[0] == 0 and cu[-1] == batch_tokens and bool((cu.diff() > 0).all())
        for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            seq = ids[a:e].numpy()
            if (seq == store.pad_id).all() and e == batch_tokens:  # the padding at the end
                assert (labels[a:e] == -100).all()
                continue
            assert e - a <= piece and torch.equal(labels[a:e], ids[a:e])
            # each sequence is one piece of one document, at a multiple of `piece`
            match = [(d, o) for d, o in _pieces(store, piece)
                     if np.array_equal(store.document(d)[o:o + piece], seq)]
            assert match, (a, e)
            seen.append(match[0])
    assert sorted(seen) == sorted(_pieces(store, piece))  # one epoch: every piece once


def test_document_batches_loss_from_sharding_resume(tmp_path):
    lengths = [40, 2, 60, 17, 33, 9, 64, 30, 5, 21]
    store = random_store(tmp_path, lengths)
    loss_from = np.array([5, -1, 0, 17, 100, 3, -1, 29, 1, 10])
    it = data.DocumentBatches(store, 64, 64, seed=1, shuffle=False, loss_from=loss_from)
    b = next(it)  # documents 0 (40 tokens) and 1 (2 tokens), then padding
    assert b["cu_seqlens"].tolist() == [0, 40, 42, 64]
    labels, ids = b["labels"][0], b["input_ids"][0]
    assert (labels[:5] == -100).all() and torch.equal(labels[5:40], ids[5:40])
    assert torch.equal(labels[40:42], ids[40:42])  # -1: every token
    assert (ids[42:] == store.pad_id).all() and (labels[42:] == -100).all()
    # ranks of a group together are the single stream; a state resumes exactly, in any world size
    single = data.DocumentBatches(store, 50, 40, seed=4, loss_from=loss_from)
    expected = [next(single) for _ in range(12)]  # several epochs
    ranks = [data.DocumentBatches(store, 50, 40, seed=4, rank=r, world_size=2, loss_from=loss_from)
             for r in range(2)]
    for k in range(6):
        for r in range(2):
            got = next(ranks[r])
            assert all(torch.equal(got[key], expected[2 * k + r][key]) for key in got)
    for stop in (0, 3, 7):
        it = data.DocumentBatches(store, 50, 40, seed=4, loss_from=loss_from)
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(it.state_dict()))
        for ws in (1, 2):
            resumed = data.DocumentBatches(store, 50, 40, seed=4, world_size=ws, loss_from=loss_from)
            resumed.load_state_dict(state)
            got = next(resumed)
            assert all(torch.equal(got[key], expected[stop][key]) for key in got)
    with pytest.raises(ValueError, match="packing"):
        PackedBatches(store, 50, 40, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="loss_from"):
        data.DocumentBatches(store, 50, 40, loss_from=[1, 2])
    with pytest.raises(ValueError, match="batch_tokens"):
        data.DocumentBatches(store, 0, 40)


def test_eval_batches_of_documents(tmp_path):
    store = random_store(tmp_path, [40, 2, 60, 17, 33, 9])
    got = data.eval_batches(store, 64, 64, max_batches=100, documents=True)
    it = data.DocumentBatches(store, 64, 64, shuffle=False)
    assert len(got) == it.batches_per_epoch(0)  # one pass
    assert all(torch.equal(g[k], want[k]) for g in got for want in [next(it)] for k in want)

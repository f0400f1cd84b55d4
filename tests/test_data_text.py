"""normjax.data.text: corpora, exactly reversible tokenizers, windows, bits per byte."""

import math

import numpy as np
import pytest
import tfds_data
from hypothesis import given, settings
from hypothesis import strategies as st

from normjax.data import text

DATA_DIR, _WHY = tfds_data.find("tiny_shakespeare")
needs_data = tfds_data.needs("tiny_shakespeare")

SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\tTabs, CRLF\r\n and  double  spaces; "
    "accents: héllo, naïve, Ærø; Greek: λόγος; CJK: 漢字; emoji: 🙂👍🏽.\n"
)
CORPUS = text.Corpus(train=SAMPLE * 20, validation=SAMPLE[::-1], source="test")


@pytest.fixture(scope="module")
def bpe():
    return text.make_tokenizer("bpe", CORPUS, vocab_size=300)


def _tokenizer(kind, bpe):
    return bpe if kind == "bpe" else text.make_tokenizer(kind, CORPUS)


@pytest.mark.parametrize("kind", text.TOKENIZERS)
@pytest.mark.parametrize("sample", [SAMPLE, SAMPLE[::-1], "", "a", "\n\n", " A 🙂"])
def test_round_trip_is_exact_and_bytes_add_up(kind, sample, bpe):
    tokenizer = _tokenizer(kind, bpe)
    ids = tokenizer.encode(sample)
    assert ids.dtype == np.int32
    assert np.all((ids >= 0) & (ids < tokenizer.vocab_size))
    assert tokenizer.decode(ids) == sample
    assert tokenizer.token_bytes[ids].sum() == len(sample.encode("utf-8"))


def test_bpe_round_trips_text_it_never_saw(bpe):
    unseen = "Zebras ‽ quixotic ÿ ※ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f end"
    assert bpe.decode(bpe.encode(unseen)) == unseen


def test_vocabularies(bpe):
    assert text.make_tokenizer("byte", CORPUS).vocab_size == 256
    char = text.make_tokenizer("char", CORPUS)
    assert char.vocab_size == len(set(SAMPLE))
    assert bpe.vocab_size == 300
    # merges compress: fewer tokens than bytes on the training text
    assert len(bpe.encode(CORPUS.train)) < 0.8 * len(CORPUS.train.encode())


def test_bpe_training_is_deterministic_and_uses_the_training_split_only():
    first = text.make_tokenizer("bpe", CORPUS, vocab_size=320)
    second = text.make_tokenizer("bpe", CORPUS, vocab_size=320)
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    # Validation text is never seen: changing it leaves the tokenizer unchanged.
    other = text.Corpus(CORPUS.train, "zzzz qqqq zzzz qqqq " * 50, "test")
    third = text.make_tokenizer("bpe", other, vocab_size=320)
    assert third.tokenizer.to_str() == first.tokenizer.to_str()


def test_bpe_vocabulary_below_the_byte_alphabet_is_an_error():
    with pytest.raises(ValueError, match="at least 256"):
        text.make_tokenizer("bpe", CORPUS, vocab_size=200)


def test_unknown_tokenizer_lists_the_valid_ones():
    with pytest.raises(ValueError, match="use one of byte, char, bpe"):
        text.make_tokenizer("wordpiece", CORPUS)


def test_char_tokenizer_names_characters_outside_its_alphabet():
    char = text.make_tokenizer("char", CORPUS)
    with pytest.raises(ValueError, match="'Q'"):
        char.encode("Q")


@pytest.mark.parametrize("kind", text.TOKENIZERS)
def test_saved_tokenizer_is_reused(kind, tmp_path):
    path = tmp_path / "tokenizer.json"
    made = text.make_tokenizer(kind, CORPUS, vocab_size=300, path=path)
    saved = path.read_text()
    # a different corpus would give a different tokenizer: the file wins
    other = text.Corpus("xyz " * 100 + SAMPLE, SAMPLE, "other")
    again = text.make_tokenizer(kind, other, vocab_size=300, path=path)
    assert path.read_text() == saved
    np.testing.assert_array_equal(again.encode(SAMPLE), made.encode(SAMPLE))
    np.testing.assert_array_equal(again.token_bytes, made.token_bytes)


def test_saved_tokenizer_of_another_kind_is_an_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    text.make_tokenizer("char", CORPUS, path=path)
    with pytest.raises(ValueError, match="holds a char tokenizer"):
        text.make_tokenizer("bpe", CORPUS, vocab_size=300, path=path)
    text.make_tokenizer("bpe", CORPUS, vocab_size=300, path=tmp_path / "b.json")
    with pytest.raises(ValueError, match="vocabulary 300"):
        text.make_tokenizer("bpe", CORPUS, vocab_size=400, path=tmp_path / "b.json")


# ------------------------------------------------------------------ corpora


def test_text_file_is_split_at_the_validation_fraction(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(SAMPLE * 10, encoding="utf-8")
    corpus = text.load_corpus(text_file=path, validation_fraction=0.25)
    assert corpus.train + corpus.validation == SAMPLE * 10
    assert len(corpus.validation) == pytest.approx(0.25 * len(SAMPLE * 10), abs=1)


def test_missing_text_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*--config.text_file"):
        text.load_corpus(text_file=tmp_path / "nope.txt")


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_text_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is empty"):
        text.load_corpus(text_file=path)


def test_non_utf8_text_file_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        text.load_corpus(text_file=path)


def test_missing_tfds_dataset_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    with pytest.raises(text.DataNotFoundError, match="tiny_shakespeare.*not found"):
        text.load_corpus(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_data
def test_tiny_shakespeare_splits():
    corpus = text.load_corpus(DATA_DIR)
    assert (len(corpus.train), len(corpus.validation)) == (1003854, 55770)
    assert corpus.train.startswith("First Citizen:\nBefore we proceed")
    assert corpus.validation.startswith("?\n\nGREMIO:")


# ------------------------------------------------------------------ windows


def test_random_windows_are_slices_and_a_pure_function_of_the_step():
    ids = np.arange(1000, dtype=np.int32) * 3
    a = text.random_windows(ids, seed=1, step=5, batch_size=8, length=16)
    assert a.shape == (8, 17) and a.dtype == np.int32
    np.testing.assert_array_equal(np.diff(a, axis=1), 3)  # contiguous slices
    np.testing.assert_array_equal(a, text.random_windows(ids, 1, 5, 8, 16))
    assert not np.array_equal(a, text.random_windows(ids, 1, 6, 8, 16))
    assert not np.array_equal(a, text.random_windows(ids, 2, 5, 8, 16))
    # every offset can be drawn, including the last
    starts = np.concatenate(
        [text.random_windows(ids[:20], 0, s, 64, 16)[:, 0] for s in range(20)]
    )
    assert set(starts // 3) == {0, 1, 2, 3}


def test_random_windows_need_a_long_enough_split():
    with pytest.raises(ValueError, match="fewer than context length"):
        text.random_windows(np.arange(10), 0, 0, 2, length=10)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 300),
    length=st.integers(1, 40),
    stride_fraction=st.floats(0.01, 1.0),
    batch_size=st.integers(1, 9),
)
@pytest.mark.parametrize("isolated", [False, True])
def test_eval_windows_score_every_target_once_with_context(
    n, length, stride_fraction, batch_size, isolated
):
    stride = max(1, int(round(stride_fraction * length)))
    ids = np.arange(n, dtype=np.int32) + 7
    scored = np.zeros(n, int)
    for batch in text.eval_windows(ids, length, stride, batch_size, isolated=isolated):
        assert all(v.shape == (batch_size, length) for v in batch.values())
        assert not np.any(batch["weights"] & ~batch["mask"])
        m = batch["mask"]
        np.testing.assert_array_equal(batch["targets"][m], batch["inputs"][m] + 1)
        for row in range(batch_size):
            w = batch["weights"][row]
            targets = batch["targets"][row][w] - 7
            scored[targets] += 1
            if w.any() and batch["inputs"][row, 0] != 7:  # not the first window
                # every scored prediction sees at least length - stride tokens
                assert np.argmax(w) >= length - stride
    np.testing.assert_array_equal(scored[1:], 1)
    assert scored[0] == 0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 3000),
    length=st.integers(1, 64),
    stride_fraction=st.floats(0.05, 1.0),
    batch_size=st.integers(1, 70),
)
def test_isolated_eval_windows_never_share_a_batch_with_a_nearby_window(
    n, length, stride_fraction, batch_size
):
    """No window of a batch overlaps another or lies within ``length`` tokens of
    it: no scored token (nor its context) appears elsewhere in its batch."""
    stride = max(1, int(round(stride_fraction * length)))
    ids = np.arange(n, dtype=np.int32)
    windows = 0
    for batch in text.eval_windows(ids, length, stride, batch_size, isolated=True):
        rows = batch["mask"].any(1)
        windows += int(rows.sum())
        spans = [
            (batch["inputs"][r, 0], batch["targets"][r][batch["mask"][r]].max())
            for r in np.flatnonzero(rows)
        ]
        for i, (lo_a, hi_a) in enumerate(spans):
            for lo_b, hi_b in spans[i + 1 :]:
                gap = max(lo_b - hi_a, lo_a - hi_b)  # tokens strictly between
                assert gap > length, (lo_a, hi_a, lo_b, hi_b)
    in_order = sum(
        int(b["mask"].any(1).sum())
        for b in text.eval_windows(ids, length, stride, batch_size)
    )
    assert windows == in_order


def test_position_buckets():
    assert text.position_buckets(64) == [(0, 8), (8, 16), (16, 32), (32, 64)]
    assert text.position_buckets(256) == [(0, 8), (8, 64), (64, 128), (128, 256)]
    assert text.position_buckets(16) == [(0, 8), (8, 16)]
    assert text.position_buckets(4) == [(0, 4)]


def test_eval_windows_reject_a_bad_stride():
    with pytest.raises(ValueError, match="stride"):
        next(text.eval_windows(np.arange(10), 4, 5, 2))


def test_bits_per_byte():
    # a uniform model over 256 bytes costs 8 bits per byte
    assert text.bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)
    # 1.55 nats per character is 2.236 bits per byte for ASCII text
    assert text.bits_per_byte(1.55, 1) == pytest.approx(2.2362, abs=1e-4)

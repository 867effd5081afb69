"""The one tokenizer and the vocabulary: PTB-like tokens, ">= min_freq", JSON round trip."""

from __future__ import annotations

import json

import pytest

from captioner.errors import UserError
from captioner.vocab import END, PAD, SPECIALS, START, UNK, Vocab, detokenize, has_words, tokenize


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A Dog RUNS", ["a", "dog", "runs"]),
        ("Hello... World!! (really?)", ["hello", "world", "really"]),
        ("A dog's ball, isn't it?", ["a", "dog", "'s", "ball", "is", "n't", "it"]),
        ("they're here, we'll go", ["they", "'re", "here", "we", "'ll", "go"]),
        ("can't", ["ca", "n't"]),
        ("a t-shirt and a well-lit room", ["a", "t-shirt", "and", "a", "well-lit", "room"]),
        ("a - b", ["a", "b"]),
        ("3 dogs in 2014, 3.5 m", ["3", "dogs", "in", "2014", "3.5", "m"]),
        ("Café naïve Über", ["café", "naïve", "über"]),
        ("the dog\u2019s \u201cball\u201d", ["the", "dog", "'s", "ball"]),
        ("a_b", ["a", "b"]),
        ("", []),
        ("   \t\n ", []),
        (" . ", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


@pytest.mark.parametrize("bad", [None, 3, b"a dog", ["a", "dog"]])
def test_tokenize_rejects_non_str(bad: object) -> None:
    with pytest.raises(TypeError, match="str"):
        tokenize(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    ["a dog's ball isn't it", "they're here", "a t-shirt on 3 chairs", "café über alles"],
)
def test_detokenize_round_trip(text: str) -> None:
    assert detokenize(tokenize(text)) == text
    assert tokenize(detokenize(tokenize(text))) == tokenize(text)


def test_detokenize_keeps_lone_apostrophe_token_separate() -> None:
    assert detokenize(["a", "'", "b"]) == "a ' b"


# -- build --------------------------------------------------------------------------------------


def test_build_min_freq_is_greater_or_equal() -> None:
    caps = ["cat cat cat dog dog bird"]
    v = Vocab.build(caps, min_freq=2)
    assert "dog" in v.stoi  # exactly 2 occurrences: kept
    assert "cat" in v.stoi
    assert "bird" not in v.stoi  # 1 = N-1: dropped
    assert Vocab.build(caps, min_freq=3).itos == [*SPECIALS, "cat"]
    assert Vocab.build(caps, min_freq=1).itos == [*SPECIALS, "cat", "dog", "bird"]


def test_build_rejects_min_freq_below_one() -> None:
    with pytest.raises(UserError, match="min_freq"):
        Vocab.build(["a"], min_freq=0)


def test_build_order_deterministic_frequency_then_alphabetical() -> None:
    caps = ["zebra apple mango", "mango apple", "zebra kiwi"]
    v = Vocab.build(caps)
    assert v.itos[4:] == ["apple", "mango", "zebra", "kiwi"]
    assert Vocab.build(reversed(caps)) == v
    assert Vocab.build(caps, max_size=2).itos[4:] == ["apple", "mango"]


def test_build_specials_first_and_never_counted_from_text() -> None:
    v = Vocab.build([["<pad>", "<unk>", "dog"], ["<start>", "<end>", "dog"]])
    assert v.itos == [PAD, START, END, UNK, "dog"]
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert [v.stoi[s] for s in SPECIALS] == [0, 1, 2, 3]


def test_build_accepts_token_lists_and_text() -> None:
    assert Vocab.build(["A Dog."]) == Vocab.build([["a", "dog"]])


# -- encode / decode ----------------------------------------------------------------------------


def test_encode_adds_specials_and_maps_unknown() -> None:
    v = Vocab.build(["a dog runs"])
    ids = v.encode("A cat runs!")
    assert ids == [v.start_id, v.stoi["a"], v.unk_id, v.stoi["runs"], v.end_id]
    assert v.encode(["a", "zzz"], add_specials=False) == [v.stoi["a"], v.unk_id]


def test_decode_stops_at_end_drops_start_and_pad_keeps_unk() -> None:
    v = Vocab.build(["a dog runs"])
    a, dog = v.stoi["a"], v.stoi["dog"]
    assert v.decode([v.start_id, a, v.pad_id, v.unk_id, dog, v.end_id, a, dog]) == ["a", UNK, "dog"]
    assert v.decode([a, dog]) == ["a", "dog"]  # no <end>: everything
    assert v.decode([v.end_id, a]) == []


def test_encode_decode_round_trip_with_tensor_ids() -> None:
    torch = pytest.importorskip("torch")
    v = Vocab.build(["a dog runs on the grass"])
    ids = torch.tensor(v.encode("the dog runs"))
    assert v.decode(ids) == ["the", "dog", "runs"]


# -- persistence --------------------------------------------------------------------------------


def test_json_round_trip_exact_with_unicode(tmp_path) -> None:
    v = Vocab.build(["café über naïve dog dog", "日本 dog's"])
    path = tmp_path / "vocab.json"
    v.save(path)
    loaded = Vocab.load(path)
    assert loaded == v
    assert loaded.itos == v.itos
    assert loaded.stoi == v.stoi
    assert "café" in path.read_text(encoding="utf-8")  # stored as UTF-8, not \u escapes
    assert not (tmp_path / "vocab.json.tmp").exists()
    assert Vocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[1, 2, 3]",
        b'{"words": ["<pad>"]}',
        b'{"itos": ["a", "b"]}',
        b'{"itos": "<pad>"}',
        "caf\xe9".encode("latin-1"),
    ],
)
def test_load_bad_vocab_json_names_the_file(tmp_path, content: bytes) -> None:
    path = tmp_path / "bad_vocab.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match="bad_vocab.json") as info:
        Vocab.load(path)
    assert "\n" not in str(info.value)


def test_load_missing_vocab_names_the_file(tmp_path) -> None:
    with pytest.raises(UserError, match="nope.json"):
        Vocab.load(tmp_path / "nope.json")


def test_duplicated_words_rejected() -> None:
    with pytest.raises(UserError, match="duplicated.*'dog'"):
        Vocab([*SPECIALS, "dog", "cat", "dog"])
    with pytest.raises(UserError, match="duplicated"):
        Vocab([*SPECIALS, "<unk>"])


def test_specials_must_come_first() -> None:
    with pytest.raises(UserError, match="start with"):
        Vocab([START, PAD, END, UNK, "dog"])


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "...",
        " ,;:!? ",
        "'",
        "''",
        "n't",
        "'s",
        "_",
        "__ _",
        "a",
        "A.",
        "3",
        "don't",
        "é",
        "İ",
        "Ⅻ",
        "٣",
        "—",
        "\u2019s",
        "`",
        "a_b",
        "\u00b2",
        "ß",
        "\u0301",
        "\u3000",
    ],
)
def test_has_words_is_tokenize_non_empty(text: str) -> None:
    assert has_words(text) == bool(tokenize(text))


def test_has_words_agrees_with_tokenize_on_random_text() -> None:
    import random

    rng = random.Random(0)
    alphabet = "ab '_-.&,!\u2019\u201c`n't\u00e9\u0130\u2160\u0663\u00b2\u0301\u3000 \t"
    for _ in range(5000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 6)))
        assert has_words(text) == bool(tokenize(text)), repr(text)


@pytest.mark.parametrize(
    "text",
    [
        "A man riding a wave.",
        "two dogs, one ball .",
        "3,5 and 3.5",
        "end. ",
        "a.b",
        "a..",
        "a . b",
        ".",
        ",",
        "",
        "  ",
        "a,b,c",
        "x .\n",
        "u.s. flag",
        "Ｋ",
        "\u212a",
        "a\tb .",
    ],
)
def test_plain_fast_path_gives_the_pattern_tokens(text: str) -> None:
    from captioner.vocab import _pattern_tokens

    assert tokenize(text) == _pattern_tokens(text.lower())


def test_plain_fast_path_on_random_text() -> None:
    """Texts made of the characters the fast path decides on (and its near misses)."""
    import random

    from captioner.vocab import _PLAIN, _pattern_tokens

    rng = random.Random(1)
    alphabet = "aZ09 ,.-&'\t\n_"
    fast = 0
    for _ in range(20000):
        text = "".join(rng.choices(alphabet, k=rng.randint(0, 8)))
        fast += bool(_PLAIN.fullmatch(text.lower()))
        assert tokenize(text) == _pattern_tokens(text.lower()), repr(text)
    assert fast > 1000  # the fast path was exercised, not only the pattern


def test_data_max_vocab_keeps_the_most_frequent_training_words():
    """``data.max_vocab=k``: a new run's vocabulary is the k most frequent words of min_freq (so
    a benchmark can hold the output layer's size exactly), null keeps them all."""
    from pathlib import Path

    from captioner.configs.hydra import compose
    from captioner.configs.training import parse_train_config
    from captioner.datasets.annotations import CaptionRecord
    from captioner.training.setup import vocab_and_model

    records = [CaptionRecord(0, Path("0.png"), ["a dog runs", "a dog sits", "a cat"])]
    overrides = ["model=demo", "model.encoder.weights=null", "data.min_freq=1"]
    capped = parse_train_config(compose("train", [*overrides, "data.max_vocab=2"]))
    vocab, _, _ = vocab_and_model(capped, records, None)
    assert vocab.itos == [*SPECIALS, "a", "dog"]  # 3 and 2 occurrences; the rest once
    every = parse_train_config(compose("train", overrides))
    assert len(vocab_and_model(every, records, None)[0]) == len(SPECIALS) + 5
    with pytest.raises(UserError, match=r"data\.max_vocab must be >= 1"):
        parse_train_config(compose("train", [*overrides, "data.max_vocab=0"]))

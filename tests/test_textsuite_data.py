"""The text benchmark's data side: every task loads from its installed source with balanced,
disjoint, deterministic splits; a missing source names the package to install; labels do not
leak into the texts.

Real sources are needed (see docs/data.md for the install lines). Where one is missing, its tests
skip on a developer machine but fail under CI (``CI`` set), so a missing install step shows.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from tvbasis.errors import TvbasisError
from tvbasis.textsuite import TASK_NAMES, Example, SourceMissingError, TaskData, data, load_task

EXPECTED = ("wn_noun", "wn_verb", "wn_domain", "fortune_topic", "lang_id", "word_sent", "name_gender", "name_origin")


def _load(name: str, **kwargs: int) -> TaskData:
    try:
        return load_task(name, **kwargs)
    except SourceMissingError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


def _key(text: str) -> str:
    return " ".join(text.casefold().split())


def _per_class(examples: list[Example]) -> Counter[int]:
    return Counter(e.label for e in examples)


def test_task_names_in_order() -> None:
    assert TASK_NAMES == EXPECTED


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_loads_balanced_and_disjoint(name: str) -> None:
    task = _load(name)
    k = len(task.label_names)
    assert task.name == name and task.source
    assert k >= 2 and len(task.prompts) == k and len(set(task.label_names)) == k
    assert all(p.strip() for p in task.prompts) and len(set(task.prompts)) == k
    for split in (task.train, task.val, task.test):
        counts = _per_class(split)
        assert set(counts) == set(range(k)), "every class appears in every split"
        assert len(set(counts.values())) == 1, "each split has the same number of examples per class"
        assert all(0 <= e.label < k for e in split)
        assert all(e.text and e.text == e.text.strip() and len(e.text) <= data.MAX_CHARS for e in split)
    assert len(task.test) >= 400, "defaults give a test split of at least ~400 items"
    keys = [{_key(e.text) for e in split} for split in (task.train, task.val, task.test)]
    assert sum(map(len, keys)) == len(task.train) + len(task.val) + len(task.test), "no duplicates"
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2]), "no text in two splits"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_deterministic(name: str) -> None:
    first = _load(name)
    data._prepared.cache_clear()  # re-parse: the result must not depend on cached state
    second = _load(name)
    assert first == second
    other = _load(name, seed=1)
    assert other.label_names == first.label_names
    assert [e.text for e in other.train] != [e.text for e in first.train]


def test_splits_ignore_source_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files listed in another order give the same splits: texts are sorted before shuffling."""
    reference = _load("word_sent")
    build = data._SPECS["word_sent"].build

    def reversed_build() -> data._Raw:
        raw = build()
        return data._Raw(list(reversed(raw.pairs)), raw.prompt, raw.source, raw.order)

    monkeypatch.setitem(data._SPECS, "word_sent", data._Spec(reversed_build, 128, 32, 256))
    data._prepared.cache_clear()
    assert load_task("word_sent") == reference
    data._prepared.cache_clear()


def test_custom_sizes_and_max_classes() -> None:
    task = _load("wn_noun", train_per_class=8, val_per_class=4, test_per_class=5, max_classes=5)
    assert len(task.label_names) == 5
    # the most frequent lexicographer files are kept
    assert set(task.label_names) == {"noun.artifact", "noun.person", "noun.plant", "noun.animal", "noun.act"}
    assert (len(task.train), len(task.val), len(task.test)) == (40, 20, 25)
    # a class's draw does not depend on which other classes are kept
    wide = _load("wn_noun", train_per_class=8, val_per_class=4, test_per_class=5)
    animal_small = {e.text for e in task.test if task.label_names[e.label] == "noun.animal"}
    animal_wide = {e.text for e in wide.test if wide.label_names[e.label] == "noun.animal"}
    assert animal_small == animal_wide


def test_bad_arguments_raise() -> None:
    with pytest.raises(TvbasisError, match="valid tasks: wn_noun, wn_verb"):
        load_task("imagenet")
    with pytest.raises(TvbasisError, match="train_per_class"):
        load_task("word_sent", train_per_class=0)
    with pytest.raises(TvbasisError, match="max_classes"):
        load_task("word_sent", max_classes=1)
    _load("word_sent")  # skips here when vaderSentiment is missing
    with pytest.raises(TvbasisError, match="fewer than 2 classes"):
        load_task("word_sent", train_per_class=100_000)


def test_domain_marker_stripped() -> None:
    assert data._strip_domain_marker("(law) a wrongful act") == "a wrongful act"
    assert data._strip_domain_marker("(Greek mythology) (plural) the Titans") == "the Titans"
    assert data._strip_domain_marker("a unit (physics)") == "a unit (physics)"
    task = _load("wn_domain")
    texts = [e.text for e in task.train + task.val + task.test]
    assert not [t for t in texts if t.startswith("(")]
    for name in task.label_names:
        assert not [t for t in texts if t.casefold().startswith(f"({name.casefold()})")]


MISSING = [
    ("wn_noun", "WORDNET_DIR", "wordnet-base", "apt-get install wordnet-base"),
    ("wn_verb", "WORDNET_DIR", "wordnet-base", "apt-get install wordnet-base"),
    ("wn_domain", "WORDNET_DIR", "wordnet-base", "apt-get install wordnet-base"),
    ("fortune_topic", "DPKG_INFO_DIR", "fortunes", "apt-get install fortunes"),
    ("lang_id", "DPKG_INFO_DIR", "fortunes", "apt-get install fortunes"),
    ("word_sent", "VADER_LEXICON", "vaderSentiment", "pip install vaderSentiment"),
    ("name_gender", "NAM_DICT", "gender-guesser", "pip install gender-guesser"),
    ("name_origin", "NAM_DICT", "gender-guesser", "pip install gender-guesser"),
]


@pytest.mark.parametrize(("name", "attr", "package", "command"), MISSING)
def test_missing_source_names_package(
    name: str, attr: str, package: str, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, attr, tmp_path / "does-not-exist")
    with pytest.raises(TvbasisError) as info:
        load_task(name)
    assert isinstance(info.value, SourceMissingError)
    message = str(info.value)
    assert message.startswith(f"{name} needs ")
    assert package in message and command in message


def test_missing_language_package_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lang_id without fortunes-eo says so, although the other language packages are there."""
    _load("lang_id")  # skips here when the fortune packages are missing
    for listing in data.DPKG_INFO_DIR.glob("fortunes*.list"):
        if listing.name != "fortunes-eo.list":
            (tmp_path / listing.name).symlink_to(listing)
    monkeypatch.setattr(data, "DPKG_INFO_DIR", tmp_path)
    with pytest.raises(SourceMissingError, match=r"install Debian package fortunes-eo \(apt-get install fortunes-eo\)"):
        load_task("lang_id")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_label_does_not_leak_into_text(name: str) -> None:
    """Predicting the class whose name appears in the text must stay far from solving the task."""
    task = _load(name)
    patterns = [
        re.compile(r"\b" + re.escape(label.split(".")[-1].replace("-", " ").casefold()) + r"\b")
        for label in task.label_names
    ]
    correct = 0
    for e in task.test:
        text = e.text.casefold().replace("-", " ")
        hits = [i for i, p in enumerate(patterns) if p.search(text)]
        correct += hits == [e.label]
    assert correct / len(task.test) < 0.25


# --- parsers on small hand-made files, so the formats are checked without the real sources ---

WN_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton | ...  \n"


def _wn_line(offset: str, lexfile: int, word: str, pointers: list[str], gloss: str) -> str:
    ptrs = " ".join(pointers)
    return f"{offset} {lexfile:02d} n 01 {word} 0 {len(pointers):03d} {ptrs} | {gloss}  \n"


def test_wordnet_parser_and_domain_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [
        _wn_line("00000100", 9, "law", [], "the collection of rules imposed by authority"),
        _wn_line("00000200", 10, "music", [], "an artistic form of auditory communication"),
        _wn_line(
            "00000300", 4, "tort", [";c 00000100 n 0000"], '(law) any wrongdoing for which an action lies; "a tort"'
        ),
        _wn_line("00000400", 4, "lien", [";c 00000100 n 0000"], "(law) the right to take another's property"),
        _wn_line("00000500", 10, "coda", [";c 00000200 n 0000"], "(music) the closing section of a movement"),
        _wn_line("00000600", 10, "fugue", ["@ 00000200 n 0000", ";c 00000200 n 0000"], "(music) a contrapuntal piece"),
    ]
    (tmp_path / "data.noun").write_text(WN_HEADER + "".join(lines), encoding="utf-8")
    (tmp_path / "data.verb").write_text(WN_HEADER, encoding="utf-8")
    synsets = data._read_wordnet(str(tmp_path / "data.noun"))
    assert set(synsets) == {"00000100", "00000200", "00000300", "00000400", "00000500", "00000600"}
    assert synsets["00000300"].definition == "(law) any wrongdoing for which an action lies"
    assert synsets["00000600"].domains == ("00000200",) and synsets["00000600"].lexfile == 10

    monkeypatch.setattr(data, "WORDNET_DIR", tmp_path)
    task = load_task("wn_domain", train_per_class=1, val_per_class=0, test_per_class=1)
    assert task.label_names == ["law", "music"]
    assert task.prompts == ["a definition of a term from law", "a definition of a term from music"]
    texts = {e.text: task.label_names[e.label] for e in task.train + task.test}
    assert texts == {
        "any wrongdoing for which an action lies": "law",
        "the right to take another's property": "law",
        "the closing section of a movement": "music",
        "a contrapuntal piece": "music",
    }


def test_fortune_parser(tmp_path: Path) -> None:
    art = "\n".join(["  /\\_/\\  ", " ( o.o ) ", "  > ^ <  "])
    long = "word " * 100
    path = tmp_path / "topic"
    path.write_text(
        f"First  fortune\n\tspans lines.\n%\n{art}\n%\n%\nshort\n%\n{long}\n%\nLast one -- Author\n", "utf-8"
    )
    entries = data._read_fortunes(str(path))
    assert entries[0] == "First fortune spans lines."
    assert entries[-1] == "Last one -- Author"
    assert len(entries) == 3, "ASCII art, empty and very short entries are dropped"
    assert len(entries[1]) <= data.MAX_CHARS and entries[1].endswith("word")


NAM_HEADER = """# nam_dict.txt header (abridged)
##################################################################################
###  list of countries  ##########################################################
##################################################################################
#
#                             Great Britain
#                             |
#
#                              Italy
#                              |
#
#                               other countries
#                               |
#
"""


def _nam_line(code: str, name: str, freqs: str, column30: str = " ") -> str:
    return f"{code:<3}{name:<26}{column30}{freqs:<4}$\r\n"


def test_nam_dict_parser_and_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = [
        _nam_line("M", "John", "A1"),  # GB 10, Italy 1
        _nam_line("M", "Oliver", "B"),  # GB
        _nam_line("F", "Giulia", "1B"),  # Italy
        _nam_line("M", "Andrea", " 9"),
        _nam_line("F", "Andrea", "3 "),  # both genders: no gender label
        _nam_line("?", "Kim", "  5"),  # unisex: no gender label; mostly in other countries: no origin
        _nam_line("1F", "Maria", "66"),  # tie between countries: no origin label
        _nam_line("M", "Xiao+Long", "  7"),  # written as one word; 'other countries' is no class
        _nam_line("M", "Jörg", "", column30="+"),  # expanded-umlaut repeat line: skipped
        "= Bob Robert$\r\n",
    ]
    path = tmp_path / "nam_dict.txt"
    path.write_text(NAM_HEADER + "".join(body), encoding="utf-8")
    names = data._read_nam_dict(str(path))
    assert names.countries == ("Great Britain", "Italy", "other countries")
    assert names.freqs["John"] == [10, 1, 0] and names.freqs["Andrea"] == [3, 9, 0]
    assert "Xiaolong" in names.codes and "Jörg" not in names.codes

    monkeypatch.setattr(data, "NAM_DICT", path)
    gender = load_task("name_gender", train_per_class=1, val_per_class=0, test_per_class=1)
    assert gender.label_names == ["male", "female"]
    labelled = {"John": "male", "Oliver": "male", "Xiaolong": "male", "Giulia": "female", "Maria": "female"}
    drawn = {e.text: gender.label_names[e.label] for e in gender.train + gender.test}
    assert len(drawn) == 4 and drawn.items() <= labelled.items()
    origin = load_task("name_origin", train_per_class=1, val_per_class=0, test_per_class=1)
    assert origin.label_names == ["Great Britain", "Italy"]
    assert origin.prompts == ["a first name from Great Britain", "a first name from Italy"]
    assert {e.text: origin.label_names[e.label] for e in origin.train + origin.test} == {
        "John": "Great Britain",
        "Oliver": "Great Britain",
        "Giulia": "Italy",
        "Andrea": "Italy",
    }

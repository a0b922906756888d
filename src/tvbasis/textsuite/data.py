"""Eight real text-classification tasks built offline from locally installed packages.

Why these sources: every label comes from a curated resource that a Debian or PyPI package ships
(WordNet's lexicographer files and topic domains, the fortune collections' files and languages,
the VADER sentiment lexicon, the ``gender`` first-name dictionary), so the benchmark needs no
network and no hub downloads, and its labels are real rather than synthetic.

Every task goes through the same pipeline: parse the source into ``(text, label)`` pairs,
normalise whitespace and cap long texts, deduplicate texts case-insensitively (a text seen with
two different labels is dropped), keep the classes that have enough examples (the most frequent
first, up to ``max_classes``), then draw class-balanced train/validation/test splits with seeded
numpy generators. Texts are sorted before any shuffling, so the splits do not depend on the
order in which the filesystem lists files. See ``docs/data.md`` for each source and its licence.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tvbasis.errors import TvbasisError

__all__ = [
    "MAX_CHARS",
    "TASK_NAMES",
    "Example",
    "SourceMissingError",
    "TaskData",
    "load_task",
]

TASK_NAMES: tuple[str, ...] = (
    "wn_noun",
    "wn_verb",
    "wn_domain",
    "fortune_topic",
    "lang_id",
    "word_sent",
    "name_gender",
    "name_origin",
)

# Where the sources live. Module-level so tests (and unusual installs) can point them elsewhere;
# the parsers are cached per path, so a changed path is read afresh.
WORDNET_DIR = Path("/usr/share/wordnet")
DPKG_INFO_DIR = Path("/var/lib/dpkg/info")
FORTUNES_DIR = "/usr/share/games/fortunes/"
VADER_LEXICON: Path | None = None  # None: vader_lexicon.txt inside the installed vaderSentiment package
NAM_DICT: Path | None = None  # None: data/nam_dict.txt inside the installed gender_guesser package

MAX_CHARS = 300  # long fortunes are cut here: the encoder reads ~128 tokens, and short texts keep fine-tunes quick


class SourceMissingError(TvbasisError):
    """A task's source file is not installed; the message names the package to install."""


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes ``TaskData.label_names``."""

    text: str
    label: int


@dataclass
class TaskData:
    """A task's class names, zero-shot prompts and class-balanced, disjoint splits."""

    name: str
    label_names: list[str]
    prompts: list[str]
    train: list[Example]
    val: list[Example]
    test: list[Example]
    source: str


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Collapse whitespace and cap the length, cutting at a word boundary where one is near."""
    text = " ".join(text.split())
    if len(text) > MAX_CHARS:
        cut = text[:MAX_CHARS]
        space = cut.rfind(" ")
        text = cut[:space] if space > MAX_CHARS // 2 else cut
    return text


def _missing_debian(task: str, path: Path | str, package: str) -> SourceMissingError:
    return SourceMissingError(f"{task} needs {path}: install Debian package {package} (apt-get install {package})")


def _missing_pypi(task: str, what: str, package: str) -> SourceMissingError:
    return SourceMissingError(
        f"{task} needs {what} from the PyPI package {package}: install it (pip install {package})"
    )


@dataclass
class _Raw:
    """What a task builder hands to the splitter."""

    pairs: list[tuple[str, str]]  # (text, label name)
    prompt: Callable[[str], str]  # label name -> zero-shot prompt
    source: str
    order: list[str] = field(default_factory=list)  # canonical label order; unlisted labels sort after, by name


# --------------------------------------------------------------------------------------------
# WordNet (Debian wordnet-base)
# --------------------------------------------------------------------------------------------

# lexnames(5WN): lexicographer file number -> name. Fixed since WordNet 1.5.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()

_NOUN_PROMPTS = {
    "noun.Tops": "a definition of a very general noun concept",
    "noun.act": "a definition of a noun about an act or action",
    "noun.animal": "a definition of a noun about animals",
    "noun.artifact": "a definition of a noun about a man-made object",
    "noun.attribute": "a definition of a noun about a quality or attribute",
    "noun.body": "a definition of a noun about parts of the body",
    "noun.cognition": "a definition of a noun about thinking and knowledge",
    "noun.communication": "a definition of a noun about communication and language",
    "noun.event": "a definition of a noun about an event or happening",
    "noun.feeling": "a definition of a noun about feelings and emotions",
    "noun.food": "a definition of a noun about food and drink",
    "noun.group": "a definition of a noun about a group of people or things",
    "noun.location": "a definition of a noun about a place or location",
    "noun.motive": "a definition of a noun about goals and motives",
    "noun.object": "a definition of a noun about a natural object",
    "noun.person": "a definition of a noun about a kind of person",
    "noun.phenomenon": "a definition of a noun about a natural phenomenon",
    "noun.plant": "a definition of a noun about plants",
    "noun.possession": "a definition of a noun about money and possessions",
    "noun.process": "a definition of a noun about a natural process",
    "noun.quantity": "a definition of a noun about quantities and units of measure",
    "noun.relation": "a definition of a noun about a relation between things or ideas",
    "noun.shape": "a definition of a noun about shapes",
    "noun.state": "a definition of a noun about a state or condition",
    "noun.substance": "a definition of a noun about a substance or material",
    "noun.time": "a definition of a noun about time and periods of time",
}

_VERB_PROMPTS = {
    "verb.body": "a definition of a verb about grooming, dressing or the body",
    "verb.change": "a definition of a verb about changing size, temperature or state",
    "verb.cognition": "a definition of a verb about thinking, judging or doubting",
    "verb.communication": "a definition of a verb about telling, asking or speaking",
    "verb.competition": "a definition of a verb about fighting or competing",
    "verb.consumption": "a definition of a verb about eating and drinking",
    "verb.contact": "a definition of a verb about touching, hitting or attaching",
    "verb.creation": "a definition of a verb about making, creating or performing",
    "verb.emotion": "a definition of a verb about feelings",
    "verb.motion": "a definition of a verb about moving, walking or flying",
    "verb.perception": "a definition of a verb about seeing, hearing or sensing",
    "verb.possession": "a definition of a verb about buying, selling or owning",
    "verb.social": "a definition of a verb about social or political life",
    "verb.stative": "a definition of a verb about being or having",
    "verb.weather": "a definition of a verb about the weather",
}

_DOMAIN_PTR = re.compile(r" ;c (\d{8}) ([nvasr]) ")
_LEADING_MARKER = re.compile(r"^(?:\s*\([^()]*\))+\s*")


@dataclass(frozen=True)
class _Synset:
    lexfile: int
    first_lemma: str
    domains: tuple[str, ...]  # offsets of the noun synsets this one's ;c (topic domain) pointers name
    definition: str  # the gloss without its quoted examples


def _definition(gloss: str) -> str:
    """The gloss up to its first quoted example (glosses read 'definition; "example"; ...')."""
    return gloss.split('; "', 1)[0].strip().rstrip(";").strip()


@functools.lru_cache(maxsize=8)
def _read_wordnet(path: str) -> dict[str, _Synset]:
    """Parse a WordNet 3.0 ``data.*`` file (wndb(5WN)) into synsets keyed by byte offset.

    Line layout: ``offset lex_filenum ss_type w_cnt(hex) {word lex_id} p_cnt {ptr} [frames] | gloss``.
    The licence header's lines start with two spaces.
    """
    out: dict[str, _Synset] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue
            head, sep, gloss = line.partition(" | ")
            if not sep:
                continue
            parts = head.split(" ", 5)
            domains = ()
            if " ;c " in head:
                # Pointers follow the words; a word never contains a space, so " ;c " is a pointer symbol.
                domains = tuple(off for off, pos in _DOMAIN_PTR.findall(head + " ") if pos == "n")
            out[parts[0]] = _Synset(int(parts[1]), parts[4], domains, _definition(gloss))
    return out


def _wordnet(task: str, pos: str) -> dict[str, _Synset]:
    path = WORDNET_DIR / f"data.{pos}"
    if not path.is_file():
        raise _missing_debian(task, path, "wordnet-base")
    return _read_wordnet(str(path))


def _build_wn_lexfile(task: str, pos: str, prompts: dict[str, str]) -> _Raw:
    synsets = _wordnet(task, pos)
    pairs = [(_normalise(s.definition), _LEXNAMES[s.lexfile]) for s in synsets.values()]
    return _Raw(
        pairs=pairs,
        prompt=lambda label: prompts.get(label, f"a definition of a word about {label.split('.')[-1]}"),
        source=f"Debian wordnet-base: {WORDNET_DIR / f'data.{pos}'} (gloss -> lexicographer file)",
        order=list(prompts),
    )


def _domain_label(lemma: str) -> str:
    return lemma.replace("_", " ")


def _strip_domain_marker(definition: str) -> str:
    """Drop leading usage labels like '(law)' or '(Greek mythology)': they would name the class."""
    stripped = _LEADING_MARKER.sub("", definition)
    return stripped if stripped else definition


def _build_wn_domain() -> _Raw:
    task = "wn_domain"
    nouns = _wordnet(task, "noun")
    verbs = _wordnet(task, "verb")
    pairs: list[tuple[str, str]] = []
    for synsets in (nouns, verbs):
        for s in synsets.values():
            labels = {_domain_label(nouns[d].first_lemma) for d in s.domains if d in nouns}
            if len(labels) == 1:  # synsets in two topic domains have no single label
                pairs.append((_normalise(_strip_domain_marker(s.definition)), labels.pop()))
    return _Raw(
        pairs=pairs,
        prompt=lambda label: f"a definition of a term from {label}",
        source=(
            f"Debian wordnet-base: {WORDNET_DIR / 'data.noun'} and {WORDNET_DIR / 'data.verb'} "
            "(gloss -> first lemma of the ;c topic-domain synset)"
        ),
    )


# --------------------------------------------------------------------------------------------
# Fortunes (Debian fortunes, fortunes-min, fortunes-de/es/it/br/pl/cs/eo)
# --------------------------------------------------------------------------------------------

_MIN_LETTER_SHARE = 0.5  # below this a fortune is ASCII art or a table, not language
_ART_PROBE = 120


@functools.lru_cache(maxsize=64)
def _package_fortune_files(list_dir: str, package: str) -> tuple[str, ...]:
    """Fortune files a Debian package installed, from dpkg's file list (what ``dpkg -L`` prints).

    Language packages differ in layout (fortunes-it puts symlinks at the top level next to it/,
    fortunes-cs mirrors cs/ as cz/ and sk/), so files are resolved to their real paths and
    deduplicated. Index (.dat) files, UTF-8 alias links (.u8) and offensive ("off") files are skipped.
    """
    listing = Path(list_dir) / f"{package}.list"
    if not listing.is_file():
        candidates = sorted(Path(list_dir).glob(f"{package}:*.list"))
        if not candidates:
            raise FileNotFoundError(listing)
        listing = candidates[0]
    real: set[str] = set()
    for raw in listing.read_text(encoding="utf-8", errors="replace").splitlines():
        path = raw.strip()
        if not path.startswith(FORTUNES_DIR) or path.endswith((".dat", ".u8")):
            continue
        if "off" in path[len(FORTUNES_DIR) :].split("/")[:-1] or not os.path.isfile(path):
            continue
        real.add(os.path.realpath(path))
    return tuple(sorted(real))


def _fortune_files(task: str, package: str) -> tuple[str, ...]:
    listing = DPKG_INFO_DIR / f"{package}.list"
    try:
        files = _package_fortune_files(str(DPKG_INFO_DIR), package)
    except FileNotFoundError:
        raise _missing_debian(task, f"the fortune files of {package} (dpkg list {listing})", package) from None
    if not files:
        raise _missing_debian(task, f"the fortune files of {package} (none found under {FORTUNES_DIR})", package)
    return files


_SEPARATOR = re.compile(r"^%[ \t\r]*$", re.MULTILINE)


@functools.lru_cache(maxsize=512)
def _read_fortunes(path: str) -> tuple[str, ...]:
    """Entries of a fortune file: separated by lines holding only '%', normalised, art dropped."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    entries: list[str] = []
    for chunk in _SEPARATOR.split(text):
        entry = _normalise(chunk)
        head = entry[:_ART_PROBE]  # art shows in its first lines; probing a prefix keeps parsing fast
        if len(entry) >= 10 and sum(map(str.isalpha, head)) >= _MIN_LETTER_SHARE * len(head):
            entries.append(entry)
    return tuple(entries)


# English topic files used as classes, with their prompts. Omitted: collections that are not about
# one topic (cookie, fortunes, miscellaneous, people, wisdom, platitudes, humorists, zippy, knghtbrd,
# disclaimer, ...) and the computing files that overlap "computers" (linux, perl, debian, linuxcookie).
_TOPIC_PROMPTS = {
    "art": "a saying about art and artists",
    "computers": "a joke or saying about computers and programmers",
    "definitions": "a humorous definition of a word",
    "drugs": "a saying about drugs, alcohol and getting high",
    "education": "a saying about school, students and teachers",
    "food": "a saying about food and eating",
    "kids": "a saying about children and babies",
    "law": "a saying about the law, lawyers and judges",
    "literature": "a quotation from a classic work of literature",
    "love": "a saying about love and romance",
    "medicine": "a saying about doctors and medicine",
    "men-women": "a saying about men and women",
    "pets": "a saying about pets, cats and dogs",
    "politics": "a saying about politics and government",
    "riddles": "a riddle with a question and a punchline answer",
    "science": "a saying about science and scientists",
    "songs-poems": "the lyrics of a song or a short poem",
    "sports": "a saying about sports and games",
    "startrek": "a quotation from Star Trek",
    "work": "a saying about work, jobs and bosses",
}
_ENGLISH_PACKAGES = ("fortunes", "fortunes-min")


def _build_fortune_topic() -> _Raw:
    task = "fortune_topic"
    pairs: list[tuple[str, str]] = []
    for package in _ENGLISH_PACKAGES:
        for path in _fortune_files(task, package):
            topic = os.path.basename(path)
            if topic in _TOPIC_PROMPTS:
                pairs.extend((entry, topic) for entry in _read_fortunes(path))
    return _Raw(
        pairs=pairs,
        prompt=lambda label: _TOPIC_PROMPTS[label],
        source="Debian fortunes and fortunes-min: /usr/share/games/fortunes/<topic> (fortune -> file name)",
        order=list(_TOPIC_PROMPTS),
    )


# Language -> (packages, basenames to skip). Skipped: ASCII art, the English/Latin translation
# exercises, and the Slovak file that fortunes-cs ships next to its Czech ones.
_LANGUAGES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "English": (_ENGLISH_PACKAGES, frozenset({"ascii-art", "translate-me"})),
    "German": (("fortunes-de",), frozenset({"asciiart", "translations"})),
    "Spanish": (("fortunes-es",), frozenset()),
    "Italian": (("fortunes-it",), frozenset({"banner"})),
    "Portuguese": (("fortunes-br",), frozenset()),
    "Polish": (("fortunes-pl",), frozenset({"cows"})),
    "Czech": (("fortunes-cs",), frozenset({"klasik-sk"})),
    "Esperanto": (("fortunes-eo",), frozenset()),
}


def _build_lang_id() -> _Raw:
    task = "lang_id"
    pairs: list[tuple[str, str]] = []
    for language, (packages, skip) in _LANGUAGES.items():
        for package in packages:
            for path in _fortune_files(task, package):
                if os.path.basename(path) not in skip:
                    pairs.extend((entry, language) for entry in _read_fortunes(path))
    packages = ", ".join(p for ps, _ in _LANGUAGES.values() for p in ps)
    return _Raw(
        pairs=pairs,
        prompt=lambda label: f"a saying in {label}",
        source=f"Debian {packages}: fortune files found via dpkg's file lists (fortune -> package language)",
        order=list(_LANGUAGES),
    )


# --------------------------------------------------------------------------------------------
# PyPI packages: vaderSentiment, gender-guesser
# --------------------------------------------------------------------------------------------


def _package_file(task: str, override: Path | None, module: str, relative: str, pypi: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    if override is not None:
        path = Path(override)
    else:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise _missing_pypi(task, f"{module}/{relative}", pypi)
        path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise _missing_pypi(task, f"{module}/{relative} ({path} not found)", pypi)
    return path


_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")
_SENTIMENT_THRESHOLD = 0.5


@functools.lru_cache(maxsize=4)
def _read_vader(path: str) -> tuple[tuple[str, float], ...]:
    """(token, mean rating) rows of vader_lexicon.txt: token, mean, std, raw ratings, tab-separated."""
    rows: list[tuple[str, float]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 2:
                try:
                    rows.append((parts[0].strip(), float(parts[1])))
                except ValueError:
                    continue
    return tuple(rows)


def _build_word_sent() -> _Raw:
    path = _package_file("word_sent", VADER_LEXICON, "vaderSentiment", "vader_lexicon.txt", "vaderSentiment")
    pairs = []
    for token, mean in _read_vader(str(path)):
        # Words only: the lexicon also rates emoticons like ':-)' and codes like 'gr8'.
        if _WORD.fullmatch(token) and abs(mean) >= _SENTIMENT_THRESHOLD:
            pairs.append((token, "positive" if mean > 0 else "negative"))
    prompts = {"negative": "a word with negative sentiment", "positive": "a word with positive sentiment"}
    return _Raw(
        pairs=pairs,
        prompt=prompts.__getitem__,
        source=f"PyPI vaderSentiment: {path} (word -> sign of the mean rating, |mean| >= 0.5)",
        order=list(prompts),
    )


@dataclass(frozen=True)
class _Names:
    countries: tuple[str, ...]  # frequency columns, left to right
    codes: dict[str, frozenset[str]]  # name -> gender codes of all its lines
    freqs: dict[str, list[int]]  # name -> per-country frequency (0 = absent, 1..13), max over lines; read-only


def _display_name(raw: str) -> str:
    """'Jun+Wei' stands for 'Jun-Wei', 'Jun Wei' and 'Junwei'; write the one-word form."""
    head, *rest = raw.split("+")
    return head + "".join(part.lower() for part in rest)


_NON_SPACE = re.compile(r"\S")
_HEX_DIGITS = frozenset("123456789ABCDEFabcdef")


@functools.lru_cache(maxsize=4)
def _read_nam_dict(path: str) -> _Names:
    """Parse nam_dict.txt (gender 2008-11-16 format).

    Each name line is ``CODE NAME`` then, from column 31 on, one hex digit per country (1 = rare,
    D = extremely common). The header names the countries, each followed by a line with '|' at
    its column; those positions are read from the header rather than hard-coded. Lines with '+'
    in column 30 repeat a name with expanded umlauts and are skipped, as the header advises.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    countries: list[tuple[str, int]] = []
    last_title = ""
    codes: dict[str, set[str]] = defaultdict(set)
    freqs: dict[str, list[int]] = {}
    column_index: dict[int, int] = {}  # character position -> country index, fixed once the header is read
    first_col = 0
    for raw in lines:
        line = raw.rstrip("$ \t\r")  # every line ends in a '$' marker
        if line.startswith("#"):
            body = line[1:].strip()
            if body == "|" and last_title:
                countries.append((last_title, line.index("|")))
                last_title = ""
            elif body and not body.startswith("#"):
                last_title = body
            continue
        if not line or line.startswith("=") or (len(line) > 29 and line[29] == "+"):
            continue
        if not column_index:
            if not countries:
                raise TvbasisError(f"{path}: no country columns in its header; is this gender's nam_dict.txt?")
            column_index = {col: i for i, (_, col) in enumerate(countries)}
            first_col = min(column_index)
        code, name = line[:2].strip(), line[3:29].strip()
        if "+" in name:
            name = _display_name(name)
        if not name:
            continue
        codes[name].add(code)
        row = freqs.setdefault(name, [0] * len(countries))
        for match in _NON_SPACE.finditer(line, first_col):
            i = column_index.get(match.start())
            if i is not None:
                digit = match.group()
                row[i] = max(row[i], int(digit, 16) if digit in _HEX_DIGITS else 0)
    return _Names(
        countries=tuple(c for c, _ in countries),
        codes={k: frozenset(v) for k, v in codes.items()},
        freqs=freqs,
    )


def _names(task: str) -> tuple[_Names, Path]:
    path = _package_file(task, NAM_DICT, "gender_guesser", "data/nam_dict.txt", "gender-guesser")
    return _read_nam_dict(str(path)), path


_GENDER_CODES = {"M": "male", "1M": "male", "F": "female", "1F": "female"}  # ?M, ?F, ? (unisex) are dropped


def _build_name_gender() -> _Raw:
    names, path = _names("name_gender")
    pairs = []
    for name, codes in names.codes.items():
        genders = {_GENDER_CODES.get(code, "unisex") for code in codes}
        if len(genders) == 1 and "unisex" not in genders:
            pairs.append((name, genders.pop()))
    prompts = {"male": "a first name of a boy", "female": "a first name of a girl"}
    return _Raw(
        pairs=pairs,
        prompt=prompts.__getitem__,
        source=f"PyPI gender-guesser: {path} (name -> gender code M/1M or F/1F)",
        order=list(prompts),
    )


# Header spelling -> class name; unlisted countries keep the header's spelling.
_COUNTRY_NAMES = {
    "U.S.A.": "United States",
    "the Netherlands": "Netherlands",
    "Swiss": "Switzerland",
    "Kazakhstan/Uzbekistan,etc.": "Central Asia",
    "Arabia/Persia": "Arabia/Persia",
    "India/Sri Lanka": "India/Sri Lanka",
}
_COUNTRY_PHRASES = {
    "United States": "the United States",
    "Netherlands": "the Netherlands",
    "Arabia/Persia": "the Arab world or Persia",
    "India/Sri Lanka": "India or Sri Lanka",
    "Czech Republic": "the Czech Republic",
}
_OTHER_COUNTRIES = "other countries"


def _build_name_origin() -> _Raw:
    names, path = _names("name_origin")
    labels = [_COUNTRY_NAMES.get(c, c) for c in names.countries]
    pairs = []
    for name, row in names.freqs.items():
        top = max(row)
        # Only names with one clear most-frequent country; 'other countries' is no class.
        if top > 0 and row.count(top) == 1:
            winner = row.index(top)
            if names.countries[winner] != _OTHER_COUNTRIES:
                pairs.append((name, labels[winner]))
    return _Raw(
        pairs=pairs,
        prompt=lambda label: f"a first name from {_COUNTRY_PHRASES.get(label, label)}",
        source=f"PyPI gender-guesser: {path} (name -> country column with the highest frequency)",
    )


# --------------------------------------------------------------------------------------------
# Splitting and the public entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    build: Callable[[], _Raw]
    train: int
    val: int
    test: int
    max_classes: int | None = None


# Defaults: test >= ~400 items where the data allow, 32-128 train items per class for a short fine-tune.
_SPECS: dict[str, _Spec] = {
    "wn_noun": _Spec(lambda: _build_wn_lexfile("wn_noun", "noun", _NOUN_PROMPTS), 64, 16, 32),
    "wn_verb": _Spec(lambda: _build_wn_lexfile("wn_verb", "verb", _VERB_PROMPTS), 64, 16, 32),
    "wn_domain": _Spec(_build_wn_domain, 32, 16, 32),
    "fortune_topic": _Spec(_build_fortune_topic, 64, 16, 32),
    "lang_id": _Spec(_build_lang_id, 64, 32, 64),
    "word_sent": _Spec(_build_word_sent, 128, 32, 256),
    "name_gender": _Spec(_build_name_gender, 128, 32, 256),
    "name_origin": _Spec(_build_name_origin, 64, 32, 48, max_classes=10),
}


def _group(pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[str, ...]]:
    """Label -> sorted unique texts; a text (compared case-insensitively) with two labels is dropped.

    Builders hand over whitespace-normalised texts, so case is the only difference left to ignore.
    """
    labels: dict[str, set[str]] = defaultdict(set)
    shown: dict[str, str] = {}
    for text, label in pairs:
        if not text:
            continue
        key = text.casefold()
        labels[key].add(label)
        if key not in shown or text < shown[key]:
            shown[key] = text
    groups: dict[str, list[str]] = defaultdict(list)
    for key, found in labels.items():
        if len(found) == 1:
            groups[next(iter(found))].append(shown[key])
    return {label: tuple(sorted(texts)) for label, texts in groups.items()}


def _source_key() -> tuple[str, ...]:
    return (str(WORDNET_DIR), str(DPKG_INFO_DIR), FORTUNES_DIR, str(VADER_LEXICON), str(NAM_DICT))


@functools.lru_cache(maxsize=32)
def _prepared(name: str, sources: tuple[str, ...]) -> tuple[_Raw, dict[str, tuple[str, ...]]]:
    """The task's parsed and grouped texts, cached per task and source locations (``sources`` is the key)."""
    raw = _SPECS[name].build()
    return raw, _group(raw.pairs)


def _rng(seed: int, *parts: str) -> np.random.Generator:
    """A generator fixed by the seed and names, so one class's draw ignores which others are present."""
    return np.random.default_rng([seed, *(zlib.crc32(p.encode("utf-8")) for p in parts)])


def _check_count(what: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise TvbasisError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def load_task(
    name: str,
    *,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    test_per_class: int | None = None,
    max_classes: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Load one task with class-balanced, disjoint, deterministic splits.

    Per-class sizes and ``max_classes`` default to the task's own (see ``docs/data.md``). Classes
    with fewer than train+val+test examples are dropped; of the rest the most frequent are kept,
    up to ``max_classes``. The same arguments always give the same splits.
    """
    spec = _SPECS.get(name)
    if spec is None:
        raise TvbasisError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
    n_train = _check_count("train_per_class", spec.train if train_per_class is None else train_per_class, 1)
    n_val = _check_count("val_per_class", spec.val if val_per_class is None else val_per_class, 0)
    n_test = _check_count("test_per_class", spec.test if test_per_class is None else test_per_class, 1)
    limit = spec.max_classes if max_classes is None else _check_count("max_classes", max_classes, 2)
    seed = _check_count("seed", seed, 0)

    raw, groups = _prepared(name, _source_key())
    need = n_train + n_val + n_test
    eligible = sorted((c for c, texts in groups.items() if len(texts) >= need), key=lambda c: (-len(groups[c]), c))
    if limit is not None:
        eligible = eligible[:limit]
    if len(eligible) < 2:
        sizes = Counter({c: len(t) for c, t in groups.items()}).most_common(3)
        raise TvbasisError(
            f"{name}: fewer than 2 classes have {need} examples (train+val+test per class); "
            f"largest classes: {sizes}. Ask for fewer examples per class."
        )
    rank = {label: i for i, label in enumerate(raw.order)}
    label_names = sorted(eligible, key=lambda c: (rank.get(c, len(rank)), c))

    splits: dict[str, list[Example]] = {"train": [], "val": [], "test": []}
    for index, label in enumerate(label_names):
        texts = groups[label]
        chosen = [texts[i] for i in _rng(seed, name, label).permutation(len(texts))[:need]]
        splits["train"] += [Example(t, index) for t in chosen[:n_train]]
        splits["val"] += [Example(t, index) for t in chosen[n_train : n_train + n_val]]
        splits["test"] += [Example(t, index) for t in chosen[n_train + n_val :]]
    for split, examples in splits.items():
        order = _rng(seed, name, split).permutation(len(examples))
        splits[split] = [examples[i] for i in order]

    return TaskData(
        name=name,
        label_names=label_names,
        prompts=[raw.prompt(label) for label in label_names],
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        source=raw.source,
    )

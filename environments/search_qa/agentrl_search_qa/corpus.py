"""The bundled document collection and its questions, generated from a fixed seed.

Everything is fictional (made-up towns, provinces, rivers and people), so a model cannot answer
from what it memorised in pretraining: it has to find the documents. The collection is the same in
every process and on every machine (it depends only on `CORPUS_SEED`).

Each person's document names their birthplace; each town's document names its province, river and
founding year. A question asks for a fact of the town where a person was born: two hops, the
person's document first, then the town's.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass

CORPUS_SEED = 20240601
_SYLLABLES = ("thorn", "wick", "mar", "ell", "bran", "dor", "ash", "vale", "kel", "ton", "ros", "mere", "fen",
              "holt", "lin", "grave", "orm", "stead", "wyn", "ford", "cal", "bury", "elm", "dun")
_FIRST = ("Mira", "Tobin", "Oriel", "Casimir", "Fenna", "Isolde", "Bram", "Lirael", "Osric", "Wren", "Talia",
          "Corwin", "Elsbeth", "Dario", "Nell", "Piet", "Saskia", "Ulric", "Yara", "Anselm")
_LAST = ("Castell", "Varga", "Holloway", "Quist", "Marrow", "Ebbing", "Tallis", "Dunmore", "Fairweather", "Oakes",
         "Pemberly", "Ravel", "Stroud", "Thackery", "Voss", "Whitlock", "Ardent", "Bellamy", "Corbin", "Drayton")
_PROFESSIONS = ("violinist", "cartographer", "glassblower", "botanist", "clockmaker", "poet", "surveyor",
                "beekeeper", "astronomer", "bookbinder")
RIVERS = ("Elm", "Sorrow", "Anwen", "Tarn", "Brisk", "Moyle", "Calder", "Ouse", "Lethe", "Wend", "Kesh", "Ravel")
PROVINCES = ("Varn", "Ostmark", "Hale", "Corrin", "Belmaris", "Tyde", "Wexmoor", "Auldon")
TOWNS, PEOPLE = 48, 160


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    person: str  # whose birthplace the question is about (the split is decided by it)
    text: str
    answer: str
    person_doc: str
    town: str
    town_doc: str


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def build() -> tuple[tuple[Document, ...], tuple[Question, ...]]:
    """(documents, questions) of the collection; computed once per process."""
    rng = random.Random(CORPUS_SEED)
    towns: dict[str, dict] = {}
    while len(towns) < TOWNS:
        name = (rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES)).capitalize()
        if name not in towns and name not in RIVERS:
            towns[name] = {"province": rng.choice(PROVINCES), "river": rng.choice(RIVERS),
                           "founded": rng.randint(900, 1850), "people": rng.randint(2, 90) * 1000}
    names = [f"{f} {s}" for f in _FIRST for s in _LAST]
    rng.shuffle(names)
    people = {name: {"profession": rng.choice(_PROFESSIONS), "born": rng.randint(1890, 2001),
                     "town": rng.choice(sorted(towns))} for name in names[:PEOPLE]}
    docs = [Document(f"town-{_slug(t)}", t,
                     f"{t} is a town in the province of {v['province']}. It lies on the river {v['river']}, was "
                     f"founded in {v['founded']} and has about {v['people']} inhabitants.")
            for t, v in towns.items()]
    docs += [Document(f"person-{_slug(p)}", p,
                      f"{p} is {'an' if v['profession'][0] in 'aeiou' else 'a'} {v['profession']}. "
                      f"{p.split()[0]} was born in {v['born']} in the town of {v['town']}.")
             for p, v in people.items()]
    questions = []
    for p, v in people.items():
        town = towns[v["town"]]
        for text, answer in ((f"On which river lies the town where {p} was born?", town["river"]),
                             (f"In which province was {p} born?", town["province"]),
                             (f"In which year was the birthplace of {p} founded?", str(town["founded"]))):
            questions.append(Question(p, text, answer, f"person-{_slug(p)}", v["town"], f"town-{_slug(v['town'])}"))
    return tuple(docs), tuple(questions)

"""Real English sentences without a download: prose sentences from CPython's standard-library
docstrings, for the MiniLM benchmark's calibration and evaluation text.

    python benchmarks/make_sentences.py                # writes benchmarks/data/sentences.txt
    python benchmarks/make_sentences.py -o /tmp/s.txt

Deterministic for a given CPython version: a fixed, sorted list of modules; per module its own
docstring, then the docstrings (inspect.getdoc) of the public classes and functions it
defines and of their public methods, in name order. Docstrings are cut into paragraphs;
indented lines, doctest and reST lines are dropped; paragraphs are cut into sentences; a
sentence is kept when it has 6–40 words, starts with a capital letter, ends with a full stop
and looks like prose (no identifiers with dots or underscores, no brackets, quotes of code,
operators). Duplicates are dropped, first occurrence kept; when more than MAX_SENTENCES
remain, an evenly spaced subset of them is kept.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import platform
import re
import sys
import warnings
from pathlib import Path

OUTPUT = Path(__file__).resolve().parent / "data" / "sentences.txt"
MODULES = sorted(
    [
        "argparse", "ast", "bdb", "calendar", "cmd", "codecs", "collections", "configparser",
        "contextlib", "csv", "dataclasses", "datetime", "difflib", "doctest", "email.message",
        "enum", "filecmp", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
        "gzip", "heapq", "hmac", "http.client", "http.cookiejar", "http.server", "imaplib",
        "inspect", "ipaddress", "json", "locale", "logging", "logging.handlers", "mailbox",
        "mimetypes", "multiprocessing.pool", "netrc", "optparse", "pathlib", "pdb", "pickle",
        "pickletools", "platform", "poplib", "pprint", "pydoc", "queue", "random", "sched",
        "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
        "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
        "timeit", "tokenize", "trace", "traceback", "typing", "unittest.case", "urllib.parse",
        "urllib.request", "uuid", "warnings", "weakref", "wave", "zipfile",
    ]
)  # fmt: skip
MIN_WORDS, MAX_WORDS = 6, 40
MAX_SENTENCES = 1000

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Code, markup or identifiers inside a sentence: not the plain prose an embedding model meets.
CODE_LIKE = re.compile(
    r"[_`{}\[\]<>|\\=*#@~^$%]"  # code or markup characters
    r"|\(\)|\w\.\w|::|->|\.\.\.|\bself\b|\bNone\b|\bTrue\b|\bFalse\b"  # calls, dotted names
    r"|[a-z][A-Z]"  # camelCase
    r"|\b(?:e\.g|i\.e|etc|cf|vs)\."  # abbreviations that confuse the sentence split
)
SKIPPED_LINE = re.compile(r"^(?:>>>|\.\.\.|\.\. |[-*+:|=#]|\d+[.)] )")


def module_docstrings(name: str) -> list[str]:
    """The module's docstring, then its public classes' and functions' (with methods)."""
    module = importlib.import_module(name)
    docs = [inspect.getdoc(module) or ""]
    for attribute in sorted(vars(module)):
        with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when read
            warnings.simplefilter("ignore", DeprecationWarning)
            value = getattr(module, attribute)
        if attribute.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            docs.append(inspect.getdoc(value) or "")
        if inspect.isclass(value):
            for method in sorted(vars(value)):
                member = vars(value)[method]
                if not method.startswith("_") and inspect.isfunction(member):
                    docs.append(inspect.getdoc(member) or "")
    return [doc for doc in docs if doc]


def paragraphs(doc: str) -> list[str]:
    """Prose paragraphs: runs of unindented lines, joined; code and markup lines end a run."""
    found, current = [], []
    for line in doc.splitlines():
        prose = line.strip() and not line.startswith((" ", "\t"))
        if prose and not SKIPPED_LINE.match(line.strip()):
            current.append(line.strip())
            continue
        if current:
            found.append(" ".join(current))
        current = []
    if current:
        found.append(" ".join(current))
    return found


def is_prose(sentence: str) -> bool:
    words = sentence.split()
    return (
        MIN_WORDS <= len(words) <= MAX_WORDS
        and sentence[0].isupper()
        and sentence.endswith(".")
        and not sentence.endswith("..")
        and sentence.count("(") == sentence.count(")")
        and sentence.count('"') % 2 == 0
        and not CODE_LIKE.search(sentence)
        and not sentence.rstrip(".").endswith(":")
    )


def extract_sentences(modules: list[str] = MODULES) -> list[str]:
    """Unique prose sentences from the docstrings of `modules`, in module order."""
    seen: dict[str, None] = {}
    for name in modules:
        for doc in module_docstrings(name):
            for paragraph in paragraphs(doc):
                for sentence in SENTENCE_END.split(paragraph):
                    sentence = " ".join(sentence.split())
                    if is_prose(sentence):
                        seen.setdefault(sentence, None)
    sentences = list(seen)
    if len(sentences) > MAX_SENTENCES:
        step = len(sentences) / MAX_SENTENCES
        sentences = [sentences[int(i * step)] for i in range(MAX_SENTENCES)]
    return sentences


def header() -> str:
    return (
        f"# Sentences from CPython {platform.python_version()} standard-library docstrings "
        f"({len(MODULES)} modules), extracted by benchmarks/make_sentences.py; one per line."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    sentences = extract_sentences()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join([header(), *sentences]) + "\n")
    print(f"wrote {len(sentences)} sentences to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

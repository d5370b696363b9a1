"""The byte-level BPE (core/tokenizer.py), groff stripping and the six-domain study corpus
(core/domains.py). Hand-made text always runs; the round trip over the study corpus needs the
manual pages that scripts/study-corpus.sh fetches and skips, naming the script, without them."""
from __future__ import annotations

import gzip
import json

import pytest

pytest.importorskip("tokenizers")

from moe_runtime.core.domains import (MANPAGE_LANGS, STUDY_CORPUS_SCRIPT, DomainSource,  # noqa: E402
                                      build_domain_corpus, domain_documents, missing_manpages, roff_to_text,
                                      study_sources)
from moe_runtime.core.tokenizer import (DOC_SEP, TokenizerError, doc_separator_id, file_sha256,  # noqa: E402
                                        load_tokenizer_file, save_tokenizer, train_bpe)

TEXTS = [
    "def parse(line: str) -> dict[str, int]:\n    return {k: int(v) for k, v in pairs(line)}\n",
    "#ifndef _STDIO_H\n#define _STDIO_H 1\nextern int printf (const char *__restrict __format, ...);\n",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.\n",
    "Die Datei besteht aus einer Sequenz von Strukturen. Größe, Übersetzung, Straße.\n",
    "Afficher le contenu des répertoires ; « entrées » triées par défaut. Où est l'élève ?\n",
    "Muestra información sobre los ficheros; ¿dónde está el niño? ¡Año señalado!\n",
]
ODD = ["tabs\tand\r\nCRLF\n", "emoji 🙂 and CJK 漢字", "  leading and trailing spaces  ", "\x00nul\x01ctl", "", " "]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS * 20, vocab_size=400)


def test_bpe_round_trips_text_it_was_trained_on_and_text_it_never_saw(bpe):
    assert bpe.get_vocab_size() == 400
    for text in TEXTS + ODD:
        ids = bpe.encode(text).ids
        assert all(0 <= i < 400 for i in ids)
        assert bpe.decode(ids) == text, repr(text)
    # it learned merges: the training text takes fewer tokens than bytes
    n_tok = sum(len(bpe.encode(t).ids) for t in TEXTS)
    assert n_tok < 0.7 * sum(len(t.encode()) for t in TEXTS)
    assert doc_separator_id(bpe) == 0 and bpe.id_to_token(0) == DOC_SEP


def test_bpe_training_is_deterministic_and_saves_with_its_digest(bpe, tmp_path):
    again = train_bpe(TEXTS * 20, vocab_size=400)
    assert again.to_str() == bpe.to_str()
    sha = save_tokenizer(bpe, tmp_path)  # a directory gets tokenizer.json
    assert sha == file_sha256(tmp_path / "tokenizer.json")
    loaded, sha2 = load_tokenizer_file(tmp_path / "tokenizer.json", expect_sha256=sha)
    assert sha2 == sha and loaded.encode(TEXTS[3]).ids == bpe.encode(TEXTS[3]).ids


def test_tokenizer_errors_are_one_clear_line(bpe, tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizers file"):
        load_tokenizer_file(bad)
    good = tmp_path / "good.json"
    save_tokenizer(bpe, good)
    with pytest.raises(TokenizerError, match="trained with"):
        load_tokenizer_file(good, expect_sha256="0" * 64)
    with pytest.raises(TokenizerError, match="vocab_size=100"):
        train_bpe(TEXTS, vocab_size=100)
    from tokenizers import Tokenizer, models
    with pytest.raises(TokenizerError, match="separate documents"):
        doc_separator_id(Tokenizer(models.BPE()))


ROFF = r""".\" -*- coding: UTF-8 -*-
.\" a comment line
.TH LS 1 "Septembre 2022" "GNU coreutils 9.1"
.de XX
.B hidden macro body
..
.SH NOM
ls \- Afficher le contenu de répertoires
.SH "VOIR AUSSI"
\fBls\fP [\fI\,OPTION\/\fP]... « entrées »\ ; voir \(em la page \[u00E9]t\['e]\&.
.PP
.BR dir (1),
.I "deux mots"
texte\" trailing comment
.nf
code\e here
.fi
"""


def test_roff_to_text_strips_markup_deterministically():
    text = roff_to_text(ROFF)
    assert text == ("NOM\nls - Afficher le contenu de répertoires\nVOIR AUSSI\n"
                    "ls [OPTION]... « entrées » ; voir \u2014 la page ét.\n"
                    "dir (1),\ndeux mots\ntexte\ncode\\ here\n")
    assert roff_to_text(ROFF) == text


def _manpage(root, lang, name, body):
    d = root / lang / "man1"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.1.gz").write_bytes(gzip.compress(body.encode()))


def test_study_sources_need_the_corpus_script_and_read_roff_pages(tmp_path):
    with pytest.raises(FileNotFoundError, match=STUDY_CORPUS_SCRIPT):
        study_sources(tmp_path / "absent")
    words = {"de": "die Datei und der Benutzer", "fr": "le fichier et les utilisateurs",
             "es": "el fichero y los usuarios"}
    for lang, w in words.items():
        for i in range(6):
            _manpage(tmp_path, lang, f"p{i}", f".TH P{i} 1\n.SH NAME\n" + f"\\fB{w}\\fP {i} " * 12 + "\n")
        _manpage(tmp_path, lang, "link", ".so man1/p0.1\n")  # a .so stub is not a document
    assert missing_manpages(tmp_path) == []
    srcs = study_sources(tmp_path)
    assert [s.name for s in srcs][-3:] == list(MANPAGE_LANGS)
    docs = domain_documents(tuple(s for s in srcs if s.reader == "roff"), val_fraction=0.3, log=lambda m: None)
    for d in docs:
        assert len(d.train) + len(d.val) == 6  # the stub was skipped
        assert all(b"\\f" not in x and b".TH" not in x and words[d.name].encode() in x for x in d.train + d.val)
    with pytest.raises(ValueError, match="reader="):
        DomainSource(name="x", roots=(), patterns=(), reader="pdf")


def test_token_corpus_joins_documents_with_the_separator(bpe, tmp_path):
    for dom, text in (("a", TEXTS[3]), ("b", TEXTS[4])):
        (tmp_path / dom).mkdir()
        for i in range(4):
            (tmp_path / dom / f"d{i}.txt").write_text(text * (i + 1))
    srcs = tuple(DomainSource(name=d, roots=(str(tmp_path / d),), patterns=("*.txt",)) for d in ("a", "b"))
    c = build_domain_corpus(srcs, tokenizer=bpe, val_fraction=0.3, log=lambda m: None)
    assert c.vocab_size == 400 and c.domains == ("a", "b")
    for d, part in enumerate(c.train_parts):
        pieces = [bpe.decode(p) for p in _split(part.tolist(), 0)]
        assert pieces and all(p and set(p.split(TEXTS[3 + d])) == {""} for p in pieces)
        assert c.info[d].train_tokens == part.numel()
    byte = build_domain_corpus(srcs, val_fraction=0.3, log=lambda m: None)
    assert byte.vocab_size == 256 and byte.train_parts[0].numel() > c.train_parts[0].numel()
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_domain_corpus(srcs, tokenizer=bpe, vocab_size=300, log=lambda m: None)


def _split(ids, sep):
    out, cur = [], []
    for i in ids:
        if i == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(i)
    return out + [cur]


@pytest.mark.skipif(bool(missing_manpages()), reason=f"the study corpus is not there; run `bash {STUDY_CORPUS_SCRIPT}` "
                                                    f"(fetches manpages-de/-fr/-es) to run this test")
def test_study_bpe_round_trips_every_domains_validation_text():
    # The study's procedure (bench/balance_study.py --tokens) on a smaller slice of the corpus.
    docs = domain_documents(study_sources(), max_bytes=150_000, max_doc_bytes=16_384, val_fraction=0.1,
                            log=lambda m: None)
    assert [d.name for d in docs] == ["python", "c", "prose", *MANPAGE_LANGS]
    tok = train_bpe([t for d in docs for t in d.texts("train")], vocab_size=4096)
    for d in docs:
        val = d.texts("val")
        assert val, d.name
        for text, enc in zip(val, tok.encode_batch(val, add_special_tokens=False)):
            assert tok.decode(enc.ids) == text, f"{d.name}: a validation document does not round-trip"
        n_bytes = sum(len(t.encode()) for t in val)
        assert sum(len(e.ids) for e in tok.encode_batch(val)) < 0.6 * n_bytes, f"{d.name}: BPE barely compresses"
    json.loads(tok.to_str())  # a valid tokenizer.json

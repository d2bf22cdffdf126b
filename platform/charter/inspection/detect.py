"""What a request carries: personal data and secrets found in its text, by type and count.

Microsoft Presidio's analyzer, fully offline: its pattern and checksum recognizers
(e-mail, credit cards with the Luhn check, IBAN with its check digits, IP addresses, the
national ids of the countries listed below) and Charter's own for secrets (cloud and API
keys, private keys), with no language model at all (no NER model is loaded or
downloaded: names and addresses in free text are not found). The text is normalised first: Unicode
NFKC (full-width digits and compatibility forms become plain ones) and zero-width and
soft-hyphen characters removed, so `4111​1111…` with a zero-width space between digits is
still a card. What pattern detection cannot see (paraphrase, homoglyphs outside NFKC,
base64, a number split across messages) is written down in docs/inspection.md.

Only types and counts leave this module: never the text or the spans.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from typing import Any

# The characters removed before detection: zero-width space, non-joiner and joiner, the
# word joiner, the byte order mark (zero-width no-break space) and the soft hyphen.
INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
MIN_SCORE = 0.5  # Presidio's confidence below which a match is not a finding


class InspectionUnavailableError(RuntimeError):
    """Presidio is not installed or could not be loaded: inspection cannot run."""


def normalise(text: str) -> str:
    """NFKC, then without invisible characters (see INVISIBLE)."""
    return unicodedata.normalize("NFKC", text).translate(INVISIBLE)


def _secret_recognizers() -> list[Any]:
    from presidio_analyzer import Pattern, PatternRecognizer

    def one(entity: str, regex: str, score: float = 0.9) -> Any:
        return PatternRecognizer(supported_entity=entity, supported_language="en",
                                 patterns=[Pattern(entity.lower(), regex, score)])

    return [
        one("AWS_ACCESS_KEY", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
        one("PRIVATE_KEY", r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
        one("GITHUB_TOKEN", r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
        one("GOOGLE_API_KEY", r"\bAIza[0-9A-Za-z_-]{35}\b"),
        one("SLACK_TOKEN", r"\bxox[abprs]-[0-9A-Za-z-]{10,}\b"),
        one("OPENAI_API_KEY", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}\b", 0.8),
        one("CHARTER_API_KEY", r"\bchk_[0-9a-f]{16}_[A-Za-z0-9_-]{20,}\b"),
    ]


class _FrNirRecognizer:
    """France's social security number (NIR): 13 digits and a two-digit key, 97 minus the
    number modulo 97 (Corsica's 2A and 2B counted as 19 and 18)."""

    @staticmethod
    def build() -> Any:
        from presidio_analyzer import Pattern, PatternRecognizer

        class Recognizer(PatternRecognizer):
            def validate_result(self, pattern_text: str) -> bool:
                digits = "".join(ch for ch in pattern_text if ch.isalnum()).upper()
                body, key = digits[:13], digits[13:]
                body = body.replace("2A", "19").replace("2B", "18")
                if not (body.isdigit() and key.isdigit()):
                    return False
                return 97 - int(body) % 97 == int(key)

        regex = (r"\b[12]\s?\d{2}\s?(?:0[1-9]|1[0-2]|[2-9]\d)\s?(?:\d{2}|2[AB])\s?\d{3}"
                 r"\s?\d{3}\s?\d{2}\b")
        return Recognizer(supported_entity="FR_NIR", supported_language="en",
                          patterns=[Pattern("fr_nir", regex, 0.5)])


# Necessary conditions of the costliest recognizers' patterns, checked first with `re`
# (a plain scan): a text without one cannot match, and most text has none. Together they
# were three quarters of the time spent on plain prose. Each is implied by every match of
# the patterns it guards (tests/unit/test_inspection.py holds them to that on generated
# text): an IPv4 address has three dots between digits, an IPv6 one two colons at most
# four hex digits apart; an Italian fiscal code is sixteen letters and digits in a row; a
# UK National Insurance number ends in three pairs of digits and a letter A to D.
GATES = {
    "IpRecognizer": re.compile(r"\d\.\d{1,3}\.\d{1,3}\.\d|:[0-9A-Fa-f]{0,4}:"),
    "ItFiscalCodeRecognizer": re.compile(r"[A-Za-z0-9]{16}"),
    "UkNinoRecognizer": re.compile(r"\d{2} ?\d{2} ?\d{2} ?[A-Da-d]"),
}


def _gated(cls: Any) -> Any:
    """`cls`, looking at a text only when its gate (GATES) finds something in it."""
    if cls.__name__ not in GATES:
        return cls
    gate = GATES[cls.__name__]

    class Gated(cls):  # type: ignore[misc]
        def analyze(self, text: str, *args: Any, **kwargs: Any) -> Any:
            if gate.search(text) is None:
                return []
            return super().analyze(text, *args, **kwargs)

    Gated.__name__ = Gated.__qualname__ = cls.__name__
    return Gated


def _recognizers(*, gated: bool = True) -> list[Any]:
    from presidio_analyzer import predefined_recognizers as p

    plain = [p.EmailRecognizer, p.CreditCardRecognizer, p.IbanRecognizer, p.IpRecognizer,
             p.NhsRecognizer, p.UkNinoRecognizer, p.ItFiscalCodeRecognizer,
             p.EsNifRecognizer, p.PlPeselRecognizer, p.DeTaxIdRecognizer,
             p.FiPersonalIdentityCodeRecognizer, p.SePersonnummerRecognizer]
    # One language for all: pattern recognizers do not depend on it.
    return [(_gated(r) if gated else r)(supported_language="en") for r in plain] + [
        _FrNirRecognizer.build(), *_secret_recognizers()]


class Detector:
    """Presidio's analyzer with Charter's recognizer set, built on first use (about 0.2 s)
    and shared by a process's threads (Presidio's analyze is read-only)."""

    def __init__(self) -> None:
        self._analyzer: Any = None
        self._engine: Any = None  # the anonymizer, built on first redaction
        self._lock = threading.Lock()

    def _load(self) -> Any:
        if self._analyzer is not None:  # built: no lock to take on the request path
            return self._analyzer
        with self._lock:
            if self._analyzer is None:
                self._analyzer = _build()
            return self._analyzer

    @property
    def entities(self) -> list[str]:
        return sorted({e for r in self._load().registry.recognizers
                       for e in r.supported_entities})

    def findings(self, texts: Iterable[str]) -> dict[str, int]:
        """The types found in `texts` and how many of each (each text on its own)."""
        analyzer = self._load()
        found: Counter[str] = Counter()
        for text in texts:
            if not text:
                continue
            for result in analyzer.analyze(text=normalise(text), language="en",
                                           score_threshold=MIN_SCORE):
                found[result.entity_type] += 1
        return dict(sorted(found.items()))


    def redact(self, text: str, types: Collection[str]) -> tuple[str, dict[str, int]]:
        """`text` with what is found of `types` replaced by `<TYPE>` (Presidio's anonymizer)
        and how many of each were; `text` itself when nothing was. A text with a
        replacement comes back normalised (NFKC, without invisible characters): the spans
        are the normalised text's."""
        if not text or not types:
            return text, {}
        analyzer = self._load()
        plain = normalise(text)
        results = analyzer.analyze(text=plain, language="en", entities=sorted(types),
                                   score_threshold=MIN_SCORE)
        if not results:
            return text, {}
        done = self._anonymizer().anonymize(text=plain, analyzer_results=results)
        return done.text, dict(
            Counter(item.entity_type for item in done.items))

    def _anonymizer(self) -> Any:
        if self._engine is not None:
            return self._engine
        with self._lock:
            if self._engine is None:
                from presidio_anonymizer import AnonymizerEngine

                self._engine = AnonymizerEngine()  # type: ignore[no-untyped-call]
            return self._engine


class Replacer:
    """Detector.redact as a function of a text, for a walk over a body or an answer: each
    call replaces what is found of `types`; `counts` adds up what was, by type."""

    def __init__(self, detector: Detector, types: Collection[str]) -> None:
        self.detector, self.types = detector, tuple(types)
        self.counts: Counter[str] = Counter()

    def __call__(self, text: str) -> str:
        out, done = self.detector.redact(text, self.types)
        self.counts.update(done)
        return out


def _build() -> Any:
    try:
        import tldextract
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NlpArtifacts, NlpEngine
    except ImportError as exc:
        raise InspectionUnavailableError(
            f"content inspection needs the `inspect` extra (presidio-analyzer): {exc}") from exc

    # The e-mail recognizer checks top-level domains with tldextract, whose default asks
    # the internet for the public suffix list: use the snapshot it ships, never the network.
    tldextract.tldextract.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=())

    class PatternsOnly(NlpEngine):
        """No language model and no tokens: every recognizer here is a pattern with its
        checksum, and none needs them. (A blank spaCy pipeline gave tokens without lemmas,
        so Presidio's context words never matched anyway, and building the tokens was two
        thirds of the time spent on a plain text.) Presidio skips context enhancement when
        there are no tokens."""

        def load(self) -> None:
            pass

        def is_loaded(self) -> bool:
            return True

        def process_text(self, text: str, language: str) -> Any:
            return NlpArtifacts(entities=[], tokens=[],  # type: ignore[arg-type]
                                tokens_indices=[], lemmas=[], nlp_engine=self,
                                language=language)

        def process_batch(self, texts: Iterable[str], language: str, batch_size: int = 1,
                          n_process: int = 1, **_: Any) -> Iterator[tuple[str, Any]]:
            for text in texts:
                yield text, self.process_text(text, language)

        def is_stopword(self, word: str, language: str) -> bool:
            return False

        def is_punct(self, word: str, language: str) -> bool:
            return False

        def get_supported_entities(self) -> list[str]:
            return []

        def get_supported_languages(self) -> list[str]:
            return ["en"]

    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in _recognizers():
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(nlp_engine=PatternsOnly(), registry=registry,
                          supported_languages=["en"])

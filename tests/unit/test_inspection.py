"""Content inspection with real Presidio, offline: what is found, and what is not (each
evasion's outcome written down, as docs/inspection.md states it)."""

from __future__ import annotations

import pytest

from charter.inspection.detect import Detector, normalise


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector()


@pytest.mark.parametrize(("text", "found"), [
    # personal data, in the languages of the deployment's countries
    ("Bitte überweisen Sie auf DE89 3704 0044 0532 0130 00.", {"IBAN_CODE": 1}),
    ("IBAN DE89 3704 0044 0532 0130 01 (one check digit wrong)", {}),
    ("Il codice fiscale è RSSMRA85T10A562S.", {"IT_FISCAL_CODE": 1}),
    ("Numéro de sécurité sociale : 1 85 05 78 006 084 91", {"FR_NIR": 1}),
    ("Numéro de sécurité sociale : 1 85 05 78 006 084 36", {}),  # its key is wrong
    ("NHS number 943 476 5919", {"UK_NHS": 1}),
    ("card 4111 1111 1111 1111, exp 12/29", {"CREDIT_CARD": 1}),
    ("card 4111 1111 1111 1112", {}),  # fails the Luhn check
    ("write to jane.doe@example.com", {"EMAIL_ADDRESS": 1}),
    # secrets
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", {"AWS_ACCESS_KEY": 1}),
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA", {"PRIVATE_KEY": 1}),
    ("token ghp_" + "a1B2" * 9, {"GITHUB_TOKEN": 1}),
    ("nothing to see: the quick brown fox jumps over the lazy dog", {}),
])
def test_what_is_found(detector: Detector, text: str, found: dict[str, int]) -> None:
    assert detector.findings([text]) == found


@pytest.mark.parametrize(("text", "found", "why"), [
    ("card 4111\u200b1111\u200b1111\u200b1111", {"CREDIT_CARD": 1},
     "zero-width spaces are removed before detection"),
    ("card ４１１１ １１１１ １１１１ １１１１", {"CREDIT_CARD": 1},
     "full-width digits become ASCII under NFKC"),
    ("card 4111-1111-1111-1111", {"CREDIT_CARD": 1}, "dashes are a card's own separators"),
    ("card 4111 1111 1111 111O", {}, "a letter O for a zero: a homoglyph NFKC keeps"),
    ("card NDExMSAxMTExIDExMTEgMTExMQ==", {}, "base64 is not decoded"),
    ("card four one one one, one one one one, one one one one, one one one one", {},
     "digits spelt out in words"),
])
def test_evasion_outcomes(detector: Detector, text: str, found: dict[str, int],
                          why: str) -> None:
    assert detector.findings([text]) == found, why


def test_each_text_is_inspected_on_its_own(detector: Detector) -> None:
    """A number split across two messages is found in neither (written down as a limit)."""
    assert detector.findings(["card 4111 1111", "1111 1111"]) == {}
    assert detector.findings(["AKIAIOSFODNN7EXAMPLE", "jane@example.com", ""]) == {
        "AWS_ACCESS_KEY": 1, "EMAIL_ADDRESS": 1}


def test_normalisation() -> None:
    assert normalise("a\u200bb\u00adc\ufeff") == "abc"
    assert normalise("ﬁ１") == "fi1"


def test_the_gated_recognizers_find_what_the_ungated_find() -> None:
    """GATES only skip texts their recognizers cannot match: on generated text rich in
    what the patterns look for (digits, hex, dots, colons, letters, spaces), and on real
    samples, each gated recognizer answers exactly what Presidio's own does."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from charter.inspection.detect import GATES, _recognizers

    gated = {type(r).__name__: r for r in _recognizers() if type(r).__name__ in GATES}
    plain = {type(r).__name__: r for r in _recognizers(gated=False)
             if type(r).__name__ in GATES}
    assert set(gated) == set(plain) == set(GATES)

    def same(text: str) -> None:
        for name in GATES:
            def found(r: object) -> list[tuple[int, int, float]]:
                return sorted((x.start, x.end, x.score) for x in r.analyze(  # type: ignore[attr-defined]
                    text, r.supported_entities, None))  # type: ignore[attr-defined]
            assert found(gated[name]) == found(plain[name]), (name, text)

    samples = ["from 10.1.2.3 and 192.168.0.254/24", "fe80::1ff:fe23:4567:890a", "::",
               "::ffff:10.0.0.1", "2001:db8::8a2e:370:7334", "RSSMRA85T10A562S",
               "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "1::",
               "rssmra85t10a562s", "NINO AB 12 34 56 C", "QQ123456C", "1.2.3", "06:30"]
    for text in samples:
        same(text)
    assert gated["IpRecognizer"].analyze("from 10.1.2.3", ["IP_ADDRESS"], None)

    pieces = st.sampled_from(["1", "9", "25", "0", ".", ":", "::", "a", "F", "X", "M",
                              "AB", "C", " ", "-", "/", "RSSMRA", "85T10A562S", "ffff",
                              "85a3", "0db8"])

    @settings(max_examples=400, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(pieces, max_size=30).map("".join))
    def check(text: str) -> None:
        same(text)

    check()

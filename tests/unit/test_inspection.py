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

"""The Rego style that makes every engine decide alike (docs/policy.md, "Rego style"),
checked on the policies as a linter would. Regal, the Rego linter, ships only as a Go
binary (GitHub releases, Homebrew, containers), none of which this project installs
from, so the rules are checked here, line by line, on the policies' own layout.

Each rule names what two engines were seen to read differently; the differential test
(tests/integration/test_policy_differential.py) is the proof, this is the early warning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

POLICIES = sorted(p for p in (Path(__file__).resolve().parents[2] / "policies" / "charter")
                  .rglob("*.rego") if not p.name.endswith("_test.rego"))

# The only built-ins a policy calls: none of them can fail on a value of the right type,
# and each is only reached once the type is checked. Not time.* (Go and Rust parse
# differently), not lower/upper (they map case differently), not to_number, units.*, ...
BUILTINS = {"object.get", "regex.match", "is_object", "is_array", "is_string", "is_boolean",
            "is_number", "count", "sprintf", "floor"}
DOTTED_HEADS = {"data", "object", "regex", "rego", "charter"}
FINDINGS = re.compile(r"^(violations|warnings) contains\b")


@dataclass(frozen=True)
class Rule:
    head: str
    body: list[str]
    line: int


def _strip(line: str) -> str:
    """The line without its comment and with string and regex literals emptied."""
    out, quote = [], ""
    for ch in line:
        if quote:
            if ch == quote:
                quote = ""
                out.append(ch)
            continue
        if ch in "\"`":
            quote = ch
            out.append(ch)
            continue
        if ch == "#":
            break
        out.append(ch)
    return "".join(out).rstrip()


def _rules(source: str) -> list[Rule]:
    rules: list[Rule] = []
    for n, raw in enumerate(source.splitlines(), 1):
        code = _strip(raw)
        if not code.strip():
            continue
        if not raw[0].isspace() and not code.startswith(("}", "]", ")", "else")):
            rules.append(Rule(code, [], n))
        elif rules:
            rules[-1].body.append(code.strip())
    return rules


def lint(source: str) -> list[str]:
    """What in `source` breaks the style, one line each ("line N: why")."""
    problems: list[str] = []
    rules = _rules(source)
    # Collections whatever the input: arrays by construction, and partial sets (`contains`).
    arrays = {r.head.split(" :=")[0] for r in rules
              if re.match(r"^_\w+ := (_array\(|\{|\[)", r.head)} | {
        r.head.split(" contains")[0] for r in rules
        if re.match(r"^_\w+ contains ", r.head)} | {"violations", "warnings"}
    for number, raw in enumerate(source.splitlines(), 1):
        code = _strip(raw)
        where = f"line {number}"
        if re.search(r"\binput\b", code) and code != "_input := input if is_object(input)":
            problems.append(f"{where}: reads input other than through _input and object.get")
        for head, _ in re.findall(r"(?<![\w.])([A-Za-z_]\w*)\.([A-Za-z_])", code):
            if head not in DOTTED_HEADS:
                problems.append(f"{where}: dotted reference on {head} (undefined when the "
                                f"key is absent): use object.get")
        for call in re.findall(r"(?<![\w.])([a-z][\w.]*)\(", code):
            if call not in BUILTINS and call not in ("if", "every", "some"):
                problems.append(f"{where}: built-in {call} is outside the engine-neutral set")
        for pattern in re.findall(r"regex\.match\((.)(.*?)\1", raw):
            text = pattern[1]
            if pattern[0] != "`" or not text.startswith("^") or not text.endswith("$"):
                problems.append(f"{where}: a regex is a `^...$` literal")
            if re.search(r"\\[dwsbDWSB]|\(\?i", text):
                problems.append(f"{where}: \\d, \\w, \\s, \\b and (?i) differ between engines")
        for fmt in re.findall(r"sprintf\(\s*\"([^\"]*)\"", raw):
            if set(re.findall(r"%.", fmt)) - {"%v"}:
                problems.append(f"{where}: sprintf formats only with %v")
        stripped = code.strip()
        if stripped.startswith("not ") and not re.fullmatch(
                r"not _\w+(\([\w\", ]*\))?( in (\{.*\}|\[.*\]|_\w+(\(.*\))?))?", stripped):
            problems.append(f"{where}: `not` only over a helper rule or function whose "
                            f"arguments are always defined")
        for rhs in re.findall(r"\bin\s+(\S+)", code):
            if not (rhs.startswith(("{", "[", "_array(")) or rhs.rstrip(")];,|") in arrays
                    or _checked_param(rules, number, rhs)):
                problems.append(f"{where}: `in` over {rhs}, not known to be a collection "
                                f"(wrap it in _array)")
    for rule in rules:
        if FINDINGS.match(rule.head):
            body = rule.body[rule.body.index("} if {") + 1:] if "} if {" in rule.body else (
                rule.body)
            if not body or body[0] not in ("_valid_input", "not _valid_input"):
                problems.append(f"line {rule.line}: a finding's body starts with _valid_input")
    return problems


def _checked_param(rules: list[Rule], number: int, name: str) -> bool:
    """`name` is a parameter of the rule around line `number`, checked by is_array first."""
    around = [r for r in rules if r.line <= number]
    if not around:
        return False
    rule = around[-1]
    if not re.fullmatch(r"\w+", name):
        return False
    return bool(re.match(rf"^_\w+\([^)]*\b{name}\b", rule.head)) and (
        f"is_array({name})" in rule.body or f"is_array({name})" in rule.head)


@pytest.mark.parametrize("path", POLICIES, ids=[p.name for p in POLICIES])
def test_the_policies_keep_the_rego_style(path: Path) -> None:
    assert lint(path.read_text()) == []


@pytest.mark.parametrize(("snippet", "why"), [
    ("x if {\n\tnot is_string(_v.storage_region)\n}", "dotted reference on _v"),
    ("x if {\n\tnot is_string(object.get(_v, \"r\", null))\n}", "`not` only over a helper"),
    ("_d := lower(object.get(_v, \"license\", null))", "built-in lower"),
    ("x if {\n\ttime.parse_rfc3339_ns(_now) > 0\n}", "built-in time.parse_rfc3339_ns"),
    ("x if {\n\tsome r in object.get(_v, \"regions\", [])\n}", "`in` over object.get"),
    ("x if input.version.id == \"v\"", "reads input"),
    ("x if regex.match(`\\d+`, _s)", "a regex is a `^...$` literal"),
    ("x if regex.match(`^\\w+$`, _s)", "differ between engines"),
    ("m := sprintf(\"%d users\", [_n])", "only with %v"),
    ("violations contains {\"code\": \"c\", \"msg\": \"m\"} if {\n\t_x == 1\n}",
     "starts with _valid_input"),
])
def test_the_lint_catches_what_engines_read_differently(snippet: str, why: str) -> None:
    problems = lint(snippet)
    assert any(why in p for p in problems), problems

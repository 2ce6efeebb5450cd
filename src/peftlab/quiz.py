"""Instant feedback on the quizzes, without the answers in the release.

Each quiz question's visible test calls `check_answer(notebook, question, answer)`, asserts that the
answer is right and prints the feedback: "correct" with the question's explanation, or "not yet" with a
hint. The release holds, per question, a
salted SHA-256 digest of the right answer in its canonical form and the explanation sealed with a key
derived from that answer (`data/quiz.json`, written by `autograder/release.py` from
`solutions/quiz.toml`): the explanation can be read only by giving the right answer.

What counts as the same answer (the grader's hidden tests use the same rule):
- a letter: the lower-case letter itself;
- a count: the exact whole number (``64`` and ``64.0`` are the same answer);
- a number: its value to three significant figures (``3.6111`` and ``3.61`` are the same answer).

A learner can try all four letters; the self-check is feedback, not a secret.
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import cache
from pathlib import Path

KEYS = Path(__file__).with_name("data") / "quiz.json"
KINDS = ("letter", "count", "number")


def canonical(answer, kind: str) -> str | None:
    """The answer's canonical text for ``kind``, or None when it is not an answer of that kind."""
    if kind == "letter":
        return answer if type(answer) is str and len(answer) == 1 and answer in "abcd" else None
    if type(answer) not in (int, float) or not math.isfinite(answer):
        return None
    if kind == "count":
        return str(int(answer)) if float(answer).is_integer() else None
    if kind == "number":
        return f"{answer:.3g}"
    raise ValueError(f"unknown kind of answer {kind!r}; expected one of {KINDS}")


def _stream(key: bytes, length: int) -> bytes:
    blocks = (hashlib.sha256(key + i.to_bytes(4, "big")).digest() for i in range(length // 32 + 1))
    return b"".join(blocks)[:length]


def _seal_key(salt: str, canon: str) -> bytes:
    return hashlib.sha256(f"explain|{salt}|{canon}".encode()).digest()


def digest(salt: str, canon: str) -> str:
    return hashlib.sha256(f"{salt}|{canon}".encode()).hexdigest()


def _xor(data: bytes, salt: str, canon: str) -> bytes:
    return bytes(a ^ b for a, b in zip(data, _stream(_seal_key(salt, canon), len(data))))


def seal(text: str, salt: str, canon: str) -> str:
    return _xor(text.encode(), salt, canon).hex()


def unseal(sealed: str, salt: str, canon: str) -> str:
    return _xor(bytes.fromhex(sealed), salt, canon).decode()


def entry(notebook: str, question: int, kind: str, answer, hint: str, explanation: str) -> dict:
    """The release's record of one question (what `autograder/release.py` writes)."""
    canon = canonical(answer, kind)
    if canon is None:
        raise ValueError(f"{notebook} Q{question}: {answer!r} is not a {kind}")
    salt = hashlib.sha256(f"peftlab quiz|{notebook}|{question}".encode()).hexdigest()[:16]
    return {"kind": kind, "salt": salt, "digest": digest(salt, canon), "hint": hint,
            "explanation": seal(explanation, salt, canon)}


@cache
def _keys() -> dict:
    if not KEYS.exists():
        raise FileNotFoundError(f"{KEYS} is missing: reinstall peftlab (the quiz self-check needs it)")
    return json.loads(KEYS.read_text())


def explanation(notebook: str, question: int, answer) -> str | None:
    """The explanation when ``answer`` is right, else None."""
    key = _keys()[notebook][str(question)]
    canon = canonical(answer, key["kind"])
    if canon is None or digest(key["salt"], canon) != key["digest"]:
        return None
    return unseal(key["explanation"], key["salt"], canon)


def check_answer(notebook: str, question: int, answer) -> tuple[bool, str]:
    """(right, feedback): "Qn: correct." with the explanation, or "Qn: not yet." with the question's
    hint. A test cell asserts ``right`` with the feedback as its message, so a learner's traceback
    shows the test's own line, and prints the feedback."""
    key = _keys()[notebook][str(question)]
    text = explanation(notebook, question, answer)
    if text is None:
        rule = {"count": " (a count is checked exactly)",
                "number": " (numbers are checked to three significant figures)"}.get(key["kind"], "")
        return False, f"Q{question}: not yet{rule}. Hint: {key['hint']}"
    return True, f"Q{question}: correct. {text}"

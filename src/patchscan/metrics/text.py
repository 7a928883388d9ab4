"""Does a generation contain the expected answer? (DESIGN §2: spaces removed, case-sensitive by default.)"""

from __future__ import annotations


def normalize(text: str, case_sensitive: bool = True) -> str:
    text = "".join(text.split())
    return text if case_sensitive else text.lower()


def contains_answer(generation: str, answer: str, case_sensitive: bool = True) -> bool:
    target = normalize(answer, case_sensitive)
    return bool(target) and target in normalize(generation, case_sensitive)

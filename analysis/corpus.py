"""Natural English text available offline: the prose paragraphs of Python's own help topics
(``pydoc_data.topics``, shipped with every CPython). Grammar blocks, code and tables are dropped.
The text depends on the Python version; ``corpus_sha256`` goes into every result for reproducibility.
"""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache

_CODEISH = re.compile(r"::=|>>>|\*\*\*|===|---|\{|\}|\bdef \w+\(|\w+\(\)")


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Distinct prose paragraphs (≥ 200 characters, unindented, few symbols), in a fixed order.
    Several help topics repeat the same paragraph; each is kept once, so the calibration and evaluation
    halves (even / odd index) share no text."""
    from pydoc_data.topics import topics

    out, seen = [], set()
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            if not block or block[0].isspace() or _CODEISH.search(block):
                continue
            text = " ".join(block.split())
            letters = sum(c.isalpha() or c.isspace() for c in text)
            if len(text) >= 200 and letters >= 0.9 * len(text) and text not in seen:
                seen.add(text)
                out.append(text)
    return tuple(out)


def corpus_text() -> str:
    return "\n\n".join(paragraphs())


def corpus_sha256() -> str:
    return hashlib.sha256(corpus_text().encode()).hexdigest()

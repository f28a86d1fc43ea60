"""Written guidelines as code: the checks a guideline labeler applies to an answer.

`follows_request` is the rule the chat evaluation counts (eval/chat.py) and the `request`
labeler starts from: the story names the requested character and object and ends with a
finished sentence.
"""

from __future__ import annotations

import re


def follows_request(answer: str, name: str, obj: str) -> bool:
    answer = answer.strip()
    return (re.search(rf"\b{re.escape(name)}\b", answer) is not None
            and re.search(rf"\b{re.escape(obj)}s?\b", answer, re.IGNORECASE) is not None
            and answer.endswith((".", "!", "?", '"')))

"""Words as the stages count them: decontamination compares `tokenize`d words, selection and evolution's
filters leave `STOP_WORDS` out."""

from __future__ import annotations

import re

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # kana, CJK ideographs (+ ext. A, compatibility)
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")

# English function words and contraction pieces: what makes no content word.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves i'm it's don't can't won't isn't
s t d ll m re ve don won isn
""".split())


def tokenize(text: str) -> list[str]:
    """The words both rules compare: lower-cased runs of letters and digits, CJK characters one by one."""
    return _TOKEN.findall(text.lower())

"""Sentiment: texts in, a label with its probability out.

Texts are tokenised with the model's own ``tokenizer.json`` (Hugging Face ``tokenizers``), cut to
the model's ``max_length`` (flagged, never silent), and padded to the smallest of the model's
``length_buckets`` that fits the longest text of the request. The bucket is the batcher key, so
requests of similar length batch together and no batch is padded to more than its bucket.
Markup is read as the text it shows (see :func:`shown_text`).
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, model_validator
from tokenizers import Tokenizer

from service.config import Settings
from service.repository import ModelSpec
from service.runtime import RuntimeOptions
from service.tasks.assets import encode_each, load_tokenizer
from service.tasks.base import Parameters, Task, require


@dataclass(frozen=True)
class TextAssets:
    tokenizer: Tokenizer
    max_length: int
    buckets: tuple[int, ...]
    unk_id: int


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # [n, bucket] int64, 0 = padding
    mask: np.ndarray  # [n, bucket] int64, 1 = token
    lengths: list[int]  # tokens per text before truncation
    truncated: list[bool]


class SentimentParameters(Parameters):
    language: str | None = Field(None, description="Language of the texts it classifies: its default scope")
    tokenizer: str = Field("tokenizer.json", description="Hugging Face tokenizers file beside the graph")
    max_length: int = Field(256, ge=1, description="Tokens it takes; longer texts are cut and flagged")
    length_buckets: list[int] | None = Field(
        None, description="Padded lengths (the batch key); default: max_length only"
    )

    @model_validator(mode="after")
    def _buckets_cover(self) -> SentimentParameters:
        if self.length_buckets is not None and max(self.length_buckets, default=0) < self.max_length:
            raise ValueError("the largest length bucket is below max_length")
        return self

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.length_buckets or [self.max_length]))


class Sentiment(Task[SentimentParameters]):
    name = "sentiment"
    parameters_model = SentimentParameters
    routes = "service.api.routes.sentiment"

    def check(self, spec: ModelSpec, parameters: SentimentParameters) -> None:
        names = sorted(t.name for t in spec.inputs)
        require(names == ["attention_mask", "input_ids"], f"inputs must be input_ids and attention_mask, not {names}")
        for t in spec.inputs:
            require(t.datatype == "INT64" and len(t.shape) == 2, f"input {t.name!r} must be INT64 [batch, length]")
        lengths = {t.shape[1] for t in spec.inputs}
        require(
            len(lengths) == 1, f"input_ids and attention_mask must have the same length axis, not {sorted(lengths)}"
        )
        fixed = lengths.pop()
        require(
            fixed == -1 or set(parameters.buckets) == {fixed},
            f"the length axis is fixed at {fixed}: length_buckets must be [{fixed}], not {list(parameters.buckets)}",
        )
        output = spec.outputs[0]
        require(len(output.shape) == 2, f"output {output.name!r} must be [batch, classes]")
        require(
            spec.labels is not None or output.shape[1] != -1,
            f"output {output.name!r} has a dynamic class axis: name its classes in 'labels'",
        )
        super().check(spec, parameters)

    def default_scope(self, parameters: SentimentParameters) -> str | None:
        return parameters.language

    def load_assets(
        self,
        spec: ModelSpec,
        parameters: SentimentParameters,
        version_dir: Path,
        options: RuntimeOptions,
        settings: Settings,
    ) -> TextAssets:
        tokenizer = load_tokenizer(parameters.tokenizer, version_dir)
        unk = tokenizer.token_to_id("[UNK]")
        return TextAssets(tokenizer, parameters.max_length, parameters.buckets, unk if unk is not None else 1)


TASK = Sentiment()


# Markup as rich-text editors write it. Only HTML's own element names are tags, so plain text with
# angle brackets keeps its words ("<sigh>", "List<String>", "Worth it <only if on sale ... =>" lost
# whole clauses to a looser pattern); inline elements join their neighbours ("<b>G</b>reat"), block
# elements separate them; namespaced ones (Word's <o:p>) are inline.
_INLINE = frozenset(
    "a abbr b bdi bdo big cite code data del dfn em font i ins kbd mark nobr q s samp small span strike strong "  # noqa: SIM905
    "sub sup time tt u var wbr".split()
)
_BLOCK = frozenset(
    "address article aside blockquote body br button caption center col colgroup dd details div dl dt fieldset "  # noqa: SIM905
    "figcaption figure footer form h1 h2 h3 h4 h5 h6 head header hr html img input label legend li main meta nav "
    "ol option p pre section select summary table tbody td textarea tfoot th thead title tr ul".split()
)
_ATTRIBUTES = r"""(?:\s+[A-Za-z_:@][-\w:.@]*(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>=`]+))?)*"""
_TAG = re.compile(r"</?([A-Za-z][A-Za-z0-9]*(?::[A-Za-z][A-Za-z0-9]*)?)" + _ATTRIBUTES + r"\s*/?>")
# What a page never shows: comments, scripts and styles, each cut to its end in one pass (a lazy
# "<!--.*?-->" took 0.67 s on 6,000 unclosed "<!--").
_HIDDEN = re.compile(r"<!--|<(script|style)\b", re.IGNORECASE)
_HIDDEN_END = {
    None: re.compile(r"-->"),
    "script": re.compile(r"</script\s*>", re.IGNORECASE),
    "style": re.compile(r"</style\s*>", re.IGNORECASE),
}
# A character reference with its semicolon, of bounded length: html.unescape alone raised on "&#"
# and 4,400 digits (Python's limit on int()), a 500 for the whole request.
_REFERENCE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")


def _tag(match: re.Match) -> str:
    name = match.group(1).lower()
    if name in _INLINE or ":" in name:
        return ""
    return " " if name in _BLOCK else match.group(0)


def _without_hidden(text: str) -> str:
    pieces, at = [], 0
    while (found := _HIDDEN.search(text, at)) is not None:
        kind = found.group(1).lower() if found.group(1) else None
        end = _HIDDEN_END[kind].search(text, found.end())
        if end is None:
            break
        pieces += [text[at : found.start()], " "]
        at = end.end()
    return "".join(pieces) + text[at:] if pieces else text


def shown_text(text: str) -> str:
    """The text a page would show for ``text``: HTML's tags dropped, comments, scripts and styles cut,
    character references read. Apps send what a rich-text field holds: "This product is great!" in
    <p><b><i> tags scored 0.500 positive against 0.99 plain, and "&nbsp;&amp;" after it turned it
    negative (0.32). A text without markup is returned unchanged ("a < b", "R&D", "AT&T", "<3")."""
    if "<" not in text and "&" not in text:
        return text
    shown = _TAG.sub(_tag, _without_hidden(text)) if "<" in text else text
    shown = _REFERENCE.sub(lambda m: html.unescape(m.group(0)), shown)
    return text if shown == text else " ".join(shown.split())


# Negations typed on a phone without their apostrophe. Only forms that are no other English word
# ("wont", "cant", "ill", "well" are, and stay as typed): "didnt love it" scored 0.81 positive, while
# "I didn't love it." was read right.
_BARE_NEGATION = re.compile(
    r"\b(do|does|did|is|was|were|are|could|would|should|has|have|had|must|need)nt\b", re.IGNORECASE
)


def with_apostrophes(text: str) -> str:
    """``text`` with "didnt", "Doesnt", "isnt" ... written "didn't", "Doesn't", "isn't"."""
    return _BARE_NEGATION.sub(r"\1n't", text) if "nt" in text.lower() else text


def encode(assets: TextAssets, texts: Sequence[str]) -> Encoded:
    texts = [with_apostrophes(shown_text(t)) for t in texts]
    encodings = encode_each(assets.tokenizer, texts)  # not encode_batch: see encode_each
    lengths = [len(e.ids) for e in encodings]
    # A text that normalises to nothing (only control characters, say) becomes one unknown token.
    rows = [e.ids[: assets.max_length] or [assets.unk_id] for e in encodings]
    longest = max(len(r) for r in rows)
    width = next(b for b in assets.buckets if b >= longest)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return Encoded(ids, (ids != 0).astype(np.int64), lengths, [n > assets.max_length for n in lengths])


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return (
        0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF or 0xF900 <= code <= 0xFAFF
    )


def detect_language(texts: Sequence[str]) -> str:
    """'zh' when Chinese characters make up at least a third of the letters, else 'en'."""
    cjk = letters = 0
    for text in texts:
        for char in text:
            if _is_cjk(char):
                cjk += 1
                letters += 1
            elif unicodedata.category(char).startswith("L"):
                letters += 1
    return "zh" if letters and cjk * 3 >= letters else "en"


def predictions(probabilities: np.ndarray, labels: Sequence[str], encoded: Encoded) -> list[dict]:
    out = []
    for row, length, truncated in zip(probabilities, encoded.lengths, encoded.truncated, strict=True):
        best = int(row.argmax())
        out.append(
            {
                "label": labels[best],
                "score": round(float(row[best]), 6),
                "scores": {label: round(float(p), 6) for label, p in zip(labels, row, strict=True)},
                "tokens": length,
                "truncated": truncated,
            }
        )
    return out

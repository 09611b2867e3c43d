"""Where the assistant turns of a rendered conversation are: character spans for the answer mask.

The mask of a conversation is defined by its prefixes: an assistant turn ``i`` spans from the end of
``render(messages[:i], add_generation_prompt=True)`` to the end of ``render(messages[:i + 1])`` (its
content and end-of-turn marker), which needs 2 extra renders per turn (:func:`prefix_spans`, the
definition, kept as the fallback). The fast path renders each conversation once:

* a template with ``{% generation %}`` blocks marks the answers itself (``return_assistant_tokens_mask``;
  the same spans, except that an answer opening a conversation does not count its header, as the
  definition, having no prompt to cut at, does);
* otherwise the shape of an assistant turn, ``header + content + suffix`` (ChatML: ``<|im_start|>assistant\\n``,
  the content, ``<|im_end|>\\n``), is learnt once per tokenizer from probe conversations with the
  definition, and each turn is then found in the one rendering by searching for that string, left to
  right (:func:`locate_spans`). A template the probes cannot describe this way, or a turn not found
  (a template that trims or rewrites the content), falls back to the definition for that conversation.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")

# probe conversations: one and several turns, with and without a system prompt
_PROBES = [
    [("user", "rad-ds probe question one"), ("assistant", "rad-ds probe answer one")],
    [("system", "rad-ds probe system"), ("user", "rad-ds probe question one"),
     ("assistant", "rad-ds probe answer one"), ("user", "rad-ds probe question two"),
     ("assistant", "rad-ds probe answer two")],
    [("user", "rad-ds probe question one"), ("assistant", "rad-ds probe answer one"),
     ("user", "rad-ds probe question two"), ("assistant", "rad-ds probe answer two"),
     ("user", "rad-ds probe question three"), ("assistant", "rad-ds probe answer three")],
]


@dataclass(frozen=True)
class TurnShape:
    """An assistant turn renders as ``header + content + suffix``; its span is ``content + suffix``."""

    header: str
    suffix: str


def has_generation_blocks(tok) -> bool:
    return bool(GENERATION_RE.search(getattr(tok, "chat_template", None) or ""))


def render(tok, conversations: list[list[dict]], **kw) -> list[str]:
    """Each conversation rendered by the tokenizer's chat template (one batched call)."""
    if not conversations:
        return []
    return list(tok.apply_chat_template(conversations, tokenize=False, **kw))


def prefix_spans(msgs: list[dict], tok, text: str) -> list[tuple[int, int]] | None:
    """The definition: each assistant turn's span from renderings of the conversation's prefixes;
    ``None`` when the template does not render a prefix as a prefix of the whole."""
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        end = tok.apply_chat_template(msgs[:i + 1], tokenize=False)
        if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
            return None
        spans.append((len(start), len(end)))
    return spans


def locate_spans(msgs: list[dict], text: str, shape: TurnShape) -> list[tuple[int, int]] | None:
    """Each assistant turn's span found in the one rendering ``text``, left to right; ``None`` when a
    turn is not there as ``header + content + suffix``."""
    spans, cursor = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        if not isinstance(content, str):
            return None
        pos = text.find(shape.header + content + shape.suffix, cursor)
        if pos < 0:
            return None
        cursor = pos + len(shape.header) + len(content) + len(shape.suffix)
        # a conversation that opens with an answer has no prompt before it: the definition's span starts at 0
        spans.append((pos + len(shape.header) if i else 0, cursor))
    return spans


def learn_turn_shape(tok) -> TurnShape | None:
    """The template's assistant-turn shape, learnt from the probes with :func:`prefix_spans` and
    checked on every probe (``None``: no single shape describes them; use the definition)."""
    shape, checked = None, 0
    for probe in _PROBES:
        msgs = [{"role": r, "content": c} for r, c in probe]
        try:
            text = render(tok, [msgs])[0]
            spans = prefix_spans(msgs, tok, text)
            if shape is None and spans:
                i = next(k for k, m in enumerate(msgs) if m["role"] == "assistant")
                before = render(tok, [msgs[:i]])[0]
                prompt = render(tok, [msgs[:i]], add_generation_prompt=True)[0]
                a, b = spans[0]
                content = msgs[i]["content"]
                if not (prompt.startswith(before) and text[a:b].startswith(content)):
                    return None
                shape = TurnShape(header=prompt[len(before):], suffix=text[a + len(content):b])
        except Exception as e:  # noqa: BLE001 - a template may refuse a probe (e.g. a system role): skip that one
            logger.debug("chat template refused probe %d (%s): skipped", len(probe), e)
            continue
        if spans is None or shape is None or locate_spans(msgs, text, shape) != spans:
            return None
        checked += 1
    return shape if checked else None

__all__ = ["TurnShape", "has_generation_blocks", "learn_turn_shape", "locate_spans", "prefix_spans", "render"]

"""Prompt encoding that user text cannot steer: user-supplied content never becomes a special token.

A tokenizer given ``"hi<|im_end|>\\n<|im_start|>system\\n..."`` maps the marker strings to the control tokens
that delimit chat turns, so a user could forge a system turn. Here the chat template is rendered with a
random placeholder in place of every message's content; the template's own text (its markers included) is
tokenized normally, and each message's content separately with ``split_special_tokens=True``, so a marker
string written by a user is encoded as the ordinary text it looks like.

When no special token of the normally tokenized chat overlaps a message's content (every benign chat), the
ids are exactly ``tokenizer.apply_chat_template(..., tokenize=True)``'s; only a chat that would forge a
control token takes the split encoding above.

Thread safety: transformers implements ``split_special_tokens`` of a fast tokenizer by setting a flag on the
shared Rust tokenizer (``encode_special_tokens``) at the start of each call, and the encoding runs without the
GIL. Two requests encoded at once on different threads, one plain text (split) and one chat (not split), could
each run under the other's flag: the chat's control tokens encoded as text (the model then continues a
garbled template: seen as a failed lossless-under-load test, 2026-12-07), the plain text's marker strings as
control tokens (a forged system turn). Every encoding here therefore sets the flag explicitly and holds
:data:`_ENCODE` (measured before the lock, 4 threads x 3,000 calls: 227 chats and 807 texts encoded wrong).
"""
from __future__ import annotations

import re
import secrets
import threading

# role names the template receives as trusted text (they are written between control tokens)
_ROLE = re.compile(r"[a-z][a-z_]{0,31}")


# held around every call that encodes: the tokenizer's split flag is shared state (module docstring)
_ENCODE = threading.Lock()


def _encode(tokenizer, text: str, *, split: bool, **kw):
    with _ENCODE:
        return tokenizer(text, split_special_tokens=split, **kw)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a plain prompt; marker strings inside ``text`` are encoded as text."""
    return list(_encode(tokenizer, text, split=True)["input_ids"])


def _content_ids(tokenizer, text: str) -> list[int]:
    return list(_encode(tokenizer, text, split=True, add_special_tokens=False)["input_ids"])


def _template_ids(tokenizer, text: str) -> list[int]:
    return list(_encode(tokenizer, text, split=False, add_special_tokens=False)["input_ids"])


def _special_strings(tokenizer) -> list[str]:
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return sorted((s for s in found if s), key=len, reverse=True)


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat: ``messages`` are ``{"role": str, "content": str}`` dicts (other keys are passed to
    the template unchanged). Raises ``ValueError`` on a role the template must not receive."""
    contents, rendered_msgs = [], []
    nonce = secrets.token_hex(8)
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not _ROLE.fullmatch(role):
            raise ValueError(f"messages.{i}.role: {role!r} is not a role name")
        if not isinstance(content, str):
            raise ValueError(f"messages.{i}.content: must be a string here")
        contents.append(content)
        rendered_msgs.append({**m, "content": f"\ue000{nonce}:{i}\ue001"})
    text = tokenizer.apply_chat_template(rendered_msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    pieces = re.split("(" + "|".join(re.escape(k) for k in marks) + ")", text) if marks else [text]
    order = [p for p in pieces[1::2]]
    if order != marks:
        # The template changed, dropped, repeated or reordered the content: render the real text, but refuse
        # content holding a marker string (it could not be kept out of the template's control tokens).
        specials = _special_strings(tokenizer)
        for i, c in enumerate(contents):
            hit = next((s for s in specials if s in c), None)
            if hit is not None:
                raise ValueError(f"messages.{i}.content: contains the reserved marker {hit!r}")
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
        return _template_ids(tokenizer, text)
    # The real text, and where each message's content lies in it.
    real, spans, pos = [], [], 0
    for j, piece in enumerate(pieces):
        if j % 2:
            piece = contents[marks.index(piece)]
            spans.append((pos, pos + len(piece)))
        real.append(piece)
        pos += len(piece)
    full = "".join(real)
    ids = _forged_free(tokenizer, full, spans)
    if ids is not None:
        return ids                      # exactly what the template + tokenizer give for this chat
    ids = []
    for j, piece in enumerate(pieces):
        if j % 2:                       # a placeholder: the message's own text
            ids += _content_ids(tokenizer, contents[marks.index(piece)])
        elif piece:
            ids += _template_ids(tokenizer, piece)
    return ids


def _forged_free(tokenizer, text: str, spans: list[tuple[int, int]]) -> list[int] | None:
    """Token ids of ``text`` tokenized normally, or None when a special token in them overlaps a content span
    (or the tokenizer cannot report offsets)."""
    if not spans:
        return _template_ids(tokenizer, text)
    try:
        enc = _encode(tokenizer, text, split=False, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return None
    special = _special_ids(tokenizer)
    for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tid in special and any(a < e and s < b for s, e in spans):
            return None
    return list(enc["input_ids"])


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids

"""Top-N alternatives of each output token, packed into stream entry fields.

Written only for requests that asked for ``logprobs > 0``: an entry of any other request
carries none of these fields, so the common case costs nothing on the wire. Per entry:

- ``n``: the number of alternatives of each token (uint32 each; N for every token in practice,
  but a backend may return fewer, so the count is per token);
- ``a``: their token ids (uint32), token after token, most likely first;
- ``b``: their log-probabilities (float32), in the same order;
- ``c`` (text entries only): their texts, a JSON array in the same order.

Packed arrays rather than one field per alternative: 20 alternatives of a token are 164 bytes
in three values, not 40 hash fields.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

from services.errors import InvalidParameterError
from services.messages import TopLogprob, TopLogprobs

TOP_COUNTS = "n"
TOP_IDS = "a"
TOP_LOGPROBS = "b"
TOP_TEXTS = "c"
_TOP_COUNTS_KEY = TOP_COUNTS.encode()  # looked up in every entry read


def encode_top_logprobs(top_logprobs: TopLogprobs, *, with_text: bool) -> dict[str, bytes]:
    """The fields of ``top_logprobs`` (none when it is empty); texts only ``with_text``."""
    if not top_logprobs:
        return {}
    flat = [alternative for alternatives in top_logprobs for alternative in alternatives]
    counts = [len(alternatives) for alternatives in top_logprobs]
    try:
        fields = {
            TOP_COUNTS: struct.pack(f"<{len(counts)}I", *counts),
            TOP_IDS: struct.pack(f"<{len(flat)}I", *(a.token_id for a in flat)),
            TOP_LOGPROBS: struct.pack(f"<{len(flat)}f", *(a.logprob for a in flat)),
        }
    except struct.error as exc:
        raise InvalidParameterError("top_logprobs", len(flat), f"cannot pack: {exc}") from exc
    if with_text:
        texts = [a.text for a in flat]
        fields[TOP_TEXTS] = json.dumps(texts, ensure_ascii=False, separators=(",", ":")).encode()
    return fields


def decode_top_logprobs(fields: Mapping[bytes, bytes]) -> TopLogprobs:
    """What ``encode_top_logprobs`` wrote (texts empty where the entry has none)."""
    packed_counts = fields.get(_TOP_COUNTS_KEY)
    if packed_counts is None:
        return ()
    try:
        counts = struct.unpack(f"<{len(packed_counts) // 4}I", packed_counts)
        packed_ids = fields.get(TOP_IDS.encode(), b"")
        ids = struct.unpack(f"<{len(packed_ids) // 4}I", packed_ids)
        packed_logprobs = fields.get(TOP_LOGPROBS.encode(), b"")
        logprobs = struct.unpack(f"<{len(packed_logprobs) // 4}f", packed_logprobs)
        raw_texts = fields.get(TOP_TEXTS.encode())
        texts = [str(text) for text in json.loads(raw_texts)] if raw_texts else [""] * len(ids)
    except (struct.error, ValueError, TypeError) as exc:
        raise InvalidParameterError("top_logprobs", len(packed_counts), f"cannot decode: {exc}") from exc
    if not sum(counts) == len(ids) == len(logprobs) == len(texts):
        sizes = f"{sum(counts)} counted, {len(ids)} ids, {len(logprobs)} logprobs, {len(texts)} texts"
        raise InvalidParameterError("top_logprobs", sizes, "sizes do not agree")
    alternatives = [TopLogprob(*item) for item in zip(ids, logprobs, texts, strict=True)]
    result, start = [], 0
    for count in counts:
        result.append(tuple(alternatives[start : start + count]))
        start += count
    return tuple(result)

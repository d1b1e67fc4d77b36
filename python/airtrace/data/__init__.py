"""The data layer: dataset loaders (the chatterbot-corpus pairs) and the batching that turns them into ``(ids, batch)``
pairs, shared by the demo, eval and AirRep; re-exports its modules, which import ``airtrace.capture`` only."""

from airtrace.data.batching import PROMPT_TEMPLATE, RESPONSE_TEMPLATE, batches, encode, format_example, tokens
from airtrace.data.chatterbot import CORPUS_PACKAGE, Pair, chatterbot_pairs, corpus_dir, hold_out, subsample, unique

__all__ = [
    "CORPUS_PACKAGE",
    "PROMPT_TEMPLATE",
    "Pair",
    "RESPONSE_TEMPLATE",
    "batches",
    "chatterbot_pairs",
    "corpus_dir",
    "encode",
    "format_example",
    "hold_out",
    "subsample",
    "tokens",
    "unique",
]

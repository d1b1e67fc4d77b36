"""AirRep (an app): trainable representation-based attribution with attention pooling over groups; its modules import
the library, the data layer and the eval app's retraining.

An encoder (BERT-style backbone, masked mean pooling, linear projector) maps
every example to ``e ∈ R^d``. A training group ``S`` is scored for a query ``x``
by attention pooling (:mod:`airtrace.airrep.pooling`); the encoder is trained
with a pairwise RankNet loss (:mod:`airtrace.airrep.train`) against datamodel
labels: the losses of dev examples under models really retrained on random
subsets (:mod:`airtrace.airrep.labels`).
"""

from airtrace.airrep.encoder import Encoder, format_text, minilm_dir
from airtrace.airrep.pooling import group_scores, pool

__all__ = ["Encoder", "format_text", "group_scores", "minilm_dir", "pool"]

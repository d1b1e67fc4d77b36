"""The default demo: SmolLM2-135M-Instruct on chatterbot-corpus Q->A pairs, attributed with LoGra + EK-FAC.

``models`` loads the model offline (converted once and cached), ``data`` reads
and encodes the corpus, ``report`` writes the HTML report and ``run`` is the
``airtrace demo`` pipeline.
"""

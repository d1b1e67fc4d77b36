"""The default demo (an app): SmolLM2-135M-Instruct on chatterbot-corpus Q->A pairs, attributed with LoGra + EK-FAC; its
modules import the library and the data layer, no other app.

``models`` loads the model offline (converted once and cached), ``data`` reads
and encodes the corpus, ``report`` writes the HTML report and ``run`` is the
``airtrace demo`` pipeline.
"""

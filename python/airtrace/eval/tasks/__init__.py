"""Built-in benchmark tasks (real data, nothing downloaded, CPU-feasible); they import the pipeline, the data layer and
the other eval modules.

- :mod:`airtrace.eval.tasks.digits`: scikit-learn ``load_digits`` with an MLP or
  an L2-regularised multinomial logistic regression (exact Hessian available).
- :mod:`airtrace.eval.tasks.tabular`: scikit-learn's ``load_wine`` (an MLP or an L2
  logistic regression) and ``load_diabetes`` (an MLP under squared error).
- :mod:`airtrace.eval.tasks.lm`: a small GPT-style causal LM on chatterbot-corpus pairs;
  :mod:`airtrace.eval.tasks.lm_eval` runs LoGra + identity / EK-FAC and the dense
  (TRAK) projection on it against cached retrained subsets (LDS).

A task gives the retraining driver ``train_fn(indices, seed) -> model`` and
``measure_fn(model) -> (q,)`` (higher = the query is fit better), the
attribution side ``loss_fn(model, batch) -> (B,)`` with (ids, batch) iterables
of the training set and the queries, and a JSON-able config that keys its
cached ground truth (:func:`airtrace.eval.cache_dir`).
"""

"""Attribution scores on the causal-LM task (:mod:`airtrace.eval.tasks.lm`) from airtrace and the peers.

Every ``score_<method>(task, model) -> (q, n) float64`` scores every query pair against every
training pair of ``task`` for the model trained on the whole pool
(:func:`airtrace.eval.tasks.lm_eval.full_model`), in the sign convention of
:mod:`airtrace.eval.metrics` (higher = the training pair helps the query). Every method sees the
same model, the same tracked modules (the weights of every nn.Linear: attention ``qkv`` /
``proj`` and MLP ``fc`` / ``proj`` of each block, and ``lm_head``; kronfluence and the airtrace
64x65 / 256x65 rows also take the blocks' biases) and the same per-example loss (summed answer-token cross-entropy,
:meth:`airtrace.eval.tasks.lm.LMTask.loss_fn`) as training loss and query measurement.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from airtrace.capture import per_example_loss
from airtrace.eval.tasks import lm_eval

F64 = torch.float64
TRAK_K = 512
"""Largest dense projection size of the TRAK rows (traker, dattri TRAK, airtrace trak-fisher);
see :func:`trak_k`."""
BATCH = 32
EXACT = dict(k_in=4096, k_out=4096, seed=0, exact_small=True)
"""Factored projection wider than every layer (the vocabulary is 1616): ``exact_small`` keeps every layer
exact, features are the unprojected weight and bias gradients (the parameter space kronfluence works in)."""

AIRTRACE = {
    **{f"airtrace {name}": settings for name, settings in lm_eval.METHODS.items()},
    "airtrace logra-ekfac 64x65": dict(projection=dict(k_in=65, k_out=64, seed=0, exact_small=False),
                                       curvature="ekfac", bias=True),
    "airtrace logra-ekfac 256x65": dict(projection=dict(k_in=65, k_out=256, seed=0, exact_small=False),
                                        curvature="ekfac", bias=True),
    "airtrace trak-fisher": dict(projection=dict(type="dense", k=TRAK_K, seed=0), curvature="fisher", bias=False),
    "airtrace logra-ekfac exact": dict(projection=EXACT, curvature="ekfac", bias=True),
    "airtrace logra-identity exact": dict(projection=EXACT, curvature="identity", bias=True),
}
"""airtrace rows: the three methods of ``lm_eval.METHODS`` (LoGra 16 x 16 + identity / EK-FAC,
dense k = 4096 + identity), LoGra k_out x k_in = 64 x 65 and 256 x 65 + EK-FAC on weights and
biases (the parameters kronfluence tracks; a square Gaussian on the input side of the layers with
d_in = 64, and at 256 x 65 on the output side of every block layer: only ``mlp.proj``'s input
and ``lm_head``'s output stay projected), and dense
k = :func:`trak_k` + damped Fisher (the math of TRAK's (ΦᵀΦ + λ)⁻¹, next to the traker row), and the
"exact" rows: EK-FAC and identity on the unprojected gradients of weights and biases (:data:`EXACT`), the
same math as the kronfluence rows."""


def trak_k(task) -> int:
    """Projection size of the TRAK rows: min(TRAK_K, n_train // 2), so that the (k, k) ΦᵀΦ that
    traker and dattri invert without damping has full rank (400 on the default task, 120 on tiny)."""
    return min(TRAK_K, task.n_train // 2)


def linear_weights(model: nn.Module) -> list[str]:
    """Parameter names of the weights of every nn.Linear (the tracked parameters of every method)."""
    return [f"{name}.weight" for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def score_airtrace(name: str, task, model) -> torch.Tensor:
    """featurize -> fit -> score with :func:`airtrace.eval.tasks.lm_eval.attribute` (tracked layers
    ``lm_eval.LAYERS``, float32 store); (q, n) float64."""
    settings = AIRTRACE[name]
    if name == "airtrace trak-fisher":
        settings = {**settings, "projection": {**settings["projection"], "k": trak_k(task)}}
    with tempfile.TemporaryDirectory(prefix="airtrace-lm-") as tmp:
        scores, _ = lm_eval.attribute(task, model, settings, tmp, progress=False)
    return scores


# --------------------------------------------------------------------------- kronfluence


def score_kronfluence(strategy: str, task, model) -> torch.Tensor:
    """kronfluence 1.0.1 pairwise scores, ``strategy`` "ekfac" or "identity", in the full
    (unprojected) space of every nn.Linear; empirical Fisher as airtrace, kronfluence's default
    dtypes, damping None = 0.1 x mean eigenvalue (airtrace's default heuristic); padding tokens
    are masked out of the covariances."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from kronfluence.utils.dataset import DataLoaderKwargs

    class ChatterbotTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return task.loss_fn(model, batch).sum()

        def compute_measurement(self, batch, model):
            return task.loss_fn(model, batch).sum()

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    kf_task = ChatterbotTask()
    prepared = prepare_model(model, kf_task)
    loader = DataLoaderKwargs(collate_fn=task.encode, num_workers=0)  # items are pairs, batches are encoded
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp:
        analyzer = Analyzer("lm", prepared, kf_task, cpu=True, output_dir=tmp, disable_tqdm=True,
                            disable_model_save=True)
        analyzer.fit_all_factors("f", task.train, per_device_batch_size=BATCH, dataloader_kwargs=loader,
                                 factor_args=FactorArguments(strategy=strategy, use_empirical_fisher=True),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("s", "f", task.queries, task.train,
                                         per_device_query_batch_size=len(task.queries),
                                         per_device_train_batch_size=BATCH, dataloader_kwargs=loader,
                                         score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("s")["all_modules"].to(F64)


# --------------------------------------------------------------------------- traker


def _answer_log_likelihood(model, params, input_ids, labels) -> torch.Tensor:
    """Minus the summed answer-token loss of one unbatched example (T,) (padding labels are ignored)."""
    logits = torch.func.functional_call(model, params, (input_ids.reshape(1, -1),))
    return -per_example_loss(logits, labels.reshape(1, -1), "causal_lm").sum()


def _traker_output():
    """traker model output: f(z) = answer log-likelihood, ∂loss/∂f = 1 (so TRAK's features are
    loss gradients and its scores g_qᵀ (ΦᵀΦ)⁻¹ g_z, the airtrace convention)."""
    from trak.modelout_functions import AbstractModelOutput

    class AnswerLogLikelihood(AbstractModelOutput):
        def __init__(self):
            super().__init__()

        @staticmethod
        def get_output(model, weights, buffers, input_ids, labels):
            return _answer_log_likelihood(model, (weights, buffers), input_ids, labels)

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1, dtype=torch.float32)

    return AnswerLogLikelihood()


def _encoded(task, pairs):
    """(input_ids, labels) of pairs in order, BATCH at a time."""
    for start in range(0, len(pairs), BATCH):
        batch = task.encode(pairs[start : start + BATCH])
        yield batch["input_ids"], batch["labels"]


def score_traker(task, model, seed: int = 0) -> torch.Tensor:
    """traker 0.3.2 TRAK (one checkpoint) on the nn.Linear weights (``grad_wrt``), CPU
    BasicProjector with proj_dim TRAK_K (Gaussian from ``seed``, redrawn in blocks of 100 columns for
    every batch), float32, no regularisation (``lambda_reg`` 0)."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    params = dict(model.named_parameters())
    tracked = linear_weights(model)
    grad_dim = sum(params[name].numel() for name in tracked)
    k = trak_k(task)
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=k, seed=seed, proj_type=ProjectionType.normal,
                               device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="traker-") as tmp:
        traker = TRAKer(model=model, task=_traker_output(), train_set_size=task.n_train, save_dir=tmp,
                        device="cpu", projector=projector, proj_dim=k, use_half_precision=False,
                        grad_wrt=tracked)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for input_ids, labels in _encoded(task, task.train):
            traker.featurize(batch=(input_ids, labels), num_samples=input_ids.shape[0])
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="q", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=len(task.queries))
        for input_ids, labels in _encoded(task, task.queries):
            traker.score(batch=(input_ids, labels), num_samples=input_ids.shape[0])
        scores = traker.finalize_scores(exp_name="q")
    return torch.as_tensor(scores, dtype=F64).T.contiguous()


# --------------------------------------------------------------------------- dattri


def score_dattri(method: str, task, model) -> torch.Tensor:
    """dattri 0.3.0 attributors on the nn.Linear weights (``layer_name``): "tracin"
    (TracInAttributor with one checkpoint and weight 1: Grad-Dot) or "trak" (TRAKAttributor,
    proj_dim :func:`trak_k`, CPU projector; correct-class probability = exp(-summed answer loss)).
    dattri returns (n, q) inner products g_zᵀ M g_q, "higher = helps"; transposed to (q, n)."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    def loss(params, data):  # one unbatched example (input_ids (T,), labels (T,))
        return -_answer_log_likelihood(model, params, *data)

    attr_task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    loader, layers = _TupleLoader(task), linear_weights(model)
    if method == "tracin":
        attributor = TracInAttributor(task=attr_task, weight_list=torch.ones(1), normalized_grad=False,
                                      device="cpu", layer_name=layers)
        scores = attributor.attribute(loader(task.train), loader(task.queries))
    elif method == "trak":
        def correct_probability(params, data):
            return torch.exp(_answer_log_likelihood(model, params, *data))

        attributor = TRAKAttributor(task=attr_task, correct_probability_func=correct_probability,
                                    projector_kwargs={"proj_dim": trak_k(task), "device": "cpu"}, device="cpu",
                                    layer_name=layers)
        attributor.cache(loader(task.train))
        scores = attributor.attribute(loader(task.queries))
    else:
        raise ValueError(f"unknown dattri method {method!r}")
    return torch.as_tensor(scores, dtype=F64).T.contiguous()


class _TupleLoader:
    """DataLoaders of (input_ids, labels) batches of pairs, BATCH at a time, in order."""

    def __init__(self, task):
        self.task = task

    def _collate(self, pairs):
        batch = self.task.encode(pairs)
        return batch["input_ids"], batch["labels"]

    def __call__(self, pairs):
        return torch.utils.data.DataLoader(pairs, batch_size=BATCH, shuffle=False, collate_fn=self._collate)


SKIPPED = {
    "dattri if": "not run: IFAttributorExplicit materialises the Hessian of the 201728 tracked weights "
                 "(201728² float32 = 163 GB)",
}
"""Peer methods that cannot run on this model, with the reason (the status of their row)."""

METHODS = {
    **{name: (lambda name: lambda task, model: score_airtrace(name, task, model))(name) for name in AIRTRACE},
    "kronfluence ekfac": lambda task, model: score_kronfluence("ekfac", task, model),
    "kronfluence identity": lambda task, model: score_kronfluence("identity", task, model),
    "traker": score_traker,
    "traker seed 1": lambda task, model: score_traker(task, model, seed=1),
    "dattri tracin": lambda task, model: score_dattri("tracin", task, model),
    "dattri trak": lambda task, model: score_dattri("trak", task, model),
}
"""Method name -> score function (task, model) -> (q, n) float64."""

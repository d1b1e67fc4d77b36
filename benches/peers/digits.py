"""Attribution scores on the digits task (:mod:`airtrace.eval.tasks.digits`) from airtrace and the peers.

Every ``score_<method>(task, model) -> (q, n) float64`` scores every query against every
training example of ``task`` for the model trained on all of it, in the sign convention of
:mod:`airtrace.eval.metrics` (higher = the training example helps the query). Peers get the
same model (a float32 copy where the library computes in float32) and the same data, with the
per-example cross-entropy as the training loss and the query loss as the measurement.
"""

from __future__ import annotations

import copy
import tempfile

import torch
import torch.nn.functional as F

from airtrace.eval import experiments

F64 = torch.float64

EXACT_K = 4096
EXACT = {"type": "factored", "k_in": EXACT_K, "k_out": EXACT_K, "seed": 0, "exact_small": True}
"""Factored projection wider than every layer: ``exact_small`` keeps all of them exact (the unprojected gradient)."""

# airtrace methods: name -> (experiments method, projection)
AIRTRACE = {
    "airtrace identity": ("identity", None),
    "airtrace kfac": ("kfac", None),
    "airtrace ekfac": ("ekfac", None),
    "airtrace ekfac wide": ("ekfac", {"type": "factored", "k_in": 65, "k_out": 32, "seed": 0, "exact_small": False}),
    "airtrace ekfac exact": ("ekfac", EXACT),
    "airtrace fisher": ("fisher", None),
    "airtrace trak": ("trak", None),
}
DENSE_K = 512


MATCHED_DAMPING = 1e-3
"""Absolute damping shared by the matched same-method pairs (airtrace "iso" rows and kronfluence "λ" rows)."""


def _attributor(task, model, curvature: str, projection: dict | None, damping: float | None = None):
    from airtrace.attribute import Attributor

    return Attributor(model, "*", loss_fn=task.loss_fn, bias=True, curvature=curvature, damping=damping,
                      projection=projection)


def _scores(att, task) -> torch.Tensor:
    """featurize -> fit -> score (every training example of every query), (q, n) float64: the steps of
    :func:`airtrace.eval.experiments.attribute` without its self-influence pass (no peer computes one here)."""
    with tempfile.TemporaryDirectory(prefix="airtrace-") as tmp:
        return experiments.score_all(att, task.train_batches(), task.query_batches(), tmp).scores


def score_airtrace(name: str, task, model) -> torch.Tensor:
    """One of the :data:`AIRTRACE` configurations (the settings of ``airtrace.eval.experiments.METHODS``)."""
    method, projection = AIRTRACE[name]
    settings = dict(experiments.METHODS[method])
    if settings.pop("dense", False):
        projection = {"type": "dense", "k": DENSE_K, "seed": 0}
    return _scores(_attributor(task, model, settings["curvature"], projection), task)


def score_airtrace_iso(curvature: str, task, model) -> torch.Tensor:
    """airtrace with the factored projection kept exact on every layer (``exact_small`` with k wider
    than every layer: P = I, the unprojected gradient) and absolute damping MATCHED_DAMPING: the same
    math as kronfluence's unprojected EK-FAC / identity with that damping."""
    return _scores(_attributor(task, model, curvature, EXACT, MATCHED_DAMPING), task)


def _float32(model):
    return copy.deepcopy(model).float().eval()


def _loader(x, y, batch_size=256):
    data = torch.utils.data.TensorDataset(x.float(), y)
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


# --------------------------------------------------------------------------- kronfluence


def score_kronfluence(strategy: str, task, model, damping: float | None = None) -> torch.Tensor:
    """kronfluence 1.0.1 pairwise scores, ``strategy`` "ekfac" or "identity"; empirical Fisher,
    float64 throughout; damping None = 0.1 x mean eigenvalue (as airtrace's default)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class DigitsTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    kf_task = DigitsTask()
    prepared = prepare_model(copy.deepcopy(model), kf_task)
    train = torch.utils.data.TensorDataset(task.x_train, task.y_train)
    queries = torch.utils.data.TensorDataset(task.x_query, task.y_query)
    f64 = dict(activation_covariance_dtype=F64, gradient_covariance_dtype=F64, eigendecomposition_dtype=F64,
               lambda_dtype=F64, per_sample_gradient_dtype=F64)
    with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp:
        analyzer = Analyzer("digits", prepared, kf_task, cpu=True, output_dir=tmp, disable_tqdm=True,
                            disable_model_save=True)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True,
                                      **{k: v for k, v in f64.items() if hasattr(FactorArguments, k)})
        analyzer.fit_all_factors("f", train, per_device_batch_size=256, factor_args=factor_args,
                                 overwrite_output_dir=True)
        score_f64 = {k: F64 for k in ("score_dtype", "per_sample_gradient_dtype", "precondition_dtype")}
        score_args = ScoreArguments(damping_factor=damping,
                                    **{k: v for k, v in score_f64.items() if hasattr(ScoreArguments, k)})
        analyzer.compute_pairwise_scores("s", "f", queries, train, per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=256, score_args=score_args,
                                         overwrite_output_dir=True)
        return analyzer.load_pairwise_scores("s")["all_modules"].to(F64)


# --------------------------------------------------------------------------- traker


def score_traker(task, model) -> torch.Tensor:
    """traker 0.3.2 TRAK (one checkpoint), CPU BasicProjector with proj_dim 512, float32.

    traker's scores are "higher = helps": the query's margin gradient against the
    training examples' loss-weighted features.
    """
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    net = _float32(model)
    n_params = sum(p.numel() for p in net.parameters())
    projector = BasicProjector(grad_dim=n_params, proj_dim=DENSE_K, seed=0, proj_type=ProjectionType.normal,
                               device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="traker-") as tmp:
        traker = TRAKer(model=net, task="image_classification", train_set_size=task.n_train, save_dir=tmp,
                        device="cpu", projector=projector, proj_dim=DENSE_K, use_half_precision=False)
        traker.load_checkpoint(net.state_dict(), model_id=0)
        for x, y in _loader(task.x_train, task.y_train):
            traker.featurize(batch=(x, y), num_samples=x.shape[0])
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="q", checkpoint=net.state_dict(), model_id=0,
                                        num_targets=task.x_query.shape[0])
        for x, y in _loader(task.x_query, task.y_query):
            traker.score(batch=(x, y), num_samples=x.shape[0])
        scores = traker.finalize_scores(exp_name="q")
    return torch.as_tensor(scores, dtype=F64).T.contiguous()


# --------------------------------------------------------------------------- dattri


def _dattri_task(net):
    from dattri.task import AttributionTask

    def loss(params, data):  # dattri passes one example, with (IF) or without (TracIn, TRAK) a batch dim
        x, y = data
        return F.cross_entropy(torch.func.functional_call(net, params, (x.reshape(-1, x.shape[-1]),)), y.reshape(-1))

    return AttributionTask(loss_func=loss, model=net, checkpoints=net.state_dict())


def score_dattri(method: str, task, model) -> torch.Tensor:
    """dattri 0.3.0 attributors: "if" (IFAttributorExplicit, regularization = the task's l2),
    "trak" (TRAKAttributor, proj_dim 512, CPU), "tracin" (TracInAttributor with one checkpoint,
    weight 1: Grad-Dot). dattri returns (n_train, n_test) inner products g_trainᵀ M g_test
    (M = H⁻¹ for IF): "higher = helps", as airtrace; transposed to (q, n)."""
    from dattri.algorithm.influence_function import IFAttributorExplicit
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.algorithm.tracin import TracInAttributor

    net = _float32(model)
    attr_task = _dattri_task(net)
    train, test = _loader(task.x_train, task.y_train), _loader(task.x_query, task.y_query)
    if method == "if":
        attributor = IFAttributorExplicit(task=attr_task, device="cpu", regularization=task.config.l2)
        attributor.cache(train)
        scores = attributor.attribute(train, test)
    elif method == "trak":
        def correct_probability(params, data):
            x, y = data
            logits = torch.func.functional_call(net, params, (x.reshape(-1, x.shape[-1]),))
            return torch.exp(-F.cross_entropy(logits, y.reshape(-1)))

        attributor = TRAKAttributor(task=attr_task, correct_probability_func=correct_probability,
                                    projector_kwargs={"proj_dim": DENSE_K, "device": "cpu"},
                                    device="cpu")
        attributor.cache(train)
        scores = attributor.attribute(test)
    elif method == "tracin":
        attributor = TracInAttributor(task=attr_task, weight_list=torch.ones(1), normalized_grad=False, device="cpu")
        scores = attributor.attribute(train, test)
    else:
        raise ValueError(f"unknown dattri method {method!r}")
    return torch.as_tensor(scores, dtype=F64).T.contiguous()


DATTRI_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
"""dattri's ``regularization`` (λ added to its Hessian) grid of the explicit / CG / Arnoldi influence rows."""


def score_dattri_if(solver: str, regularization: float, task, model) -> torch.Tensor:
    """dattri 0.3.0 influence with the true Hessian + ``regularization`` I over all parameters: "explicit"
    (IFAttributorExplicit), "cg" (IFAttributorCG, its defaults: 10 iterations, tol 1e-7) or "arnoldi"
    (IFAttributorArnoldi, its default 100 eigenvectors); scores as :func:`score_dattri`."""
    from dattri.algorithm.influence_function import IFAttributorArnoldi, IFAttributorCG, IFAttributorExplicit

    kinds = {"explicit": IFAttributorExplicit, "cg": IFAttributorCG, "arnoldi": IFAttributorArnoldi}
    attributor = kinds[solver](task=_dattri_task(_float32(model)), device="cpu", regularization=regularization)
    train, test = _loader(task.x_train, task.y_train), _loader(task.x_query, task.y_query)
    attributor.cache(train)
    return torch.as_tensor(attributor.attribute(train, test), dtype=F64).T.contiguous()


def score_airtrace_exact(task, model, solver: str = "cg") -> torch.Tensor:
    """airtrace ``curvature="exact"`` on the Gauss-Newton matrix, every layer unprojected, damping "auto" (the
    stationary L2 strength): ``solver`` "cg" (EK-FAC-preconditioned) or "dense" (the explicit matrix from p
    products, Cholesky)."""
    from airtrace.attribute import Attributor

    at = Attributor(model, "*", loss_fn=task.loss_fn, bias=True, curvature="exact", solver=solver)
    return _scores(at, task)


METHODS = {
    **{name: (lambda name: lambda task, model: score_airtrace(name, task, model))(name) for name in AIRTRACE},
    "kronfluence ekfac": lambda task, model: score_kronfluence("ekfac", task, model),
    "kronfluence identity": lambda task, model: score_kronfluence("identity", task, model),
    "airtrace ekfac iso": lambda task, model: score_airtrace_iso("ekfac", task, model),
    "kronfluence ekfac λ": lambda task, model: score_kronfluence("ekfac", task, model, MATCHED_DAMPING),
    "airtrace identity iso": lambda task, model: score_airtrace_iso("identity", task, model),
    "traker": score_traker,
    "dattri if": lambda task, model: score_dattri("if", task, model),
    "dattri trak": lambda task, model: score_dattri("trak", task, model),
    "dattri tracin": lambda task, model: score_dattri("tracin", task, model),
    "airtrace default": lambda task, model: _scores(_attributor(task, model, "ekfac", None, "auto"), task),
    "airtrace exact": score_airtrace_exact,
    "airtrace exact dense": lambda task, model: score_airtrace_exact(task, model, "dense"),
    **{f"dattri {solver} λ={r:g}": (lambda solver, r: lambda task, model: score_dattri_if(solver, r, task, model))(
        solver, r) for solver in ("explicit", "cg", "arnoldi") for r in DATTRI_GRID},
}
"""Method name -> score function (task, model) -> (q, n) float64."""

PEER_MODULE = {"kronfluence": "kronfluence", "traker": "trak", "dattri": "dattri"}


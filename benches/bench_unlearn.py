"""Unlearning by datamodel matching (:mod:`airtrace.unlearn`) against the oracle: models really retrained without
the forget set, on the digits MLP (``--task digits``) or the small GPT on chatterbot (``--task lm``).

Tasks (CPU, one thread):

- ``digits``: :mod:`airtrace.eval.tasks.digits` (float64) with ``init_seed=None`` (each seed draws its own initial
  weights, so retrained models form a distribution), 1000 training images, 200 held-out validation images. Forget
  sets: random 1% (10 images), random 5% (50), and a coherent group: half of the training images of digit 3 (53).
  Outputs matched by DMM: the logits (the paper's choice for classifiers); KLoM on the margin (correct logit minus
  the log-sum-exp of the others).
- ``lm``: :mod:`airtrace.eval.tasks.lm`, the "tiny" GPT (d_model 32, one block, 8 epochs; float32) on a pool of
  ``--lm-pool`` chatterbot pairs (default 480) with ``init_seed = order_seed = None`` (each seed its own weights
  and example order), its 64 query pairs as validation. Forget sets: random 1% and 5% of the pool and one whole
  chatterbot category (the category whose share of the pool is nearest 5%). Outputs, matched by DMM and compared by
  KLoM: per example, minus the mean answer-token loss (the answer's mean log-likelihood; the paper's KLoM takes a
  classifier's margin, a per-example scalar, and this is the LM's per-example scalar, the one the datamodel labels
  of ``airtrace airrep label`` measure too).

``--seeds N`` original models are trained on all the data; per forget set, N oracles are trained from scratch on
the retained data (other seeds), and N more oracles give the noise floor (oracle vs oracle).

Methods, each applied to every original model at equal compute (``--steps`` Adam steps of ``--batch-size``
examples; the learning rate is the best of ``--lrs`` per method and forget set, chosen by the mean KLoM over all
evaluated points, the same rule for every method):

- do nothing;
- gradient ascent on the forget set (maximise its loss);
- fine-tuning on the retained set (the training loss);
- DMM (scale 1/n): EK-FAC attribution (digits: exact per-layer features, ``damping="auto"``; lm: the default
  projection) predicts the outputs of the retrained model on the forget set and ``--reference`` retained examples
  with the one-step Newton scale 1/n (:func:`airtrace.unlearn.predict_outputs`), then the steps match them
  (:func:`airtrace.unlearn.match_outputs`);
- DMM (labels fit): the same with the scale of :func:`airtrace.unlearn.fit_scale`, fitted per original model on
  datamodel labels: ``--subsets`` models retrained on random subsets of ``--label-fraction`` of the training set
  (:func:`airtrace.eval.retrain`) and measured on the validation points (minus the loss), made as the project makes the labels ``airtrace
  calibrate`` reads: every subset model from the task's one initial model (lm: and one example order). With a seed
  of its own per subset model the tiny GPT's labels are noise: 8 of them gave the fit a correlation of -0.001.

DMM's attribution (featurize + fit + score, and the scale fit) comes on top of the steps; its seconds per model are
reported (``extra_s``); the labels' retraining is a one-time cost per training set, printed in the header.

Metric: KLoM (Georgiev et al. 2024, arXiv:2410.23232, App. E.1): per evaluated point, the KL divergence from the
distribution of its output over the N unlearned models to the distribution over the N oracles. The paper estimates
it from hundreds of models per side by binning both samples (20 equal bins over the joint range, outputs clipped to
±100, empty oracle bins floored at 1e-5; its code). With N = 8 models per side that estimate saturates near
log(1/1e-5) · (share of empty bins) for every method, the oracle-vs-oracle floor included, so the table ranks by the
same divergence between Gaussians fitted per point (mean and variance of the N outputs, variances floored at 1e-6)
and reports the binned estimate beside it (``*_binned``). Reported: mean and 95th percentile over the forget points,
200 retained training points and the validation points; the oracle-vs-oracle row (other seeds) is the noise floor.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benches/bench_unlearn.py [--task digits|lm] [--seeds 8] [--steps 100] [--check]
    .venv/bin/python benches/bench_unlearn.py --quick      # 3 seeds, 20 steps, one lr; writes nothing
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("do nothing", "gradient ascent", "fine-tune retain", "DMM (scale 1/n)", "DMM (labels fit)")
BASELINES = METHODS[:3]
SPLITS = ("forget", "retain", "validation")
BINS, EPS, CLIP, VAR_FLOOR = 20, 1e-5, 100.0, 1e-6


# --------------------------------------------------------------------------- metric

def binned_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two samples, binned into BINS equal bins over their joint range (the paper's estimator)."""
    p, q = p.clamp(-CLIP, CLIP), q.clamp(-CLIP, CLIP)
    lo, hi = float(min(p.min(), q.min())), float(max(p.max(), q.max()))
    hi = hi if hi > lo else lo + 1.0
    edges = torch.linspace(lo, hi, BINS + 1, dtype=torch.float64)[1:-1]
    pc = torch.bincount(torch.bucketize(p, edges, right=True), minlength=BINS).double()
    qc = torch.bincount(torch.bucketize(q, edges, right=True), minlength=BINS).double()
    pp, qq = pc / pc.sum(), qc / qc.sum()
    keep = pp > 0
    return float((pp[keep] * (pp[keep] / qq[keep].clamp_min(EPS)).log()).sum())


def gaussian_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(P,) KL(N(μ_p, σ_p²) || N(μ_q, σ_q²)) per column of (N, P) samples (variances floored at VAR_FLOOR)."""
    vp, vq = p.var(dim=0) + VAR_FLOOR, q.var(dim=0) + VAR_FLOOR
    return 0.5 * ((vp / vq) + (p.mean(dim=0) - q.mean(dim=0)) ** 2 / vq - 1 + (vq / vp).log())


def klom(unlearned: torch.Tensor, oracle: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per point of (N, P) margins of unlearned models and oracles: the Gaussian and the binned KLoM, (P,) each."""
    binned = torch.tensor([binned_kl(unlearned[:, j], oracle[:, j]) for j in range(unlearned.shape[1])])
    return {"gauss": gaussian_kl(unlearned, oracle), "binned": binned}


# --------------------------------------------------------------------------- tasks

class Digits:
    """The digits MLP: training, forget sets, evaluated points, the losses of the baselines, DMM's outputs."""

    name, title = "digits", "digits MLP"

    def __init__(self, args):
        from airtrace.eval.tasks.digits import DigitsTask, digits_config

        self.task = DigitsTask(digits_config("mlp", init_seed=None, n_train=1000, n_query=200))
        self.labelled = DigitsTask(digits_config("mlp", n_train=1000, n_query=200))  # one initial model for all
        self.n = self.task.n_train
        self.loss_fn, self.measure = self.task.loss_fn, None  # the labels measure minus loss_fn

    def train(self, rows, seed: int):
        return self.task.train_fn(torch.as_tensor(rows), seed)

    def forget_sets(self, quick: bool) -> dict[str, list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(1234)).tolist()
        threes = [r for r in range(self.n) if int(self.task.y_train[r]) == 3]
        sets = {"random 1%": sorted(order[: self.n // 100]),
                "random 5%": sorted(order[self.n // 100: self.n // 100 + self.n // 20]),
                "half of digit 3": threes[: len(threes) // 2]}
        return {k: v for k, v in sets.items() if not quick or k != "random 5%"}

    def points(self, rows: list[int] | None):
        """Training rows ``rows`` (None: the validation images) as what :meth:`scores` takes."""
        if rows is None:
            return self.task.x_query, self.task.y_query
        return self.task.x_train[rows], self.task.y_train[rows]

    @torch.no_grad()
    def scores(self, model, points) -> torch.Tensor:
        """(P,) margin: correct logit minus the log-sum-exp of the other logits."""
        x, y = points
        logits = model(x)
        correct = logits.gather(1, y[:, None])[:, 0]
        return correct - logits.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)

    def forget_loss(self, model, rows):
        return F.cross_entropy(model(self.task.x_train[rows]), self.task.y_train[rows])

    def train_loss(self, model, rows):
        return self.task.objective(model, rows)

    @staticmethod
    def outputs(model, batch):
        return model(batch["x"])

    def attributor(self, model):
        from airtrace import Attributor

        return Attributor(model, loss_fn=self.loss_fn, projection="exact", curvature="ekfac")

    def batches(self):
        """(training batches, labelled query batches)."""
        return self.task.train_batches(256), self.task.query_batches(256)



class LM:
    """The tiny GPT on chatterbot pairs: as :class:`Digits`."""

    name, title = "lm", "tiny GPT on chatterbot"

    def __init__(self, args):
        from airtrace.eval.tasks.lm import LMTask, answer_losses, lm_config

        self.task = LMTask(lm_config("tiny", n_train=args.lm_pool, init_seed=None, order_seed=None))
        self.labelled = LMTask(lm_config("tiny", n_train=args.lm_pool))  # one initial model and order for all
        self.n = self.task.n_train
        self.answer_losses = answer_losses
        self.loss_fn = self.task.loss_fn  # summed answer-token loss: what training differentiates
        self.measure = lambda model, batch: self.outputs(model, batch)[:, 0]

    def train(self, rows, seed: int):
        return self.task.train_fn(torch.as_tensor(rows), seed)

    def forget_sets(self, quick: bool) -> dict[str, list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(1234)).tolist()
        one, five = max(1, round(0.01 * self.n)), round(0.05 * self.n)
        members: dict[str, list[int]] = {}
        for r, pair in enumerate(self.task.train):
            members.setdefault(pair["category"], []).append(r)
        category = min(sorted(members), key=lambda c: abs(len(members[c]) - five))
        sets = {"random 1%": sorted(order[:one]), "random 5%": sorted(order[one: one + five]),
                f"category {category}": members[category]}
        return {k: v for k, v in sets.items() if not quick or k != "random 5%"}

    def points(self, rows: list[int] | None):
        return list(self.task.queries) if rows is None else [self.task.train[r] for r in rows]

    def scores(self, model, points) -> torch.Tensor:
        """(P,) minus the mean answer-token loss."""
        return -self.task.example_losses(model, points)

    def _mean_loss(self, model, rows):
        losses, counts = self.answer_losses(model, self.task.encode([self.task.train[r] for r in rows]))
        return losses.sum() / counts.sum().clamp_min(1)

    def forget_loss(self, model, rows):
        return self._mean_loss(model, rows)

    def train_loss(self, model, rows):
        return self._mean_loss(model, rows)

    def outputs(self, model, batch):
        losses, counts = self.answer_losses(model, batch)
        return -(losses / counts.clamp_min(1))[:, None]

    def attributor(self, model):
        from airtrace import Attributor

        return Attributor(model, loss_fn=self.loss_fn, curvature="ekfac")

    def batches(self):
        return self.task.train_batches(32), self.task.query_batches(32)



TASKS = {"digits": Digits, "lm": LM}


# --------------------------------------------------------------------------- unlearning methods

def _steps(model, objective, batches: list[torch.Tensor], steps: int, lr: float, seed: int) -> None:
    """``steps`` Adam steps of ``objective(rows)`` over the row batches in the seeded order of airtrace.unlearn."""
    from airtrace.unlearn import batch_at

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        objective(batches[batch_at(step, len(batches), seed)].tolist()).backward()
        optimizer.step()


def _row_batches(rows: list[int], batch_size: int, seed: int) -> list[torch.Tensor]:
    order = torch.tensor(rows)[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]
    return list(order.split(batch_size))


def gradient_ascent(model, bench, forget, retain, args, lr, seed):
    model = copy.deepcopy(model)
    _steps(model, lambda r: -bench.forget_loss(model, r), _row_batches(forget, args.batch_size, seed), args.steps,
           lr, seed)
    return model.eval()


def finetune_retain(model, bench, forget, retain, args, lr, seed):
    model = copy.deepcopy(model)
    _steps(model, lambda r: bench.train_loss(model, r), _row_batches(retain, args.batch_size, seed), args.steps, lr,
           seed)
    return model.eval()


class DMM:
    """Attribution of one original model (featurize + EK-FAC fit, and the scale fitted on the labels, once), then
    per forget set the predicted outputs and the matching steps."""

    def __init__(self, model, bench, folder: str, labels):
        from airtrace.unlearn import fit_scale

        self.model, self.bench = model, bench
        self.train, queries = bench.batches()
        t0 = time.perf_counter()
        self.attributor = bench.attributor(model)
        self.store = self.attributor.featurize(self.train, folder, dtype="float32", progress=False)
        self.attributor.fit(self.train, store=self.store, progress=False)
        self.fit = fit_scale(self.attributor, self.store, queries, *labels, measure=bench.measure, progress=False)
        self.seconds = time.perf_counter() - t0
        self.targets: dict = {}

    def prepare(self, name: str, forget: list[int], args, seed: int) -> None:
        """The reference set and the predicted outputs (scale 1/n) of forget set ``name``."""
        from airtrace.unlearn import predict_outputs, reference_batches

        t0 = time.perf_counter()
        reference = reference_batches(self.train, self.store, forget, retain=args.reference, seed=seed,
                                      batch_size=args.batch_size)
        targets = predict_outputs(self.attributor, self.store, reference, forget, self.bench.outputs,
                                  scale=1.0 / len(self.store), progress=False)
        self.targets[name] = (reference, targets, time.perf_counter() - t0)

    def unlearn(self, name: str, lr: float, args, seed: int, fitted: bool):
        """A copy of the model matched to the targets of ``name``, at scale 1/n or the fitted one."""
        from airtrace.unlearn import MatchConfig, Targets, match_outputs

        reference, targets, _ = self.targets[name]
        if fitted:
            factor = self.fit.scale / targets.scale
            targets = Targets(targets.ids, targets.full, targets.full + factor * (targets.predicted - targets.full),
                              self.fit.scale)
        model = copy.deepcopy(self.model)
        match_outputs(model, reference, targets, self.bench.outputs, MatchConfig(steps=args.steps, lr=lr, seed=seed),
                      progress=False)
        return model.eval()


def datamodel_labels(bench, folder: str, subsets: int, fraction: float):
    """(outputs (m, q), masks (m, n)): ``subsets`` models retrained on random ``fraction`` of the training set (seed
    7), measured on the validation
    points (:func:`airtrace.eval.retrain`), the way the project's labels are made: every model from the task's one
    initial model (and, lm, one example order), so the outputs vary with the subset, not the seed."""
    from airtrace.eval import retrain, sample_subsets

    task = bench.labelled
    plan = sample_subsets(bench.n, subsets, fraction=fraction, seed=7)
    return retrain(plan, task.train_fn, task.measure_fn, folder, progress=False), plan.masks


# --------------------------------------------------------------------------- the run

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="digits", help="the model and data (default digits)")
    parser.add_argument("--seeds", type=int, default=8, help="original models = oracles per forget set (default 8)")
    parser.add_argument("--steps", type=int, default=100, help="unlearning steps of every method (default 100)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default digits 64, lm 32)")
    parser.add_argument("--reference", type=int, default=256, help="retained examples in DMM's reference set")
    parser.add_argument("--subsets", type=int, default=32,
                        help="datamodel labels: models retrained on random subsets for the scale fit (default 32)")
    parser.add_argument("--label-fraction", type=float, default=0.5,
                        help="datamodel labels: share of the training set in each subset (default 0.5)")
    parser.add_argument("--lm-pool", type=int, default=480, help="lm: training pairs (default 480)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                        help="learning rates tried per method")
    parser.add_argument("--quick", action="store_true", help="3 seeds, 20 steps, one lr, 2 forget sets, 8 subsets; "
                                                             "no files")
    parser.add_argument("--out", type=Path, help="results folder (default benches/results/<device>/)")
    C.add_check_flag(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.batch_size is None:
        args.batch_size = 32 if args.task == "lm" else 64
    if args.quick:
        args.seeds, args.steps, args.lrs, args.subsets = 3, 20, [1e-3], 8

    head = C.header(gpu=False)
    bench = TASKS[args.task](args)
    C.print_header(head, f"unlearning against retrained oracles: {bench.title}, KLoM")
    t0 = time.perf_counter()
    originals = [bench.train(torch.arange(bench.n), seed) for seed in range(args.seeds)]
    train_seconds = (time.perf_counter() - t0) / args.seeds
    print(f"# {args.seeds} original models, {train_seconds:.2f} s each (load {head['load_avg']})", flush=True)
    sets = bench.forget_sets(args.quick)
    probe = torch.randperm(bench.n, generator=torch.Generator().manual_seed(99)).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        labels = datamodel_labels(bench, f"{tmp}/labels", args.subsets, args.label_fraction)
        print(f"# datamodel labels: {args.subsets} models on random subsets of {args.label_fraction:.0%}, "
              f"{time.perf_counter() - t1:.0f} s", flush=True)
        dmms = [DMM(m, bench, f"{tmp}/store{s}", labels) for s, m in enumerate(originals)]
        attribution_seconds = statistics.mean(d.seconds for d in dmms)
        per_n = [d.fit.per_n for d in dmms]
        print(f"# DMM featurize + fit + scale fit: {attribution_seconds:.2f} s per model; fitted scale "
              f"{statistics.mean(per_n):.4g} / n (range {min(per_n):.4g} .. {max(per_n):.4g}; correlation "
              f"{statistics.mean(d.fit.correlation for d in dmms):.3f})", flush=True)
        for name, forget in sets.items():
            forget_set = set(forget)
            retain = [r for r in range(bench.n) if r not in forget_set]
            points = {"forget": bench.points(forget),
                      "retain": bench.points([r for r in probe if r not in forget_set][:200]),
                      "validation": bench.points(None)}

            def output_matrix(models):
                return {s: torch.stack([bench.scores(m, points[s]) for m in models]) for s in SPLITS}

            oracle = output_matrix([bench.train(retain, 1000 + s) for s in range(args.seeds)])
            floor = output_matrix([bench.train(retain, 2000 + s) for s in range(args.seeds)])
            for s, d in enumerate(dmms):
                d.prepare(name, forget, args, seed=s)
            predict_seconds = statistics.mean(d.targets[name][2] for d in dmms)
            candidates = {"oracle (other seeds)": [(None, floor)],
                          "do nothing": [(None, output_matrix(originals))]}
            for method, fn in (("gradient ascent", gradient_ascent), ("fine-tune retain", finetune_retain)):
                candidates[method] = [(lr, output_matrix([fn(m, bench, forget, retain, args, lr, s)
                                                          for s, m in enumerate(originals)])) for lr in args.lrs]
            for method, fitted in (("DMM (scale 1/n)", False), ("DMM (labels fit)", True)):
                candidates[method] = [(lr, output_matrix([d.unlearn(name, lr, args, s, fitted)
                                                          for s, d in enumerate(dmms)])) for lr in args.lrs]
            for method, tried in candidates.items():
                scored = []
                for lr, unlearned in tried:
                    kl = {s: klom(unlearned[s], oracle[s]) for s in SPLITS}
                    scored.append((float(torch.cat([kl[s]["gauss"] for s in SPLITS]).mean()), lr, kl))
                overall, lr, kl = min(scored, key=lambda t: t[0])
                row = {"task": bench.name, "forget_set": name, "n_forget": len(forget), "method": method, "lr": lr,
                       "all_mean": overall, "steps": 0 if lr is None else args.steps}
                for s in SPLITS:
                    row[f"{s}_mean"] = float(kl[s]["gauss"].mean())
                    row[f"{s}_p95"] = float(kl[s]["gauss"].quantile(0.95))
                    row[f"{s}_binned"] = float(kl[s]["binned"].mean())
                if method.startswith("DMM"):
                    row["extra_s"] = attribution_seconds + predict_seconds
                    row["scale_per_n"] = statistics.mean(per_n) if method == "DMM (labels fit)" else 1.0
                    row["label_fraction"] = args.label_fraction if method == "DMM (labels fit)" else None
                rows.append(row)
            print(f"# {name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    columns = ["task", "forget_set", "n_forget", "method", "lr", "steps", "forget_mean", "forget_p95", "retain_mean",
               "retain_p95", "validation_mean", "validation_p95", "all_mean", "forget_binned", "retain_binned",
               "validation_binned", "scale_per_n", "label_fraction", "extra_s"]
    C.print_table(rows, columns, title=f"KLoM to the oracle (mean / p95 over points; {args.seeds} seeds, "
                                       f"{args.steps} steps of {args.batch_size}; lower is better)")
    lines = []
    for name in sets:
        by = {r["method"]: r for r in rows if r["forget_set"] == name}
        for s in SPLITS:
            dmm = by["DMM (labels fit)"][f"{s}_mean"]
            worst = max(by[m][f"{s}_mean"] - dmm for m in BASELINES)
            best_other = min(BASELINES, key=lambda m: by[m][f"{s}_mean"])
            lines.append(C.target(f"{name}, {s}: best baseline ({best_other}) KLoM minus DMM's (labels fit)",
                                  by[best_other][f"{s}_mean"] - dmm, 0.0,
                                  detail=f" (DMM {dmm:.3g}, {best_other} "
                                         f"{by[best_other][f'{s}_mean']:.3g}, largest gap {worst:.3g})"))
    out = C.results_dir(args.out, args.quick, head)
    if out is not None:
        stem = "bench_unlearn" if bench.name == "digits" else f"bench_unlearn_{bench.name}"
        path = C.write_csv(out / f"{stem}.csv", rows, columns, head)
        plot(rows, list(sets), out / f"{stem}.png", args, bench.title)
        print(f"\nwrote {path} and {out / f'{stem}.png'}")
    return C.report_targets(lines, args.check)


def plot(rows: list[dict], sets: list[str], path: Path, args, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["oracle (other seeds)", *METHODS]
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(5 * len(SPLITS), 4.5), sharey=True)
    width = 0.8 / len(methods)
    for ax, s in zip(axes, SPLITS):
        for k, m in enumerate(methods):
            values = [next(r[f"{s}_mean"] for r in rows if r["forget_set"] == n and r["method"] == m) for n in sets]
            ax.bar([i + (k - (len(methods) - 1) / 2) * width for i in range(len(sets))], values, width, label=m)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_title(f"{s} points")
        ax.set_yscale("log")
    axes[0].set_ylabel("mean KLoM to the oracle (lower is better)")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"{title}: unlearning vs retraining ({args.seeds} seeds, {args.steps} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

"""Pruning quality on Fashion-MNIST: top-1 at equal MACs per criterion, after the same fine-tuning.

For each model (VGG-style ``fmnist_cnn``, ResNet-style ``fmnist_resnet``, MobileNet-style
``fmnist_mobilenet``), criterion and MACs target: score on a 512-image calibration sample of the train
split, prune with torch-pruning to the target, fine-tune (distillation from the unpruned model with the
default run's FinetuneConfig, same budget for every criterion), evaluate top-1 on the full 10k test set.
Every finished cell is saved as JSON under a folder named after the fine-tuning budget (``ft3`` = 3
epochs on the whole train split) and skipped on rerun, so the table can be filled over several runs
and cells of another budget are never mixed in. Baselines are trained once (scripts/train_baseline.py)
and kept in benchmarks/results/baselines/ (committed).

Criteria come from the registry; score options go in brackets, e.g.
``--criteria 'sae-mi,sae-mi[quantization=percentile,levels=16],l1,random'`` (keys: ScoreConfig fields,
anything else goes to the criterion's params). Under each table: the per-seed paired difference of
every SAE variant to the best non-SAE criterion and to random, and the issue's goals for ``--compare``
(default: the config's default criterion).

    python benchmarks/pruning_quality.py --threads 1            # the full table (many hours on 2 CPU cores)
    python benchmarks/pruning_quality.py --screen --threads 1   # proxy for choosing among SAE variants
    python benchmarks/pruning_quality.py --quick    # < 15 min: 1 model, 4 criteria, 2x, 1 seed, short budget
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_stats import mean_sd, paired_diff  # noqa: E402

RESULTS = HERE / "results"
CACHE = RESULTS / "cache"  # fine-tuning checkpoints (gitignored)
BASELINES = RESULTS / "baselines"
ASSET = HERE.parent / "edgeprune" / "assets" / "fmnist_cnn.safetensors"
CRITERIA = ["sae-mi", "sae-kernel-mi", "mi", "sae", "l1", "taylor", "bn-scale", "random"]  # the default list
MODELS = {"vgg": "fmnist_cnn", "resnet": "fmnist_resnet", "mobilenet": "fmnist_mobilenet"}
# epochs of the committed baselines (scripts/train_baseline.py); mobilenet: what fit in ~30 min on 1 CPU thread
BASELINE_EPOCHS = {"vgg": 15.0, "resnet": 15.0, "mobilenet": 3.0}
BASELINE_GOAL = 0.93


@dataclass
class Budget:
    finetune_epochs: float
    train_limit: int | None  # fine-tuning images (None = the whole train split)
    test_limit: int | None
    baseline_epochs: float
    calib: int = 512


    def tag(self) -> str:
        """The cell folder: cells of different budgets never meet in one table."""
        return (f"ft{self.finetune_epochs:g}" + (f"-n{self.train_limit}" if self.train_limit else "")
                + (f"-t{self.test_limit}" if self.test_limit else "") + (f"-c{self.calib}" if self.calib != 512 else ""))


def _default_ft_epochs() -> float:
    from edgeprune.config import FinetuneConfig

    return FinetuneConfig().epochs  # the default run's budget (3 epochs of KD)


FULL = Budget(finetune_epochs=_default_ft_epochs(), train_limit=None, test_limit=None, baseline_epochs=15.0)
SCREEN = Budget(finetune_epochs=1.0, train_limit=16000, test_limit=None, baseline_epochs=15.0)
QUICK = Budget(finetune_epochs=0.5, train_limit=8000, test_limit=2000, baseline_epochs=0.3, calib=256)


# ----------------------------------------------------------------------------- data and baselines


def load_data(budget: Budget):
    from edgeprune.config import Preprocessing
    from edgeprune.data import load_fashion_mnist, train_val_split

    pre = Preprocessing()
    train_all = load_fashion_mnist(None, "train", pre)
    test = load_fashion_mnist(None, "test", pre, limit=budget.test_limit)
    train, val = train_val_split(train_all, 0.05, seed=0)  # 57000 / 3000
    return train, val, test


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 px (reflect pad, crop); x is (B, C, H, W)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    h, w = x.shape[2:]
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")  # (B, C, H+4, W+4)
    i, j = (int(v) for v in torch.randint(0, 5, (2,)))
    return padded[:, :, i : i + h, j : j + w]


def train_baseline(arch: str, epochs: float, train, val, device: str, *, channels_last: bool = False) -> torch.nn.Module:
    """The baseline recipe (every model the same): SGD lr 0.05 cosine with warm-up, label smoothing 0.1,
    shift + flip augmentation, batch 128, seed 0; resumable from its checkpoint directory.
    ``channels_last`` only changes the memory layout (depthwise convs train ~2x faster on CPU)."""
    from edgeprune import zoo
    from edgeprune.config import FinetuneConfig
    from edgeprune.finetune import finetune

    torch.manual_seed(0)
    model = getattr(zoo, arch)()
    cfg = FinetuneConfig(epochs=epochs, lr=0.05, batch_size=128, warmup_epochs=min(0.5, epochs / 10),
                         kd_alpha=0.0, label_smoothing=0.1, evals_per_epoch=1, seed=0)
    aug = augment
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        aug = lambda x: augment(x).contiguous(memory_format=torch.channels_last)  # noqa: E731
    res = finetune(model, None, train, val, cfg, ckpt_dir=CACHE / f"train-{arch}-e{epochs:g}", device=device,
                   augment=aug)
    return res.model.to(memory_format=torch.contiguous_format)


def baseline_path(name: str, epochs: float) -> Path:
    return BASELINES / f"{MODELS[name]}-e{epochs:g}.safetensors"  # committed (< 2 MB)


def baseline(name: str, train, val, test, budget: Budget, device: str, quick: bool) -> tuple[torch.nn.Module, float]:
    """The trained unpruned model: bundled weights if good enough, else the committed baseline, else
    trained once here (the recipe of :func:`train_baseline`) and saved."""
    from safetensors.torch import load_file

    from edgeprune import zoo
    from edgeprune.finetune import evaluate
    from edgeprune.models import save_safetensors

    factory = getattr(zoo, MODELS[name])
    if name == "vgg" and ASSET.is_file():
        model = factory()
        model.load_state_dict(load_file(str(ASSET)))
        acc = evaluate(model.to(device), test, device=device)
        if acc >= BASELINE_GOAL or quick:
            if acc < BASELINE_GOAL:
                print(f"note: bundled {ASSET.name} is {acc:.4f} top-1, below the {BASELINE_GOAL} goal; used as is (--quick)")
            return model.eval(), acc
        print(f"bundled {ASSET.name}: {acc:.4f} < {BASELINE_GOAL}; training our own baseline")
    epochs = budget.baseline_epochs if quick else BASELINE_EPOCHS[name]
    path = baseline_path(name, epochs)
    model = factory()
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        model = train_baseline(MODELS[name], epochs, train, val, device)
        BASELINES.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, path)
    acc = evaluate(model.to(device), test, device=device)
    if acc < BASELINE_GOAL:
        print(f"warning: baseline {path.stem} is {acc:.4f} top-1, below the {BASELINE_GOAL} goal"
              + (" (expected with --quick)" if quick else ""))
    return model.eval(), acc


# ----------------------------------------------------------------------------- one cell


def calibration(train, seed: int, n: int):
    g = torch.Generator().manual_seed(1000 + seed)
    return train.subset(torch.randperm(len(train), generator=g)[:n])


@dataclass(frozen=True)
class Variant:
    """A registered criterion plus score options, as given on the command line: ``sae-mi[levels=16]``."""

    label: str
    criterion: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        """File-name safe: ``sae-mi~levels-16``."""
        return self.criterion + "".join(f"~{k}-{v}" for k, v in self.options)

    @property
    def is_sae(self) -> bool:
        return "sae" in self.criterion


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def split_top(text: str) -> list[str]:
    """Split at commas outside brackets: ``a,b[x=1,y=2],c`` -> ``['a', 'b[x=1,y=2]', 'c']``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [t for t in out if t]


def parse_variant(text: str) -> Variant:
    """``name`` or ``name[key=value,...]``; the name must be registered, the options valid for ScoreConfig."""
    from edgeprune.scoring import CRITERIA

    m = re.fullmatch(r"\s*([^\[\]\s]+)\s*(?:\[(.*)\])?\s*", text)
    if not m:
        raise ValueError(f"cannot read criterion {text!r}: expected name or name[key=value,...]")
    name, opts = m.group(1), m.group(2)
    CRITERIA.get(name)  # unknown names fail here, with the registered names in the message
    options = []
    for item in split_top(opts or ""):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"score option {item!r} of {text!r} is not key=value")
        options.append((key.strip(), _value(val)))
    variant = Variant(text.strip(), name, tuple(options))
    _dry_score(variant)  # the options fail now, before any data is loaded
    return variant


def _dry_score(variant: Variant) -> None:
    """Score a tiny two-conv net on 8 random images with the variant's options: whatever score_model or the
    criterion rejects (an unknown quantization, a bad parameter) fails here with its own message."""
    from torch import nn

    from edgeprune.data import TensorData
    from edgeprune.scoring import score_model

    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    data = TensorData(torch.rand(8, 1, 8, 8, generator=g), torch.arange(8) % 2, ["a", "b"], "dry run")
    score_model(net, data, criterion=variant.criterion, num_classes=2, **{**score_kwargs(variant), "progress": False})


def score_kwargs(variant: Variant) -> dict[str, Any]:
    """score_model keyword arguments: the config's defaults (what ``edgeprune run`` uses) with the
    variant's options on top; options that are not ScoreConfig fields go to the criterion's params."""
    import inspect

    from edgeprune.config import ScoreConfig
    from edgeprune.scoring import score_model

    fields = set(ScoreConfig.model_fields)
    known = {k: v for k, v in variant.options if k in fields and k != "params"}
    extra = {k: v for k, v in variant.options if k not in fields}
    cfg = ScoreConfig(criterion=variant.criterion, **known)  # pydantic names a bad field and value
    accepted = {n for n, p in inspect.signature(score_model).parameters.items() if p.kind is not p.VAR_KEYWORD}
    kw = {k: getattr(cfg, k) for k in fields if k in accepted and k not in ("criterion", "model", "data")}
    return {**kw, **cfg.params, **extra}


def default_variant() -> Variant:
    from edgeprune.config import ScoreConfig

    return parse_variant(ScoreConfig().criterion)


def prune_with(model, variant: Variant, target: float, calib, seed: int, device: str):
    from edgeprune.prune import prune_model
    from edgeprune.scoring import make_importance, needs_gradients, score_model

    crit = variant.criterion
    model = model.to(device).eval()
    scores = score_model(model, calib, criterion=crit, device=device, num_classes=10,
                         **{**score_kwargs(variant), "progress": False})
    importance = make_importance(crit, scores, seed=seed)  # random: the seed decides the channels
    x_cal, y_cal = calib.images[:256].to(device), calib.labels[:256].to(device)

    def backward(m, _step):  # Taylor needs gradients on the model being pruned
        m.zero_grad()
        F.cross_entropy(m(x_cal), y_cal).backward()

    t0 = time.perf_counter()
    res = prune_model(model, x_cal[:1], importance, target_macs_reduction=target, round_to=None, progress=False,
                      scores=scores.scores or None, before_step=backward if needs_gradients(crit) else None)
    return res, scores.seconds, time.perf_counter() - t0


def run_cell(key: str, model_name: str, teacher, base_acc: float, variant: Variant, target: float, seed: int,
             data, budget: Budget, device: str) -> dict:
    """One table cell. Fine-tuning: the default run's FinetuneConfig (KD) with the budget's epochs."""
    from edgeprune.config import FinetuneConfig
    from edgeprune.finetune import evaluate, finetune, recalibrate_bn

    train, val, test = data
    pr, score_s, prune_s = prune_with(teacher, variant, target, calibration(train, seed, budget.calib), seed, device)
    recalibrate_bn(pr.model, train, device=device)  # as the pipeline does after every prune
    acc_pruned = evaluate(pr.model, test, device=device)
    ft_train = train if budget.train_limit is None else train.subset(range(budget.train_limit))
    cfg = FinetuneConfig(epochs=budget.finetune_epochs, seed=seed)
    ft = finetune(pr.model, teacher, ft_train, val, cfg, ckpt_dir=CACHE / "ckpt" / budget.tag() / key,
                  device=device, progress=False)
    top1 = evaluate(ft.model, test, device=device)
    return {"key": key, "model": model_name, "criterion": variant.criterion, "variant": variant.label,
            "score_options": dict(variant.options), "target_macs_reduction": target, "seed": seed,
            "top1": top1, "baseline_top1": base_acc, "drop_pt": 100 * (base_acc - top1),
            "top1_before_finetune": acc_pruned, "macs_reduction": pr.macs_reduction,
            "params_reduction": pr.params_reduction, "scoring_s": score_s, "prune_s": prune_s,
            "finetune_s": ft.seconds, "finetune_epochs": ft.epochs_run, "best_val": ft.best_val_acc,
            "finetune_config": cfg.model_dump(), "budget": budget.tag(),
            "device": device, "test_images": len(test), "finetune_images": len(ft_train)}


# ----------------------------------------------------------------------------- table


def _ms(vals: list[float], fmt: str) -> str:
    if not vals:
        return "-"
    m, sd = mean_sd(vals)
    return f"{format(m, fmt)} ± {format(sd, fmt)}"


def _label(c: dict) -> str:
    return c.get("variant", c["criterion"])


def _order(cells: list[dict], wanted: list[str]) -> list[str]:
    present = {_label(c) for c in cells}
    return [v for v in wanted if v in present] + sorted(present - set(wanted))


def table(cells: list[dict], title: str, header: list[str], wanted: list[str], compare: str) -> str:
    lines = [f"# {title}", "", *header, f"Cells: {len(cells)} (top-1 on the Fashion-MNIST test set, mean ± sd over seeds)",
             ""]
    for model in sorted({c["model"] for c in cells}):
        rows = [c for c in cells if c["model"] == model]
        base = rows[0]["baseline_top1"]
        lines += [f"## {model} (unpruned top-1 {100 * base:.2f} %)", "",
                  "| target | criterion | seeds | top-1 % | drop pt | before FT % | MACs x | scoring s |",
                  "|---|---|---|---|---|---|---|---|"]
        for tgt in sorted({c["target_macs_reduction"] for c in rows}):
            for label in _order(rows, wanted):
                cs = [c for c in rows if c["target_macs_reduction"] == tgt and _label(c) == label]
                if not cs:
                    continue
                pick = lambda k, s=1.0: [s * c[k] for c in cs]  # noqa: E731
                lines.append(f"| {tgt:g}x | {label} | {len(cs)} | {_ms(pick('top1', 100), '.2f')} | "
                             f"{_ms(pick('drop_pt'), '.2f')} | {_ms(pick('top1_before_finetune', 100), '.1f')} | "
                             f"{_ms(pick('macs_reduction'), '.2f')} | {_ms(pick('scoring_s'), '.2f')} |")
        lines += [""] + paired_table(rows) + [""] + goals(rows, compare) + [""]
    return "\n".join(lines + summary(cells))


def summary(cells: list[dict]) -> list[str]:
    """Every SAE variant over all (model, target) cells: the mean of its per-cell paired differences to the
    best non-SAE criterion and to random, and in how many cells it is >= the best non-SAE."""
    per: dict[str, list[tuple[dict | None, dict | None]]] = {}
    for model in sorted({c["model"] for c in cells}):
        rows = [c for c in cells if c["model"] == model]
        for tgt in sorted({c["target_macs_reduction"] for c in rows}):
            best = best_baseline(rows, tgt)
            for label in _order([c for c in rows if "sae" in c["criterion"]], []):
                mine = _by_seed(rows, label, tgt)
                if mine:
                    per.setdefault(label, []).append(
                        (paired_diff(mine, _by_seed(rows, best, tgt)) if best else None,
                         paired_diff(mine, _by_seed(rows, "random", tgt))))
    if not per:
        return []
    out = ["## Summary over models and targets", "",
           "| SAE variant | cells | mean paired vs best non-SAE (pt) | cells >= best non-SAE | mean paired vs random (pt) |",
           "|---|---|---|---|---|"]
    for label, ds in sorted(per.items(), key=lambda kv: -mean_sd([d["mean"] for d, _ in kv[1] if d])[0]
                            if any(d for d, _ in kv[1]) else 0.0):
        vb = [d["mean"] for d, _ in ds if d]
        vr = [r["mean"] for _, r in ds if r]
        out.append(f"| {label} | {len(ds)} | {_fmt_mean(vb)} | {sum(v >= 0 for v in vb)}/{len(vb)} | {_fmt_mean(vr)} |")
    return out + [""]


def _fmt_mean(vals: list[float]) -> str:
    return f"{mean_sd(vals)[0]:+.2f}" if vals else "-"


def _by_seed(rows: list[dict], label: str, tgt: float) -> dict[int, float]:
    return {c["seed"]: 100 * c["top1"] for c in rows if _label(c) == label and c["target_macs_reduction"] == tgt}


def best_baseline(rows: list[dict], tgt: float) -> Optional[str]:
    """The non-SAE, non-random criterion with the best mean top-1 at ``tgt``."""
    cands = {_label(c) for c in rows if c["target_macs_reduction"] == tgt
             and "sae" not in c["criterion"] and c["criterion"] != "random"}
    means = {lab: mean_sd(_by_seed(rows, lab, tgt).values())[0] for lab in cands}
    return max(means, key=means.get) if means else None


def _fmt_d(d: Optional[dict]) -> str:
    return "-" if d is None else f"{d['mean']:+.2f} ± {d['sd']:.2f} (n={d['n']})"


def paired_table(rows: list[dict]) -> list[str]:
    """Per-seed paired top-1 differences (pt) of every SAE variant to the best non-SAE criterion and to random."""
    out = ["Paired differences (top-1 pt, same seed = same calibration sample and fine-tuning seed; mean ± sd over seeds):",
           "", "| target | SAE variant | best non-SAE | vs best non-SAE | vs random |", "|---|---|---|---|---|"]
    for tgt in sorted({c["target_macs_reduction"] for c in rows}):
        best = best_baseline(rows, tgt)
        rand = "random" if any(_label(c) == "random" for c in rows) else None
        for label in _order([c for c in rows if "sae" in c["criterion"]], []):
            mine = _by_seed(rows, label, tgt)
            if not mine:
                continue
            d_best = paired_diff(mine, _by_seed(rows, best, tgt)) if best else None
            d_rand = paired_diff(mine, _by_seed(rows, rand, tgt)) if rand else None
            out.append(f"| {tgt:g}x | {label} | {best or '-'} | {_fmt_d(d_best)} | {_fmt_d(d_rand)} |")
    return out


MAX_DROP_2X = 0.5  # pt, issue 12: 2x MACs with the default fine-tuning


def goal_checks(rows: list[dict], compare: str) -> list[tuple[str, Optional[bool]]]:
    """The issue's goals for ``compare`` in every target of one model: (text, met); met is None when
    the cells cannot judge it (a spread needs two seeds)."""
    out = []
    for tgt in sorted({c["target_macs_reduction"] for c in rows}):
        mine = _by_seed(rows, compare, tgt)
        if not mine:
            continue
        best = best_baseline(rows, tgt)
        if best:
            d = paired_diff(mine, _by_seed(rows, best, tgt))
            if d:
                out.append((f"{tgt:g}x: {compare} >= best non-SAE ({best}): paired {_fmt_d(d)} pt", d["mean"] >= 0))
                if d["n"] < 2:
                    out[-1] = (out[-1][0] + " (one seed: the sd is not estimated)", out[-1][1])
        rand = _by_seed(rows, "random", tgt)
        d = paired_diff(mine, rand)
        if d:
            sd = max(d["sd"], mean_sd([mine[s] for s in d["seeds"]])[1], mean_sd([rand[s] for s in d["seeds"]])[1])
            text = (f"{tgt:g}x: {compare} > random by more than the seed sd ({sd:.2f} pt, the largest of either "
                    f"criterion's and the paired sd): paired {_fmt_d(d)} pt")
            if d["n"] < 2:  # one seed: no sd to exceed
                out.append((text + " (one seed: the sd is not estimated)", None))
            else:
                out.append((text, d["mean"] > sd))
        if tgt == 2.0:
            drop = mean_sd([c["drop_pt"] for c in rows if _label(c) == compare and c["target_macs_reduction"] == tgt])[0]
            out.append((f"2x: {compare} drop {drop:.2f} pt <= {MAX_DROP_2X} pt", drop <= MAX_DROP_2X))
    return out


def goals(rows: list[dict], compare: str) -> list[str]:
    """The goal lines of one model; every line says met or NOT met."""
    checks = goal_checks(rows, compare)
    if not checks:
        return [f"Goals: no cells of {compare} yet."]
    verdict = {True: "met", False: "NOT met", None: "not judged"}
    return ["Goals (issue 12):", ""] + [f"- {text}: {verdict[ok]}" for text, ok in checks]


def machine() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{platform.node()} {platform.processor() or platform.machine()}, {dev}, torch {torch.__version__}"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="< 15 min: vgg, 4 criteria, 2x, seed 0, short budget")
    mode.add_argument("--screen", action="store_true",
                      help=f"cheap proxy for choosing among SAE variants: {SCREEN.finetune_epochs:g} epoch of KD on "
                           f"{SCREEN.train_limit} images, 2x, seeds 0,1,2, all models; writes pruning_screen.md")
    ap.add_argument("--models", default=None, help=f"comma list of {','.join(MODELS)}")
    ap.add_argument("--criteria", default=None,
                    help="comma list of registered criteria, each optionally with score options in brackets, "
                         f"e.g. 'sae-mi[quantization=percentile],l1' (default {','.join(CRITERIA)})")
    ap.add_argument("--compare", default=None, help="the criterion whose goals are checked (default: the config's)")
    ap.add_argument("--targets", default=None, help="comma list of MACs reductions (default 2,3; --screen 2)")
    ap.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    ap.add_argument("--finetune-epochs", type=float, default=None,
                    help=f"KD epochs for every cell (default {FULL.finetune_epochs:g}, the default run's; "
                         f"--screen {SCREEN.finetune_epochs:g})")
    ap.add_argument("--train-limit", type=int, default=None, help="fine-tuning images (default: all; --screen "
                                                                 f"{SCREEN.train_limit})")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the cells of this budget; run nothing")
    return ap.parse_args(argv)


def plan(args) -> tuple[list[str], list[Variant], list[float], list[int], Budget]:
    split = lambda s, d: d if s is None else [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    models, targets, seeds, budget = list(MODELS), ["2", "3"], ["0", "1", "2"], FULL
    crits = list(CRITERIA)
    if args.quick:
        models, crits, targets, seeds, budget = ["vgg"], ["sae-mi", "mi", "l1", "random"], ["2"], ["0"], QUICK
    elif args.screen:
        targets, budget = ["2"], SCREEN
    from edgeprune.errors import EdgePruneError

    models = split(args.models, models)
    bad = [m for m in models if m not in MODELS]
    if bad:
        sys.exit(f"unknown model(s) {bad}; valid: {list(MODELS)}")
    try:
        variants = [parse_variant(t) for t in (split_top(args.criteria) if args.criteria else crits)]
    except (EdgePruneError, ValueError) as exc:  # unknown name (ConfigError) or bad option (pydantic, a ValueError)
        sys.exit(f"--criteria: {exc}")
    if args.finetune_epochs is not None or args.train_limit is not None:
        budget = replace(budget, finetune_epochs=budget.finetune_epochs if args.finetune_epochs is None
                         else args.finetune_epochs, train_limit=args.train_limit or budget.train_limit)
    targets = [float(t) for t in split(args.targets, targets)]
    return models, variants, targets, [int(s) for s in split(args.seeds, seeds)], budget


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    models, variants, targets, seeds, budget = plan(args)
    compare = args.compare or default_variant().label
    name = "pruning_quality_quick" if args.quick else "pruning_screen" if args.screen else "pruning_quality"
    cell_dir = RESULTS / name / budget.tag()
    cell_dir.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        write_table(cell_dir, name, budget, [v.label for v in variants], compare, argv)
        return
    print(f"cells in {cell_dir}; {len(models) * len(variants) * len(targets) * len(seeds)} planned", flush=True)
    data = load_data(budget)
    for model_name in models:
        teacher, base_acc = baseline(model_name, *data, budget, device, args.quick)
        print(f"{model_name}: baseline top-1 {base_acc:.4f}", flush=True)
        # seeds outermost: a partial run still holds complete tables for the first seeds
        for seed in seeds:
            for target in targets:
                for v in variants:
                    key = f"{model_name}-{v.slug}-{target:g}x-s{seed}"
                    path = cell_dir / f"{key}.json"
                    if path.is_file():
                        continue
                    t0 = time.perf_counter()
                    cell = run_cell(key, model_name, teacher, base_acc, v, target, seed, data, budget, device)
                    cell["cell_s"] = time.perf_counter() - t0
                    write_atomic(path, json.dumps(cell, indent=1))
                    print(f"{key}: top-1 {cell['top1']:.4f} (drop {cell['drop_pt']:.2f} pt, MACs "
                          f"{cell['macs_reduction']:.2f}x, scoring {cell['scoring_s']:.2f} s, cell {cell['cell_s']:.0f} s)",
                          flush=True)
                    write_table(cell_dir, name, budget, [v.label for v in variants], compare, argv)
    write_table(cell_dir, name, budget, [v.label for v in variants], compare, argv)


def write_atomic(path: Path, text: str) -> None:
    """Temp file named after this process, then rename: processes filling the table side by side (one
    per model, or two on the same cell) never see or leave a half-written file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_table(cell_dir: Path, name: str, budget: Budget, wanted: list[str], compare: str, argv=None) -> None:
    cells = [json.loads(p.read_text()) for p in sorted(cell_dir.glob("*.json"))]
    cmd = "python benchmarks/pruning_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    title = {"pruning_quality_quick": "Pruning quality on Fashion-MNIST (--quick: short budget, not the committed table)",
             "pruning_screen": "Pruning-quality screen (cheap proxy for choosing among SAE variants)"}.get(
        name, "Pruning quality on Fashion-MNIST")
    header = [(f"Last command: `{cmd.strip()}` (every cell of this table has the same budget; several processes may "
               "fill it side by side)  "), f"Machine: {machine()}  ",
              (f"Fine-tuning budget `{budget.tag()}`: {budget.finetune_epochs:g} epoch(s) of KD (the default run's "
               f"FinetuneConfig otherwise) on {budget.train_limit or 'all'} train images; calibration "
               f"{budget.calib} images; cells in `{cell_dir.relative_to(HERE.parent)}`  "),
              f"Goals checked for `{compare}`."]
    write_atomic(RESULTS / f"{name}.md", table(cells, title, header, wanted, compare))
    if cells:
        plot(cells, RESULTS / f"{name}.png", compare)


def plot(cells: list[dict], path: Path, compare: str) -> None:
    """Top-1 after fine-tuning per criterion (mean, sd bars), one panel per model and target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(c["model"], c["target_macs_reduction"]) for c in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (model, tgt) in zip(axes[0], panels):
        rows = [c for c in cells if c["model"] == model and c["target_macs_reduction"] == tgt]
        labels = _order(rows, [])
        vals = [[100 * c["top1"] for c in rows if _label(c) == k] for k in labels]
        stats = [mean_sd(v) for v in vals]
        means, sds = [m for m, _ in stats], [s for _, s in stats]
        colors = ["tab:red" if k == compare else "tab:orange" if "sae" in k else "tab:gray" for k in labels]
        ax.bar(range(len(labels)), means, yerr=sds, color=colors, capsize=3)
        ax.axhline(100 * rows[0]["baseline_top1"], color="black", lw=1, ls="--", label="unpruned")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
        lo = min(m - s for m, s in zip(means, sds))
        ax.set_ylim(max(0.0, lo - 1.0), 100 * rows[0]["baseline_top1"] + 0.5)
        ax.set_title(f"{model}, {tgt:g}x MACs (n={max(len(v) for v in vals)} seeds)", fontsize=9)
        ax.set_ylabel("top-1 % after fine-tuning")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(f".{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()

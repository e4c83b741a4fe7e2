"""Benchmark of the paper's claims for the scoring criteria on Fashion-MNIST models.

Measures, in one run, for every criterion given (registered names, score options in brackets as in
benchmarks/pruning_quality.py, e.g. ``mi[batch_size=100]``):

- seconds per calibration size N, every criterion timed the same way: one untimed warm-up each, then
  ``--repeats`` rounds, each round running every (criterion, N) once, interleaved; the median is
  reported, with torch threads and the load average before / after each model;
- the headline: the config's default criterion against the batched ``mi`` at N = 512 (time ratio),
  and ``mi-full`` (the whole-set estimator) as a secondary row when registered;
- stability: Jaccard overlap of the channels a per-layer pruning at ``--stab-ratio`` removes, between
  two disjoint calibration samples, mean ± sd over ``--stab-pairs`` disjoint pairs (plus Spearman);
- noise robustness (Spearman clean vs Gaussian noise) and one-shot accuracy after removing 25 % / 50 %
  of each layer's filters (BN re-estimated, no fine-tuning);
- a diagnostic per layer: Spearman of each criterion's scores with the filter L1 norm and with the
  channel tail ratio (max / mean of the positive activations over the calibration sample).

Writes ``benchmarks/results/scoring{,_quick}{,_TAG}.md`` and ``.json``.

    python benchmarks/scoring.py --quick      # a few minutes on 1 core
    python benchmarks/scoring.py              # full: 3 models, N up to 1024, 5 pairs of N = 512
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_stats import jaccard, mean_sd, pruned_set  # noqa: E402
from pruning_quality import Variant, default_variant, parse_variant, score_kwargs, split_top  # noqa: E402

from edgeprune.config import ModelConfig, Preprocessing  # noqa: E402
from edgeprune.data import TensorData, load_fashion_mnist  # noqa: E402
from edgeprune.errors import EdgePruneError  # noqa: E402
from edgeprune.models import BUNDLED_WEIGHTS, build_model, save_safetensors  # noqa: E402
from edgeprune.scoring import CRITERIA, find_taps, iterate_maps, make_importance, needs_gradients, score_model  # noqa: E402

RESULTS = HERE / "results"
CACHE = RESULTS / "cache"
WEIGHTS_ONLY = {"l1", "l2", "bn-scale", "fpgm"}  # identical ranking on any sample
CUBIC = {"mi-full", "sae-kernel-mi"}  # an N x N eigendecomposition per filter: not timed at the largest N
PQ_BASELINES = {"fmnist_resnet": ("resnet", 15.0), "fmnist_mobilenet": ("mobilenet", 3.0)}


# ----------------------------------------------------------------------------- models and data


def _train(model: nn.Module, data: TensorData, *, epochs: int, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * ((len(data) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for i in range(0, len(data), 128):
            idx = perm[i: i + 128]
            loss = nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def get_model(arch: str, *, train: TensorData, epochs: int) -> tuple[nn.Module, str]:
    """The bundled weights for fmnist_cnn, the committed pruning-quality baseline for the others, else a
    cached short training run."""
    from safetensors.torch import load_file

    model = build_model(ModelConfig(arch=f"edgeprune.zoo:{arch}", weights=None), 1)
    if arch == "fmnist_cnn" and BUNDLED_WEIGHTS.is_file():
        model.load_state_dict(load_file(str(BUNDLED_WEIGHTS)))
        return model.eval(), f"bundled {BUNDLED_WEIGHTS.name}"
    if arch in PQ_BASELINES:
        _, ep = PQ_BASELINES[arch]
        path = RESULTS / "baselines" / f"{arch}-e{ep:g}.safetensors"
        if path.is_file():
            model.load_state_dict(load_file(str(path)))
            return model.eval(), f"committed baseline {path.name}"
    path = CACHE / f"{arch}_{len(train)}x{epochs}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
    else:
        torch.manual_seed(0)
        _train(model, train, epochs=epochs)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_safetensors(model, path)
    return model.eval(), f"trained here: {len(train)} images x {epochs} epochs (cached {path.name})"


def accuracy(model: nn.Module, data: TensorData) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(1) for x, _ in data.batches(500)])
    return float((pred == data.labels).float().mean())


def reestimate_bn(model: nn.Module, calib: TensorData) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for x, _ in calib.batches(128):
            model(x)
    model.eval()


# ----------------------------------------------------------------------------- measurements


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def spearman(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Mean over layers of the per-layer Spearman correlation (layers constant in either are skipped)."""
    vals = [v for k in a if k in b for v in [_spearman(a[k], b[k])] if not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def scores_of(model, data, v: Variant, **kw):
    return score_model(model, data, criterion=v.criterion, num_classes=10, **{**score_kwargs(v), **kw,
                                                                              "progress": False})


def timings(model, train, perm, variants, sizes, repeats, skip) -> dict[str, dict[int, list[float]]]:
    """Seconds per (criterion, N) over ``repeats`` rounds, every round running all of them interleaved,
    after one untimed warm-up run of each criterion at the smallest N."""
    subsets = {n: train.subset(perm[:n]) for n in sizes}
    for v in variants:
        scores_of(model, subsets[sizes[0]], v)
    out: dict[str, dict[int, list[float]]] = {v.label: {n: [] for n in sizes if (v.criterion, n) not in skip}
                                              for v in variants}
    for r in range(repeats):
        for n in sizes:
            for v in variants:
                if (v.criterion, n) not in skip:
                    out[v.label][n].append(scores_of(model, subsets[n], v).seconds)
        print(f"  timing round {r + 1}/{repeats} done", flush=True)
    return out


def stability(model, train, perm, variants, n, pairs, ratio) -> tuple[dict, dict]:
    """Per criterion: Jaccard of the pruned sets and Spearman of the scores between the two disjoint
    samples of each pair (pair p: images perm[2pn:(2p+1)n] and perm[(2p+1)n:(2p+2)n]); also the scores of
    the first sample of pair 0 (for the diagnostic). ``random`` draws fresh scores: the chance level."""
    if len(perm) < 2 * pairs * n:
        raise ValueError(f"stability needs {2 * pairs * n} train images, have {len(perm)}")
    convs = dict(model.named_modules())
    channels = {k: convs[k].out_channels for k in find_taps(model, train.images[:2])}
    g = torch.Generator().manual_seed(7)
    res, first = {}, {}
    for v in variants:
        jac, rho = [], []
        for p in range(pairs):
            a, b = (train.subset(perm[(2 * p + k) * n: (2 * p + k + 1) * n]) for k in (0, 1))
            if v.criterion == "random":
                sa, sb = ({k: torch.rand(c, generator=g) for k, c in channels.items()} for _ in range(2))
            else:
                sa, sb = scores_of(model, a, v).scores, scores_of(model, b, v).scores
                first.setdefault(v.label, sa)
            jac.append(jaccard(pruned_set(sa, ratio), pruned_set(sb, ratio)))
            rho.append(spearman(sa, sb))
        res[v.label] = {"jaccard": jac, "spearman": rho}
        print(f"  stability {v.label}: Jaccard {mean_sd(jac)[0]:.3f} ± {mean_sd(jac)[1]:.3f}", flush=True)
    return res, first


def channel_stats(model, data: TensorData) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per conv: filter L1 norm (C_out,) and the tail ratio of its tapped map (C_out,): the max over the
    sample of the positive activations divided by their mean (nan for a channel never positive)."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    taps = find_taps(model, data.images[:2])
    l1 = {n: convs[n].weight.detach().abs().flatten(1).sum(1) for n in taps}
    mx, tot, cnt = {}, {}, {}
    for _, maps, _ in iterate_maps(model, taps, data.images, batch_size=128, device="cpu"):
        for n, m in maps.items():  # m: (B, C, H, W)
            pos = m.clamp(min=0).transpose(0, 1).flatten(1)  # (C, B*H*W)
            mx[n] = torch.maximum(mx.get(n, torch.zeros(len(pos))), pos.max(1).values)
            tot[n] = tot.get(n, 0) + pos.sum(1)
            cnt[n] = cnt.get(n, 0) + (pos > 0).sum(1)
    tail = {n: mx[n] / (tot[n] / cnt[n].clamp(min=1)).where(cnt[n] > 0, torch.tensor(float("nan"))) for n in mx}
    return l1, tail


def diagnostic(model, data, first_scores: dict[str, dict[str, torch.Tensor]]) -> dict:
    """layer -> criterion -> {"l1": rho, "tail": rho}, from the scores of the same sample."""
    l1, tail = channel_stats(model, data)
    out = {}
    for layer in l1:
        row = {}
        for label, scores in first_scores.items():
            if layer in scores:
                t = tail[layer]
                ok = ~torch.isnan(t)
                row[label] = {"l1": _spearman(scores[layer], l1[layer]),
                              "tail": _spearman(scores[layer][ok], t[ok]) if ok.sum() > 2 else float("nan")}
        out[layer] = {"channels": len(l1[layer]), "criteria": row}
    return out


def one_shot(model, v: Variant, calib, test, ratio) -> float:
    import torch_pruning as tp

    m = copy.deepcopy(model)
    crit = CRITERIA.get(v.criterion)
    scores = scores_of(m, calib, v) if crit.needs_data else None
    imp = make_importance(v.criterion, scores)
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(m, calib.images[:2], importance=imp, pruning_ratio=ratio, ignored_layers=[last])
    if needs_gradients(v.criterion):
        nn.functional.cross_entropy(m(calib.images), calib.labels).backward()
    torch.manual_seed(0)
    pruner.step()
    m.zero_grad(set_to_none=True)
    reestimate_bn(m, calib)
    return accuracy(m, test)


def bench_model(model, train, test, *, variants, sizes, repeats, skip, stab_n, pairs, ratio) -> dict:
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(train), generator=g)
    active = [v for v in variants if CRITERIA.get(v.criterion).needs_data]
    res: dict = {"load_before": os.getloadavg(), "seconds": timings(model, train, perm, active, sizes, repeats, skip)}
    ranked = [v for v in variants if v in active or v.criterion == "random"]
    res["stability"], first = stability(model, train, perm, ranked, stab_n, pairs, ratio)
    s1 = train.subset(perm[:stab_n])
    res["diagnostic"] = diagnostic(model, s1, first)
    res["noise"] = {}
    for v in active:
        base = first[v.label]
        res["noise"][v.label] = {}
        for sigma in (0.1, 0.3):
            noisy = TensorData(s1.images + sigma * torch.randn(s1.images.shape, generator=g), s1.labels,
                               s1.classes, "noisy")
            res["noise"][v.label][sigma] = spearman(base, scores_of(model, noisy, v).scores)
    res["one_shot"] = {}
    for v in variants:
        res["one_shot"][v.label] = {r: one_shot(model, v, s1, test, r) for r in (0.25, 0.5)}
        print(f"  one-shot {v.label}: {res['one_shot'][v.label]}", flush=True)
    res["load_after"] = os.getloadavg()
    return res


# ----------------------------------------------------------------------------- report


def _fmt(v, nd=3):
    return "-" if v is None or math.isnan(v) else f"{v:.{nd}f}"


def _pm(vals, nd=3) -> str:
    m, s = mean_sd(vals)
    return "-" if math.isnan(m) else f"{m:.{nd}f} ± {s:.{nd}f}"


def _median(seconds: dict, n: int):
    vals = seconds.get(n) or seconds.get(str(n))
    return statistics.median(vals) if vals else None


def _ratio(r: dict, num: str, den: str, n: int) -> tuple[float | None, list[float]]:
    """Median-time ratio num / den at N = n, and the per-round ratios (the rounds are interleaved)."""
    a, b = r["seconds"].get(num, {}), r["seconds"].get(den, {})
    ta, tb = a.get(n) or a.get(str(n)), b.get(n) or b.get(str(n))
    if not ta or not tb:
        return None, []
    return statistics.median(ta) / statistics.median(tb), [x / y for x, y in zip(ta, tb)]


def headline(all_res: dict, meta: dict) -> list[str]:
    d, at = meta["default"], meta["at"]
    lines = [f"## Headline: default `{d}` against the batched `mi` at N = {at}", "",
             f"| model | baseline | baseline s / {d} s (median of {meta['repeats']} interleaved rounds) "
             f"| per-round ratio | Jaccard pruned set {d} | Jaccard pruned set baseline |", "|---|---|---|---|---|---|"]
    for arch, r in all_res.items():
        for base in ("mi", "mi-full"):
            if base not in r["seconds"] or d not in r["seconds"]:
                continue
            ratio, per = _ratio(r, base, d, at)
            stab = r["stability"]
            lines.append(f"| {arch} | {base} | {_fmt(ratio, 1)} | {_pm(per, 1)} | "
                         f"{_pm(stab.get(d, {}).get('jaccard', []))} | {_pm(stab.get(base, {}).get('jaccard', []))} |")
    return lines + ["", f"Jaccard: overlap of the channels removed by a per-layer {meta['ratio']:.0%} pruning, between two "
                    f"disjoint samples of N = {meta['stab_n']}, mean ± sd over {meta['pairs']} disjoint pairs.", ""]


def model_table(arch: str, r: dict, meta: dict) -> list[str]:
    sizes, at = meta["sizes"], meta["at"]
    lines = [f"## {arch} ({r['source']}; unpruned accuracy {r['base_acc']:.4f}; load average (1 min) "
             f"{r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f} on {os.cpu_count()} cores)", "",
             "| criterion | " + " | ".join(f"s @N={n}" for n in sizes) + f" | mi / crit @N={at} "
             f"| time x for N x{sizes[-1] // sizes[0]} | Jaccard pruned {meta['ratio']:.0%} | Spearman "
             "| noise 0.1 | noise 0.3 | acc -25% | acc -50% |", "|" + "---|" * (len(sizes) + 9)]
    for c in meta["criteria"]:
        t = r["seconds"].get(c, {})
        ratio, _ = _ratio(r, "mi", c, at)
        lo, hi = _median(t, sizes[0]), _median(t, sizes[-1])
        growth = hi / lo if hi and lo else None
        stab, noise, os_ = r["stability"].get(c), r["noise"].get(c, {}), r["one_shot"].get(c, {})
        w = meta["criterion_of"][c] in WEIGHTS_ONLY
        same = "1 (weights only)"
        lines.append(f"| {c} | " + " | ".join(_fmt(_median(t, n), 2) for n in sizes) + f" | {_fmt(ratio, 1)} | "
                     f"{_fmt(growth, 1)} | {same if w else _pm(stab['jaccard']) if stab else '-'} | "
                     f"{same if w else _pm(stab['spearman']) if stab else '-'} | "
                     f"{same if w else _fmt(noise.get(0.1))} | {same if w else _fmt(noise.get(0.3))} | "
                     f"{_fmt(os_.get(0.25), 4)} | {_fmt(os_.get(0.5), 4)} |")
    return lines + [""]


def diagnostic_table(arch: str, diag: dict) -> list[str]:
    crits = list(next(iter(diag.values()))["criteria"]) if diag else []
    lines = [f"### {arch}: Spearman with filter L1 / with the channel tail ratio, per layer", "",
             "| layer | C | " + " | ".join(crits) + " |", "|---|---|" + "---|" * len(crits)]
    for layer, row in diag.items():
        cells = [f"{_fmt(row['criteria'][c]['l1'], 2)} / {_fmt(row['criteria'][c]['tail'], 2)}" for c in crits]
        lines.append(f"| {layer} | {row['channels']} | " + " | ".join(cells) + " |")
    means = []
    for c in crits:
        l1 = [row["criteria"][c]["l1"] for row in diag.values() if not math.isnan(row["criteria"][c]["l1"])]
        tl = [row["criteria"][c]["tail"] for row in diag.values() if not math.isnan(row["criteria"][c]["tail"])]
        means.append(f"{_fmt(mean_sd(l1)[0], 2)} / {_fmt(mean_sd(tl)[0], 2)}")
    return lines + ["| mean | | " + " | ".join(means) + " |", ""]


def markdown(all_res: dict, meta: dict) -> str:
    lines = [f"# Scoring benchmark ({'quick' if meta['quick'] else 'full'})", "",
             f"Command: `{meta['command']}`; {meta['threads']} torch thread(s); calibration from the Fashion-MNIST "
             f"train split, accuracy on {meta['test_n']} test images; wall {meta['wall_s'] / 60:.1f} min.", ""]
    lines += headline(all_res, meta)
    for arch, r in all_res.items():
        lines += model_table(arch, r, meta)
    lines += ["Seconds: median of the interleaved rounds, forward passes over the calibration images included "
              "(`-`: not timed; criteria with an N x N eigendecomposition per filter stop before the largest N). "
              "Weights-only criteria (l1, l2, bn-scale, fpgm) rank identically on any sample; `random` draws fresh "
              "scores for each sample (the chance level of the overlap); taylor's stability is not measured. "
              "One-shot: each layer loses 25% / 50% of its filters (torch-pruning MetaPruner, local ranking, "
              "classifier kept), BN statistics re-estimated on the calibration sample, no fine-tuning.", "",
              "## Diagnostic", "",
              "Per layer, on the first stability sample: Spearman of each criterion's scores with the filter L1 norm "
              "and with the channel tail ratio (max / mean of the positive activations of the tapped map).", ""]
    for arch, r in all_res.items():
        lines += diagnostic_table(arch, r["diagnostic"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes: fmnist_cnn, N 128 and 512, pairs of 128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--archs", default=None, help="comma-separated zoo models")
    ap.add_argument("--criteria", default=None, help="registered criteria, score options in brackets, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    ap.add_argument("--stab-n", type=int, default=None, help="images per stability sample (default 512; quick 128)")
    ap.add_argument("--stab-pairs", type=int, default=5, help="disjoint sample pairs (>= 5 for the issue)")
    ap.add_argument("--stab-ratio", type=float, default=0.25, help="per-layer pruning ratio of the pruned-set overlap")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    return ap.parse_args(argv)


def default_criteria() -> list[str]:
    """The default criterion, the MI baselines, every registered SAE variant, the data-free ones, random."""
    d = default_variant().label
    sae = sorted(n for n in CRITERIA.names() if "sae" in n and n != "sae-kernel-mi")
    names = [d, "mi", "mi-full", *sae, "sae-kernel-mi", "l1", "l2", "bn-scale", "fpgm", "taylor", "random"]
    return list(dict.fromkeys(n for n in names if n in CRITERIA or n == d))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quick = args.quick
    try:
        variants = [parse_variant(t) for t in (split_top(args.criteria) if args.criteria else default_criteria())]
    except (EdgePruneError, ValueError) as exc:  # unknown name (ConfigError) or bad option (pydantic, a ValueError)
        sys.exit(f"--criteria: {exc}")
    if quick and not args.criteria:
        variants = [v for v in variants if v.criterion not in {"sae-kernel-mi", "l2", "fpgm"}]
    sizes = [128, 512] if quick else [128, 256, 512, 1024]
    stab_n = args.stab_n or (128 if quick else 512)
    skip = {(c, sizes[-1]) for c in CUBIC} if not quick else {("sae-kernel-mi", 512)}
    archs = (args.archs or ("fmnist_cnn" if quick else "fmnist_cnn,fmnist_resnet,fmnist_mobilenet")).split(",")
    pre = Preprocessing()
    train = load_fashion_mnist(None, "train", pre, limit=12000 if quick else 60000)
    test = load_fashion_mnist(None, "eval", pre, limit=1000 if quick else 10000)
    all_res, t0 = {}, time.time()
    for arch in archs:
        model, source = get_model(arch, train=train, epochs=1 if quick else 2)
        print(f"{arch}: {source}", flush=True)
        r = bench_model(model, train, test, variants=variants, sizes=sizes, repeats=args.repeats, skip=skip,
                        stab_n=stab_n, pairs=args.stab_pairs, ratio=args.stab_ratio)
        r.update(source=source, base_acc=accuracy(model, test))
        all_res[arch] = r
    meta = {"quick": quick, "sizes": sizes, "at": 512 if 512 in sizes else sizes[-1], "stab_n": stab_n,
            "pairs": args.stab_pairs, "ratio": args.stab_ratio, "repeats": args.repeats,
            "criteria": [v.label for v in variants], "criterion_of": {v.label: v.criterion for v in variants},
            "default": default_variant().label,
            "threads": torch.get_num_threads(), "test_n": len(test), "wall_s": time.time() - t0,
            "command": "python benchmarks/scoring.py " + shlex.join(sys.argv[1:] if argv is None else argv)}
    stem = "scoring" + ("_quick" if quick else "") + (f"_{args.tag}" if args.tag else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": all_res}, indent=1, default=str))
    (RESULTS / f"{stem}.md").write_text(markdown(all_res, meta))
    print(markdown(all_res, meta))


if __name__ == "__main__":
    main()

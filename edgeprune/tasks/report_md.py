"""report.md of a task run: what was pruned, the metric before -> after, one row per artifact."""
from __future__ import annotations


def _f(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _parity(p: dict) -> str:
    if "pixel_agreement" in p:
        return f"pixel agreement {p['pixel_agreement']:.4f}"
    return f"{p['matched']} matched, {p['missing']} missing, {p['extra']} extra"


def _rung(a: dict) -> str:
    lad = a.get("int8_ladder")
    return "-" if not lad else f"{lad['shipped_rung']}: {lad['shipped']} ({len(lad['attempts'])} tried)"


def render(r: dict) -> str:
    m, pr, t = r["primary_metric"], r["prune"], r["torch"]
    lines = [f"# {r['name']}: {r['task']} ({r['model']})", "",
             f"Data: {r['data']['source']} ({r['data']['train']} train / {r['data']['eval']} eval images; "
             f"classes {', '.join(r['data']['classes'])}).", "",
             f"Scoring: {r['score']['criterion']}. Pruning: ratio {pr['ratio']:.3f}, MACs {pr['macs_before']:,} -> "
             f"{pr['macs_after']:,} ({pr['macs_reduction']:.2f}x, {pr['macs_of']}); params {pr['params_before']:,} -> "
             f"{pr['params_after']:,}.", "",
             f"PyTorch {m}: {_f(t['baseline'][m])} -> {_f(t['pruned'][m])} (drop {t['drop_pt']:.2f} pt, "
             f"{'PASS' if t['passed'] else 'FAIL'}; allowed {r['gate']['max_metric_drop_pt']} pt).", "",
             f"| target | precision | {m} unpruned -> pruned artifact | drop (pt) | parity | p50 baseline ms | p50 pruned ms | speed-up | INT8 rung | gate |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in r["artifacts"]:
        p50 = a.get("latency", {}).get("p50_ms", {})
        before = a.get("baseline", {}).get("metric", {}).get(m)
        lines.append(f"| {a['target']} | {a['precision']} | {_f(before)} -> {_f(a['metric'][m])} | {a['drop_pt']:.2f} | "
                     f"{_parity(a['parity'])} | {_f(p50.get('baseline'), 3)} | {_f(p50.get('pruned'), 3)} | "
                     f"{_f(a.get('latency', {}).get('speedup'), 2)} | {_rung(a)} | {'PASS' if a['passed'] else 'FAIL'} |")
    lines += ["", f"Overall gate: {'PASS' if r['gate']['passed'] else 'FAIL'}. Run time {r['seconds']:.0f} s.", ""]
    lines += _plots(r.get("plots") or [])
    return "\n".join(lines)


def _plots(plots: list[dict]) -> list[str]:
    """Each plot file embedded (paths relative to report.md), or why it is missing."""
    lines = []
    for p in plots:
        lines += [f"![{p['title']}]({p['file']})" if p.get("file") else
                  f"Plot `{p['name']}` ({p['title']}) is missing: {p.get('error', 'not drawn')}.", ""]
    return ["## Plots", ""] + lines if lines else []

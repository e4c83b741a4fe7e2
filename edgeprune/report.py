"""The run report: report.json, report.md and a self-contained report.html.

The HTML embeds its plots as base64 PNG and its CSS inline: it opens from a USB stick on a
machine with no network. Every section renders from whatever the report dict holds and is
left out when its part is missing.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional

from .safety import atomic_write

ARTIFACT_COLUMNS = (
    ("target", "Target"), ("precision", "Precision"), ("device", "Device"), ("size", "Size"),
    ("p50", "p50 ms"), ("p90", "p90 ms"), ("p95", "p95 ms"), ("p99", "p99 ms"), ("minmax", "min/max ms"),
    ("throughput", "img/s"), ("speedup", "Speed-up"), ("accuracy", "Top-1 %"), ("drop", "Drop pt"), ("agreement", "Agree %"),
    ("budget", "Budget"),
)


# ----------------------------------------------------------------------------- cells


def _fmt(v: Any, spec: str = ".3f", scale: float = 1.0) -> str:
    if v is None:
        return "-"
    try:
        return format(float(v) * scale, spec)
    except (TypeError, ValueError):
        return str(v)


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def budget_verdict(a: dict[str, Any]) -> str:
    if a.get("status") == "failed" and not a.get("budget"):
        return "FAIL (" + str(a.get("error", "error")) + ")"
    b = a.get("budget") or {}
    why = [name for name, key in (("accuracy", "accuracy_ok"), ("latency", "latency_ok")) if b.get(key) is False]
    if why:
        return "FAIL: " + ", ".join(why)
    return "pass" if a.get("status", "ok") == "ok" else "FAIL"


def artifact_row(a: dict[str, Any]) -> dict[str, str]:
    lat = a.get("latency_ms") or {}
    parity = a.get("parity") or {}
    return {
        "target": str(a.get("target", "-")), "precision": str(a.get("precision", "-")),
        "device": str(a.get("device", "-")), "size": human_bytes(a.get("size_bytes")),
        "p50": _fmt(lat.get("p50")), "p90": _fmt(lat.get("p90")), "p95": _fmt(lat.get("p95")),
        "p99": _fmt(lat.get("p99")), "minmax": f"{_fmt(lat.get('min'))} / {_fmt(lat.get('max'))}",
        "throughput": _fmt(a.get("throughput"), ".1f"), "accuracy": _fmt(a.get("accuracy"), ".2f", 100),
        "drop": _fmt(a.get("accuracy_drop_pt"), "+.2f"), "agreement": _fmt(parity.get("top1_agreement"), ".2f", 100),
        "speedup": _speedup_cell(a), "budget": budget_verdict(a),
    }


def _speedup_cell(a: dict[str, Any]) -> str:
    return "-" if a.get("speedup") is None else f"{float(a['speedup']):.2f}x"


SPEEDUP_HEADER = ["Target", "Precision", "p50 before ms", "p50 after ms", "Speed-up", "Top-1 before %",
                  "Top-1 after %", "Ship"]


def speedup_rows(report: dict[str, Any]) -> list[list[str]]:
    """The headline, per target and precision: the unpruned model compiled and timed on the same
    target (interleaved with the pruned one) against the pruned artifact; empty when no artifact has
    a baseline."""
    rows = []
    for a in report.get("artifacts", []):
        base = a.get("baseline")
        if not base:
            continue
        after = ((base.get("timing") or {}).get("pruned_latency_ms") or {}).get("p50")
        before = (base.get("latency_ms") or {}).get("p50")
        rows.append([str(a.get("target", "-")), str(a.get("precision", "-")), _fmt(before), _fmt(after),
                     _speedup_cell(a) if not base.get("error") else f"- ({base['error']})",
                     _fmt(base.get("accuracy"), ".2f", 100), _fmt(a.get("accuracy"), ".2f", 100),
                     budget_verdict(a)])
    return rows


def speedup_note(report: dict[str, Any]) -> str:
    timing = next(((a.get("baseline") or {}).get("timing") for a in report.get("artifacts", [])
                   if (a.get("baseline") or {}).get("timing")), None)
    if not timing:
        return ""
    return (f"Before: the unpruned model compiled for the same target, precision and settings; after: the pruned "
            f"artifact. Both p50s come from one measurement, {timing.get('rounds')} rounds alternating baseline "
            f"and pruned ({timing.get('order')}), batch {timing.get('batch_size')}, scope {timing.get('scope')}. "
            "Top-1 on the same eval split.")


def model_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(quantity, before, after) for params, MACs and accuracy."""
    m, acc = report.get("model") or {}, report.get("accuracy") or {}
    rows = []
    if m.get("params_before") is not None:
        rows.append(("Parameters", f"{m['params_before']:,}", f"{m.get('params_after', 0):,}"))
    if m.get("macs_before") is not None:
        red = f" ({m['macs_reduction']:.2f}x fewer)" if m.get("macs_reduction") else ""
        rows.append(("MACs", f"{m['macs_before']:,}", f"{m.get('macs_after', 0):,}{red}"))
    if acc.get("baseline") is not None:
        after = _fmt(acc.get("pruned"), ".2f", 100)
        if acc.get("pruned_before_finetune") is not None:
            after += f" (before fine-tune {_fmt(acc['pruned_before_finetune'], '.2f', 100)})"
        rows.append(("Top-1 % (PyTorch)", _fmt(acc["baseline"], ".2f", 100), after))
    return rows


# ----------------------------------------------------------------------------- terminal


def summary_table(report: dict[str, Any]) -> str:
    """One screen of text: model before/after and one line per artifact."""
    cols = ("target", "precision", "p50", "p99", "throughput", "speedup", "accuracy", "drop", "budget")
    heads = dict(ARTIFACT_COLUMNS)
    rows = [artifact_row(a) for a in report.get("artifacts", [])]
    try:
        return _rich_summary(report, cols, heads, rows)
    except ImportError:
        return _plain_summary(report, cols, heads, rows)


def _rich_summary(report, cols, heads, rows) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(record=True, width=120, force_terminal=False, color_system=None)
    title = (report.get("run") or {}).get("name", "edgeprune run")
    mt = Table(title=f"{title}: model")
    for h in ("", "before", "after"):
        mt.add_column(h)
    for r in model_rows(report):
        mt.add_row(*r)
    at = Table(title="artifacts")
    for c in cols:
        at.add_column(heads[c], justify="left" if c in ("target", "precision", "budget") else "right")
    for r in rows:
        at.add_row(*(r[c] for c in cols), style=None if r["budget"] == "pass" else "red")
    with console.capture() as cap:
        console.print(mt)
        console.print(at)
    return cap.get()


def _plain_summary(report, cols, heads, rows) -> str:
    lines = [f"{q}: {b} -> {a}" for q, b, a in model_rows(report)]
    lines.append(plain_table([heads[c] for c in cols], [[r[c] for c in cols] for r in rows]))
    return "\n".join(lines)


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


# ----------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in esc])


def render_markdown(report: dict[str, Any]) -> str:
    run = report.get("run") or {}
    out = [f"# edgeprune report: {run.get('name', 'run')}", ""]
    out += [f"- {k}: {run[k]}" for k in ("started", "finished", "seconds", "command") if run.get(k) is not None]
    if run.get("stage_seconds"):
        out.append("- seconds per stage: " + ", ".join(f"{k} {v:g}" for k, v in run["stage_seconds"].items()))
    if report.get("model", {}).get("arch"):
        out.append(f"- model: `{report['model']['arch']}`")
    out.append("")
    if model_rows(report):
        out += ["## Model", "", _md_table(["", "before", "after"], [list(r) for r in model_rows(report)]), ""]
    if speedup_rows(report):
        out += ["## Speed-up vs the unpruned model", "", _md_table(SPEEDUP_HEADER, speedup_rows(report)), "",
                speedup_note(report), ""]
    if report.get("artifacts"):
        out += ["## Artifacts", "", _md_table([h for _, h in ARTIFACT_COLUMNS],
                [[artifact_row(a)[k] for k, _ in ARTIFACT_COLUMNS] for a in report["artifacts"]]), ""]
        out += [_scope_note(report), ""]
    out += _md_sections(report)
    return "\n".join(out).rstrip() + "\n"


def _scope_note(report: dict[str, Any]) -> str:
    first = [(a.get("latency_by_batch") or [{}])[0] for a in report.get("artifacts", [])]
    scopes = sorted({str(f.get("scope", "inference")) for f in first})
    timed = sorted({str(f["timed"]) for f in first if f.get("timed")})
    what = f" Timed: {'; '.join(timed)}." if timed else ""
    return ("Latency: per batch, perf_counter_ns around each call after warm-up by count and time; percentiles "
            f"over all runs (no outlier clipping). Scope: {', '.join(scopes)}.{what}")


def _md_sections(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    sc = report.get("scoring") or {}
    if sc:
        out += ["## Scoring", "", f"criterion `{sc.get('criterion')}`, {sc.get('seconds', '-')} s, "
                f"labels: {sc.get('labels_source', '-')}", ""]
    out += recovery_lines(report)
    cal = report.get("calibration") or {}
    if cal:
        out += ["## Calibration", "",
                f"`{cal.get('path')}`: {cal.get('count')} images, sha256 `{cal.get('sha256')}`", ""]
    exp = report.get("export") or {}
    if exp:
        par = exp.get("parity") or {}
        out += ["## Export", "", f"`{exp.get('path')}`: max abs diff {_fmt(par.get('max_abs_diff'), '.2e')}, "
                f"top-1 agreement {_fmt(par.get('top1_agreement'), '.2f', 100)} %", ""]
    if report.get("warnings"):
        out += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    envs = _environments(report)
    host = report.get("environment") or {}
    if envs or host:
        out += ["## Environment", ""]
        if host.get("isa_summary"):
            out.append(f"- ISA ({host.get('cpu_model')}): {host['isa_summary']}")
        out += [f"- {k}: {v}" for k, v in envs.items()] + [""]
    out += _ladder_lines(report)
    return out


RECOVERY_STEPS = {"pruned": "pruned (no recovery)", "bn": "+ BatchNorm statistics re-estimated",
                  "reconstruct": "+ layer-wise least-squares reconstruction", "distill": "+ distillation"}


def recovery_lines(report: dict[str, Any]) -> list[str]:
    """``finetune.mode`` calibration / none: each recovery step with its top-1 and seconds."""
    ft = report.get("finetune") or {}
    if not ft.get("steps"):
        return []
    rows = []
    for s in ft["steps"]:
        what = RECOVERY_STEPS.get(s["step"], s["step"])
        if s.get("skipped"):
            what += f" (skipped: {s['skipped']})"
        elif s["step"] == "reconstruct":
            what += f" ({s.get('layers_refit', 0)} layers refit)"
        elif s["step"] == "distill":
            what += f" ({s.get('epochs', 0):g} epochs{', stopped by its time bound' if s.get('stopped_by_time') else ''})"
        rows.append([what, _fmt(s.get("top1"), ".2f", 100), f"{s.get('seconds', 0):.2f}"])
    return [f"## Recovery (finetune.mode {ft.get('mode')}: {ft.get('images')} calibration images, no training "
            f"split, {ft.get('seconds', 0):.1f} s)", "", _md_table(["step", "top-1 %", "seconds"], rows), ""]


def _ladder_lines(report: dict[str, Any]) -> list[str]:
    """Which INT8 recovery rung shipped per target, what it keeps in float, and its p50 vs rung 0."""
    rows = [a for a in report.get("artifacts", []) if a.get("ladder")]
    if not rows:
        return []
    out = ["## INT8 recovery ladder", ""]
    for a in rows:
        lad = a["ladder"]
        settings = (a.get("meta") or {}).get("int8_settings") or {}
        line = f"- {a['target']}: rung {lad['shipped_rung']} ({lad['shipped']})"
        if lad.get("excluded"):
            line += f", kept in float: {', '.join(lad['excluded'])}"
        if lad.get("p50_vs_rung0") is not None:
            line += f", p50 {lad['p50_vs_rung0']:.2f}x rung 0 ({lad['rung0_p50_ms']} ms)"
        tried = "; ".join(f"rung {t['rung']} {t['name']}: drop {t['accuracy_drop_pt']} pt" for t in lad["attempts"])
        out.append(f"{line}. Tried: {tried}.")
        if lad.get("not_climbed"):
            out.append(f"  not climbed: {lad['not_climbed']}")
        if settings.get("reason"):
            out.append(f"  settings: {settings['reason']}")
    return out + [""]


def _environments(report: dict[str, Any]) -> dict[str, str]:
    """``{target: one-line environment}`` for every artifact that recorded one."""
    out = {}
    for a in report.get("artifacts", []):
        env = a.get("env") or {}
        if not env or a.get("target") in out:
            continue
        rts = ", ".join(f"{k} {v}" for k, v in (env.get("runtimes") or {}).items())
        parts = [env.get("hostname"), env.get("cpu_model"), f"{env.get('cpu_cores_available')} cores",
                 f"governor {env.get('cpu_governor') or 'n/a'}", rts]
        if env.get("jetson"):
            parts.append(f"nvpmodel {env['jetson'].get('nvpmodel')}")
        out[a.get("target")] = "; ".join(str(p) for p in parts if p)
    return out


# ----------------------------------------------------------------------------- html


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#222}
h1{font-size:1.6em;margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}
th{background:#f3f5f7} td:first-child,th:first-child{text-align:left}
tr.fail td{background:#fdecea} td.pass{color:#17803d;font-weight:600} td.fail{color:#b3261e;font-weight:600}
.meta{color:#555;font-size:13px} img{max-width:100%;border:1px solid #eee;margin:6px 0}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:12px} .note{color:#555;font-size:12px}
"""


def _html_table(header: list[str], rows: list[list[str]], row_classes: Optional[list[str]] = None) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = []
    for i, r in enumerate(rows):
        cls = row_classes[i] if row_classes else ""
        cells = "".join(_td(c) for c in r)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _td(c: str) -> str:
    cls = "pass" if c == "pass" else "fail" if str(c).startswith("FAIL") else ""
    return f'<td class="{cls}">{html.escape(str(c))}</td>'


def render_html(report: dict[str, Any], plots: Optional[dict[str, str]] = None) -> str:
    from .plots_report import all_plots

    plots = all_plots(report) if plots is None else plots
    run = report.get("run") or {}
    parts = [f"<h1>edgeprune report: {html.escape(str(run.get('name', 'run')))}</h1>", _html_meta(report)]
    if model_rows(report):
        parts += ["<h2>Model</h2>", _html_table(["", "before", "after"], [list(r) for r in model_rows(report)])]
    if speedup_rows(report):
        parts += ["<h2>Speed-up vs the unpruned model</h2>", _html_table(SPEEDUP_HEADER, speedup_rows(report)),
                  f'<p class="note">{html.escape(speedup_note(report))}</p>']
    arts = report.get("artifacts", [])
    if arts:
        rows = [artifact_row(a) for a in arts]
        parts += ["<h2>Artifacts per target and precision</h2>",
                  _html_table([h for _, h in ARTIFACT_COLUMNS], [[r[k] for k, _ in ARTIFACT_COLUMNS] for r in rows],
                              ["" if r["budget"] == "pass" else "fail" for r in rows]),
                  f'<p class="note">{html.escape(_scope_note(report))}</p>']
    parts += _html_plots(plots)
    md_rest = _md_sections(report)
    if md_rest:
        parts.append(_md_lines_to_html(md_rest))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>edgeprune report: {html.escape(str(run.get('name', 'run')))}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def _html_meta(report: dict[str, Any]) -> str:
    run = report.get("run") or {}
    bits = [f"{k}: {html.escape(str(run[k]))}" for k in ("started", "seconds", "command") if run.get(k) is not None]
    if (report.get("model") or {}).get("arch"):
        bits.append(f"model: <code>{html.escape(report['model']['arch'])}</code>")
    return f'<p class="meta">{" &middot; ".join(bits)}</p>'


def _html_plots(plots: dict[str, str]) -> list[str]:
    if not plots:
        return []
    figs = [f'<div><h3>{html.escape(t)}</h3><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"></div>'
            for t, b64 in plots.items()]
    return ["<h2>Plots</h2>", f'<div class="grid">{"".join(figs)}</div>']


def _md_lines_to_html(lines: list[str]) -> str:
    out, in_list = [], False
    for line in lines:
        if line.startswith("- ") and not in_list:
            out.append("<ul>")
            in_list = True
        if not line.startswith("- ") and in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            out.append(f"<li>{html.escape(line[2:]).replace('`', '')}</li>")
        elif line:
            out.append(f"<p>{html.escape(line).replace('`', '')}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


# ----------------------------------------------------------------------------- files


def write_report(run_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``run_dir``; return their paths. The report is
    checked against :class:`edgeprune.report_model.Report` first (a section of the wrong shape fails)."""
    from .report_model import validate_report

    validate_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "html": run_dir / "report.html"}
    atomic_write(paths["json"], json.dumps(report, indent=1, default=str))
    atomic_write(paths["md"], render_markdown(report))
    atomic_write(paths["html"], render_html(report))
    return paths


def load_report(run_dir: Path) -> dict[str, Any]:
    from .errors import DataError

    p = Path(run_dir)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise DataError(f"no report.json in {run_dir}", hint="pass a finished run directory or its report.json")
    from .report_model import validate_report

    try:
        report = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{p} is not valid JSON: {exc}") from exc
    if not isinstance(report, dict):
        raise DataError(f"{p} holds a {type(report).__name__}, not a report object")
    validate_report(report, str(p))
    return report

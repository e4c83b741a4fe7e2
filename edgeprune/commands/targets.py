"""``edgeprune targets list|show|validate`` and ``edgeprune doctor``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..config import TARGETS_DIR, dump_yaml, load_target, target_paths
from ..errors import ConfigError, EdgePruneError
from ..safety import check_batch_memory

targets_app = typer.Typer(help="Hardware targets (targets/*.yaml): list, show, validate.", no_args_is_help=True)


def _console() -> Console:
    return Console(width=160)


@targets_app.command("list")
def list_targets(targets_dir: Path = typer.Option(TARGETS_DIR, help="folder of target YAML files")) -> None:
    """One row per target YAML: backend, device, precisions, budgets."""
    table = Table("name", "backend", "device", "precisions", "batch", "drop budget (pt)", "description")
    for name in target_paths(targets_dir):
        try:
            t = load_target(name, targets_dir)
        except EdgePruneError as exc:
            table.add_row(name, "[red]invalid[/red]", "", "", "", "", exc.message.splitlines()[-1].strip())
            continue
        batch = f"1..{t.max_batch_size}" if t.dynamic_batch else str(t.batch_size)
        table.add_row(t.name, t.backend.value, t.device, ",".join(p.value for p in t.precisions), batch,
                      f"{t.accuracy_drop_budget_pt:g}", t.description)
    _console().print(table)


@targets_app.command("show")
def show_target(name: str = typer.Argument(..., help="target name or path to a YAML file"),
                targets_dir: Path = typer.Option(TARGETS_DIR, help="folder of target YAML files")) -> None:
    """The resolved target, every default filled in."""
    typer.echo(dump_yaml(load_target(name, targets_dir)), nl=False)


@targets_app.command("validate")
def validate_targets(names: Optional[list[str]] = typer.Argument(None, help="names or YAML paths; default: all"),
                     targets_dir: Path = typer.Option(TARGETS_DIR, help="folder of target YAML files")) -> None:
    """Validate target YAMLs; fails (non-zero) naming every bad key and value."""
    names = names or list(target_paths(targets_dir))
    errors = []
    for name in names:
        try:
            t = load_target(name, targets_dir)
            # the smallest input edgeprune takes (1x8x8): a batch that cannot fit even so is refused here
            check_batch_memory(t, (1, 8, 8), f"target {t.name!r} (at the smallest input, 1x8x8)")
            typer.echo(f"ok      {t.name}")
        except EdgePruneError as exc:
            typer.echo(f"invalid {name}")
            errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))


def doctor_cmd() -> None:
    """Runtimes, versions, devices and precisions available on this machine."""
    from ..backends import doctor

    table = Table("backend", "installed", "version", "device", "precisions here", "note")
    for row in doctor():
        if not row["installed"]:
            table.add_row(row["backend"], "[red]no[/red]", "", "", "", f"{row['reason']} (extra: {row['requires']})")
            continue
        for i, dev in enumerate(row["devices"] or ["(none)"]):
            first = i == 0
            table.add_row(row["backend"] if first else "", "yes" if first else "", row["version"] if first else "",
                          dev, ",".join(row["precisions"].get(dev, [])) or "-", "")
    _console().print(table)
    _console().print(isa_text())


def isa_text() -> str:
    """The CPU, its INT8/FP16 ISA features and the INT8 settings each backend picks from them."""
    from ..backends.onnxruntime_backend import int8_settings as ort_settings
    from ..backends.openvino_backend import int8_settings as ov_settings
    from ..envinfo import cpu_model, isa_features, isa_summary

    isa = isa_features()
    ort, ov = ort_settings(isa, {}), ov_settings(isa, {})
    return "\n".join([
        f"CPU: {cpu_model()}",
        f"ISA: {isa_summary(isa)} (fp16 compute: {isa.get('fp16_compute')})",
        f"INT8 on ONNX Runtime: reduce_range={ort['reduce_range']} ({ort['reason']})",
        f"INT8 on OpenVINO/NNCF: overflow_fix={ov['overflow_fix']} ({ov['reason']})",
    ])


def register(app: typer.Typer) -> None:
    app.add_typer(targets_app, name="targets")
    app.command("doctor")(doctor_cmd)

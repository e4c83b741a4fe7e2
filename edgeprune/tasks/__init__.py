"""Segmentation and detection (issue 16): a synthetic inspection data set, mask / COCO loaders with
strict validation, dense-label SAE scoring, metrics, output parity, the per-task operations
(:mod:`edgeprune.tasks.ops`) and the end-to-end driver :func:`run_task`.

``edgeprune run`` does not call :func:`run_task` yet; it takes a PipelineConfig with ``task:
segmentation | detection`` and a run folder.
"""


def run_task(cfg, out_dir):
    """score -> prune -> fine-tune -> export -> compile -> check -> report.json / report.md."""
    from .run import run_task as _run

    return _run(cfg, out_dir)

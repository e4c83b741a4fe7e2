"""One module per pipeline stage, in the order the pipeline runs them:

score -> prune (or latency, when a target has a latency budget) -> finetune -> export -> compile
(per target and precision: compile, check and bench (:mod:`.check`), the INT8 recovery ladder
(:mod:`.ladder`), the unpruned baseline (:mod:`.baseline`)) -> report.

Each stage is ``run(ctx: RunContext, inp: <Stage>Input) -> output``: it writes into ``ctx.dir`` and adds
its section to ``ctx.report``. It knows nothing of resuming: :mod:`edgeprune.pipeline` decides which
stages run, and the single-stage commands (:mod:`edgeprune.commands`) call the same ``run``.
Dependencies point one way: commands -> pipeline -> stages -> context -> libraries.
This package imports none of its modules here, so that importing one stage loads only that one.
"""

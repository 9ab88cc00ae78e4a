"""Experiments: grids of training runs over seeds and arms, run resumably, evaluated and reported.

    grid     grid files: a preset, seeds, arms
    records  the logs on disk (evals.jsonl, probes.jsonl, reference_probes.jsonl) and each cell's state
    probes   linear probes of the finished cells, and of the raw pixels and the alignment targets on the same images
    runner   running a grid (resumable, one evaluation log, probes as cells finish)
    stats    mean ± std, Welch and paired intervals, verdicts
    tables   the evaluations as tables and curves, and each arm's stored config
    claims   the paper's claims, tested with intervals, and the same-seed differences
    report   the report's page: tables with seed spreads, the claims, curves

Each imports only the ones above it; together they import training and everything below it.
"""

"""Experiments: grids of training runs over seeds and arms, run resumably, evaluated and reported.

    grid    grid files: a preset, seeds, arms
    runner  running a grid (resumable, one evaluation log, probes)
    report  the report: tables with seed spreads, curves, sample grids

Imports training and everything below it.
"""

"""Training: the run configuration, the loss, the loop and the run folder it writes.

    config      RunConfig (model, data, optimiser, loop, alignment, evaluation), YAML, --set; the preset registry
    objective   the training loss as (loss, named terms): NLL + lambda x alignment; the encoder targets of a batch
    loop        the training loop (one process or DDP), as a recipe
    evaluation  evaluation during training (train.eval_every): FID, one-step and Bayes top-1, bits/dim
    runlog      what a run shows: log lines, metrics.jsonl, TensorBoard, sample grids, the loss curve
    run         run folders: load_run, the stored config, the lock, samples of a run

Imports everything below it (flow, data, eval, align, fmnist, the base modules).
"""

"""Everything a training run owns: the recipe, the loop, its state, in-loop evaluations, metrics,
the optimizer's parameter groups, the learning-rate schedule and exact gradient accumulation.

    recipe.py        YAML recipe -> typed Recipe (each section's dataclass lives with its component)
    loop.py          Trainer: fetch, train one step, record, evaluate, checkpoint
    components.py    the engine, loss, loader, schedule, checkpoints and evaluations, built from a recipe
    state.py         TrainState: counters, eval history and RNGs, saved with every checkpoint
    rng.py           seeding, capture and restore of every random generator
    accumulation.py  one optimizer step's forward/backward, exact for a contrastive loss
    optim.py         AdamW parameter groups (what gets weight decay), fused on GPUs
    schedule.py      learning rate as a pure function of the step
    evals.py         in-loop zero-shot evaluation through rwkvclip_dist.eval
    metrics.py       TensorBoard, progress bar, summary lines, loss_log.jsonl
    preemption.py    SIGTERM / SIGUSR1: save, then exit 0
    ownership.py     one trainer per run directory (a lock naming host, pid and job)
    runner.py        run a recipe; map each way a run ends to its exit status

``rwkvclip_dist/train.py`` is the command-line entry point.
"""

"""zarrckpt benchmark suite: ``python -m benchmarks [--quick] [--out DIR] [--only WORKLOAD]``.

Modules
-------
workloads
    State dicts to checkpoint (registry: :func:`~benchmarks.workloads.register_workload`).
systems
    Checkpoint systems: zarrckpt, torch.save/load (+ mmap), DCP, safetensors,
    tensorstore and the raw numpy bound (registry: :func:`~benchmarks.systems.register_system`).
_worker
    Measures one workload in a subprocess (rounds rotated across systems).
report
    results.json, results.md, charts, targets.
cli
    Command line and orchestration.
"""

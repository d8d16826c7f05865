"""Training on Ray Train + DeepSpeed ZeRO: config, worker loop, checkpoints, MLflow, plan.

The driver entry is :func:`ttm_ray.training.trainer.train`; the worker loop is
:func:`ttm_ray.training.loop.train_worker`. Submodules are imported on use so that loading a
config does not import Ray or DeepSpeed.
"""

"""The encoded-latent cache: ``ttm-ray encode`` runs the frozen encoders once per clip.

``config.py`` (:class:`EncodeConfig`, ``kind: encode``), ``worker.py`` (rows -> encoded rows,
a plain class that works without Ray), ``job.py`` (the Ray Data job: read a published
dataset version, an actor pool of encoder workers, an atomic publish of the encoded version,
incremental by encoding hash). The format itself is :mod:`ttm_ray.dataset.encoded`, which is
all training needs.
"""

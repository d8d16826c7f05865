"""Joining or starting Ray the same way in every job (embedded default: a local Ray)."""

from __future__ import annotations

import logging

from ttm_ray.config.run import RunConfig

log = logging.getLogger(__name__)


def init_ray(run: RunConfig, **kwargs: object) -> bool:
    """Connect to ``run``'s cluster, or start a local one. Returns True if we started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = run.resolved_ray_address()
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("starting a local Ray (num_cpus=%s)", run.num_cpus)
        # With its dashboard (on 127.0.0.1, as Ray binds it by default): the state API behind
        # it is what Ray Train's placement-group cleaner polls (without it, it warns every
        # second), and users can watch the job at http://127.0.0.1:8265. It starts no slower.
        ray.init(num_cpus=run.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 **kwargs)
    return True

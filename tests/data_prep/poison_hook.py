"""A Ray worker setup hook for the poison-input test: the decoder of one named input aborts
its process natively (``os.abort()``, as a segfaulting or OOM-killed decoder would die).

Installed with ``runtime_env={"worker_process_setup_hook": "poison_hook.install"}`` and this
folder on the workers' ``PYTHONPATH``; the input is named by ``TTM_POISON_INPUT``. Everything
else is the real pipeline: only the clip stage's ``Video`` opener is wrapped.
"""

from __future__ import annotations

import os


def install() -> None:
    import data_prep.stages.clip as clip_stage

    poison = os.environ["TTM_POISON_INPUT"]
    real = clip_stage.Video

    class PoisonedVideo(real):  # type: ignore[misc, valid-type]
        def __init__(self, uri: str, *args, **kwargs) -> None:
            if os.path.basename(str(uri)) == poison:
                os.abort()
            super().__init__(uri, *args, **kwargs)

    clip_stage.Video = PoisonedVideo

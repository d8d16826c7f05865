"""Fixtures shared by the model tests."""

from __future__ import annotations

import pytest

from ttm_ray.conditioning.masked_attention import ObjectLayout


@pytest.fixture
def layouts_made(monkeypatch: pytest.MonkeyPatch) -> list[ObjectLayout]:
    """Every ``ObjectLayout`` constructed while the test runs, in order (the test may clear
    the list between forwards)."""
    made: list[ObjectLayout] = []
    init = ObjectLayout.__init__

    def counting_init(self: ObjectLayout, *args, **kwargs) -> None:
        made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ObjectLayout, "__init__", counting_init)
    return made

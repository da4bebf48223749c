"""Parsl's PBSProProvider with the qstat interval as a parameter (2025.1.13 fixes it at 60 s).

A job that ends at walltime simply drops out of `qstat`; the sooner Parsl looks, the sooner it
submits the next job for the tasks still waiting.
"""

from __future__ import annotations

from parsl.providers import PBSProProvider as _ParslPBSProProvider


class PBSProProvider(_ParslPBSProProvider):
    def __init__(self, *, status_polling_interval: int = 60, **kwargs):
        super().__init__(**kwargs)
        self._status_polling_interval = status_polling_interval

    @property
    def status_polling_interval(self) -> int:
        return self._status_polling_interval

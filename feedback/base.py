"""The one strict, frozen pydantic base of every alignd config section and contract model.

Unknown keys are errors (a typo fails at start-up, or when a file written by another process
is read, instead of silently using a default), and a loaded value never changes. ``feedback``
is the package every other one may import, so the base lives here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

"""The two names every backend module shares: the refusal, and the models a pipeline runs."""

from __future__ import annotations

import dataclasses

from t2f.clip import Clip
from t2f.errors import T2FError
from t2f.mapper import Mapper
from t2f.types import StyleGenerator


class BackendUnavailable(T2FError):
    """A backend that cannot run here (missing library, GPU or artifacts, or a precision it does not run)."""


@dataclasses.dataclass(frozen=True)
class Models:
    """The three models a pipeline runs."""
    generator: StyleGenerator
    clip: Clip
    mapper: Mapper

    def __iter__(self):
        return iter((self.generator, self.clip, self.mapper))

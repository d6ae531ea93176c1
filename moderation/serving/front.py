"""What the server's process answers at the door with: the planner (validation, prompts) and
the description of the model it serves. With the model in a process of its own this is all the
server's process holds of it: no engine, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model import Tokenizer
from moderation.core.planning import Planner
from moderation.runtime import ModelDescription, Runtime, load_policies, make_planner
from moderation.serving.settings import ServeSettings
from moderation.serving.worker.process_messages import ModelInfo


@dataclass(frozen=True)
class Front:
    planner: Planner
    model: ModelDescription

    @classmethod
    def of_runtime(cls, runtime: Runtime) -> Front:
        """The front of a model loaded in this process."""
        return cls(runtime.planner, runtime.description)

    @classmethod
    def of_model_process(cls, info: ModelInfo, settings: ServeSettings) -> Front:
        """The same planning as in the model process, with the limits it reported."""
        planner = make_planner(
            Tokenizer.from_file(Path(info.folder)),
            info.model.limits,
            settings.runtime_settings(),
            load_policies(settings.policy_files),
        )
        return cls(planner, info.model)

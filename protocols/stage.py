"""The base of every engine stage: the kernel's Actor plus the engine's typed wiring and facts.

The kernel hands each process an opaque wiring dict and the readiness info of earlier stages;
this is the one place they are read, into `Addresses` and `EngineFacts`.
"""

from __future__ import annotations

from typing import Any

from core.actor import Actor, ActorSpec
from core.config import EngineConfig
from core.launch.addresses import Addresses
from protocols.messages import EngineFacts


class Stage(Actor):
    def __init__(self, spec: ActorSpec, config: EngineConfig, wiring: dict[str, Any]) -> None:
        super().__init__(spec, config, wiring)
        self.addresses = Addresses.from_dict(wiring)
        # the executors report the facts; stages started before them (HTTP) see none
        known = "max_model_len" in spec.ready_info
        self._facts = EngineFacts.from_info(spec.ready_info) if known else None

    @property
    def facts(self) -> EngineFacts:
        """The engine's facts; every stage but the executor starts after they are known."""
        if self._facts is None:
            raise RuntimeError(f"{self.name} started before the engine facts were known")
        return self._facts

"""The engine's stage table: which actors run, how many of each, and in which start order.

Actors are named by import strings, so the kernel never imports a model or an actor.
"""

from __future__ import annotations

from core.actor import ActorSpec
from core.config import EngineConfig
from core.supervisor import StageGroup


def topology(config: EngineConfig) -> list[StageGroup]:
    """Executors first (their KV pool decides the engine facts), then scheduler and gateway, then
    the stateless stages, then the HTTP adapter."""
    executors = [
        ActorSpec(f"executor{r}", "actors.executor:ExecutorActor", index=r)
        for r in range(config.tensor_parallel_size)
    ]
    engine = [
        ActorSpec("scheduler", "actors.scheduler:SchedulerActor"),
        ActorSpec("gateway", "actors.gateway:GatewayActor"),
    ]
    stateless = [
        ActorSpec(f"tokenizer{i}", "actors.tokenizer:TokenizerActor", index=i)
        for i in range(config.tokenizer_workers)
    ]
    stateless += [
        ActorSpec(f"images{i}", "actors.image_preprocessor:ImagePreprocessorActor", index=i)
        for i in range(config.image_workers)
    ]
    stateless += [
        ActorSpec(f"detokenizer{i}", "actors.detokenizer:DetokenizerActor", index=i)
        for i in range(config.detokenizer_workers)
    ]
    groups = [StageGroup(executors), StageGroup(engine), StageGroup(stateless, restartable=True)]
    if config.http:
        groups.append(
            StageGroup(
                [ActorSpec("http", "protocols.openai.server:OpenAIServerActor")], restartable=True
            )
        )
    return groups

"""The engine's stage table: which actors run, how many of each, and in which start order.

Actors are named by import strings, so the kernel never imports a model or an actor.
"""

from __future__ import annotations

from core.actor import ActorSpec
from core.config import EngineConfig
from core.supervisor import StageGroup


def topology(config: EngineConfig) -> list[StageGroup]:
    """The HTTP adapter first (it binds its port at once and answers 503 while the rest start;
    it is stopped first too), then the executors (their KV pool decides the engine facts), then
    scheduler and gateway, then the stateless stages. Of a multi-host engine, the leader lists
    the other hosts' executors as remote (waited for, watched, not run), and the other hosts
    run their executors only."""
    local = config.local_ranks
    executors = [
        ActorSpec(f"executor{r}", "actors.executor:ExecutorActor", index=r, remote=r not in local)
        for r in range(config.tensor_parallel_size)
    ]
    if config.node_rank > 0:
        return [StageGroup([spec for spec in executors if not spec.remote])]
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
        http = ActorSpec("http", "protocols.openai.server:OpenAIServerActor")
        groups.insert(
            0, StageGroup([http], restartable=True, stop_first=True, outlives_engine=True)
        )
    return groups


def stage_of(actor: str) -> tuple[str, int] | None:
    """(stage, replica index) of a replicated stateless actor named here ("tokenizer", "images"
    or "detokenizer"); None for any other actor."""
    for stage in ("tokenizer", "images", "detokenizer"):
        index = actor.removeprefix(stage)
        if index != actor and index.isdigit():
            return stage, int(index)
    return None

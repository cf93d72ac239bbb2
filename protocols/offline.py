"""The offline Python API: `LLM(model).generate(prompts, SamplingParams(...))`.

It starts a full engine (`python -m core.launch --no-http`) in a private run folder and talks to
it through the ZMQ SDK, so offline runs exercise exactly the path a server request takes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from typing import Any, cast

from protocols.client import EngineClient
from protocols.messages import (
    EngineFacts,
    GenerateRequest,
    HealthReply,
    RequestOutput,
    SamplingParams,
)

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


class LLM:
    def __init__(self, model: str = "", *, ready_timeout: float = 600.0, **engine_args: Any):
        """Start an engine for `model`; keyword args are launch flags (`max_model_len=256`)."""
        self.run_dir = tempfile.mkdtemp(prefix="tessera-llm-")
        cmd = [sys.executable, "-m", "core.launch", "--no-http", "--run-dir", self.run_dir]
        if model:
            cmd += ["--model", model]
        for key, value in engine_args.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value is False:
                cmd.append("--no-" + key.replace("_", "-"))
            elif isinstance(value, (list, tuple)):
                cmd += [flag, *map(str, value)]
            elif value is not None:
                cmd += [flag, str(value)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(cmd, env=env)
        self.client = EngineClient(f"ipc://{self.run_dir}/front.sock")
        try:
            facts = self._wait_ready(ready_timeout).facts
            assert facts is not None  # a ready engine reports its facts
            self.facts: EngineFacts = facts
        except BaseException:
            self.shutdown()
            raise

    def _wait_ready(self, timeout: float) -> HealthReply:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the engine exited with code {self.proc.returncode}")
            try:
                return self.client.wait_ready(timeout=2.0)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids), batched together; outputs in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [cast("str | list[int]", prompts)]
        else:
            batch = cast("list[str | list[int]]", prompts)
        sp = sampling_params or SamplingParams()
        reqs = []
        for p in batch:
            rid = uuid.uuid4().hex
            if isinstance(p, str):
                reqs.append(GenerateRequest(rid, replace(sp), prompt=p))
            else:
                reqs.append(GenerateRequest(rid, replace(sp), prompt_token_ids=list(p)))
        return self._run(reqs)

    def chat(
        self,
        conversations: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Chat with the model's template; one conversation or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            batch = [cast("list[dict[str, Any]]", conversations)]
        else:
            batch = cast("list[list[dict[str, Any]]]", conversations)
        sp = sampling_params or SamplingParams()
        reqs = [GenerateRequest(uuid.uuid4().hex, replace(sp), messages=c) for c in batch]
        return self._run(reqs)

    def _run(self, reqs: list[GenerateRequest]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        for result in self.client.complete_many(reqs):
            if isinstance(result, BaseException):  # EngineError: refused or failed
                raise result
            outputs.append(result)
        return outputs

    def shutdown(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None  # type: ignore[assignment]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

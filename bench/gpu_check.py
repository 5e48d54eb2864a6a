"""The GPU check: what a lent GPU machine (one H200, no network) runs in one command, in under nine minutes.

    bench/gpu_check.sh                  # on the GPU machine (installs the carried wheels, then runs this)
    bench/gpu_check.sh --dry-run        # here, on the CPU, tiny sizes, < 60 s: the same code paths (CI runs it)

Parts, each in its own process, so that one failing (or hanging past its time) never stops the others; the table
marks each part ok / FAIL / skipped with the reason:

1. env: GPU, driver-visible memory, versions, and the bf16 matrix-product rate this card reaches (a ceiling to
   read the MFU against);
2. pytest -m cuda: tests/cuda (the step in float32 vs the CPU reference and bfloat16 vs float32, packed vs padded
   rows, the chunked LM head, the optimizer stepped in backward; the embedded engine's log-probs vs teacher-forced
   passes in float32 and bfloat16). Skips count as failures here: on the GPU machine nothing may skip;
3. the recipe (recipes/grpo.py's ``train``, in process) on CUDA with the embedded policy, bfloat16, for a few steps
   at two sizes built in code with random weights (``model.spec=random:smollm2-135m``, ``random:qwen2.5-0.5b``;
   gym_plugin/models/random_init.py), plus train.overlap=true and memory=low: s/step split into collect / train /
   sync, sampled tokens/s, trained tokens/s, peak GPU memory, and the step's MFU against 790 TFLOP/s bf16, with
   FLOPs counted as 6 x parameters x tokens (trained tokens, as asked; and the tokens the packed forward ran on,
   prompts included). Medians over the steps after the first (the first pays CUDA's warm-up; it is in the JSON).
   The rewards come from a bench-only verifier (``coin_flip``: the parity of the reply's sha256), since a random
   model's replies earn nothing from a real task: every group of 8 then has mixed rewards and nearly every row
   trains;
4. what stays unverified with one GPU and no network, said plainly.

Prints one table; writes gpu_check.json (and the parts' logs) to $OUT when set, else to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = 790.0
"""The H200's dense bf16 matrix rate as the device notes give it (TFLOP/s): the MFU denominator."""

# (label, model config, extra recipe overrides); the real sizes on the GPU, the same architectures tiny on the CPU
RUNS = [
    ("smollm2-135m", "smollm2-135m", []),
    ("qwen2.5-0.5b", "qwen2.5-0.5b", []),
    ("smollm2-135m overlap", "smollm2-135m", ["train.overlap=true"]),
    ("qwen2.5-0.5b memory=low", "qwen2.5-0.5b", ["memory=low"]),
]
DRY_SIZES = {"smollm2-135m": "llama-tiny", "qwen2.5-0.5b": "qwen2-tiny"}
DRY_RUNS = 2
"""The dry run does the first two RUNS only (the two architectures): the variants are the same driver code with one
more override, and their recipe settings have CPU tests of their own; each run costs ~10 s of imports here."""

FULL = {"steps": 4, "prompts": 16, "group": 8, "max_tokens": 128, "device": "cuda", "budget_s": 510.0,
        "timeouts": {"env": 90, "pytest": 240, "recipe": 150}}
DRY = {"steps": 2, "prompts": 4, "group": 4, "max_tokens": 16, "device": "cpu", "budget_s": 420.0,
       "timeouts": {"env": 60, "pytest": 240, "recipe": 120}}  # generous: CI machines are slow and shared

UNVERIFIED = [
    "FSDP and DDP over NCCL (distributed.strategy=fsdp|ddp under torchrun with backend nccl): they need two GPUs, "
    "this machine has one. CI runs both on CPUs over gloo (tests/integration/test_step_distributed.py, "
    "test_recipe_ranks.py); NCCL's own collectives and FSDP2 on CUDA have never run.",
    "weight_sync=vllm_nccl and policy=vllm on a GPU: they need vLLM's CUDA wheels (vllm==0.32.0 and its CUDA "
    "packages, gigabytes), too large to carry (64 MiB) and nothing can be fetched there. CI runs vLLM's CPU build "
    "(weight_sync=vllm_reload) only.",
    "Learning on real weights: no checkpoint can be fetched there, so the recipe runs random weights of the real "
    "shapes; costs are the real models', rewards are a coin flip. The reward curves of the README are CPU runs.",
    "Versions: the machine's own torch 2.11 (CUDA 13) and transformers 5.17, not CI's torch 2.13 / transformers 5.19.",
]


# ------------------------------------------------------------------------------------------------ child parts
def part_env(args) -> dict:
    """Versions, the device, and the bf16 matmul rate it reaches (median of timed repeats)."""
    import platform

    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "device": args.device}
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)")
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count)
    n = 8192 if dev.type == "cuda" else 256
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))  # random: zeros run faster
    times = []
    for i in range(12):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - t0
        if i >= 2:  # warm-up: cuBLAS handle and heuristics
            times.append(seconds)
    info["bf16_matmul_n"] = n
    info["bf16_matmul_tflops"] = 2 * n**3 / statistics.median(times) / 1e12
    return info


def part_recipe(args) -> dict:
    """One recipe run in this process: compose conf/grpo.yaml with overrides, swap in the coin_flip verifier, run
    recipes/grpo.py's ``train``, read back metrics.jsonl."""
    import asyncio
    import importlib.util

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gym_plugin.distributed import init_distributed
    from gym_plugin.grpo_config import check_overrides, parse_grpo_config
    from gym_plugin.memory import return_freed_memory_to_os
    from gym_plugin.models.random_init import random_model_config

    register_coin_flip()
    spec = importlib.util.spec_from_file_location("grpo_recipe", ROOT / "recipes" / "grpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)

    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_run_"))
    overrides = [
        f"model.spec=random:{args.size}", "model.dtype=bfloat16", f"model.device={args.device}", f"model.name={args.size}",
        "env=letters", f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}",
        f"train.group_size={args.group}", f"policy.max_output_tokens={args.max_tokens}",
        f"policy.max_batch_size={args.prompts * args.group}", "eval.at_start=false", "eval.at_end=false",
        "logging.progress=false", "logging.plot=false", "logging.save_rollouts=false", f"run_dir={run_dir}",
        *args.override,
    ]
    check_overrides(overrides, ROOT / "conf")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose("grpo", overrides=overrides)
    data = OmegaConf.to_container(raw, resolve=True)
    data["env"]["gym"] = {  # the letters prompts, rewarded by a coin flip per reply
        "coin": {"resources_servers": {"coin_flip": {}}},
        "letters_agent": {"responses_api_agents": {"simple_agent": {
            "resources_server": {"type": "resources_servers", "name": "coin"},
            "model_server": {"type": "responses_api_models", "name": "policy_model"}, "max_turns": 1}}},
    }
    cfg = parse_grpo_config(data)
    return_freed_memory_to_os()
    info = init_distributed(cfg.distributed.backend, cfg.distributed.timeout_s, cfg.model.device)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    started = time.perf_counter()
    try:
        asyncio.run(recipe.train(cfg, info, recipe.RunState(keep_run_dir=True)))
        steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(random_model_config(args.size)).parameters())
    result = {"size": args.size, "device": str(info.device), "dtype": cfg.model.dtype, "params": params,
              "overrides": args.override, "wall_s": time.perf_counter() - started, "steps": steps}
    if info.device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(info.device) / 2**20
        result["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved(info.device) / 2**20
        # evidence that the weights, their gradients and the optimizer state lived on the GPU: the recipe logs
        # perf/peak_gpu_mb only when its model is on CUDA, and the peak must hold weights + gradients (bf16)
        weights_mb = params * 2 / 2**20
        if "perf/peak_gpu_mb" not in steps[-1] or result["peak_gpu_mb"] < 2 * weights_mb:
            raise RuntimeError(f"the recipe did not train on the GPU: peak GPU memory {result['peak_gpu_mb']:.0f} MB "
                               f"for {weights_mb:.0f} MB of bf16 weights; metrics keys {sorted(steps[-1])[:5]}...")
    return result


def register_coin_flip() -> None:
    """``resources_servers / coin_flip`` (bench only): reward = the parity of the sha256 of the reply's text, a fair
    coin per distinct reply, so a random model's groups have mixed rewards and their rows train."""
    from gym_plugin.servers.registry import register
    from gym_plugin.servers.resources.base import ResourceServer, final_text

    @register("resources_servers", "coin_flip")
    class CoinFlipResourceServer(ResourceServer):
        async def verify_row(self, row, response, state):
            return {"reward": float(hashlib.sha256(final_text(response).encode()).digest()[0] & 1)}


# ------------------------------------------------------------------------------------------------ the parent
class Check:
    def __init__(self, args):
        self.args = args
        self.mode = DRY if args.dry_run else FULL
        self.out = Path(os.environ.get("OUT") or args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.report = {"dry_run": args.dry_run, "peak_bf16_tflops": PEAK_BF16_TFLOPS, "parts": {},
                       "unverified": UNVERIFIED, "flops_rule": "6 x parameters x tokens (forward + backward, "
                       "no recomputation counted; activation checkpointing recomputes the forward)"}

    def left(self) -> float:
        return self.mode["budget_s"] - (time.monotonic() - self.started)

    def child(self, name: str, argv: list[str], timeout: float, log_name: str, env: dict | None = None) -> dict:
        """Run one part in a child process; returns its part record (status, seconds, detail, result)."""
        if self.left() < 20:
            return {"status": "skipped", "detail": f"time budget ({self.mode['budget_s']:.0f} s) spent"}
        timeout = min(timeout, self.left() - 5)
        result_path = Path(tempfile.mkstemp(prefix="gpu_check_", suffix=".json")[1])
        log_path = self.out / log_name
        t0 = time.monotonic()
        cmd = [sys.executable, *argv, "--result", str(result_path)] if argv[0].endswith(".py") else argv
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        child_env["PYTHONPATH"] = str(ROOT) + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
        with open(log_path, "a") as log:
            log.write(f"\n===== {name}: {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
        seconds = time.monotonic() - t0
        record = {"seconds": round(seconds, 1), "log": log_name}
        try:
            text = result_path.read_text()
            record["result"] = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            record["result"] = None
        finally:
            result_path.unlink(missing_ok=True)
        if rc is None:
            record.update(status="FAIL", detail=f"killed after {timeout:.0f} s (its time limit); see {log_name}")
        elif rc != 0:
            record.update(status="FAIL", detail=f"exit {rc}: {tail(log_path)}")
        else:
            record.update(status="ok", detail="")
        return record

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=1))

    def run(self) -> int:
        m, device = self.mode, self.mode["device"]
        parts = self.report["parts"]
        me = str(Path(__file__).resolve())
        parts["env"] = self.child("env", [me, "--part", "env", "--device", device], m["timeouts"]["env"],
                                  "gpu_check_env.log")
        self.save()
        parts["pytest"] = self.pytest()
        self.save()
        for label, size, extra in RUNS[:DRY_RUNS] if self.args.dry_run else RUNS:
            if self.args.dry_run:
                label, size = label.replace(size, DRY_SIZES[size]), DRY_SIZES[size]
            argv = [me, "--part", "recipe", "--size", size, "--device", device, "--steps", str(m["steps"]),
                    "--prompts", str(m["prompts"]), "--group", str(m["group"]), "--max-tokens", str(m["max_tokens"])]
            for o in extra:
                argv += ["--override", o]
            record = self.child(f"recipe {label}", argv, m["timeouts"]["recipe"],
                                f"gpu_check_recipe_{label.split()[0]}.log")
            if record["status"] == "ok":
                record["figures"] = figures(record["result"])
            parts[f"recipe {label}"] = record
            self.save()
        print(self.table())
        (self.out / "gpu_check.txt").write_text(self.table() + "\n")
        self.save()
        return 0 if all(p["status"] == "ok" for p in parts.values()) else 1

    def pytest(self) -> dict:
        junit = Path(tempfile.mkstemp(prefix="gpu_check_junit_", suffix=".xml")[1])
        env = {"GYM_PLUGIN_CUDA_TESTS_ON_CPU": "1"} if self.args.dry_run else {}
        cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-m", "cuda", "tests/cuda", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        record = self.child("pytest -m cuda", cmd, self.mode["timeouts"]["pytest"], "gpu_check_pytest.log", env)
        try:
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        except (ET.ParseError, OSError, AttributeError):
            counts = None
        finally:
            junit.unlink(missing_ok=True)
        record["counts"] = counts
        if counts is not None:
            passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
            record["detail"] = (f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
                                f"{counts['skipped']} skipped" + (f"; {record['detail']}" if record["detail"] else ""))
            if counts["skipped"] and record["status"] == "ok":  # on the GPU machine nothing may skip
                record["status"] = "FAIL"
                record["detail"] += " (a skip here means the GPU path did not run)"
            if counts["tests"] == 0 and record["status"] == "ok":
                record.update(status="FAIL", detail="no test collected")
        return record

    def table(self) -> str:
        r, parts = self.report, self.report["parts"]
        env = (parts.get("env") or {}).get("result") or {}
        lines = ["", "=" * 118,
                 "GPU check" + (" -- DRY RUN on the CPU, tiny sizes: the figures below mean nothing" if r["dry_run"]
                                else ""),
                 f"device {env.get('gpu', env.get('device', '?'))}"
                 + (f" ({env['gpu_memory_gib']} GiB, sm {env['capability']}, {env['sm_count']} SMs)" if "gpu" in env else "")
                 + f" | torch {env.get('torch', '?')} (CUDA {env.get('cuda')}) | transformers {env.get('transformers', '?')}"
                 f" | python {env.get('python', '?')}",
                 f"bf16 matmul {env.get('bf16_matmul_n', '?')}^3: {env.get('bf16_matmul_tflops', float('nan')):.0f} "
                 f"TFLOP/s measured here (MFU below is against {PEAK_BF16_TFLOPS:.0f})",
                 "", f"{'part':<30} {'status':<8} {'time':>6}  detail"]
        for name, p in parts.items():
            lines.append(f"{name:<30} {p['status']:<8} {p.get('seconds', 0):>5.0f}s  {p.get('detail', '')}"[:300])
        head = (f"{'recipe run (bf16, embedded)':<26} {'params':>7} {'s/step':>7} {'collect':>8} {'train':>6} {'sync':>6}"
                f" {'sampled':>9} {'trained':>9} {'peak GPU':>9} {'MFU':>6} {'MFU':>6}")
        unit = (f"{'':<26} {'':>7} {'':>7} {'s':>8} {'s':>6} {'s':>6} {'tok/s':>9} {'tok/s':>9} {'GiB':>9}"
                f" {'train':>6} {'fwd':>6}")
        lines += ["", head, unit]
        for name, p in parts.items():
            f = p.get("figures")
            if not name.startswith("recipe") or not f:
                continue
            peak = f"{f['peak_gpu_gib']:.1f}" if f.get("peak_gpu_gib") is not None else "n/a"
            lines.append(f"{name[len('recipe '):]:<26} {f['params_m']:>6.1f}M {f['s_per_step']:>7.2f} {f['collect_s']:>8.2f}"
                         f" {f['train_s']:>6.2f} {f['sync_s']:>6.3f} {f['sampled_tok_s']:>9.0f} {f['trained_tok_s']:>9.0f}"
                         f" {peak:>9} {f['mfu_trained']:>6.1%} {f['mfu_forward']:>6.1%}")
        note = ("Medians over steps 2.. (step 1 pays CUDA's warm-up). sampled tok/s: tokens the embedded policy "
                "generated / collect time (overlap: / the step's time, since it samples while training); trained "
                "tok/s: trained (generated) tokens / train time; peak GPU: torch.cuda.max_memory_allocated over the "
                f"run. MFU = 6 x params x tokens / train time / {PEAK_BF16_TFLOPS:.0f} TFLOP/s; 'train': trained "
                "tokens (the rule asked for), 'fwd': the tokens the packed forward ran on (prompts once per pack, "
                "generated tokens). Activation checkpointing (the recipe's default) recomputes the forward: not "
                "counted.")
        lines += ["", textwrap.fill(note, 118), "", "Unverified with one GPU and no network:"]
        lines += [textwrap.fill(u, 118, initial_indent="  - ", subsequent_indent="    ") for u in r["unverified"]]
        lines.append("=" * 118)
        return "\n".join(lines)


def figures(result: dict) -> dict:
    """The table's numbers from one recipe run: medians over steps 2.. (all steps when there is one)."""
    steps = result["steps"]
    later = steps[1:] or steps

    def med(fn):
        return statistics.median(fn(s) for s in later)

    params = result["params"]
    train_s = med(lambda s: s["perf/step_time_s"])
    trained = med(lambda s: s["perf/num_trained_tokens"])
    forward = med(lambda s: s["perf/num_forward_tokens"])
    sampled = med(lambda s: s["rollout/gen_tokens_mean"] * s["rollout/num_rollouts"])
    # train.overlap: the next step's rollouts are sampled while this one trains, so the collect wait is no sampling
    # time; sampled tokens/s is then taken over the whole step
    overlap = "train.overlap=true" in result.get("overrides", [])
    sample_time = "perf/iteration_time_s" if overlap else "perf/collect_time_s"
    peak = result.get("peak_gpu_mb")
    return {
        "params_m": params / 1e6, "s_per_step": med(lambda s: s["perf/iteration_time_s"]),
        "collect_s": med(lambda s: s["perf/collect_time_s"]), "train_s": train_s,
        "sync_s": med(lambda s: s["perf/weight_sync_s"]),
        "sampled_tok_s": med(lambda s: s["rollout/gen_tokens_mean"] * s["rollout/num_rollouts"] / s[sample_time]),
        "sampled_over": sample_time,
        "trained_tok_s": med(lambda s: s["perf/num_trained_tokens"] / s["perf/step_time_s"]),
        "sampled_tokens": sampled, "trained_tokens": trained, "forward_tokens": forward,
        "skipped_rows": med(lambda s: s.get("perf/num_skipped_rows", 0.0)),
        "peak_gpu_gib": peak / 1024 if peak is not None else None,
        "mfu_trained": 6 * params * trained / train_s / (PEAK_BF16_TFLOPS * 1e12),
        "mfu_forward": 6 * params * forward / train_s / (PEAK_BF16_TFLOPS * 1e12),
        "first_step": {k: steps[0].get(k) for k in ("perf/iteration_time_s", "perf/collect_time_s", "perf/step_time_s")},
    }


def tail(path: Path, chars: int = 240) -> str:
    """The last non-empty lines of a log, on one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-chars:]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes, < 60 s: the same code paths")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check"), help="where to write when $OUT is unset")
    p.add_argument("--part", choices=["env", "recipe"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--group", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--max-tokens", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.part:  # a child: its result as JSON into --result; a failure is its traceback and a non-zero exit
        result = {"env": part_env, "recipe": part_recipe}[args.part](args)
        Path(args.result).write_text(json.dumps(result))
        return 0
    return Check(args).run()


if __name__ == "__main__":
    sys.exit(main())

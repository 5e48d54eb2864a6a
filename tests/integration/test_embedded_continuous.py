"""The embedded engine's continuous batching and prefix cache, on the tiny model (engine API, no HTTP).

- a row that joins while another is generating gets the same tokens and log-probs as alone with the same seed;
- the prefix cache: a repeated prompt and a next turn (prompt + answer + more) reuse the KV of the earlier call
  (hits counted, results unchanged); a weight update empties it, and what follows uses the new weights;
- an update waits for the rows in flight (they report the old version) and no row is admitted meanwhile;
- long rows (hundreds of tokens, different prompt lengths, joining at different steps) keep log-probs within
  1e-4 of a teacher-forced forward pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from gym_plugin.models.tiny import build_tiny_model, build_tiny_tokenizer
from gym_plugin.servers.embedded import GenerationEngine, SamplingParams
from gym_plugin.servers.embedded import slots
from gym_plugin.servers.embedded.slots import SlotModel, packing_unsupported_reason

FP32_TOL = 1e-4


def teacher_forced(model, prompt_ids: list[int], gen_ids: list[int]) -> torch.Tensor:
    """Raw log-probs of ``gen_ids`` in one forward pass over prompt + generation (transformers' own forward)."""
    ids = torch.tensor([prompt_ids + gen_ids])  # [1, P + G]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()  # [P + G, V]
    lp = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]  # [G, V]: position i predicts token i + 1
    return lp.gather(-1, torch.tensor(gen_ids)[:, None])[:, 0]  # [G]


def worst_diff(model, prompt: list[int], res) -> float:
    return (teacher_forced(model, prompt, res.token_ids) - torch.tensor(res.logprobs)).abs().max().item()


def engine_for(model, tok, **kw) -> GenerationEngine:
    engine = GenerationEngine(model, tok, batch_wait_ms=0.0, **kw)
    assert engine.continuous  # the tiny model is a LlamaForCausalLM: the continuous scheduler serves it
    engine.start()
    return engine


def wait_until(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.0005)


def test_a_row_joining_mid_batch_equals_the_row_alone():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    long_prompt = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    late_prompt = tok.encode("What is 12 + 30?", add_special_tokens=False)
    long_p = SamplingParams(max_tokens=200, temperature=1.0, seed=11, ignore_eos=True)
    late_p = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=7, n=2, ignore_eos=True)

    engine = engine_for(model, tok, prefix_cache_tokens=0)
    try:
        first = engine.submit(long_prompt, long_p)
        wait_until(lambda: engine.stats.decoded_tokens >= 30)  # the long row is 30+ tokens in
        late = engine.submit(late_prompt, late_p)
        late_rows = late.result(timeout=60)
        assert not first.done()  # the late request finished while the long row was still generating
        long_row = first.result(timeout=60)[0]
        # two admissions (the late one joined the running row), 3 rows active at once
        assert (engine.stats.batches, engine.stats.max_rows_in_batch) == (2, 3)
    finally:
        engine.stop()

    alone = engine_for(model, tok, prefix_cache_tokens=0)
    try:
        late_alone = alone.submit(late_prompt, late_p).result(timeout=60)
        long_alone = alone.submit(long_prompt, long_p).result(timeout=60)[0]
    finally:
        alone.stop()
    for together, by_itself in zip(late_rows + [long_row], late_alone + [long_alone]):
        assert together.token_ids == by_itself.token_ids  # same seed, same tokens, whatever shared the batch
        assert max(abs(a - b) for a, b in zip(together.logprobs, by_itself.logprobs)) < FP32_TOL
    assert late_rows[0].token_ids != late_rows[1].token_ids  # rows of one request: seeds seed + 0, seed + 1
    assert [len(r.token_ids) for r in late_rows + [long_row]] == [30, 30, 200]
    assert worst_diff(model, late_prompt, late_rows[1]) < FP32_TOL
    assert worst_diff(model, long_prompt, long_row) < FP32_TOL


def test_prefix_cache_hits_on_repeats_and_next_turns_and_is_emptied_by_a_weight_update():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    other = build_tiny_model(tok, seed=1).state_dict()
    prompt = tok.encode("Let x = 3 and y = 4. What is the capital of France? Reply with only the city name.",
                        add_special_tokens=False)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = engine_for(model, tok)
    cache = engine.prefix_cache
    try:
        a = engine.submit(prompt, greedy).result(timeout=30)[0]
        assert (cache.hits, len(cache)) == (0, 2)  # a miss; stored: the prompt, then prompt + answer[:-1]
        b = engine.submit(prompt, greedy).result(timeout=30)[0]
        # the repeat: every prompt position but the last (always run, it gives the first logits) from the cache
        assert (cache.hits, cache.hit_tokens) == (1, len(prompt) - 1)
        assert b.token_ids == a.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < FP32_TOL
        # a next turn: prompt + answer + more text; the stored prompt + answer[:-1] (12 + len - 1 positions) is reused
        turn2 = prompt + a.token_ids + tok.encode(" Tomorrow it will rain.", add_special_tokens=False)
        c = engine.submit(turn2, greedy).result(timeout=30)[0]
        assert (cache.hits, cache.hit_tokens) == (2, 2 * len(prompt) - 1 + len(a.token_ids) - 1)
        assert worst_diff(model, turn2, c) < FP32_TOL

        version = engine.update_weights(other)
        assert (version, len(cache), cache.tokens) == (1, 0, 0)  # emptied: that KV came from the old weights
        d = engine.submit(prompt, greedy).result(timeout=30)[0]
        assert cache.hits == 2 and d.policy_version == 1  # a miss: nothing of the old weights was reused
        assert d.token_ids != a.token_ids
        assert worst_diff(build_tiny_model(tok, seed=1), prompt, d) < FP32_TOL
        with engine.exclusive_weights():  # a trainer stepping the served module in place: emptied as well
            assert len(cache) == 0
    finally:
        engine.stop()


def test_weights_stepped_in_place_without_telling_the_engine_drop_the_prefix_cache():
    # a trainer sharing the served module that steps it outside exclusive_weights (a user's own loop): the next
    # prefill sees the parameters' version counters moved and reuses no KV of the old weights
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    prompt = tok.encode("Let x = 3 and y = 4. What is the capital of France? Reply with only the city name.",
                        add_special_tokens=False)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = engine_for(model, tok)
    cache = engine.prefix_cache
    try:
        a = engine.submit(prompt, greedy).result(timeout=30)[0]
        assert len(cache) == 2
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)  # an in-place update, as optimizer.step() makes
        b = engine.submit(prompt, greedy).result(timeout=30)[0]
        assert cache.hits == 0  # the stored prompt was dropped, not reused
        assert worst_diff(model, prompt, b) < FP32_TOL  # log-probs of the weights as they are now
        assert b.logprobs != a.logprobs
        c = engine.submit(prompt, greedy).result(timeout=30)[0]  # unchanged weights: the cache serves again
        assert cache.hits == 1 and c.token_ids == b.token_ids
    finally:
        engine.stop()


def test_an_update_waits_for_rows_in_flight_and_admits_nothing_meanwhile():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    other = build_tiny_model(tok, seed=1).state_dict()
    prompt = tok.encode("hi", add_special_tokens=False)
    engine = engine_for(model, tok)
    try:
        running = engine.submit(prompt, SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True))
        wait_until(lambda: engine.stats.decoded_tokens >= 5)
        versions = []
        updater = threading.Thread(target=lambda: versions.append(engine.update_weights(other)))
        updater.start()
        wait_until(lambda: engine._weight_waiters == 1)
        late = engine.submit(prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        updater.join(60)
        assert versions == [1] and running.done()  # the update ran only once the running row was done
        assert running.result()[0].policy_version == 0 and len(running.result()[0].token_ids) == 600
        assert late.result(timeout=30)[0].policy_version == 1  # not admitted while the update waited
    finally:
        engine.stop()


def test_long_rows_joining_at_different_steps_keep_teacher_forced_logprobs():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    texts = ["hi", "Numbers: 0 1 2 3", "The weather today is sunny with a light breeze.",
             "Question: If Tom has 3 apples and buys 5 more, how many apples does he have? Answer:"]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    engine = engine_for(model, tok)
    try:
        futures = []
        for i, p in enumerate(prompts):
            futures.append(engine.submit(p, SamplingParams(max_tokens=300 + 60 * i, temperature=1.0, seed=i,
                                                           ignore_eos=True)))
            wait_until(lambda: engine.stats.decoded_tokens >= 40 * (i + 1))  # the next joins 40 tokens later
        results = [f.result(timeout=120)[0] for f in futures]
    finally:
        engine.stop()
    assert engine.stats.batches == 4  # each joined a running batch on its own
    assert [len(r.token_ids) for r in results] == [300, 360, 420, 480]
    worst = max(worst_diff(model, p, r) for p, r in zip(prompts, results))
    print(f"tiny fp32 long rows (300-480 tokens) max |logprob - teacher forced| = {worst:.2e}")
    assert worst < FP32_TOL


def test_never_written_kv_memory_is_never_read_into_a_result():
    # Attention reads every active slot up to the longest row; a shorter row's masked positions get weight 0,
    # but 0 * NaN is NaN. Here every buffer is filled with NaN where nothing was written yet (what fresh memory
    # may hold): rows of different lengths joining at different steps must still give finite, teacher-forced
    # log-probs (the engine zeroes positions before they are first read).
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    engine = engine_for(model, tok, prefix_cache_tokens=0)
    sm = engine._batcher.sm
    real_reserve = sm.reserve

    def poisoned_reserve(*args):
        real_reserve(*args)
        for t in sm.k + sm.v:
            t[:, :, sm.initialized :] = float("nan")

    sm.reserve = poisoned_reserve
    prompts = [tok.encode(t, add_special_tokens=False) for t in ["hi", "Let x = 3 and y = 4. Then x^2 + y^2 = 25."]]
    try:
        short = engine.submit(prompts[0], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
        wait_until(lambda: engine.stats.decoded_tokens >= 3)
        long = engine.submit(prompts[1], SamplingParams(max_tokens=90, temperature=1.0, seed=3, ignore_eos=True))
        results = [short.result(timeout=60)[0], long.result(timeout=60)[0]]
    finally:
        engine.stop()
    assert engine.stats.batches == 2
    assert max(worst_diff(model, p, r) for p, r in zip(prompts, results)) < FP32_TOL  # NaN fails this too


def test_prompts_admitted_together_run_their_shared_head_once():
    # Three different prompts behind one 40-token preamble, admitted together: the preamble runs once (then
    # each prompt copies it from the prefix cache: 3 hits of 40 positions) and the results are those of an
    # engine without the cache (greedy: same tokens; log-probs within rounding).
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    head = tok.encode("You are a helpful assistant. " * 8, add_special_tokens=False)[:40]
    prompts = [head + tok.encode(q, add_special_tokens=False) for q in ["hi", "2+2", "Let x = 3 and y = 4."]]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def generate(cache_tokens: int):
        engine = GenerationEngine(model, tok, batch_wait_ms=300.0, batch_max_wait_ms=2000.0,
                                  prefix_cache_tokens=cache_tokens)
        engine.start()
        try:
            futures = [engine.submit(p, greedy) for p in prompts]
            return [f.result(timeout=60)[0] for f in futures], engine
        finally:
            engine.stop()

    shared, engine = generate(8192)
    plain, _ = generate(0)
    assert engine.stats.batches == 1  # one admission
    assert (engine.prefix_cache.hits, engine.prefix_cache.hit_tokens) == (3, 3 * 40)
    for a, b, p in zip(shared, plain, prompts):
        assert a.token_ids == b.token_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < FP32_TOL
        assert worst_diff(model, p, a) < FP32_TOL


def test_scheduler_batch_is_the_one_batch_engine_and_a_wrong_name_is_refused():
    """``scheduler: batch`` (the engine before continuous batching, kept to measure against) serves the same rows:
    each row's uniforms come from its own seeded generator in both schedulers, so the tokens are equal and the
    log-probs agree within fp32 rounding. A misspelt scheduler is a ConfigError naming the value and the choices."""
    import pytest

    from gym_plugin.errors import ConfigError
    from gym_plugin.servers.embedded import EmbeddedPolicyServer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    prompt = tok.encode("What is 12 + 30?", add_special_tokens=False)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=5, n=2, ignore_eos=True)
    rows = {}
    for scheduler in ("continuous", "batch"):
        server = EmbeddedPolicyServer(model=model, tokenizer=tok, scheduler=scheduler)
        assert server.engine.continuous is (scheduler == "continuous")
        server.engine.start()
        try:
            rows[scheduler] = server.engine.submit(prompt, params).result(timeout=60)
        finally:
            server.engine.stop()
    for a, b in zip(rows["continuous"], rows["batch"]):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 40
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < FP32_TOL
    with pytest.raises(ConfigError, match=r"scheduler='contnuous' is not one of \['continuous', 'batch'\]"):
        EmbeddedPolicyServer(model=model, tokenizer=tok, scheduler="contnuous")


def test_a_request_whose_prefill_fails_gets_the_error_and_the_engine_serves_on():
    """A prompt the model cannot embed (an id past the embedding table; the HTTP app refuses those earlier, the
    engine API does not) used to leave its caller waiting forever: its rows were in no slot when prefill raised."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    rows = model.get_input_embeddings().weight.shape[0]
    engine = engine_for(model, tok, prefix_cache_tokens=0)
    try:
        bad = engine.submit([1, 2, rows + 5], SamplingParams(max_tokens=4, seed=0))
        try:
            bad.result(timeout=30)
        except IndexError as e:  # torch's embedding: "index out of range in self"
            assert "index out of range" in str(e)
        else:
            raise AssertionError("an out-of-range prompt id gave a result")
        good = engine.submit([1, 2, 3], SamplingParams(max_tokens=4, seed=0, ignore_eos=True)).result(timeout=30)
        assert len(good[0].token_ids) == 4
        assert engine.continuous  # the scheduler survived the failure
    finally:
        engine.stop()


def test_packed_weights_give_the_rows_of_the_plain_forward_and_are_rebuilt_after_an_update():
    tok = build_tiny_tokenizer()
    prompts = [tok.encode(t, add_special_tokens=False) for t in
               ("The quick brown fox jumps over the lazy dog.", "What is 12 + 30?", "Name a color.")]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=s, ignore_eos=True) for s in (3, 4, 5)]
    other = build_tiny_model(tok, seed=1).state_dict()

    def run(packed: bool):
        # 4 slots for 3 rows: the decode products run packed, padded to 4 rows (3/4 of the packed count)
        engine = engine_for(build_tiny_model(tok), tok, prefix_cache_tokens=0, packed_weights=packed,
                            max_batch_size=4)
        try:
            before = [f.result(timeout=60)[0] for f in [engine.submit(p, q) for p, q in zip(prompts, params)]]
            deadline = time.monotonic() + 10
            while engine._batcher.sm.packed and time.monotonic() < deadline:  # lingering (LINGER_S), then idle
                time.sleep(0.01)
            assert engine._batcher.sm.packed == {}  # idle: the copy is gone
            engine.update_weights(other)
            after = [f.result(timeout=60)[0] for f in [engine.submit(p, q) for p, q in zip(prompts, params)]]
            short = engine.submit(prompts[0], SamplingParams(max_tokens=5, seed=1)).result(timeout=60)[0]
            return before, after, short, engine.stats.packs
        finally:
            engine.stop()

    plain_before, plain_after, _, plain_packs = run(False)
    packed_before, packed_after, _, packs = run(True)
    if packing_unsupported_reason(build_tiny_model(tok)) is not None:  # e.g. a torch without MKL
        assert packs == 0
        return
    # one packing per busy period of >= PACK_AFTER_STEPS (8) decode steps: 40-token batches yes, 5 tokens no
    assert (plain_packs, packs) == (0, 2)
    for plain, packed in zip(plain_before + plain_after, packed_before + packed_after):
        assert packed.token_ids == plain.token_ids
        assert max(abs(x - y) for x, y in zip(packed.logprobs, plain.logprobs)) < 1e-5
    assert [r.token_ids for r in packed_after] != [r.token_ids for r in packed_before]  # the update was seen
    fresh = build_tiny_model(tok, seed=1)
    assert max(worst_diff(fresh, p, r) for p, r in zip(prompts, packed_after)) < FP32_TOL


def test_packing_is_refused_with_a_reason_off_the_cpu_fp32_path():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok).to(torch.bfloat16)
    assert "bfloat16" in packing_unsupported_reason(model)
    engine = engine_for(model, tok, prefix_cache_tokens=0)  # packed_weights on by default: ignored, logged
    try:
        res = engine.submit(tok.encode("Name a color.", add_special_tokens=False),
                            SamplingParams(max_tokens=20, seed=2, ignore_eos=True)).result(timeout=60)[0]
        assert len(res.token_ids) == 20 and engine.stats.packs == 0
    finally:
        engine.stop()


def test_the_scripted_layers_give_the_module_loops_logits_and_step_aside_for_a_wrapped_module(monkeypatch):
    """Unpacked, ``SlotModel`` runs the layers as one TorchScript call (``_plain_layers``) where they have its
    layout: the logits of a prefill and a decode step are those of the module loop (``SCRIPTED`` off); a weight
    changed in place is seen at the next step; a projection wrapped by another module sends the forward back to
    the module loop (after ``release``: the plan is read once a busy period), which runs the wrapper."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    if slots.layers_unsupported_reason(model) is not None:
        pytest.skip(f"layer functions unsupported here: {slots.layers_unsupported_reason(model)}")
    torch.manual_seed(0)
    V = model.config.vocab_size
    prompt, nxt = torch.randint(3, V, (3, 5)), torch.randint(3, V, (3, 1))

    def steps(sm: SlotModel) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of a 5-token prefill and of one decode step of 3 rows. [3, V] each"""
        sm.reserve(3, 64, 0)
        with torch.inference_mode():
            first = sm.forward(0, prompt, torch.zeros(3, dtype=torch.long), torch.full((3,), 5))
            return first, sm.forward(0, nxt, torch.full((3,), 5), torch.ones(3, dtype=torch.long))

    def module_loop() -> torch.Tensor:
        """The decode step's logits from the module loop (``SCRIPTED`` off, a fresh SlotModel). [3, V]"""
        monkeypatch.setattr(slots, "SCRIPTED", False)
        return steps(SlotModel(model))[1]

    def run(scripted: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(slots, "SCRIPTED", scripted)
        sm = SlotModel(model)
        out = steps(sm)
        assert (sm._plain is not None and sm._plain[0] is not None) == scripted
        return out

    assert slots._scripted(slots._plain_layers) is not slots._plain_layers  # TorchScript compiled it here
    for a, b in zip(run(True), run(False)):
        assert a.shape == b.shape == (3, V)
        assert (a - b).abs().max().item() < 1e-6

    monkeypatch.setattr(slots, "SCRIPTED", True)
    sm = SlotModel(model)
    q = model.model.layers[1].self_attn.q_proj
    _, before = steps(sm)
    with torch.inference_mode():
        q.weight.mul_(-1.0)  # in place, no release: the listed parameter is the module's
        after = sm.forward(0, nxt, torch.full((3,), 5), torch.ones(3, dtype=torch.long))
    assert sm._plain[0] is not None  # both steps ran the scripted layers
    assert (after - module_loop()).abs().max() < 1e-6
    assert (after - before).abs().max() > 1e-3  # the flipped weight changed the logits

    class Doubled(torch.nn.Module):  # an adapter-like wrapper: not a torch.nn.Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    model.model.layers[1].self_attn.q_proj = Doubled(q)
    monkeypatch.setattr(slots, "SCRIPTED", True)
    sm.release()
    _, wrapped = steps(sm)
    assert sm._plain == (None,)  # the layout check refused: the module loop ran, wrapper included
    assert (wrapped - module_loop()).abs().max() < 1e-6
    assert (wrapped - after).abs().max() > 1e-3


def test_GYM_PLUGIN_SCRIPTED_LAYERS_0_turns_the_scripted_layers_off():
    code = "from gym_plugin.servers.embedded import slots; print(slots.SCRIPTED)"
    env = {**os.environ, "GYM_PLUGIN_SCRIPTED_LAYERS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr[-2000:]
    assert slots.SCRIPTED == (os.environ.get("GYM_PLUGIN_SCRIPTED_LAYERS", "1") != "0")  # this process: as set


def test_packing_names_the_layer_part_its_packed_layers_do_not_cover():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    if packing_unsupported_reason(model) is not None:
        pytest.skip(f"packing unsupported here: {packing_unsupported_reason(model)}")
    model.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert packing_unsupported_reason(model) == "the MLP's activation is GELU, not SiLU"
    model = build_tiny_model(tok)
    model.model.layers[0].self_attn.k_proj.bias = torch.nn.Parameter(torch.zeros(model.config.num_key_value_heads
                                                                                 * model.config.head_dim))
    assert packing_unsupported_reason(model) == "q/k/v projections where only some have a bias"


def test_a_request_that_comes_while_the_worker_lingers_starts_in_the_same_busy_period():
    """The next call of a client (here: sent from the first call's done callback, as the last row ends) is taken
    during ``LINGER_S``: the packed weights made in the first call's busy period serve it (one packing, not two),
    its tokens are those it gets alone, and the worker goes idle after (the copy is dropped)."""
    tok = build_tiny_tokenizer()
    prompt = tok.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    first_p = SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True)
    second_p = SamplingParams(max_tokens=40, temperature=1.0, seed=4, ignore_eos=True)
    alone_engine = engine_for(build_tiny_model(tok), tok, prefix_cache_tokens=0)
    try:
        alone = alone_engine.submit(prompt, second_p).result(timeout=60)[0]
    finally:
        alone_engine.stop()
    engine = engine_for(build_tiny_model(tok), tok, prefix_cache_tokens=0)
    try:
        sent = threading.Event()
        second = []

        def next_call(_fut) -> None:
            second.append(engine.submit(prompt, second_p))
            sent.set()

        first = engine.submit(prompt, first_p)
        first.add_done_callback(next_call)
        assert len(first.result(timeout=60)[0].token_ids) == 40
        assert sent.wait(timeout=60)
        res = second[0].result(timeout=60)[0]
        assert res.token_ids == alone.token_ids
        assert max(abs(x - y) for x, y in zip(res.logprobs, alone.logprobs)) < 1e-5
        if packing_unsupported_reason(engine.model) is None:
            assert engine.stats.packs == 1
        deadline = time.monotonic() + 10
        while engine._batcher.sm.packed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine._batcher.sm.packed == {}
    finally:
        engine.stop()


def test_packed_products_padded_and_fused_give_the_logits_of_the_modules(monkeypatch):
    """``SlotModel.pack(8)``: a decode step of 8 rows runs packed, 7 and 6 rows padded to 8, 5 rows plain (below
    3/4 of 8); q/k/v and gate/up are fused. Every step's logits are those of the unpacked forward (the same bits
    on MKL; held to 1e-5)."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    if packing_unsupported_reason(model) is not None:
        pytest.skip(f"packing unsupported here: {packing_unsupported_reason(model)}")
    torch.manual_seed(0)
    prompt = torch.randint(3, model.get_input_embeddings().weight.shape[0], (8, 5))
    nxt = torch.randint(3, model.get_input_embeddings().weight.shape[0], (8, 1))

    def decode(sm: SlotModel, rows: int) -> torch.Tensor:
        sm.reserve(8, 64, 0)
        with torch.inference_mode():
            sm.forward(0, prompt[:rows], torch.zeros(rows, dtype=torch.long), torch.full((rows,), 5))
            return sm.forward(0, nxt[:rows], torch.full((rows,), 5), torch.ones(rows, dtype=torch.long))  # [rows, V]

    plain, packed = SlotModel(model), SlotModel(model)
    assert packed.pack(8) >= 0
    layer = model.model.layers[0]
    assert {layer.self_attn, layer.mlp, layer.self_attn.o_proj, layer.mlp.down_proj, model.lm_head} <= set(packed.packed)
    assert layer.self_attn.q_proj not in packed.packed  # fused into self_attn's entry
    for rows, runs_packed in ((8, True), (7, True), (6, True), (5, False)):
        # the plain weight MKL is handed holds no memory: a packed product that fell back to it gives zeros
        assert packed._packs(rows) == runs_packed, rows  # 7 and 6 rows padded up to 8
        a, b = decode(plain, rows), decode(packed, rows)
        assert a.shape == b.shape == (rows, model.config.vocab_size)
        assert (a - b).abs().max().item() < 1e-5, rows
        if runs_packed:  # the layers scripted by TorchScript and the same function as Python
            assert slots._scripted(slots._packed_layers) is not slots._packed_layers  # TorchScript compiled it
            monkeypatch.setattr(slots, "SCRIPTED", False)
            c = decode(packed, rows)
            monkeypatch.setattr(slots, "SCRIPTED", True)
            assert (b - c).abs().max().item() < 1e-5, rows

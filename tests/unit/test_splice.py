"""gym_plugin.protocol.splice_offsets: the one multi-turn splice behind process_rollouts rows and NeMo-RL message
logs. Hand-worked token lists: call k's prompt either starts with call k-1's prompt + generation (offset = their
total length) or it does not (DRIFT)."""

from gym_plugin.protocol import DRIFT, first_difference, splice_offsets


def test_offsets_of_a_three_call_rollout():
    p0, g0 = [1, 2, 3], [4, 5]  # 3 + 2 = 5 tokens seen after call 0
    p1, g1 = [1, 2, 3, 4, 5, 9, 9], [6]  # tool output [9, 9] follows; 7 + 1 = 8 seen after call 1
    p2, g2 = [1, 2, 3, 4, 5, 9, 9, 6, 8], [7, 2]
    calls = [(p0, g0, [-0.1, -0.2]), (p1, g1, [-0.3]), (p2, g2, [-0.4, -0.5])]
    assert splice_offsets(calls) == [0, 5, 8]
    # The splice: prompt_0 + gen_0 + prompt_1[5:] + gen_1 + prompt_2[8:] + gen_2 == last prompt + last generation.
    spliced = p0 + g0 + p1[5:] + g1 + p2[8:] + g2
    assert spliced == p2 + g2 == [1, 2, 3, 4, 5, 9, 9, 6, 8, 7, 2]


def test_drift_where_the_history_was_rewritten():
    # Call 1's prompt dropped the generated 5 (a template that strips reasoning): drift at call 1 only; call 2
    # extends call 1 again (offset = len(p1) + len(g1) = 5 + 1 = 6).
    p0, g0 = [1, 2, 3], [4, 5]
    p1, g1 = [1, 2, 3, 4, 9], [6]
    p2, g2 = [1, 2, 3, 4, 9, 6, 7], [8]
    assert splice_offsets([(p0, g0), (p1, g1), (p2, g2)]) == [0, DRIFT, 6]
    assert first_difference(p1, p0, g0) == 4  # 9 where 5 was
    # A prompt shorter than what came before is drift too, and its first difference is its end.
    assert splice_offsets([(p0, g0), ([1, 2], [7])]) == [0, DRIFT]
    assert first_difference([1, 2], p0, g0) == 2


def test_generation_mismatch_and_trivial_cases():
    # Same prompt prefix but the generation differs (the endpoint re-tokenized its own output): drift.
    assert splice_offsets([([1], [2, 3]), ([1, 2, 4], [5])]) == [0, DRIFT]
    assert splice_offsets([([1, 2], [3])]) == [0]
    assert splice_offsets([]) == []
    # An empty generation: the next prompt only has to extend the previous prompt.
    assert splice_offsets([([1, 2], []), ([1, 2, 3], [4])]) == [0, 2]

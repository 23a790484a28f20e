"""Scheduling by class and by key changes when a sequence runs, never what it generates: greedy
outputs through priority and fair-share preemptions equal transformers' `generate`."""

from tests.unit.test_engine import greedy, make_engine, prompts, run_all


def test_greedy_output_unchanged_by_classes_keys_and_preemptions(hf_model, reference_greedy):
    # 3 slots, keys of weights 2:1, three classes, and preemption as soon as anyone waits
    engine = make_engine(hf_model, max_num_seqs=3, preempt_after_s=0.0, tenant_weights={"a": 2.0, "b": 1.0})
    ps = prompts(hf_model[1], 9, seed=7)
    asks = [(p, ("a", "b", "c")[i % 3], (1, 0, -1)[i // 3 % 3], 12 + 3 * i) for i, p in enumerate(ps)]
    outputs: dict[str, list[int]] = {}
    for i, (p, tenant, priority, n) in enumerate(asks):
        engine.add_request(str(i), p, greedy(n), priority, tenant)
        for out in engine.step():  # each arrives while the others run, so better classes preempt
            outputs.setdefault(out.request_id, []).extend(out.token_ids)
    for rid, tokens in run_all(engine).items():
        outputs.setdefault(rid, []).extend(tokens)
    stats = engine.stats()
    assert stats.preemptions_by_cause["priority"] > 0
    for i, (p, _, _, n) in enumerate(asks):
        assert outputs[str(i)] == reference_greedy(p, n), f"request {i} diverged"
    assert stats.num_waiting == 0 and engine.stats().kv_blocks_used == 0

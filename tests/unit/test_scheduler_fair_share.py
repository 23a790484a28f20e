"""The scheduler's priority classes and per-key fair share, on its own (no model): who is admitted,
who is preempted and why, and who is refused a place in the queue."""

from collections import Counter

from app.engine.block_manager import BlockManager
from app.engine.sampling_params import SamplingParams
from app.engine.scheduler import Scheduler
from app.engine.sequence import Sequence, SequenceStatus


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scheduler(max_num_seqs: int = 4, blocks: int = 1024, prefill: int = 4096, **kwargs) -> Scheduler:
    kwargs.setdefault("clock", Clock())
    return Scheduler(BlockManager(blocks, 16), max_num_seqs, prefill, **kwargs)


def seq(name: str, tenant: str = "", priority: int = 0, tokens: int = 100, prompt: int = 8) -> Sequence:
    return Sequence(name, list(range(1, prompt + 1)), SamplingParams(max_tokens=tokens), None, frozenset(),
                    priority, tenant)


def run_step(s: Scheduler) -> tuple[list[Sequence], int]:
    """One engine step as the engine takes it: every scheduled sequence gets a token; finished ones
    leave. Returns what `schedule` did: (the step's sequences, how many of them, first, it admitted)."""
    seqs, num_prefills = s.schedule()
    for q in seqs:
        q.output_ids.append(7)
        q.num_cached = q.num_tokens
        if len(q.output_ids) >= q.params.max_tokens:
            q.status = SequenceStatus.FINISHED
            s.remove(q)
    return seqs, num_prefills


def step(s: Scheduler) -> list[Sequence]:
    """`run_step`: every sequence the step ran."""
    return run_step(s)[0]


def admitted_in_step(s: Scheduler) -> list[Sequence]:
    """`run_step`: the sequences the step admitted."""
    seqs, num_prefills = run_step(s)
    return seqs[:num_prefills]


def test_a_better_class_is_admitted_first_whatever_its_arrival():
    s = scheduler(max_num_seqs=1)
    for name, priority in [("batch", 5), ("standard", 0), ("interactive", -1), ("batch2", 1)]:
        s.add(seq(name, priority=priority, tokens=3))
    order = []
    while s.has_work():
        for q in step(s):
            if q.request_id not in order:
                order.append(q.request_id)
    assert order == ["interactive", "standard", "batch2", "batch"]  # within a class: by priority


def test_three_keys_share_the_slots_by_weight():
    s = scheduler(max_num_seqs=12, weights={"a": 3, "b": 2, "c": 1})
    for key in "abc":
        for i in range(40):
            s.add(seq(f"{key}{i}", key, tokens=10_000))
    tokens = Counter()
    for _ in range(200):
        for q in step(s):
            tokens[q.tenant] += 1
    assert Counter(q.tenant for q in s.running) == {"a": 6, "b": 4, "c": 2}
    assert tokens["a"] / tokens["c"] == 3 and tokens["b"] / tokens["c"] == 2


def test_equal_keys_alternate_whoever_came_first():
    s = scheduler(max_num_seqs=8)
    for i in range(30):  # a flood of "a" arrives before the first of "b"
        s.add(seq(f"a{i}", "a", tokens=50))
    s.add(seq("b0", "b", tokens=50))
    s.add(seq("b1", "b", tokens=50))
    admitted, _ = s.schedule()
    assert {"b0", "b1"} <= {q.request_id for q in admitted}


def test_a_prefill_step_shares_its_token_budget_among_keys():
    s = scheduler(max_num_seqs=16, prefill=64)
    for i in range(4):
        s.add(seq(f"a{i}", "a", prompt=16))
    s.add(seq("b0", "b", prompt=16))
    admitted, num_prefills = s.schedule()
    assert [q.tenant for q in admitted].count("b") == 1 and len(admitted) == num_prefills == 4


def test_a_better_class_borrows_a_slot_at_once_and_the_batch_shrinks_back():
    s = scheduler(max_num_seqs=8)  # one borrowed slot (8 // 8)
    for i in range(12):
        s.add(seq(f"batch{i}", "x", priority=1, tokens=3 + i))
    step(s)
    s.add(seq("urgent", "y", priority=-1, tokens=20))
    assert [q.request_id for q in admitted_in_step(s)] == ["urgent"], "admitted in the next step, with no wait"
    assert len(s.running) == 9 and s.num_preemptions == 0
    admissions = []
    for _ in range(8):  # "batch" sequences finish one a step from now on, and more of them wait
        running = len(s.running)
        admissions.append((running, len(admitted_in_step(s))))
    assert all(admitted == 0 for running, admitted in admissions if running >= 8), admissions
    assert any(admitted for _, admitted in admissions), f"admitted again once under the cap: {admissions}"


def test_a_waiting_better_class_preempts_a_worse_one_after_the_bound():
    clock = Clock()
    s = scheduler(max_num_seqs=2, clock=clock, preempt_after_s=0.5)
    for i in range(2):
        s.add(seq(f"batch{i}", "x", priority=1, tokens=1_000))
    step(s)
    s.add(seq("urgent0", "y", priority=-1, tokens=8))
    step(s)  # it takes the one borrowed slot
    s.add(seq("urgent", "y", priority=-1, tokens=5))
    step(s)
    assert s.num_preemptions == 0, "it has not waited past the bound yet"
    clock.now = 0.6
    assert [q.request_id for q in admitted_in_step(s)] == ["urgent"]
    # back within the cap (2): the worse class's newest went back, then the next, for the borrowed slot
    assert s.preemptions == {"kv_cache": 0, "priority": 2, "fair_share": 0}
    assert [q.request_id for q in s.queues[2]["x"]] == ["batch0", "batch1"]
    for _ in range(10):
        step(s)
    assert "batch1" in {q.request_id for q in s.running}, "recomputed once the better class left room"


def test_a_key_below_its_share_borrows_a_slot_then_preempts_the_key_over_it_to_its_share_and_no_more():
    clock = Clock()
    s = scheduler(max_num_seqs=4, clock=clock, preempt_after_s=0.1)
    for i in range(20):
        s.add(seq(f"a{i}", "a", tokens=1_000))
    step(s)
    s.add(seq("b0", "b", tokens=1_000))
    s.add(seq("b1", "b", tokens=30))
    assert [q.request_id for q in admitted_in_step(s)] == ["b0"], "b0 borrows the one spare slot at once"
    assert s.num_preemptions == 0
    step(s)
    clock.now = 1.0
    assert [q.request_id for q in admitted_in_step(s)] == ["b1"]
    # back within the cap: "a" gave back the borrowed slot too, so each key has its share
    assert s.preemptions["fair_share"] == 2 and Counter(q.tenant for q in s.running) == {"a": 2, "b": 2}
    clock.now = 100.0  # every waiting "a" has waited long: still no trade back, "a" has its share
    for _ in range(20):
        step(s)
    assert s.num_preemptions == 2


def test_weights_hold_when_the_light_key_filled_the_batch_first():
    """Borrowed slots must not leave the over-share key holding them until its sequences finish."""
    clock = Clock()
    s = scheduler(max_num_seqs=32, clock=clock, weights={"heavy": 3, "light": 1})
    for i in range(40):
        s.add(seq(f"l{i}", "light", tokens=1_000))
    step(s)
    for i in range(40):
        s.add(seq(f"h{i}", "heavy", tokens=1_000))
    for _ in range(60):
        clock.now += 0.03
        step(s)
    assert Counter(q.tenant for q in s.running) == {"heavy": 24, "light": 8}


def test_a_key_at_its_share_waits_for_a_slot_instead_of_preempting():
    clock = Clock()
    s = scheduler(max_num_seqs=4, clock=clock, preempt_after_s=0.0)
    for i in range(2):
        s.add(seq(f"a{i}", "a", tokens=1_000))
        s.add(seq(f"b{i}", "b", tokens=1_000))
    step(s)
    s.add(seq("b2", "b", tokens=1_000))
    clock.now = 10.0
    for _ in range(5):
        step(s)
    assert s.num_preemptions == 0 and "b2" in {q.request_id for q in s.queues[1]["b"]}


def test_a_worse_class_still_progresses_in_the_slots_better_ones_leave():
    s = scheduler(max_num_seqs=4, preempt_after_s=0.0)
    s.add(seq("batch", "x", priority=3, tokens=20))
    done = set()
    for i in range(60):  # interactive requests keep arriving, three at a time at most
        if sum(q.rank == 0 for q in s.running) + s.waiting_by_class[0] < 3:
            s.add(seq(f"i{i}", "y", priority=-1, tokens=4))
        for q in step(s):
            if q.is_finished:
                done.add(q.request_id)
    assert "batch" in done


def test_kv_pressure_preempts_the_worst_class_first():
    s = scheduler(max_num_seqs=4, blocks=6)  # 6 blocks of 16: three 17-token sequences, then one must go
    s.add(seq("batch", "x", priority=1, prompt=16, tokens=40))
    s.add(seq("standard", "x", priority=0, prompt=16, tokens=40))
    s.add(seq("interactive", "x", priority=-1, prompt=16, tokens=40))
    for _ in range(20):
        step(s)
    assert s.preemptions["kv_cache"] >= 1
    assert [q.request_id for q in s.queues[2]["x"]] == ["batch"]


def test_a_flooding_key_fills_its_own_share_of_the_queue_not_everyones():
    s = scheduler(max_num_seqs=2, weights={"a": 1, "b": 1})
    refused = 0
    for i in range(40):
        if s.queue_full("a", 16) is None:
            s.add(seq(f"a{i}", "a"))
        else:
            refused += 1
    assert s.num_waiting == 16 and refused == 24  # alone, "a" may hold the whole queue
    assert s.queue_full("b", 16) is None  # "b" has its share: 8 of 16
    for i in range(8):
        s.add(seq(f"b{i}", "b"))
    assert "share" in s.queue_full("b", 16)
    assert "share" in s.queue_full("a", 16)


def test_the_whole_replica_refuses_past_twice_its_queue():
    s = scheduler(max_num_seqs=1)
    for tenant in "abcdefgh":
        while s.queue_full(tenant, 8) is None:
            s.add(seq("x", tenant))
    assert s.num_waiting == 16 and s.queue_full("z", 8) == "The model's queue is full; retry shortly."


def test_a_key_asking_above_its_class_is_capped_and_the_call_says_which_ran():
    from app.limits import Call

    for max_class, asked, ran in [("interactive", -3, (-3, "interactive")), ("standard", -3, (0, "standard")),
                                  ("batch", -3, (1, "batch")), ("batch", 0, (1, "batch")),
                                  ("standard", 5, (5, "batch")), ("interactive", 0, (0, "standard"))]:
        call = Call(tenant="k", max_class=max_class)
        priority, tenant = call.scheduling(asked)
        assert (priority, call.ran_class) == ran and tenant == "k"


def test_key_policies_in_the_config():
    import pytest

    from app.config import ConfigError, parse_app_config

    models = [{"name": "m", "source": "x"}]
    config = parse_app_config({"models": models, "auth": {"keys": [
        {"key_id": "0123456789ab", "max_class": "interactive", "weight": 3}]}})
    assert config.models[0].engine.tenant_weights == {"0123456789ab": 3.0}
    assert config.auth.policy("0123456789ab").max_class == "interactive"
    assert (config.auth.policy("ffffffffffff").max_class, config.auth.policy("anonymous").weight) == ("standard", 1.0)
    for bad in [{"key_id": "sk-secret", "weight": 1}, {"key_id": "0123456789ab", "weight": 0},
                {"key_id": "0123456789ab", "max_class": "urgent"}]:
        with pytest.raises(ConfigError, match=r"args\.auth\.keys\[0\]"):
            parse_app_config({"models": models, "auth": {"keys": [bad]}})

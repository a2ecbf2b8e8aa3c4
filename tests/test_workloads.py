"""The fleet benchmark's repeated-request workloads (small literal cases)."""
import pytest

from aded_ray.bench.rollouts import repeat_rounds


def test_repeat_rounds_issue_every_request_once_per_round_and_route_repeats_at_random():
    traces = [{"id": f"p{i}", "output_ids": [i]} for i in range(8)]
    out = repeat_rounds(traces, rounds=3, seed=0)
    assert len(out) == 24
    for r in range(3):
        got = out[8 * r:8 * (r + 1)]
        assert sorted(t["id"] for t in got) == sorted(f"p{i}#r{r}" for i in range(8))    # each once per round
        assert all(t["output_ids"] == [int(t["id"][1])] for t in got)                   # the same trace, copied
    assert traces[0] == {"id": "p0", "output_ids": [0]}                                  # inputs untouched
    # dealt round-robin to 4 replicas (the benchmark's rule): 2 requests each per round, and a request's
    # repeats do not all go back to the replica that served it first
    deal = [out[i::4] for i in range(4)]
    assert all(sum(t["id"].endswith(f"#r{r}") for t in d) == 2 for d in deal for r in range(3))
    replica = {t["id"]: i for i, d in enumerate(deal) for t in d}
    moved = sum(len({replica[f"p{i}#r{r}"] for r in range(3)}) > 1 for i in range(8))
    assert moved >= 6
    assert repeat_rounds(traces, 3, seed=0) == out and repeat_rounds(traces, 3, seed=1) != out   # seeded
    with pytest.raises(ValueError, match="rounds = 0"):
        repeat_rounds(traces, 0)


def test_the_late_replicas_first_half_is_served_by_the_others_before_it_joins():
    from aded_ray.bench.fleet import late_deals

    deal = [[f"r{i}q{k}" for k in range(6)] for i in range(4)]
    out = late_deals(deal, 3)
    assert out[-1] == ["r3q3", "r3q4", "r3q5"]                              # the late replica: its second half
    assert sorted(sum(out, [])) == sorted(sum(deal, []))                    # every request served once
    assert out[0] == ["r0q0", "r3q0", "r0q1", "r0q2", "r0q3", "r0q4", "r0q5"]   # right after the same slot
    assert out[1] == ["r1q0", "r1q1", "r3q1", "r1q2", "r1q3", "r1q4", "r1q5"]
    assert out[2] == ["r2q0", "r2q1", "r2q2", "r3q2", "r2q3", "r2q4", "r2q5"]
    assert late_deals([["a", "b"]], 1) == [["b"]]
    # an uneven deal: the late replica's requests beyond a shorter replica's own go to it all the same
    uneven = late_deals([["a0"], ["b0", "b1", "b2"], ["c0", "c1", "c2", "c3"]], 3)
    assert uneven == [["a0", "c0", "c2"], ["b0", "b1", "c1", "b2"], ["c3"]]


def test_bench_store_refuses_rounds_without_the_repeats_workload(tmp_path):
    from aded_ray.cli import main

    with pytest.raises(SystemExit, match="--rounds 3 applies to --workload repeats only"):
        main(["bench-store", "--traces", str(tmp_path / "t.jsonl"), "--rounds", "3"])
    with pytest.raises(SystemExit, match="--rounds 2 applies"):
        main(["bench-store", "--workload", "tasks", "--rounds", "2"])


def test_fleet_e2e_refuses_rounds_without_the_repeats_workload():
    from aded_ray.bench.fleet_e2e import main

    with pytest.raises(SystemExit, match="--rounds 3 applies to --workload repeats only"):
        main(["--rounds", "3"])                              # rollouts, the default workload: no rounds


def test_the_tasks_workload_deals_a_functions_templates_to_different_replicas():
    from aded_ray.bench.rollouts import TASK_INPUTS, TEMPLATES, task_prompts

    tasks = task_prompts(TASK_INPUTS)
    assert len(tasks) == len(TEMPLATES) * TASK_INPUTS >= 80          # >= 10 requests for the late replica
    deal = [tasks[i::4] for i in range(4)]                             # bench-store's round robin
    replicas = {}
    for r, d in enumerate(deal):
        for t in d:
            replicas.setdefault(t["id"].split("-", 1)[1], set()).add(r)
    assert len(replicas) == TASK_INPUTS and all(len(v) == len(TEMPLATES) for v in replicas.values())


def test_a_tasks_file_of_another_size_is_stale(tmp_path):
    import json

    from aded_ray.bench.rollouts import TASK_INPUTS, stale_tasks, task_prompts

    f = tmp_path / "tasks.jsonl"
    for k, stale in [(8, True), (TASK_INPUTS, False), (TASK_INPUTS + 1, True)]:
        f.write_text("".join(json.dumps({"id": t["id"], "output_ids": [1]}) + "\n" for t in task_prompts(k)))
        assert stale_tasks(f) is stale, k


def test_fleet_e2e_tasks_keep_every_template_of_the_first_functions_in_recorded_order():
    from aded_ray.bench.fleet_e2e import task_requests

    traces = [{"id": f"task{t}-HumanEval/{f}", "prompt_ids": [t, f]} for t in range(3) for f in range(6)]
    got = task_requests(traces, 5)
    assert [r["id"] for r in got] == [f"task{t}-HumanEval/{f}" for t in range(3) for f in range(5)]
    assert [r["prompt_ids"] for r in got[:2]] == [[0, 0], [0, 1]] and got[-1]["seed"] == 1014
    deal = [got[i::4] for i in range(4)]                        # fleet_jobs' round robin: 3 replicas per function
    for f in range(5):
        assert sum(any(r["id"].endswith(f"/{f}") for r in d) for d in deal) == 3

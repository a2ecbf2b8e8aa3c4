"""The end-to-end fleet benchmark's deal (no model): requests round robin, one store namespace per fleet."""
from aded_ray.bench.fleet_e2e import fleet_jobs


def test_every_process_of_a_fleet_shares_one_namespace_and_the_requests_are_dealt_round_robin():
    reqs = [{"id": i} for i in range(10)]
    jobs = fleet_jobs(reqs, "store.tri", "redis://x", "/tmp/ready", 4, 96, 1, 0.8)
    assert len(jobs) == 4 and len({j[3] for j in jobs}) == 1          # one fleet, one namespace
    assert [[r["id"] for r in j[1]] for j in jobs] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert all(j[9] is True for j in jobs)                              # speculating unless told not to
    assert all(j[9] is False for j in fleet_jobs(reqs, "s", None, "/tmp/r", 4, 96, 1, 0.0, speculate=False))

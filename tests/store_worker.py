"""One OS process of the shared-store convergence test: applies its delta set, then reports its state.

argv: store file, Redis URL, number of workers, JSON list of token sequences, output file.
"""
import json
import sys
import time

import numpy as np
import redis

from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.store.redis_store import SharedStore


def main():
    store, url, n_workers, seqs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    m = TrigramMatrix.load(store)
    s = SharedStore(m, url, flush_interval_s=0.02, pull_interval_s=0.02, batch_max=50)
    for seq in seqs:                          # the adaptive update: local bumps + outbox
        m.update(seq)
    r = redis.Redis.from_url(url)
    if seqs:
        while s._outbox:
            time.sleep(0.01)
        s.flush()
        r.incr("test:done")
    deadline = time.time() + 30
    while int(r.get("test:done") or 0) < n_workers and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)                           # let the background thread read the log to its end
    s.pull()
    s.drain()
    k, t, c = m.deltas()
    s.close()
    order = np.lexsort((t, k))
    with open(out, "w") as fh:
        json.dump({"keys": k[order].tolist(), "toks": t[order].tolist(), "counts": c[order].tolist(),
                   "stats": s.stats}, fh)


if __name__ == "__main__":
    main()

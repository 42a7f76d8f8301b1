"""The five stages of one INPO iteration, each with its sharding across processes.

Each module has ``work(ctx, ..., folder)`` — what every rank does with its share, writing
``*.rankNNN.*`` files into the stage's ``.partial`` folder — and ``merge(ctx, ..., folder)`` —
what rank 0 does after the barrier: put the shards together in index order and return the
stage's summary (it goes into the manifest). What a stage writes does not depend on how many
processes computed it.

* :mod:`.generate` — K samples a prompt from π_t (prompts sharded; a seed per prompt and sample)
* :mod:`.annotate` — the oracle and the selection rule → ``pairs.jsonl`` (samples sharded)
* :mod:`.logps` — ``log π_ref`` and ``log π_t`` of every pair (pairs sharded)
* :mod:`.train` — the loss from π_t's weights → π_{t+1} (DDP / FSDP through accelerate)
* :mod:`.evaluate` — metrics of π_{t+1} (held-out prompts sharded)
"""

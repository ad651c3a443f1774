"""What the instances behind one nginx share (SPEC §8, §9): rate-limit counters,
concurrency leases, later jobs and idempotency keys. In-process by default
(`memory`), Redis when `REDIS_URL` is set (`redis`, imported only then)."""

"""Helpers shared by the unit and integration tests, one module per thing they help with.

- `waiting`: poll for an observable condition (never a fixed sleep);
- `namespace`: one test's isolated topics, consumer groups and Redis keys, and their removal;
- `kafka`: raw records in and out of the broker, committed offsets, drained groups;
- `processes`: the real CLI as a subprocess (workers, engines, dashboards), a free port;
- `stages`: stage functions driven by hand with known scores, a stage's agent in-process;
- `catalog`: revisions recorded and promoted through the real catalog writer;
- `adapters`: random non-zero PEFT adapters, and one stored as a policy's revision;
- `serving`: count (or refuse) a serving client's /generate calls.

Fixtures live in the conftest.py files (pytest finds them there): `tiny_model_dir` in
tests/conftest.py; `settings`, `run`, `catalog` and `redis_client` in tests/integration/conftest.py.
"""

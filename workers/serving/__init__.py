"""Serving: SGLang-API engines that follow the Redis hot working set.

`client` speaks SGLang's HTTP API; `server` is the CPU engine serving that same API (over
`sampler` and the preallocated adapter `slots`); `residency` moves adapters through an explicit
state machine to follow each engine's assignment in Redis; `router` sends a policy's requests to
an engine that holds its serving revision.
"""

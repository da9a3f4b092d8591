"""The OpenAI-compatible front door: policies by name, feedback back into training.

`app.py` (aiohttp routes and the request path), `apikeys.py` (namespace keys, hashed at rest),
`answers.py` (what was answered, for feedback; the `served` log), `upstream.py` (calling an
engine's OpenAI routes, streamed or not, the same for SGLang and the CPU engine).
"""

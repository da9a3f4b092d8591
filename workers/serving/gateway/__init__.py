"""The OpenAI-compatible front door: policies by name, feedback back into training.

`app.py` (aiohttp routes and the request path), `apikeys.py` (namespace keys, hashed at rest),
`answers.py` (what was answered, for feedback), `resolve.py` (model names), `outcome.py` (what
an answer amounted to); engines are called through `AsyncSGLangClient`, the same code for
SGLang and the CPU engine.
"""

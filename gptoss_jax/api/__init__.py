"""`gptoss-jax serve`: an OpenAI-compatible HTTP server on top of the serving engine.

- `protocol.py`: request bodies validated at the edge, and the API's error (OpenAI's shape);
- `constraints.py`: constrained decoding with llguidance (grammars over harmony tokens, a per-step mask);
- `harmony_io.py`: OpenAI requests -> the conversation to continue, through `gptoss_jax.harmony` (the one
  mapping to harmony and the one output parser, shared with fine-tuning and the chat CLI);
- `backend.py`: the generation interface the server is written against, and its adapter to the model;
- `run.py`: a request's choices on the backend (sampling settings, masks, the test hook);
- `chat.py`, `responses.py`, `completions.py`: the three APIs, streamed (SSE) and not;
- `app.py`: the FastAPI app (routes, errors, API key, body limit, logging, metrics, disconnects);
- `cli.py`: `add_serve_arguments` / `run_serve`, the `serve` subcommand.

docs/serving.md lists every supported and unsupported request field.
"""

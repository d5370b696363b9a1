"""`moe serve`: an OpenAI-compatible HTTP server over the expert cache, with continuous batching.

    protocol.py   OpenAI request schemas, their checks, error and response bodies
    text.py       text <-> token ids (tokenizer.json, or UTF-8 bytes for byte-level models)
    chat.py       the checkpoint's chat template and EOS ids (core.hf.chat), a default for byte-level runs
    scheduler.py  the thread that owns the model (a core.generation.DecodeBatch): admission, steps, cancels
    metrics.py    counters, the expert cache's figures, the Prometheus text page
    app.py        FastAPI endpoints, SSE streaming, API key, errors
    server.py     model -> engine -> scheduler -> uvicorn; graceful shutdown
    cli.py        `moe serve` arguments (registered with the `moe` command)

Importing this package imports nothing heavy; FastAPI and uvicorn load with server.py / app.py.
"""

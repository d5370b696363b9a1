"""`moe serve`: an OpenAI-compatible HTTP server over the expert cache, with continuous batching.

    protocol.py   OpenAI request schemas, their checks, error and response bodies
    text.py       tokenizer, incremental detokenization, stop strings
    chat.py       chat template and stop tokens from the checkpoint's tokenizer_config.json
    backend.py    what the scheduler needs from a generation engine; cache statistics
    scheduler.py  the thread that owns the model: admission, batched decode steps, cancellation
    metrics.py    counters and the Prometheus text page
    app.py        FastAPI endpoints, SSE streaming, API key, errors
    server.py     model -> engine -> scheduler -> uvicorn; graceful shutdown
    cli.py        `moe serve` arguments (registered with the `moe` command)

Importing this package imports nothing heavy; FastAPI and uvicorn load with server.py / app.py.
"""

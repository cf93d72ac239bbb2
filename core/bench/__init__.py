"""``python -m core.bench``: an evalscope-style benchmark client for any OpenAI-compatible server.

It sweeps concurrency levels (``--parallel 1 2 4 --number 4 8 16``), streams every request, and
reports per level RPS, latency, generated tokens/s, TTFT, TPOT, ITL and the success rate, as a
table, ``summary.json``, ``requests.jsonl`` and ``plot.png``. Only the standard library, httpx,
orjson, numpy, Pillow, tokenizers (for ``--tokenizer``), tqdm and matplotlib; nothing of
Tessera's engine, so it measures Tessera and its peers alike.

Modules: ``datasets`` (prompts), ``client`` (HTTP/SSE), ``metrics`` (definitions), ``report``
(table, JSON, plot), ``__main__`` (command line).
"""

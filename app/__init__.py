"""The web service: a FastAPI app over one checkpoint and, optionally, one index (`clipforge serve`).

Layout: settings -> main.create_app -> one router per resource; routes take what they use
through the `...Dep` aliases of dependencies. lifespan starts and stops the service;
model_worker is the one thread that runs the model and the index writes, and batching (the
micro-batcher), encoders (cached encodes) and index_search run on it; openapi shapes the
schema clients are generated from. errors, middleware, metrics and logs are cross-cutting.
Never imports training.
"""
